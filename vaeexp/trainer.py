"""The training loop, readable top to bottom: setup, steps, the end of each epoch, checkpoints
(the step: `vaeexp.step`; what a checkpoint holds: `vaeexp.checkpoint`).

It trains a *stack*: the members of a group of jobs (vaeexp.stacked) as one model whose
parameters carry a leading member dimension; a single run is a stack of one. Every member has
its own batch order and noise, metrics, checkpoint and callbacks' records; a member whose loss
stops being finite is stopped (its learning rate 0) and the others go on.

Data stays on the device as one tensor; a batch is an index slice of each member's seeded
permutation. Losses are summed on the device and read back every `log_every_n_steps`; only on
CPU, where it costs no synchronisation, is each step's loss also checked for NaN/Inf. On CUDA
the step is captured once as a CUDA graph and replayed (`CapturedStep`), where it can be.
Tracking lives behind `Callback`, so this module knows nothing about MLflow.
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

from vaeexp.checkpoint import CheckpointError, Checkpoints, Position, restore_state, training_state
from vaeexp.config import Config, Optimizer
from vaeexp.data import Dataset
from vaeexp.model import VAE
from vaeexp.optim import StackedOptimizer
from vaeexp.process import StopFlag, seconds_since_start
from vaeexp.step import (
    MembersDiverged,
    StepSettings,
    batch_order,
    binarized,
    divergences,
    dynamic_binarization,
    epoch_noise,
    held_out_losses,
    setup,
    train_step,
)

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

log = logging.getLogger(__name__)
# Metrics of the machine, not of what is trained: never the same twice.
WALL_CLOCK = ("epoch_seconds", "images_per_second", "startup_seconds")


class Callback:
    """Everything the training loop calls out to (the metric logger, the epoch images, the film),
    in the manner of Lightning's `Callback`: each method is a no-op until a subclass overrides it,
    so the loop knows nothing about MLflow or the film. The loop calls with the whole stack; a
    callback of one member (`member`) reads its own row."""

    member: int = 0  # the member of the stack whose records this callback keeps

    def on_train_start(self, step: int, model: VAE) -> None:
        """Once, before the first step this process trains: step 0 in a fresh run, the
        checkpoint's step in a resumed one."""

    def on_step(
        self, step: int, epoch: int, model: VAE, recon: torch.Tensor, kl: torch.Tensor
    ) -> None:
        """After optimiser step `step` (counted from 1) of epoch `epoch` (counted from 1).
        `recon` and `kl` are each member's per-image terms before the step, (M, b): read them,
        copy what is kept (a captured step overwrites them with the next)."""

    def on_metrics(self, step: int, metrics: dict[int, dict[str, float]]) -> None:
        """A step-metric point of each member still training: "loss", "recon" and "kl", the
        means since the last point."""

    def on_epoch_end(
        self, epoch: int, step: int, metrics: dict[int, dict[str, float]], model: VAE
    ) -> None:
        """After epoch `epoch`'s test-set losses, before its checkpoints; `metrics` has each
        member still training."""

    def on_diverged(self, member: int, reason: str) -> None:
        """Member `member` stopped: its loss is no longer finite."""


class Logger(Protocol):
    """Where callbacks log: MLflow in a run (vaeexp.tracking.logger.MlflowLogger), anything alike
    in a test."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_image(self, image: np.ndarray | Image.Image, key: str, step: int) -> None: ...
    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None: ...


@dataclass
class Result:
    model: VAE  # this member, as a one-member model with weights of its own
    epoch: int
    step: int
    metrics: dict[str, float]  # the last epoch's train/* and test/* values
    diverged: str | None = None  # why it stopped, if its loss stopped being finite


def train(
    cfgs: Sequence[Config],
    data: Dataset,
    device: torch.device,
    *,
    callbacks: Sequence[Callback] = (),
    checkpoints: Sequence[Checkpoints] | None = None,
    stop: StopFlag | None = None,
) -> list[Result]:
    """Train the members `cfgs` (one group: vaeexp.stacked.group_key) on `data` as one stack; a
    result each. `stop`, set from a signal handler, ends it between two steps, every member
    checkpointed."""
    cfg, members = cfgs[0], len(cfgs)
    checkpoints = list(checkpoints or [Checkpoints() for _ in cfgs])
    stop = stop or StopFlag()
    model, optimizer = setup(cfgs, device)
    step_fn = CapturedStep() if CapturedStep.possible(cfgs, device) else train_step
    pos, metrics = Position.start(members, device), [{} for _ in cfgs]
    _restore(cfgs, checkpoints, model, optimizer, pos, metrics)

    train_x, test_x = data.train_x.to(device), data.test_x.to(device)
    n, steps_per_epoch = len(train_x), data.steps_per_epoch(cfg.batch_size)
    settings = StepSettings.from_configs(cfgs, device, device.type == "cpu", steps_per_epoch)
    stack = _Stack(model, optimizer, callbacks)
    model.train()
    startup: dict[str, float] = {}
    for callback in callbacks:
        callback.on_train_start(pos.step, model)
    total = cfg.epochs * steps_per_epoch
    first_step = pos.step + 1
    noise = None
    with stop.armed(), _progress_bar(cfg.runtime.progress, total, pos.step) as bar:
        log.info("training %d steps, from step %d", total - pos.step, first_step)
        while pos.epoch < cfg.epochs and stack.training:
            started = time.perf_counter()
            order = batch_order(cfgs, pos.epoch, n, device)  # stateless: (seed, epoch)
            noise = epoch_noise(cfgs, pos.epoch, n, device, noise)
            for batch in range(pos.batch, steps_per_epoch):
                rows = slice(batch * cfg.batch_size, min(n, (batch + 1) * cfg.batch_size))
                x = train_x[order[:, rows]]  # (M, b, 784): each member's own batch
                if dynamic_binarization(cfg):
                    x = binarized(x, cfgs, pos.epoch, batch)
                try:
                    recon, kl = step_fn(model, optimizer, x, noise[:, rows], settings, pos.step + 1)
                except MembersDiverged as e:  # before anything was updated: stop them, again
                    stack.stop(e.reasons)
                    if not stack.training:
                        break
                    recon, kl = step_fn(model, optimizer, x, noise[:, rows], settings, pos.step + 1)
                pos.step += 1
                pos.batch += 1
                if pos.step == first_step:
                    startup = {"startup_seconds": seconds_since_start()}  # to a trained step
                for callback in callbacks:
                    callback.on_step(pos.step, pos.epoch + 1, model, recon, kl)
                pos.window += torch.stack((recon.sum(1), kl.sum(1)), dim=1)
                pos.window_images += rows.stop - rows.start
                bar.update()
                if pos.step % cfg.log_every_n_steps == 0:
                    _flush_window(pos, stack, bar)
                    if not stack.training:
                        break
                if stop.requested:
                    # mid-epoch: a resumed run continues with the next batch
                    stack.save(cfgs, checkpoints, pos, metrics)
                    stop.check()
            if not stack.training:
                break
            if pos.window_images:
                _flush_window(pos, stack, bar)  # the epoch's tail
            pos.epoch, pos.batch = pos.epoch + 1, 0
            epoch_metrics = end_of_epoch(cfgs, model, pos, n, test_x, started, stack, settings)
            if not stack.training:
                break
            for m, values in epoch_metrics.items():
                metrics[m] = values | startup
                if pos.epoch <= cfgs[m].kl_warmup_epochs:  # while it changes: the weight reached
                    metrics[m]["train/kl_weight"] = settings.kl_weight_at(pos.step + 1, m)
            startup = {}
            # Metrics out before the checkpoint: after a hard kill in between, the resumed run
            # retrains this epoch and its callbacks skip what was already delivered. The other way
            # round, the epoch's metrics would be lost.
            active = {m: metrics[m] for m in stack.active}
            for callback in callbacks:
                callback.on_epoch_end(pos.epoch, pos.step, active, model)
            stack.save(cfgs, checkpoints, pos, metrics)
            stop.check()
    return [
        Result(model.member(m, copy=True), pos.epoch, pos.step, metrics[m], stack.diverged.get(m))
        for m in range(members)
    ]


class _Stack:
    """Which members still train, and what stops one: its learning rate is 0 from then on and its
    weights are zeroed (finite, so its rows of every product stay finite); its callbacks hear
    why."""

    def __init__(self, model: VAE, optimizer: StackedOptimizer, callbacks: Sequence[Callback]):
        self.model, self.optimizer, self.callbacks = model, optimizer, callbacks
        self.active = list(range(model.members))
        self.diverged: dict[int, str] = {}

    @property
    def training(self) -> bool:
        return bool(self.active)

    def stop(self, reasons: dict[int, str]) -> None:
        for m, reason in reasons.items():
            if m not in self.active:
                continue
            self.active.remove(m)
            self.diverged[m] = reason
            if self.model.members > 1:
                log.error("member %d: %s; it stops, the others go on", m, reason)
            self.optimizer.freeze(m)
            with torch.no_grad():
                for p in self.model.parameters():
                    p[m].zero_()
            for callback in self.callbacks:
                callback.on_diverged(m, reason)

    def save(
        self,
        cfgs: Sequence[Config],
        checkpoints: Sequence[Checkpoints],
        pos: Position,
        metrics: list[dict[str, float]],
    ) -> None:
        """Every training member's checkpoint; a stopped one keeps its last good one."""
        for m in self.active:
            if checkpoints[m].path is None:  # nothing to write: no copies off the device
                continue
            state = training_state(cfgs[m], self.model, self.optimizer, m, pos, metrics[m])
            checkpoints[m].save(state)


def _restore(
    cfgs: Sequence[Config],
    checkpoints: Sequence[Checkpoints],
    model: VAE,
    optimizer: StackedOptimizer,
    pos: Position,
    metrics: list[dict[str, float]],
) -> None:
    """Members continue from their checkpoints, all from the same step (vaeexp.recipe groups
    them so), or all start afresh."""
    resumed = [m for m, c in enumerate(checkpoints) if c.resume is not None]
    if not resumed:
        return
    if len(resumed) != len(cfgs) or len({checkpoints[m].resume["step"] for m in resumed}) > 1:
        raise CheckpointError("a stack's members continue together from one step, or none does")
    for m in resumed:
        metrics[m] = restore_state(checkpoints[m].resume, cfgs[m], model, optimizer, m, pos)


class CapturedStep:
    """The step as one CUDA graph (torch.cuda.graphs), replayed with each batch: the forward and
    backward passes and the optimizer's update, a few dozen small kernels that an eager GPU step
    launches one by one from Python, are one launch. Captured after a few eager steps on a side
    stream (what capture requires); a batch of another shape (an epoch's short last batch) runs
    eagerly. The captured kernels are the eager ones: the numbers do not change. A learning rate
    that stops being one shared number (a member stopped: its lr is 0) is captured anew.

    Possible on CUDA with `runtime.cuda_graph` (the default), for what has no per-step value that
    the graph would freeze: not with Adam (its bias corrections change every step), a KL warm-up,
    dynamic binarization or torch.compile."""

    WARMUP = 3

    def __init__(self) -> None:
        self.calls = 0
        self.version = -1  # the optimizer's, when captured: a member stopped since, capture again
        self.graph: Any = None
        self.inputs: tuple[torch.Tensor, torch.Tensor] | None = None
        self.outputs: tuple[torch.Tensor, torch.Tensor] | None = None

    @staticmethod
    def possible(cfgs: Sequence[Config], device: torch.device) -> bool:
        cfg = cfgs[0]
        return (
            device.type == "cuda"
            and cfg.runtime.cuda_graph
            and not cfg.runtime.compile
            and cfg.optimizer == Optimizer.rmsprop
            and not dynamic_binarization(cfg)
            and not any(c.kl_warmup_epochs for c in cfgs)
        )

    def __call__(
        self,
        model: VAE,
        optimizer: StackedOptimizer,
        x: torch.Tensor,
        noise: torch.Tensor,
        settings: StepSettings,
        step: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self.calls += 1
        if self.inputs is not None and self.inputs[0].shape != x.shape:
            return train_step(model, optimizer, x, noise, settings, step)
        if self.calls <= self.WARMUP:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                out = train_step(model, optimizer, x, noise, settings, step)
            torch.cuda.current_stream().wait_stream(side)
            return out
        if self.graph is None or self.version != optimizer.version:
            self.version = optimizer.version
            self.inputs = (x.clone(), noise.clone())
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.outputs = train_step(model, optimizer, *self.inputs, settings, step)
        else:
            self.inputs[0].copy_(x)
            self.inputs[1].copy_(noise)
            optimizer.steps += 1  # what the eager step counts, in Python, outside the graph
        self.graph.replay()
        return self.outputs


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


def _flush_window(pos: Position, stack: _Stack, bar: Any) -> None:
    """One step-metric point a member: its mean (recon, kl) since the last one."""
    pos.epoch_sums += pos.window  # windows never straddle an epoch: its tail is flushed
    means = (pos.window / pos.window_images).tolist()
    pos.window.zero_()
    pos.window_images = 0
    recon, kl = [r for r, _ in means], [k for _, k in means]
    stack.stop({m: why for m, why in divergences(pos.step, recon, kl).items() if m in stack.active})
    points = {m: {"loss": recon[m] + kl[m], "recon": recon[m], "kl": kl[m]} for m in stack.active}
    for callback in stack.callbacks:
        callback.on_metrics(pos.step, points)
    if points:
        best = min(p["loss"] for p in points.values())
        bar.set_postfix(loss=f"{best:.2f}", refresh=False)


def end_of_epoch(
    cfgs: Sequence[Config],
    model: VAE,
    pos: Position,
    n: int,
    test_x: torch.Tensor,
    started: float,
    stack: _Stack,
    settings: StepSettings,
) -> dict[int, dict[str, float]]:
    """Each training member's finished epoch: train/* and test/* losses (nats per image) and the
    stack's speed."""
    cfg = cfgs[0]
    sums = (pos.epoch_sums / n).tolist()
    pos.epoch_sums.zero_()
    test = held_out_losses(model, test_x, settings.epsilon_std, cfg.test_batch_size)
    recon, kl = [t["recon"] for t in test], [t["kl"] for t in test]
    failed = divergences(pos.step, recon, kl, where="test set")
    stack.stop({m: why for m, why in failed.items() if m in stack.active})
    seconds = time.perf_counter() - started  # the epoch, its test pass included
    out = {}
    for m in stack.active:
        (train_recon, train_kl), scores = sums[m], test[m]
        metrics = {"train/loss": train_recon + train_kl, "train/recon": train_recon}
        metrics |= {"train/kl": train_kl} | {f"test/{k}": v for k, v in scores.items()}
        metrics |= {"epoch_seconds": seconds, "images_per_second": n / seconds}
        out[m] = metrics
    for m, metrics in out.items():
        log.info(
            "%sepoch %d/%d  train %.2f  test %.2f (recon %.2f, kl %.2f)  %.1fs",
            f"member {m}: " if len(cfgs) > 1 else "",
            pos.epoch,
            cfg.epochs,
            metrics["train/loss"],
            metrics["test/loss"],
            metrics["test/recon"],
            metrics["test/kl"],
            seconds,
        )
    return out
