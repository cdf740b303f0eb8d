"""What a checkpoint holds to continue a run exactly, mid-epoch included: where training
stands, weights, optimizer statistics and RNG, and the config it trained."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vaeexp import checkpoint
from vaeexp.config import Config, plain

log = logging.getLogger(__name__)

ARCHITECTURE = ("latent_dim", "intermediate_dim")


@dataclass
class Position:
    """Where training stands: all a checkpoint needs, beyond weights and RNG, to continue exactly
    (mid-epoch included), with the same metric points an uninterrupted run would log."""

    epoch: int  # completed epochs
    batch: int  # batches done in the current epoch
    step: int
    epoch_sums: torch.Tensor  # (recon, kl) summed over this epoch's flushed windows so far
    window: torch.Tensor  # (recon, kl) summed since the last step-metric point
    window_images: int

    @classmethod
    def start(cls, device: torch.device) -> Position:
        return cls(0, 0, 0, torch.zeros(2, device=device), torch.zeros(2, device=device), 0)


@dataclass
class Checkpoints:
    """Where the loop saves its state, the state it continues from, and what rides along."""

    path: Path | None = None
    resume: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. the MLflow run id


def save(checkpoints: Checkpoints, state: dict[str, Any]) -> None:
    if checkpoints.path is not None:
        checkpoint.save(checkpoints.path, state | checkpoints.extra)


def training_state(cfg: Config, model, optimizer, pos: Position, metrics, device) -> dict:
    """Everything a checkpoint holds to continue exactly: weights, optimizer, RNG, position."""
    rng = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state()
    return {
        "epoch": pos.epoch,
        "batch": pos.batch,
        "step": pos.step,
        "epoch_sums": pos.epoch_sums.cpu(),
        "window": pos.window.cpu(),
        "window_images": pos.window_images,
        "metrics": metrics,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "rng": rng,
        "config": plain(cfg),
    }


def restore_state(state, cfg: Config, model, optimizer, device) -> tuple[Position, dict]:
    """Load a checkpoint into `model` and `optimizer`; the config's lr, rho, eps win."""
    saved = state.get("config", {})
    for key in ARCHITECTURE:
        if saved.get(key) != getattr(cfg, key):
            raise checkpoint.CheckpointError(
                f"resume: the checkpoint has {key}={saved.get(key)}, the config says "
                f"{getattr(cfg, key)}"
            )
    model.load_state_dict(state["model"])
    configured = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    optimizer.load_state_dict(state["optimizer"])
    for group, hyper in zip(optimizer.param_groups, configured, strict=True):
        group.update(hyper)  # the checkpoint gives the statistics
    torch.set_rng_state(state["rng"]["torch"])
    if device.type == "cuda" and "cuda" in state["rng"]:
        torch.cuda.set_rng_state(state["rng"]["cuda"])
    pos = Position(
        epoch=state["epoch"],
        batch=state.get("batch", 0),
        step=state["step"],
        epoch_sums=state.get("epoch_sums", torch.zeros(2)).to(device),
        window=state.get("window", torch.zeros(2)).to(device),
        window_images=state.get("window_images", 0),
    )
    log.info("resumed at epoch %d, batch %d (step %d)", pos.epoch + 1, pos.batch, pos.step)
    return pos, dict(state.get("metrics", {}))
