"""The training loop, readable top to bottom.

Data stays on the device as one tensor; a batch is an index slice of a seeded permutation. Losses
are summed on the device and read back only every `log_every_n_steps`, so the host never waits
on a step. Tracking lives behind `Hooks`, so this module knows nothing about MLflow.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from vaeexp import checkpoint
from vaeexp.config import Binarize
from vaeexp.data import Dataset
from vaeexp.model import VAE, loss_terms
from vaeexp.optim import make_optimizer

log = logging.getLogger(__name__)

TERMS = ("loss", "recon", "kl")
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


class Hooks(Protocol):
    def on_step(self, step: int, metrics: dict[str, float]) -> None: ...
    def on_epoch_end(
        self, epoch: int, step: int, metrics: dict[str, float], model: VAE
    ) -> None: ...


@dataclass
class Result:
    model: VAE
    epoch: int
    step: int
    metrics: dict[str, float]  # the last epoch's train/* and test/* values


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


def train(
    cfg: DictConfig,
    data: Dataset,
    *,
    device: torch.device,
    hooks: Hooks | None = None,
    checkpoint_path: Path | None = None,
    resume: dict[str, Any] | None = None,
    extra_state: dict[str, Any] | None = None,
) -> Result:
    torch.manual_seed(cfg.seed)
    model = VAE(cfg.latent_dim, cfg.intermediate_dim, cfg.init.value).to(device)
    optimizer = make_optimizer(cfg.optimizer.value, model.parameters(), cfg.lr, cfg.rho, cfg.eps)
    epoch, step, metrics = 0, 0, {}
    if resume is not None:
        epoch, step, metrics = _restore(resume, cfg, model, optimizer, device)

    objective = torch.compile(loss_terms) if cfg.compile else loss_terms
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=cfg.precision.value == "bf16")
    train_x, test_x = data.train_x.to(device), data.test_x.to(device)
    dynamic = cfg.data.binarize == Binarize.dynamic
    n, batch_size = len(train_x), cfg.batch_size
    steps_per_epoch = math.ceil(n / batch_size)
    bar = tqdm(
        total=cfg.epochs * steps_per_epoch,
        initial=step,
        unit="step",
        dynamic_ncols=True,
        disable=not cfg.progress,
        desc="training",
    )
    window, window_images = torch.zeros(2, device=device), 0  # sums since the last log

    def flush() -> None:
        nonlocal window_images
        recon, kl = (window / window_images).tolist()
        window.zero_()
        window_images = 0
        _check_finite(step, recon, kl)
        values = {"loss": recon + kl, "recon": recon, "kl": kl}
        if hooks:
            hooks.on_step(step, values)
        bar.set_postfix(loss=f"{values['loss']:.2f}", refresh=False)

    model.train()
    first_step = step + 1
    with STOP.armed(), logging_redirect_tqdm():
        while epoch < cfg.epochs:
            started = time.perf_counter()
            epoch_sums = torch.zeros(2, device=device)
            order = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)  # resumable: no state
            perm = torch.randperm(n, generator=order)
            for idx in perm.to(device).split(batch_size):
                x = train_x[idx]
                if dynamic:
                    x = torch.bernoulli(x)
                noise = torch.randn(len(x), cfg.latent_dim, device=device)
                with autocast:
                    recon, kl = objective(model, x, cfg.epsilon_std, noise=noise)
                recon, kl = recon.float(), kl.float()
                loss = (recon + kl).mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()

                step += 1
                if step == first_step:
                    log.info("first step done")  # bench/ times start-up by this line
                batch_sums = torch.stack((recon.sum(), kl.sum())).detach()
                window += batch_sums
                epoch_sums += batch_sums
                window_images += len(idx)
                bar.update()
                if step % cfg.log_every_n_steps == 0:
                    flush()
                STOP.check()
            if window_images:
                flush()  # the epoch's tail, so a checkpoint never holds a half-filled window
            epoch += 1

            recon, kl = (epoch_sums / n).tolist()
            metrics = {"train/loss": recon + kl, "train/recon": recon, "train/kl": kl}
            test = evaluate(model, test_x, cfg.epsilon_std, cfg.eval_batch_size)
            _check_finite(step, test["recon"], test["kl"], where="test set")
            metrics |= {f"test/{k}": v for k, v in test.items()}
            seconds = time.perf_counter() - started
            metrics |= {"epoch_seconds": seconds, "images_per_second": n / seconds}
            log.info(
                "epoch %d/%d  train %.2f  test %.2f (recon %.2f, kl %.2f)  %.1fs",
                epoch,
                cfg.epochs,
                metrics["train/loss"],
                test["loss"],
                test["recon"],
                test["kl"],
                seconds,
            )
            if checkpoint_path is not None:
                state = _state(cfg, model, optimizer, epoch, step, metrics, device)
                checkpoint.save(checkpoint_path, state | (extra_state or {}))
            if hooks:
                hooks.on_epoch_end(epoch, step, metrics, model)
            STOP.check()
    bar.close()
    return Result(model=model, epoch=epoch, step=step, metrics=metrics)


def _state(cfg, model, optimizer, epoch, step, metrics, device) -> dict[str, Any]:
    """Everything a resumed run needs to continue exactly where this one stands."""
    rng = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state()
    return {
        "epoch": epoch,
        "step": step,
        "metrics": metrics,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "rng": rng,
        "config": OmegaConf.to_container(cfg, resolve=True, enum_to_str=True),
    }


def _restore(state, cfg, model, optimizer, device) -> tuple[int, int, dict[str, float]]:
    saved = state.get("config", {})
    for key in ARCHITECTURE:
        if saved.get(key) != cfg[key]:
            raise checkpoint.CheckpointError(
                f"resume: the checkpoint has {key}={saved.get(key)}, the config says {cfg[key]}"
            )
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"]["torch"])
    if device.type == "cuda" and "cuda" in state["rng"]:
        torch.cuda.set_rng_state(state["rng"]["cuda"])
    log.info("resumed from epoch %d, step %d", state["epoch"], state["step"])
    return state["epoch"], state["step"], dict(state.get("metrics", {}))


def _check_finite(step: int, recon: float, kl: float, where: str = "training") -> None:
    for term, value in (("recon", recon), ("kl", kl)):
        if not math.isfinite(value):
            raise Diverged(f"{where} loss diverged at step {step}: {term} is {value}")
