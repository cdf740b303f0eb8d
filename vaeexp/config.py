"""Config schema: every setting a user can type, its type, its one default, and what identifies
a run.

Hydra's ConfigStore holds the dataclasses below, so type errors and unknown keys are caught while
composing (`vaeexp.validate` adds the range checks a type cannot express). The defaults live here
only: `conf/` picks group options and presets, and never restates a default. Code past the entry
point reads a typed `Config` (`settings`), not a DictConfig.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any, overload

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from vaeexp.paths import default_data_root, default_tracking_uri, parent_run_id, runs_dir
from vaeexp.paths import sweep_folder as _sweep_folder

RUN_ID = re.compile(r"[0-9a-f]{32}")  # an MLflow run id
# Settings that say where or how a job runs, not what it trains: left out of a run's identity.
WHERE_OR_HOW = (
    "hydra",
    "tracking",
    "iwae",
    "paths",
    "resume",
    "checkpoint",
    "data.root",
    "dry_run",
    "runtime.device",
    "runtime.threads",
    "runtime.cuda_graph",
    "runtime.progress",
)


class Optimizer(Enum):
    rmsprop = "rmsprop"  # Keras's rule, as the reference (vaeexp.optim)
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
    auto = "auto"  # bf16 where the CPU computes it natively, else fp32 (emulated bf16 is slower)
    fp32 = "fp32"
    bf16 = "bf16"


class Binarize(Enum):
    none = "none"  # grey pixels as Bernoulli targets, as the reference
    static = "static"  # thresholded once
    dynamic = "dynamic"  # resampled every batch


@dataclass
class DataConfig:
    """A dataset, defined once in its file of the data group (`conf/data/<name>.yaml`)."""

    name: str = MISSING  # the data group's option: data=mnist, data=fashion_mnist, ...
    # The dataset class: one of torchvision's MNIST family (its mirrors, MD5 sums and reader),
    # or a class with their constructor (root, train) and `data`, `targets`, `classes`.
    _target_: str = MISSING
    root: str = "${vaeexp.data_root:}"  # download cache; VAEEXP_DATA overrides
    mirrors: list[str] | None = None  # null: the dataset class's own mirrors
    system_dirs: list[str] = field(default_factory=list)  # read-only copies, e.g. Debian's
    download: bool = True
    fallback: str | None = None  # the data config trained on, loudly, when this one cannot be had
    binarize: Binarize = Binarize.none
    train_limit: int | None = None  # a fixed subset, for quick runs
    test_limit: int | None = None


@dataclass
class TrackingConfig:
    uri: str = "${vaeexp.tracking_uri:}"  # MLFLOW_TRACKING_URI, else SQLite under runs/
    experiment: str = "vaeexp"
    # Only used when the experiment is created on a local store; a server picks its own.
    artifact_location: str | None = "${paths.runs}/mlartifacts"
    run_name: str | None = None  # null: named from the overrides
    parent_run_id: str | None = "${vaeexp.sweep_parent:}"  # a sweep's parent run; see sweep.py
    log_model: bool = True
    log_images: bool = True
    # MLflow's system metrics (CPU, memory, disk, network; GPU utilisation and memory through
    # nvidia-ml-py), logged beside the run's own: is the GPU busy?
    system_metrics: bool = True


@dataclass
class IwaeConfig:
    """End-of-run importance-weighted bound on the test NLL (logged as test_nll_iwae_k{k})."""

    k: int = 1000  # importance samples
    images: int | None = 1000  # the first N test images; null: all of them; 0: skip


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
    knn_k: int = 5  # neighbours for the per-frame kNN accuracy


@dataclass
class RuntimeConfig:
    """The machine's knobs: how fast and where a run trains, set once for a machine rather than
    compared. device, threads, cuda_graph and progress are left out of a run's identity
    (WHERE_OR_HOW); the others change the numbers a little, so they stay in it."""

    device: Device = Device.auto
    threads: int = 0  # torch intra-op threads; 0: automatic
    flush_denormal: bool = True  # CPU: subnormal floats as 0 (each costs a microcode assist)
    compile: bool = False  # torch.compile the loss step
    # CUDA: capture the training step as a CUDA graph and replay it (vaeexp.trainer.CapturedStep)
    cuda_graph: bool = True
    precision: Precision = Precision.fp32  # bf16: autocast of the training step
    film_precision: FilmPrecision = FilmPrecision.auto  # the film frame's encoder pass
    progress: bool = True  # a progress bar


@dataclass
class PathsConfig:
    runs: str = "${vaeexp.runs_dir:}"  # VAEEXP_RUNS overrides


@dataclass
class Config:
    latent_dim: int = 2
    intermediate_dim: int = 256
    batch_size: int = 100
    epsilon_std: float = 1.0  # std of the reparameterisation noise; 1 is the ELBO
    epochs: int = 50
    optimizer: Optimizer = Optimizer.rmsprop
    lr: float = 1e-3
    rho: float = 0.9  # RMSprop decay
    eps: float = 1e-7  # where Keras puts it: vaeexp.optim
    # The loss the optimiser minimises (vaeexp.step.objective_weight says why it matters).
    objective_scale: ObjectiveScale = ObjectiveScale.per_pixel
    # beta: the KL term's weight in the optimised objective (beta-VAE); 1 optimises the ELBO.
    # Metrics stay the unweighted terms, so runs of different weights compare.
    kl_weight: float = 1.0
    kl_warmup_epochs: int = 0  # the weight rises linearly from 0 over these epochs, step by step
    init: Init = Init.glorot
    seed: int = 0
    grad_clip: float | None = None  # global norm of the optimised objective's gradients
    log_every_n_steps: int = 50
    test_batch_size: int = 1000  # the per-epoch test-set losses
    checkpoint: bool = True
    resume: str | None = None  # auto, a run folder, a checkpoint file or an MLflow run id
    dry_run: bool = False  # validate and list the job(s) without loading data or training
    data: DataConfig = field(default_factory=DataConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    iwae: IwaeConfig = field(default_factory=IwaeConfig)
    film: FilmConfig = field(default_factory=FilmConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)


def register() -> None:
    """Make the schema and our resolvers known to Hydra; safe to call more than once."""
    ConfigStore.instance().store(name="config_schema", node=Config)
    for name, fn in {
        "vaeexp.runs_dir": lambda: str(runs_dir()),
        "vaeexp.tracking_uri": default_tracking_uri,
        "vaeexp.data_root": default_data_root,
        "vaeexp.sweep_parent": lambda: parent_run_id(_sweep_folder()),
    }.items():
        OmegaConf.register_new_resolver(name, fn, replace=True)


def settings(cfg: DictConfig | Config) -> Config:
    """The typed config (enums and all) that the code past the entry point reads."""
    if isinstance(cfg, Config):
        return cfg
    if OmegaConf.get_type(cfg) is not Config:  # e.g. a masked copy, as Hydra's callers make
        cfg = OmegaConf.merge(OmegaConf.structured(Config), cfg)
    return OmegaConf.to_object(cfg)  # type: ignore[return-value]


def plain(cfg: Config) -> dict[str, Any]:
    """The config as plain values (enums as their names), as checkpoints store it."""
    return asdict(cfg, dict_factory=lambda items: {k: getattr(v, "value", v) for k, v in items})


@overload
def identity(of: dict[str, Any], *, epochs: bool = True) -> dict[str, Any]: ...
@overload
def identity(of: Sequence[str], *, epochs: bool = True) -> list[tuple[str, str]]: ...
def identity(of, *, epochs=True):
    """What a run trains, the one test of "the same run": a config (as `plain` gives it) less
    the settings of where or how it runs (WHERE_OR_HOW), or, of a list of `key=value`
    overrides, the `(key, value)` pairs that change what is trained, in order. It names runs,
    matches a checkpoint to continue and a sweep to resume, and gives the report its columns.

    `epochs=False` leaves out how long to train: `resume=auto` continues a shorter run of the
    same settings. A sweep's jobs keep it, since a sweep may vary it and each job continues its
    own run."""
    left_out = WHERE_OR_HOW if epochs else (*WHERE_OR_HOW, "epochs")
    if isinstance(of, dict):
        return without(of, left_out)
    pairs = [o.lstrip("+~").split("=", 1) for o in of if "=" in o]
    return [(k, v) for k, v in pairs if not _left_out(k, left_out)]


def _left_out(key: str, left_out: tuple[str, ...]) -> bool:
    """A dotted key under one of `left_out`, or a group of Hydra's own (`hydra/launcher=...`)."""
    return key.startswith("hydra/") or any(key == x or key.startswith(f"{x}.") for x in left_out)


def run_name(overrides: Sequence[str], sep: str = ",") -> str:
    """A run's name: the overrides that change what it trains (`latent_dim=8,epochs=10`)."""
    return sep.join(f"{k}={v}" for k, v in identity(overrides)) or "defaults"


def without(tree: dict[str, Any], keys: tuple[str, ...], prefix: str = "") -> dict[str, Any]:
    """`tree` less the dotted `keys`."""
    out = {}
    for k, v in tree.items():
        full = f"{prefix}{k}"
        if full in keys:
            continue
        out[k] = without(v, keys, f"{full}.") if isinstance(v, dict) else v
    return out
