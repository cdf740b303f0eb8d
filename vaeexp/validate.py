"""The checks a type cannot express, and one line for every error a user's config can make.

Each message names the key and what is allowed, and is raised before any data is loaded or any
MLflow run is created.
"""

from __future__ import annotations

import difflib
import importlib.util
import math
import re
import sys
import urllib.parse
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from vaeexp.config import RUN_ID, Config, Device
from vaeexp.paths import data_config_file, data_configs


class ConfigError(ValueError):
    """A setting the user can fix; the message is one line naming the key."""


def limits_ok(value: str) -> bool:
    """film.limits (and `python -m vaeexp.film --limits`): auto, or a half-width L > 0."""
    if value == "auto":
        return True
    try:
        return math.isfinite(float(value)) and float(value) > 0
    except ValueError:
        return False


# (key, test, what is allowed) for the checks a type cannot express.
RULES: list[tuple[str, object, str]] = [
    ("latent_dim", lambda v: v >= 1, "an integer >= 1"),
    ("intermediate_dim", lambda v: v >= 1, "an integer >= 1"),
    ("batch_size", lambda v: v >= 1, "an integer >= 1"),
    ("epochs", lambda v: v >= 1, "an integer >= 1"),
    ("epsilon_std", lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0"),
    ("lr", lambda v: math.isfinite(v) and v > 0, "a finite number > 0"),
    ("rho", lambda v: 0 <= v < 1, "a number in [0, 1)"),
    ("eps", lambda v: math.isfinite(v) and v > 0, "a finite number > 0"),
    ("kl_weight", lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0"),
    ("kl_warmup_epochs", lambda v: v >= 0, "an integer >= 0 (0: no warm-up)"),
    ("seed", lambda v: 0 <= v < 2**63, "an integer >= 0"),
    ("runtime.threads", lambda v: v >= 0, "an integer >= 0 (0: torch's default)"),
    ("grad_clip", lambda v: v is None or (math.isfinite(v) and v > 0), "null or a number > 0"),
    ("log_every_n_steps", lambda v: v >= 1, "an integer >= 1"),
    ("test_batch_size", lambda v: v >= 1, "an integer >= 1"),
    ("data.train_limit", lambda v: v is None or v >= 1, "null or an integer >= 1"),
    ("data.test_limit", lambda v: v is None or v >= 1, "null or an integer >= 1"),
    ("iwae.k", lambda v: v >= 1, "an integer >= 1"),
    ("iwae.images", lambda v: v is None or v >= 0, "null (all) or an integer >= 0 (0: skip)"),
    ("film.points", lambda v: v is None or v >= 10, "null (all test images) or an integer >= 10"),
    (
        "film.every_step_until",
        lambda v: v is None or v >= 0,
        "null (every step) or an integer >= 0",
    ),
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
    known = set(_all_keys(OmegaConf.structured(Config)))
    for key in _all_keys(cfg):  # `+key=value` adds keys the schema does not know
        if key not in known:
            raise ConfigError(unknown_setting(key, known))
    for key, ok, allowed in RULES:
        value = OmegaConf.select(cfg, key)
        if not ok(value):
            raise ConfigError(f"{key}={value} is not allowed: must be {allowed}")
    check_no_credentials(cfg.tracking.uri)
    if cfg.data.mirrors is not None and not cfg.data.mirrors:
        raise ConfigError(
            "data.mirrors=[] is not allowed: must be null (the dataset's own mirrors) or a list "
            "of base URLs"
        )
    if cfg.data.fallback is not None and data_config_file(cfg.data.fallback) is None:
        raise ConfigError(
            f"data.fallback={cfg.data.fallback} is not allowed: must be null (no fallback) or a "
            f"data config: {', '.join(data_configs())}"
        )
    module = cfg.data._target_.partition(".")[0]
    if not module.isidentifier() or importlib.util.find_spec(module) is None:
        raise ConfigError(
            f"data._target_={cfg.data._target_} is not allowed: must name a dataset class such "
            "as torchvision.datasets.MNIST"
        )
    if cfg.resume is not None and not (
        cfg.resume == "auto" or Path(cfg.resume).exists() or RUN_ID.fullmatch(cfg.resume)
    ):
        raise ConfigError(
            f"resume={cfg.resume} is not allowed: must be auto, a run folder, a checkpoint file "
            "or an MLflow run id"
        )
    if cfg.runtime.device not in (Device.cuda, Device.mps):
        return
    import torch  # only to ask for a device: keeps `--help` and config errors fast

    here = "allowed here: auto, cpu"
    if cfg.runtime.device == Device.cuda and not torch.cuda.is_available():
        raise ConfigError(f"runtime.device=cuda is not available on this machine; {here}")
    if cfg.runtime.device == Device.mps and not torch.backends.mps.is_available():
        raise ConfigError(f"runtime.device=mps is not available on this machine; {here}")


def check_no_credentials(uri: str) -> None:
    """Refuse a user name or password written into tracking.uri. Whatever the URI holds is
    recorded as the run's params, in checkpoints, logs and Hydra's saved config, which Hydra
    writes before vaeexp's code runs: refusing it (before Hydra writes anything, see
    `RefuseCredentials`) leaves nothing to redact in any of those places, today's or a later
    one's. MLflow reads a server's credentials from its own variables instead."""
    try:
        parts = urllib.parse.urlsplit(uri)
    except ValueError:  # not a URI at all: check_reachable names it
        return
    web = parts.scheme in ("http", "https")
    if parts.password is None and not (web and parts.username is not None):
        return
    where = parts.netloc.rpartition("@")[2]
    fix = (
        f"use tracking.uri={parts.scheme}://{where}{parts.path} and set MLFLOW_TRACKING_USERNAME "
        "and MLFLOW_TRACKING_PASSWORD"
        if web
        else "leave the password to the database driver (for PostgreSQL: PGPASSWORD or ~/.pgpass)"
    )
    raise ConfigError(
        f"tracking.uri (or MLFLOW_TRACKING_URI) holds credentials for {where}, which would be "
        f"saved with the run's config, params and logs: {fix}"
    )


class RefuseCredentials(Callback):
    """Hydra writes the config of a run (.hydra/) or a sweep (multirun.yaml) right after these
    hooks: a URI with credentials stops here, before anything is written. A callback's
    exception would be only a warning to Hydra; SystemExit ends the command."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config)

    @staticmethod
    def _check(config: DictConfig) -> None:
        try:
            check_no_credentials(config.tracking.uri)
        except ConfigError as e:
            print(f"vaeexp: error: {e}", file=sys.stderr)
            raise SystemExit(2) from None


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
        return unknown_setting(key, _all_keys(OmegaConf.structured(Config)))
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


def unknown_setting(key: str, known: set[str] | list[str]) -> str:
    close = difflib.get_close_matches(key, sorted(known), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return f"unknown setting '{key}'{hint}; `python -m vaeexp --cfg job` lists them all"


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
