"""The training loop, readable top to bottom.

Data stays on the device as one tensor; a batch is an index slice of a seeded permutation. Losses
are summed on the device and read back every `log_every_n_steps`; only on CPU, where it costs no
synchronisation, is each step's loss also checked for NaN/Inf. Tracking lives behind `Hooks`, so
this module knows nothing about MLflow.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from vaeexp import checkpoint
from vaeexp.config import Binarize, ObjectiveScale
from vaeexp.data import Dataset
from vaeexp.model import IMAGE_DIM, VAE, loss_terms
from vaeexp.optim import make_optimizer

log = logging.getLogger(__name__)

ARCHITECTURE = ("latent_dim", "intermediate_dim")
EVAL_SEED = 2024  # test-set noise has its own generator: evaluating never moves training's RNG


class Diverged(RuntimeError):
    """The loss stopped being finite."""


class StopFlag:
    """Set by a signal handler while the loop runs, so training stops between two steps and never
    in the middle of a checkpoint write or an MLflow call."""

    def __init__(self) -> None:
        self.active = False
        self.requested: str | None = None

    @contextmanager
    def armed(self) -> Iterator[None]:
        self.active, self.requested = True, None
        try:
            yield
        finally:
            self.active = False

    def request(self, reason: str) -> bool:
        """True if the loop will stop at the next step; False if the caller must stop itself."""
        if not self.active or self.requested:
            return False
        self.requested = reason
        return True

    def check(self) -> None:
        if self.requested:
            raise KeyboardInterrupt(self.requested)


STOP = StopFlag()


class Film(Protocol):
    """The latent film (vaeexp.film): copies what it needs at a frame's step and returns."""

    def due(self, step: int) -> bool: ...
    def capture(
        self, step: int, epoch: int, model: VAE, recon: torch.Tensor, kl: torch.Tensor
    ) -> None: ...
    def on_epoch_end(self, epoch: int, step: int, model: VAE) -> None: ...


class Hooks(Protocol):
    def on_step(self, step: int, metrics: dict[str, float]) -> None: ...
    def on_epoch_end(
        self, epoch: int, step: int, metrics: dict[str, float], model: VAE
    ) -> None: ...


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
class Result:
    model: VAE
    epoch: int
    step: int
    metrics: dict[str, float]  # the last epoch's train/* and test/* values


def cpu_settings(flush_denormal: bool, threads: int = 0) -> None:
    """Call before torch's first op: its OpenMP threads, and the film's worker, copy this
    thread's floating-point mode when they start. Subnormal floats (saturated pixels make them
    late in training) each cost the CPU a microcode assist: flushed, epoch 6 is 1.3x faster."""
    torch.set_flush_denormal(flush_denormal)  # returns False where unsupported: nothing to do
    if threads:
        torch.set_num_threads(threads)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(name)


@torch.no_grad()
def evaluate(model: VAE, x: torch.Tensor, epsilon_std: float, batch_size: int) -> dict[str, float]:
    """Mean loss terms over `x` with fixed noise, so the same model always scores the same.

    `loss` is the training objective, which depends on epsilon_std; `neg_elbo` is the true
    negative ELBO (epsilon ~ N(0, 1)), comparable across runs with different epsilon_std.
    """
    was_training = model.training
    model.eval()
    stds = [epsilon_std] if epsilon_std == 1.0 else [epsilon_std, 1.0]
    sums = torch.zeros(len(stds), 2, device=x.device)
    for i, std in enumerate(stds):
        g = torch.Generator(device=x.device).manual_seed(EVAL_SEED)
        for xb in x.split(batch_size):
            recon, kl = loss_terms(model, xb, std, g)
            sums[i] += torch.stack((recon.sum(), kl.sum()))
    model.train(was_training)
    (recon, kl), elbo_terms = (sums / len(x)).tolist()[0], (sums[-1] / len(x)).tolist()
    return {"loss": recon + kl, "recon": recon, "kl": kl, "neg_elbo": sum(elbo_terms)}


def setup(cfg: DictConfig, device: torch.device) -> tuple[VAE, torch.optim.Optimizer]:
    """The seeded model and its optimizer, as a run starts."""
    torch.manual_seed(cfg.seed)
    model = VAE(cfg.latent_dim, cfg.intermediate_dim, cfg.init.value).to(device)
    optimizer = make_optimizer(cfg.optimizer.value, model.parameters(), cfg.lr, cfg.rho, cfg.eps)
    return model, optimizer


@dataclass(frozen=True)
class StepSettings:
    """What one optimisation step needs from the config, read once: an OmegaConf attribute read
    costs microseconds, and the step runs hundreds of thousands of times."""

    epsilon_std: float
    weight: float  # multiplies the batch's mean nats per image to give the optimised objective
    grad_clip: float | None
    bf16: bool
    check_finite: bool  # read the loss back every step: free on CPU, a sync elsewhere
    loss_terms: Callable[..., tuple[torch.Tensor, torch.Tensor]] = loss_terms

    @classmethod
    def from_config(cls, cfg: DictConfig, check_finite: bool = True) -> StepSettings:
        return cls(
            epsilon_std=cfg.epsilon_std,
            weight=objective_weight(cfg.objective_scale),
            grad_clip=cfg.grad_clip,
            bf16=cfg.precision.value == "bf16",
            check_finite=check_finite,
            loss_terms=torch.compile(loss_terms) if cfg.compile else loss_terms,
        )


def objective_weight(scale: ObjectiveScale) -> float:
    """per_pixel is the reference's Keras loss, binary_crossentropy (a mean over the 784 pixels)
    plus mean(KL) / 784: the negative ELBO in nats per image / 784. RMSprop's eps sits inside
    the square root, so the two scales take different steps (bench/RESULTS.md, "Parity")."""
    return 1 / IMAGE_DIM if scale == ObjectiveScale.per_pixel else 1.0


def train_step(
    model: VAE,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    noise: torch.Tensor,
    settings: StepSettings,
    step: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimiser step on batch `x` with reparameterisation noise `noise` ~ N(0, 1);
    returns the per-image (recon, kl) in nats, before the step."""
    if settings.bf16:
        with torch.autocast(x.device.type, torch.bfloat16):
            recon, kl = settings.loss_terms(model, x, settings.epsilon_std, noise=noise)
        recon, kl = recon.float(), kl.float()
    else:
        recon, kl = settings.loss_terms(model, x, settings.epsilon_std, noise=noise)
    loss = (recon + kl).mean() * settings.weight
    if settings.check_finite and not math.isfinite(loss.item()):
        _check_finite(step, recon.sum().item(), kl.sum().item())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if settings.grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
    optimizer.step()
    return recon, kl


def train(
    cfg: DictConfig,
    data: Dataset,
    *,
    device: torch.device,
    hooks: Hooks | None = None,
    film: Film | None = None,
    checkpoint_path: Path | None = None,
    resume: dict[str, Any] | None = None,
    extra_state: dict[str, Any] | None = None,
) -> Result:
    model, optimizer = setup(cfg, device)
    pos, metrics = Position.start(device), {}
    if resume is not None:
        pos, metrics = _restore(resume, cfg, model, optimizer, device)

    settings = StepSettings.from_config(cfg, check_finite=device.type == "cpu")
    train_x, test_x = data.train_x.to(device), data.test_x.to(device)
    dynamic = cfg.data.binarize == Binarize.dynamic
    n, batch_size = len(train_x), cfg.batch_size
    # Plain locals: an OmegaConf attribute read costs microseconds, read every step it adds up.
    latent_dim = cfg.latent_dim
    log_every = cfg.log_every_n_steps
    bar = tqdm(
        total=cfg.epochs * math.ceil(n / batch_size),
        initial=pos.step,
        unit="step",
        dynamic_ncols=True,
        disable=not cfg.progress,
        desc="training",
    )

    def save() -> None:
        if checkpoint_path is not None:
            state = _state(cfg, model, optimizer, pos, metrics, device)
            checkpoint.save(checkpoint_path, state | (extra_state or {}))

    def flush() -> None:
        pos.epoch_sums += pos.window  # windows never straddle an epoch: its tail is flushed
        recon, kl = (pos.window / pos.window_images).tolist()
        pos.window.zero_()
        pos.window_images = 0
        _check_finite(pos.step, recon, kl)
        if hooks:
            hooks.on_step(pos.step, {"loss": recon + kl, "recon": recon, "kl": kl})
        bar.set_postfix(loss=f"{recon + kl:.2f}", refresh=False)

    model.train()
    first_step = pos.step + 1
    if film is not None and pos.step == 0:
        film.capture(0, 0, model, None, None)  # the untrained latent space
    with STOP.armed(), logging_redirect_tqdm():
        while pos.epoch < cfg.epochs:
            started = time.perf_counter()
            order = torch.Generator().manual_seed(cfg.seed * 100_003 + pos.epoch)  # stateless
            batches = torch.randperm(n, generator=order).to(device).split(batch_size)
            for idx in batches[pos.batch :]:
                x = train_x[idx]
                if dynamic:
                    x = torch.bernoulli(x)
                noise = torch.randn(len(x), latent_dim, device=device)
                recon, kl = train_step(model, optimizer, x, noise, settings, pos.step + 1)
                pos.step += 1
                pos.batch += 1
                if pos.step == first_step:
                    log.info("first step done")  # bench/ times start-up by this line
                if film is not None and film.due(pos.step):
                    film.capture(pos.step, pos.epoch + 1, model, recon.detach(), kl.detach())
                pos.window += torch.stack((recon.sum(), kl.sum())).detach()
                pos.window_images += len(idx)
                bar.update()
                if pos.step % log_every == 0:
                    flush()
                if STOP.requested:
                    save()  # mid-epoch: a resumed run continues with the next batch
                    STOP.check()
            if pos.window_images:
                flush()  # the epoch's tail
            pos.epoch, pos.batch = pos.epoch + 1, 0

            recon, kl = (pos.epoch_sums / n).tolist()
            pos.epoch_sums.zero_()
            metrics = {"train/loss": recon + kl, "train/recon": recon, "train/kl": kl}
            test = evaluate(model, test_x, cfg.epsilon_std, cfg.eval_batch_size)
            _check_finite(pos.step, test["recon"], test["kl"], where="test set")
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
            # Metrics out before the checkpoint: after a hard kill in between, the resumed run
            # retrains this epoch and its hooks skip what was already delivered. The other way
            # round, the epoch's metrics would be lost.
            if hooks:
                hooks.on_epoch_end(pos.epoch, pos.step, metrics, model)
            if film is not None:
                film.on_epoch_end(pos.epoch, pos.step, model)
            save()
            STOP.check()
    bar.close()
    return Result(model=model, epoch=pos.epoch, step=pos.step, metrics=metrics)


def _state(cfg, model, optimizer, pos: Position, metrics, device) -> dict[str, Any]:
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
        "config": OmegaConf.to_container(cfg, resolve=True, enum_to_str=True),
    }


def _restore(state, cfg, model, optimizer, device) -> tuple[Position, dict[str, float]]:
    saved = state.get("config", {})
    for key in ARCHITECTURE:
        if saved.get(key) != cfg[key]:
            raise checkpoint.CheckpointError(
                f"resume: the checkpoint has {key}={saved.get(key)}, the config says {cfg[key]}"
            )
    model.load_state_dict(state["model"])
    configured = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    optimizer.load_state_dict(state["optimizer"])
    for group, hyper in zip(optimizer.param_groups, configured, strict=True):
        group.update(hyper)  # the config's lr, rho, eps win; the checkpoint gives the statistics
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


def _check_finite(step: int, recon: float, kl: float, where: str = "training") -> None:
    for term, value in (("recon", recon), ("kl", kl)):
        if not math.isfinite(value):
            raise Diverged(f"{where} loss diverged at step {step}: {term} is {value}")
    if not math.isfinite(recon + kl):
        raise Diverged(f"{where} loss diverged at step {step}: recon + kl is {recon + kl}")
