"""Checkpoints: the one dict a run writes to continue exactly, where it is written and read, and
which one `resume=` continues.

A checkpoint is either complete or absent (written to a temp file, fsynced, renamed) and loads
without running pickled code (`weights_only`). `training_state` writes it and `restore_state`
reads it: where training stands (mid-epoch included), weights, optimizer statistics and the
config it trained. A member of a stack writes the checkpoint its job alone would, and continues
from it, in a stack or alone.

`resume=auto` picks the newest checkpoint under the project's runs/ that trains what this config
trains (`config.identity`, less `epochs`), so re-launching the same command continues where it
stopped. A sweep's job looks only in its own folder and in the sweeps its sweep continues
(vaeexp.sweep): its runs belong to that sweep's parent, and another sweep's run of the same
settings does not.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from vaeexp.config import RUN_ID, Config, identity, plain
from vaeexp.model import VAE
from vaeexp.optim import StackedOptimizer

log = logging.getLogger(__name__)

FORMAT = "vaeexp.checkpoint"
VERSION = 2
FILENAME = "checkpoint.pt"
CONFIG_SUFFIX = ".json"  # checkpoint.json beside checkpoint.pt: its config, for resume=auto
ARCHITECTURE = ("latent_dim", "intermediate_dim")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file."""


def save(path: str | Path, state: dict[str, Any]) -> None:
    """Write atomically: a temp file in the same folder, fsync, then rename over the target."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            torch.save({"format": FORMAT, "version": VERSION, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        if "config" in state:
            _write_atomically(path.with_suffix(CONFIG_SUFFIX), json.dumps(state["config"]))
    except (OSError, RuntimeError) as e:  # torch reports a full disk as a RuntimeError
        free = shutil.disk_usage(path.parent).free if path.parent.exists() else 0
        raise CheckpointError(
            f"{path}: could not write the checkpoint ({free // 1024} KiB free there: "
            f"{str(e).splitlines()[0]}); the previous one, if any, is intact"
        ) from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def _write_atomically(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def saved_config(path: str | Path) -> dict[str, Any] | None:
    """The config of the checkpoint at `path` from the small file beside it, without loading
    the checkpoint; None where there is none (a state saved without its config)."""
    try:
        config = json.loads(Path(path).with_suffix(CONFIG_SUFFIX).read_text())
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def locate(path: str | Path) -> Path:
    """A checkpoint file, or the one inside a run folder."""
    path = Path(path)
    if path.is_dir():
        path = path / FILENAME
    if not path.is_file():
        raise CheckpointError(f"{path}: no checkpoint here (expected a {FILENAME} or a run folder)")
    return path


def load(path: str | Path) -> dict[str, Any]:
    path = locate(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds for truncated or foreign files
        raise CheckpointError(
            f"{path}: not a readable checkpoint ({type(e).__name__}); it may be truncated or "
            "not written by vaeexp"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a vaeexp checkpoint")
    if state.get("version") != VERSION:
        raise CheckpointError(
            f"{path}: checkpoint version {state.get('version')}, "
            f"this vaeexp reads version {VERSION}"
        )
    return state


def load_model(path: str | Path) -> tuple[VAE, dict[str, Any]]:
    """The trained model a checkpoint holds (eval mode, on the CPU) and the config it trained."""
    state = load(path)
    try:
        config = state["config"]
        model = VAE(config["latent_dim"], config["intermediate_dim"])
        model.load_state_dict(state["model"])
    except (KeyError, RuntimeError) as e:
        raise CheckpointError(f"{path}: its model cannot be rebuilt ({e})") from None
    return model.eval(), config


@dataclass
class Position:
    """Where training stands: all a checkpoint needs, beyond weights and optimizer statistics,
    to continue exactly (mid-epoch included), with the same metric points an uninterrupted run
    would log. The members of a stack stand at the same step; their sums are a row each."""

    epoch: int  # completed epochs
    batch: int  # batches done in the current epoch
    step: int
    epoch_sums: torch.Tensor  # (M, 2): (recon, kl) summed over this epoch's flushed windows
    window: torch.Tensor  # (M, 2): (recon, kl) summed since the last step-metric point
    window_images: int

    @classmethod
    def start(cls, members: int, device: torch.device) -> Position:
        zeros = torch.zeros(members, 2, device=device)
        return cls(0, 0, 0, zeros, zeros.clone(), 0)


@dataclass
class Checkpoints:
    """Where the loop saves a member's state, the state it continues from, and what rides
    along."""

    path: Path | None = None
    resume: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. the MLflow run id

    def save(self, state: dict[str, Any]) -> None:
        if self.path is not None:
            save(self.path, state | self.extra)


def training_state(
    cfg: Config,
    model: VAE,
    optimizer: StackedOptimizer,
    member: int,
    pos: Position,
    metrics: dict[str, float],
) -> dict[str, Any]:
    """Everything member `member`'s checkpoint holds to continue exactly, as a run of its own:
    its weights and optimizer statistics, the position, its sums and config. No generator
    state: every random draw is a function of (seed, epoch) (vaeexp.step)."""
    return {
        "epoch": pos.epoch,
        "batch": pos.batch,
        "step": pos.step,
        "epoch_sums": pos.epoch_sums[member].cpu(),
        "window": pos.window[member].cpu(),
        "window_images": pos.window_images,
        "metrics": metrics,
        "model": {k: v.cpu() for k, v in model.member(member).state_dict().items()},
        "optimizer": {
            k: [t.cpu() for t in v] if isinstance(v, list) else v
            for k, v in optimizer.member_state(member).items()
        },
        "config": plain(cfg),
    }


def restore_state(
    state: dict[str, Any],
    cfg: Config,
    model: VAE,
    optimizer: StackedOptimizer,
    member: int,
    pos: Position,
) -> dict[str, float]:
    """Load a checkpoint into member `member` of `model` and `optimizer` and into `pos` (the
    config's lr, rho, eps win: the checkpoint gives the statistics); its metrics."""
    saved = state["config"]
    for key in ARCHITECTURE:
        if saved[key] != getattr(cfg, key):
            raise CheckpointError(
                f"resume: the checkpoint has {key}={saved[key]}, the config says "
                f"{getattr(cfg, key)}"
            )
    if saved["optimizer"] != cfg.optimizer.value:
        raise CheckpointError(
            f"resume: the checkpoint has optimizer={saved['optimizer']}, the config says "
            f"{cfg.optimizer.value}"
        )
    with torch.no_grad():
        for name, value in state["model"].items():
            model.get_parameter(name)[member : member + 1].copy_(value)
    optimizer.load_member_state(member, state["optimizer"])
    pos.epoch, pos.batch, pos.step = state["epoch"], state["batch"], state["step"]
    pos.epoch_sums[member] = state["epoch_sums"]
    pos.window[member] = state["window"]
    pos.window_images = state["window_images"]
    log.info("resumed at epoch %d, batch %d (step %d)", pos.epoch + 1, pos.batch, pos.step)
    return dict(state["metrics"])


def resolve(
    spec: str,
    cfg: Config,
    runs_dir: Path,
    output_dir: Path | None = None,
    sweeps: list[Path] | None = None,
) -> Path | None:
    """The checkpoint file to resume from; None for `auto` with nothing to continue. `auto`
    looks first in this job's own folder (a re-launched `hydra.run.dir=X`, a requeued job), then
    in `sweeps` (the earlier folders of a resumed sweep) if this is a sweep's job, else under
    runs/."""
    if spec == "auto":
        # A sweep may vary `epochs`, and each of its jobs continues its own run; elsewhere a
        # longer run of the same settings continues a shorter one.
        epochs = sweeps is not None
        wanted = identity(plain(cfg), epochs=epochs)
        own = output_dir / FILENAME if output_dir else None
        if own is not None and own.is_file() and _matches(own, wanted, epochs):
            return own
        if sweeps is not None:
            found = (p for folder in sweeps for p in folder.glob(f"*/{FILENAME}"))
            return _newest_match(found, wanted, epochs)
        return latest_matching(cfg, runs_dir)
    if RUN_ID.fullmatch(spec) and not Path(spec).exists():
        return _from_run_id(spec, cfg.tracking.uri)
    return locate(spec)


def latest_matching(cfg: Config, runs_dir: Path) -> Path | None:
    """The newest checkpoint under runs/ that trains what `cfg` trains. Each is compared through
    the small config file beside it; only a match is loaded (to check it is whole)."""
    return _newest_match(
        (p for sub in ("outputs", "multirun") for p in (runs_dir / sub).glob(f"**/{FILENAME}")),
        identity(plain(cfg), epochs=False),
        epochs=False,
    )


def job_folders(cfg: Config, output_dir: Path, sweeps: list[Path]) -> list[Path]:
    """This job's own folder and the folders of the same job in the sweeps it continues, found
    by the config Hydra saved there: where a run stopped before its first checkpoint lived."""
    wanted = identity(plain(cfg))
    same = []
    for folder in sweeps:
        for saved in folder.glob("*/.hydra/config.yaml"):
            with contextlib.suppress(Exception):  # a folder of a job that never composed
                if identity(OmegaConf.to_container(OmegaConf.load(saved))) == wanted:
                    same.append(saved.parent.parent)
    return [output_dir, *same]


def _newest_match(paths: Iterable[Path], wanted: dict, epochs: bool) -> Path | None:
    candidates = sorted(paths, key=lambda p: p.stat().st_mtime, reverse=True)
    return next((path for path in candidates if _matches(path, wanted, epochs)), None)


def _matches(path: Path, wanted: dict, epochs: bool) -> bool:
    saved = saved_config(path)
    if saved is not None and identity(saved, epochs=epochs) != wanted:
        return False
    try:
        state = load(path)
    except CheckpointError as e:
        log.warning("resume=auto: skipping %s", e)
        return False
    return "config" in state and identity(state["config"], epochs=epochs) == wanted


def _from_run_id(run_id: str, uri: str) -> Path:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        run = MlflowClient(uri).get_run(run_id)
    except MlflowException as e:
        if e.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise CheckpointError(f"resume={run_id}: no such MLflow run in {uri}") from None
        reason = str(e).splitlines()[0][:200]
        raise CheckpointError(f"resume={run_id}: cannot ask {uri} for the run ({reason})") from None
    folder = run.data.tags.get("output_dir")
    if not folder:
        raise CheckpointError(f"resume={run_id}: the run has no output_dir tag")
    return locate(folder)
