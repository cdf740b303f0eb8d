"""One optimisation step of the VAE, the objective it minimises, and the test-set losses.

The loss terms are nats per image; the optimised objective weights the KL term by `kl_weight`
(beta, warmed up from 0 over `kl_warmup_epochs`) and is scaled by `objective_scale` (Keras's
per-pixel mean, as the reference, or nats per image). Metrics are the unweighted terms.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from vaeexp.config import Config, ObjectiveScale, Precision
from vaeexp.model import IMAGE_DIM, VAE, loss_terms
from vaeexp.optim import make_optimizer

TEST_SEED = 2024  # test-set noise has its own generator: scoring never moves training's RNG


class Diverged(RuntimeError):
    """The loss stopped being finite."""


def setup(cfg: Config, device: torch.device) -> tuple[VAE, torch.optim.Optimizer]:
    """The seeded model and its optimizer, as a run starts."""
    torch.manual_seed(cfg.seed)
    model = VAE(cfg.latent_dim, cfg.intermediate_dim, cfg.init.value).to(device)
    optimizer = make_optimizer(cfg.optimizer.value, model.parameters(), cfg.lr, cfg.rho, cfg.eps)
    return model, optimizer


@dataclass(frozen=True)
class StepSettings:
    """What one optimisation step needs from the config, read once: the step runs hundreds of
    thousands of times."""

    epsilon_std: float
    weight: float  # multiplies the batch's mean nats per image to give the optimised objective
    kl_weight: float  # beta, once warmed up
    kl_warmup_steps: int  # steps over which the KL weight rises from 0 to kl_weight; 0: none
    grad_clip: float | None
    bf16: bool
    check_finite: bool  # read the loss back every step: free on CPU, a sync elsewhere
    loss_terms: Callable[..., tuple[torch.Tensor, torch.Tensor]] = loss_terms

    @classmethod
    def from_config(
        cls, cfg: Config, check_finite: bool = True, steps_per_epoch: int | None = None
    ) -> StepSettings:
        """`steps_per_epoch` sizes the KL warm-up; only a config with one needs it."""
        if cfg.kl_warmup_epochs and steps_per_epoch is None:
            raise ValueError("kl_warmup_epochs needs steps_per_epoch")
        return cls(
            epsilon_std=cfg.epsilon_std,
            weight=objective_weight(cfg.objective_scale),
            kl_weight=cfg.kl_weight,
            kl_warmup_steps=cfg.kl_warmup_epochs * (steps_per_epoch or 0),
            grad_clip=cfg.grad_clip,
            bf16=cfg.runtime.precision == Precision.bf16,
            check_finite=check_finite,
            loss_terms=torch.compile(loss_terms) if cfg.runtime.compile else loss_terms,
        )

    def kl_weight_at(self, step: int) -> float:
        """The KL term's weight in step `step`'s objective (steps count from 1): 0 at the first
        step, rising linearly to kl_weight over the warm-up's steps, then kl_weight. A plain
        function of the step: a resumed run continues the ramp exactly, and no value is read
        back from the device."""
        if step > self.kl_warmup_steps:
            return self.kl_weight
        return self.kl_weight * (step - 1) / self.kl_warmup_steps


def objective_weight(scale: ObjectiveScale) -> float:
    """per_pixel is the reference's Keras loss, binary_crossentropy (a mean over the 784 pixels)
    plus mean(KL) / 784: the negative ELBO in nats per image / 784; per_image is nats per image.
    Keras's RMSprop is not scale-invariant (vaeexp.optim), so the two scales train differently,
    and per_pixel, the default, trains the reference's objective."""
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
    returns the per-image (recon, kl) in nats, before the step: unweighted, whatever the KL
    weight of the objective."""
    if settings.bf16:
        with torch.autocast(x.device.type, torch.bfloat16):
            recon, kl = settings.loss_terms(model, x, settings.epsilon_std, noise=noise)
        recon, kl = recon.float(), kl.float()
    else:
        recon, kl = settings.loss_terms(model, x, settings.epsilon_std, noise=noise)
    beta = settings.kl_weight_at(step)  # a Python float: nothing to read back from the device
    loss = (recon + kl if beta == 1.0 else recon + beta * kl).mean() * settings.weight
    if settings.check_finite and not math.isfinite(loss.item()):
        check_finite(step, recon.sum().item(), kl.sum().item())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if settings.grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
    optimizer.step()
    return recon, kl


@torch.no_grad()
def held_out_losses(
    model: VAE, x: torch.Tensor, epsilon_std: float, batch_size: int
) -> dict[str, float]:
    """Mean loss terms over the test images `x` with fixed noise, so the same model always
    scores the same.

    `loss` is the training objective in nats, which depends on epsilon_std; `neg_elbo` is the
    true negative ELBO (epsilon ~ N(0, 1)), comparable across runs with different epsilon_std.
    """
    was_training = model.training
    model.eval()
    stds = [epsilon_std] if epsilon_std == 1.0 else [epsilon_std, 1.0]
    sums = torch.zeros(len(stds), 2, device=x.device)
    for i, std in enumerate(stds):
        g = torch.Generator(device=x.device).manual_seed(TEST_SEED)
        for xb in x.split(batch_size):
            recon, kl = loss_terms(model, xb, std, g)
            sums[i] += torch.stack((recon.sum(), kl.sum()))
    model.train(was_training)
    (recon, kl), elbo_terms = (sums / len(x)).tolist()[0], (sums[-1] / len(x)).tolist()
    return {"loss": recon + kl, "recon": recon, "kl": kl, "neg_elbo": sum(elbo_terms)}


def check_finite(step: int, recon: float, kl: float, where: str = "training") -> None:
    for term, value in (("recon", recon), ("kl", kl)):
        if not math.isfinite(value):
            raise Diverged(f"{where} loss diverged at step {step}: {term} is {value}")
    if not math.isfinite(recon + kl):
        raise Diverged(f"{where} loss diverged at step {step}: recon + kl is {recon + kl}")
