"""The training loop, readable top to bottom: setup, steps, the end of each epoch, checkpoints
(the step: `vaeexp.step`; what a checkpoint holds: `vaeexp.checkpoint`).

Data stays on the device as one tensor; a batch is an index slice of a seeded permutation. Losses
are summed on the device and read back every `log_every_n_steps`; only on CPU, where it costs no
synchronisation, is each step's loss also checked for NaN/Inf. Tracking lives behind `Hooks`, so
this module knows nothing about MLflow.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from vaeexp.checkpoint import Checkpoints, Position, restore_state, training_state
from vaeexp.config import Binarize, Config
from vaeexp.data import Dataset
from vaeexp.model import VAE
from vaeexp.process import StopFlag, seconds_since_start
from vaeexp.step import StepSettings, check_finite, held_out_losses, setup, train_step

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

log = logging.getLogger(__name__)
# Metrics of the machine, not of what is trained: never the same twice.
WALL_CLOCK = ("epoch_seconds", "images_per_second", "startup_seconds")


class Callback:
    """Everything the training loop calls out to (the metric logger, the epoch images, the film),
    in the manner of Lightning's `Callback`: each method is a no-op until a subclass overrides it,
    so the loop knows nothing about MLflow or the film."""

    def on_train_start(self, step: int, model: VAE) -> None:
        """Once, before the first step this process trains: step 0 in a fresh run, the
        checkpoint's step in a resumed one."""

    def on_step(
        self, step: int, epoch: int, model: VAE, recon: torch.Tensor, kl: torch.Tensor
    ) -> None:
        """After optimiser step `step` (counted from 1) of epoch `epoch` (counted from 1).
        `recon` and `kl` are the batch's per-image terms before the step: read them, detach
        what is kept."""

    def on_metrics(self, step: int, metrics: dict[str, float]) -> None:
        """A step-metric point: "loss", "recon" and "kl", the means since the last point."""

    def on_epoch_end(self, epoch: int, step: int, metrics: dict[str, float], model: VAE) -> None:
        """After epoch `epoch`'s test-set losses, before its checkpoint."""


class Logger(Protocol):
    """Where callbacks log: MLflow in a run (vaeexp.tracking.logger.MlflowLogger), anything alike
    in a test."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_image(self, image: np.ndarray | Image.Image, key: str, step: int) -> None: ...
    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None: ...


@dataclass
class Result:
    model: VAE
    epoch: int
    step: int
    metrics: dict[str, float]  # the last epoch's train/* and test/* values


def train(
    cfg: Config,
    data: Dataset,
    device: torch.device,
    *,
    callbacks: Sequence[Callback] = (),
    checkpoints: Checkpoints | None = None,
    stop: StopFlag | None = None,
) -> Result:
    """Train `cfg` on `data`; `stop`, set from a signal handler, ends it between two steps."""
    checkpoints, stop = checkpoints or Checkpoints(), stop or StopFlag()
    model, optimizer = setup(cfg, device)
    pos, metrics = Position.start(device), {}
    if checkpoints.resume is not None:
        pos, metrics = restore_state(checkpoints.resume, cfg, model, optimizer, device)

    train_x, test_x = data.train_x.to(device), data.test_x.to(device)
    dynamic = cfg.data.binarize == Binarize.dynamic
    n, steps_per_epoch = len(train_x), data.steps_per_epoch(cfg.batch_size)
    settings = StepSettings.from_config(cfg, device.type == "cpu", steps_per_epoch)
    model.train()
    startup: dict[str, float] = {}
    for callback in callbacks:
        callback.on_train_start(pos.step, model)
    total = cfg.epochs * steps_per_epoch
    first_step = pos.step + 1
    with stop.armed(), _progress_bar(cfg.runtime.progress, total, pos.step) as bar:
        log.info("training %d steps, from step %d", total - pos.step, first_step)
        while pos.epoch < cfg.epochs:
            started = time.perf_counter()
            order = torch.Generator().manual_seed(cfg.seed * 100_003 + pos.epoch)  # stateless
            batches = torch.randperm(n, generator=order).to(device).split(cfg.batch_size)
            for idx in batches[pos.batch :]:
                x = torch.bernoulli(train_x[idx]) if dynamic else train_x[idx]
                noise = torch.randn(len(x), cfg.latent_dim, device=device)
                recon, kl = train_step(model, optimizer, x, noise, settings, pos.step + 1)
                pos.step += 1
                pos.batch += 1
                if pos.step == first_step:
                    startup = {"startup_seconds": seconds_since_start()}  # to a trained step
                for callback in callbacks:
                    callback.on_step(pos.step, pos.epoch + 1, model, recon, kl)
                pos.window += torch.stack((recon.sum(), kl.sum())).detach()
                pos.window_images += len(idx)
                bar.update()
                if pos.step % cfg.log_every_n_steps == 0:
                    _flush_window(pos, callbacks, bar)
                if stop.requested:
                    # mid-epoch: a resumed run continues with the next batch
                    checkpoints.save(training_state(cfg, model, optimizer, pos, metrics, device))
                    stop.check()
            if pos.window_images:
                _flush_window(pos, callbacks, bar)  # the epoch's tail
            pos.epoch, pos.batch = pos.epoch + 1, 0
            metrics = end_of_epoch(cfg, model, pos, n, test_x, started) | startup
            startup = {}
            if pos.epoch <= cfg.kl_warmup_epochs:  # while it changes: the weight reached
                metrics["train/kl_weight"] = settings.kl_weight_at(pos.step + 1)
            # Metrics out before the checkpoint: after a hard kill in between, the resumed run
            # retrains this epoch and its callbacks skip what was already delivered. The other way
            # round, the epoch's metrics would be lost.
            for callback in callbacks:
                callback.on_epoch_end(pos.epoch, pos.step, metrics, model)
            checkpoints.save(training_state(cfg, model, optimizer, pos, metrics, device))
            stop.check()
    return Result(model=model, epoch=pos.epoch, step=pos.step, metrics=metrics)


class _NoBar:
    def update(self) -> None:
        pass

    def set_postfix(self, **values: Any) -> None:
        pass


@contextmanager
def _progress_bar(enabled: bool, total: int, initial: int) -> Iterator[Any]:
    """tqdm's bar, with log lines above it rather than through it: the root logger's handlers
    (Hydra's) and MLflow's own, which does not propagate. Without a bar tqdm is not imported:
    bench/gpu.py trains where only torch, torchvision, numpy and Hydra are installed."""
    if not enabled:
        yield _NoBar()
        return
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    redirected = [logging.root, logging.getLogger("mlflow")]
    bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, desc="training")
    with bar, logging_redirect_tqdm(loggers=redirected):
        yield bar


def _flush_window(pos: Position, callbacks: Sequence[Callback], bar: Any) -> None:
    """One step-metric point: the mean (recon, kl) since the last one."""
    pos.epoch_sums += pos.window  # windows never straddle an epoch: its tail is flushed
    recon, kl = (pos.window / pos.window_images).tolist()
    pos.window.zero_()
    pos.window_images = 0
    check_finite(pos.step, recon, kl)
    for callback in callbacks:
        callback.on_metrics(pos.step, {"loss": recon + kl, "recon": recon, "kl": kl})
    bar.set_postfix(loss=f"{recon + kl:.2f}", refresh=False)


def end_of_epoch(
    cfg: Config, model: VAE, pos: Position, n: int, test_x: torch.Tensor, started: float
) -> dict[str, float]:
    """The finished epoch's train/* and test/* losses (nats per image) and its speed."""
    recon, kl = (pos.epoch_sums / n).tolist()
    pos.epoch_sums.zero_()
    metrics = {"train/loss": recon + kl, "train/recon": recon, "train/kl": kl}
    test = held_out_losses(model, test_x, cfg.epsilon_std, cfg.test_batch_size)
    check_finite(pos.step, test["recon"], test["kl"], where="test set")
    metrics |= {f"test/{k}": v for k, v in test.items()}
    seconds = time.perf_counter() - started
    metrics |= {"epoch_seconds": seconds, "images_per_second": n / seconds}
    log.info(
        "epoch %d/%d  train %.2f  test %.2f (recon %.2f, kl %.2f)  %.1fs",
        pos.epoch,
        cfg.epochs,
        metrics["train/loss"],
        test["loss"],
        test["recon"],
        test["kl"],
        seconds,
    )
    return metrics
