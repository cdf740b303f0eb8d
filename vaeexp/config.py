"""Config schema: every setting a user can type, its type, and what values are allowed.

Hydra's ConfigStore holds the dataclasses below, so type errors and unknown keys are caught while
composing; `validate` adds the range checks a type cannot express. Both report one line that names
the key and what is allowed, before any data is loaded or any MLflow run is created.
"""

from __future__ import annotations

import difflib
import math
import os
import re
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

PROJECT_ROOT = Path(__file__).resolve().parents[1]


class ConfigError(ValueError):
    """A setting the user can fix; the message is one line naming the key."""


class Optimizer(Enum):
    rmsprop = "rmsprop"  # Keras's rule: eps inside the square root, as the reference
    adam = "adam"


class ObjectiveScale(Enum):
    """The scale of the loss the optimiser sees; metrics are in nats per image either way."""

    per_pixel = "per_pixel"  # the reference (Keras): BCE averaged over the pixels + KL / 784
    per_image = "per_image"  # nats per image: BCE summed over pixels + KL (784x the above)


class Device(Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"
    mps = "mps"


class Init(Enum):
    glorot = "glorot"  # Keras default: Glorot-uniform weights, zero biases
    torch = "torch"  # torch.nn.Linear's own default


class Precision(Enum):
    fp32 = "fp32"
    bf16 = "bf16"  # autocast: matmuls in bfloat16, losses and optimizer state in float32


class FilmPrecision(Enum):
    auto = "auto"  # bf16 where the CPU computes it natively (7x faster here), else fp32
    fp32 = "fp32"
    bf16 = "bf16"


class DatasetName(Enum):
    mnist = "mnist"
    fashion_mnist = "fashion_mnist"
    kmnist = "kmnist"
    mnist_bundled = "mnist_bundled"


class Binarize(Enum):
    none = "none"
    static = "static"
    dynamic = "dynamic"


def runs_dir() -> Path:
    """All outputs of the project land here, whatever the working folder."""
    return Path(os.environ.get("VAEEXP_RUNS") or PROJECT_ROOT / "runs").resolve()


def default_tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{runs_dir() / 'mlflow.db'}"


def default_data_root() -> str:
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return os.environ.get("VAEEXP_DATA") or str(Path(cache) / "vaeexp" / "data")


@dataclass
class DataConfig:
    name: DatasetName = DatasetName.mnist
    root: str = "${vaeexp.data_root:}"
    mirrors: list[str] = field(default_factory=list)
    system_dirs: list[str] = field(default_factory=list)
    download: bool = True
    fallback: bool = True
    binarize: Binarize = Binarize.none
    train_limit: int | None = None
    test_limit: int | None = None


@dataclass
class TrackingConfig:
    uri: str = "${vaeexp.tracking_uri:}"
    experiment: str = "vaeexp"
    # Only used when the experiment is created on a local store; a server picks its own.
    artifact_location: str | None = "${paths.runs}/mlartifacts"
    run_name: str | None = None
    parent_run_id: str | None = "${vaeexp.sweep_parent:}"  # a sweep's parent run; see sweep.py
    log_model: bool = True
    log_images: bool = True


@dataclass
class EvalConfig:
    """End-of-run importance-weighted bound on the test NLL (logged as test_nll_iwae_k{k})."""

    iwae_k: int = 1000
    iwae_images: int | None = 1000  # the first N test images; null: all of them; 0: skip


@dataclass
class FilmConfig:
    """The latent film: latent means of fixed test images, filmed on a dense-early schedule."""

    enabled: bool = True
    points: int | None = None  # null: every test image, as the reference; N: stratified subsample
    every_step_until: int | None = 10  # a frame at every step up to here; null: every step
    every_n_steps: int = 25  # then one every N steps ...
    until_epoch: int = 1  # ... to the end of this epoch; later, one at each epoch's end
    limits: str = "10"  # axes from -L to L (the reference's 10), or auto: fitted over all frames
    fps: int = 10
    stride: int = 1  # the GIF / MP4 shows every stride-th frame
    mp4: bool = False
    decoder: bool = True  # latent_dim 2: the decoded 20x20 grid, one frame per epoch
    knn_k: int = 5
    precision: FilmPrecision = FilmPrecision.auto


@dataclass
class PathsConfig:
    runs: str = "${vaeexp.runs_dir:}"


@dataclass
class Config:
    latent_dim: int = 2
    intermediate_dim: int = 256
    batch_size: int = 100
    epsilon_std: float = 1.0
    epochs: int = 50
    optimizer: Optimizer = Optimizer.rmsprop
    lr: float = 1e-3
    rho: float = 0.9
    eps: float = 1e-7
    objective_scale: ObjectiveScale = ObjectiveScale.per_pixel
    init: Init = Init.glorot
    seed: int = 0
    device: Device = Device.auto
    threads: int = 0
    flush_denormal: bool = True
    grad_clip: float | None = None
    compile: bool = False
    precision: Precision = Precision.fp32
    log_every_n_steps: int = 50
    eval_batch_size: int = 1000
    progress: bool = True
    checkpoint: bool = True
    resume: str | None = None
    dry_run: bool = False
    data: DataConfig = field(default_factory=DataConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    film: FilmConfig = field(default_factory=FilmConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)


def register() -> None:
    """Make the schema and our resolvers known to Hydra; safe to call more than once."""
    ConfigStore.instance().store(name="config_schema", node=Config)
    for name, fn in {
        "vaeexp.runs_dir": lambda: str(runs_dir()),
        "vaeexp.tracking_uri": default_tracking_uri,
        "vaeexp.data_root": default_data_root,
        "vaeexp.sweep_parent": _sweep_parent,
    }.items():
        OmegaConf.register_new_resolver(name, fn, replace=True)


def _sweep_parent() -> str | None:
    from vaeexp.sweep import parent_run_id

    return parent_run_id()


def limits_ok(value: str) -> bool:
    """film.limits (and `python -m vaeexp.film --limits`): auto, or a half-width L > 0."""
    if value == "auto":
        return True
    try:
        return math.isfinite(float(value)) and float(value) > 0
    except ValueError:
        return False


# (key, test, what is allowed) for the checks a type cannot express.
_RULES: list[tuple[str, object, str]] = [
    ("latent_dim", lambda v: v >= 1, "an integer >= 1"),
    ("intermediate_dim", lambda v: v >= 1, "an integer >= 1"),
    ("batch_size", lambda v: v >= 1, "an integer >= 1"),
    ("epochs", lambda v: v >= 1, "an integer >= 1"),
    ("epsilon_std", lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0"),
    ("lr", lambda v: math.isfinite(v) and v > 0, "a finite number > 0"),
    ("rho", lambda v: 0 <= v < 1, "a number in [0, 1)"),
    ("eps", lambda v: math.isfinite(v) and v > 0, "a finite number > 0"),
    ("seed", lambda v: 0 <= v < 2**63, "an integer >= 0"),
    ("threads", lambda v: v >= 0, "an integer >= 0 (0: torch's default)"),
    ("grad_clip", lambda v: v is None or (math.isfinite(v) and v > 0), "null or a number > 0"),
    ("log_every_n_steps", lambda v: v >= 1, "an integer >= 1"),
    ("eval_batch_size", lambda v: v >= 1, "an integer >= 1"),
    ("data.train_limit", lambda v: v is None or v >= 1, "null or an integer >= 1"),
    ("data.test_limit", lambda v: v is None or v >= 1, "null or an integer >= 1"),
    ("eval.iwae_k", lambda v: v >= 1, "an integer >= 1"),
    ("eval.iwae_images", lambda v: v is None or v >= 0, "null (all) or an integer >= 0 (0: skip)"),
    ("film.points", lambda v: v is None or v >= 10, "null (all test images) or an integer >= 10"),
    ("film.every_step_until", lambda v: v is None or v >= 0, "null (every step) or an int >= 0"),
    ("film.every_n_steps", lambda v: v >= 1, "an integer >= 1"),
    ("film.until_epoch", lambda v: v >= 0, "an integer >= 0"),
    ("film.limits", limits_ok, "auto or a number L > 0 (axes from -L to L)"),
    ("film.fps", lambda v: 1 <= v <= 100, "an integer from 1 to 100"),
    ("film.stride", lambda v: v >= 1, "an integer >= 1"),
    ("film.knn_k", lambda v: v >= 1, "an integer >= 1"),
    ("tracking.experiment", lambda v: bool(v.strip()), "a non-empty name"),
    ("tracking.uri", lambda v: bool(v.strip()), "a tracking URI such as sqlite:///path/mlflow.db"),
]


def validate(cfg: DictConfig) -> None:
    """Refuse values no run can use; raises ConfigError with a one-line message."""
    for key, ok, allowed in _RULES:
        value = OmegaConf.select(cfg, key)
        if not ok(value):
            raise ConfigError(f"{key}={value} is not allowed: must be {allowed}")
    if cfg.data.name != DatasetName.mnist_bundled and cfg.data.download and not cfg.data.mirrors:
        raise ConfigError("data.mirrors is empty: list at least one mirror, or data.download=false")
    if cfg.resume is not None and not (
        cfg.resume == "auto"
        or Path(cfg.resume).exists()
        or re.fullmatch(r"[0-9a-f]{32}", cfg.resume)
    ):
        raise ConfigError(
            f"resume={cfg.resume} is not allowed: must be auto, a run folder, a checkpoint file "
            "or an MLflow run id"
        )
    import torch  # late: keeps `--help` and config errors fast

    if cfg.device == Device.cuda and not torch.cuda.is_available():
        raise ConfigError("device=cuda is not available on this machine; allowed here: auto, cpu")
    if cfg.device == Device.mps and not torch.backends.mps.is_available():
        raise ConfigError("device=mps is not available on this machine; allowed here: auto, cpu")


def explain(exc: BaseException) -> str:
    """One line for a Hydra/OmegaConf composition error, naming the key and what is allowed."""
    from hydra.errors import MissingConfigException, OverrideParseException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

    if isinstance(exc, ConfigError):
        return str(exc)
    if isinstance(exc, MissingConfigException) and exc.missing_cfg_file and exc.options:
        group, _, choice = exc.missing_cfg_file.rpartition("/")
        return f"{group}={choice} is not a known choice; allowed: {', '.join(exc.options)}"
    if isinstance(exc, OverrideParseException):
        return f"cannot parse override '{exc.override}': {_first_line(exc.message)}"
    cause = exc.__cause__ if isinstance(exc.__cause__, OmegaConfBaseException) else exc
    key = getattr(cause, "full_key", None)
    if isinstance(cause, ConfigKeyError | ConfigAttributeError) and key:
        known = _all_keys(OmegaConf.structured(Config))
        close = difflib.get_close_matches(key, known, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        return f"unknown setting '{key}'{hint}; `python -m vaeexp --cfg job` lists them all"
    msg = _first_line(getattr(cause, "msg", None) or str(cause))
    if key:
        m = re.match(r"Value '(.*)' of type '\w+' could not be converted to (\w+)", msg)
        if m:
            kind = {"Float": "a number", "Integer": "an integer", "Boolean": "true or false"}
            return f"{key}={m.group(1)} is not allowed: must be {kind.get(m.group(2), m.group(2))}"
        m = re.match(r"Invalid value '(.*)', expected one of \[(.*)\]", msg)
        if m:
            return f"{key}={m.group(1)} is not allowed: must be one of {m.group(2)}"
        m = re.match(r"Value '(.*)' is not a valid bool", msg)
        if m:
            return f"{key}={m.group(1)} is not allowed: must be true or false"
        return f"{key}: {msg}"
    return _first_line(str(exc))


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), text)


def _all_keys(node: DictConfig, prefix: str = "") -> list[str]:
    keys = []
    for k in node:
        full = f"{prefix}{k}"
        keys.append(full)
        child = node._get_node(k)
        if isinstance(child, DictConfig):
            keys += _all_keys(child, f"{full}.")
    return keys
