"""One optimisation step of a stack of VAEs, the objective it minimises, its random draws, and
the test-set losses.

The loss terms are nats per image; the optimised objective weights the KL term by `kl_weight`
(beta, warmed up from 0 over `kl_warmup_epochs`) and is scaled by `objective_scale` (Keras's
per-pixel mean, as the reference, or nats per image). Metrics are the unweighted terms.

Every member of a stack has its own settings (vaeexp.stacked.PER_MEMBER) and its own random
numbers: its initial weights from its seed, its batch order and reparameterisation noise from
(seed, epoch), drawn whole for the epoch, so that a member draws exactly what the same job draws
alone, whatever else is in its stack. The objective is the sum of the members' objectives: each
member's gradient is its own objective's, since no product or sum mixes members.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from vaeexp.config import Binarize, Config, ObjectiveScale, Precision
from vaeexp.model import IMAGE_DIM, VAE, loss_terms
from vaeexp.optim import Hyper, StackedOptimizer, make_optimizer, per_member

TEST_SEED = 2024  # test-set noise: the same draws for every member and every epoch
NOISE, BINARIZE = 1, 2  # streams of a member's (seed, epoch) draws (`stream_seed`)


class Diverged(RuntimeError):
    """The loss stopped being finite."""


class MembersDiverged(Diverged):
    """Some members' losses stopped being finite; `reasons` maps each to its message."""

    def __init__(self, reasons: dict[int, str]) -> None:
        super().__init__("; ".join(reasons.values()))
        self.reasons = reasons


def setup(cfgs: Sequence[Config], device: torch.device) -> tuple[VAE, StackedOptimizer]:
    """The stack's model, each member seeded as its job alone, and its optimizer."""
    first = cfgs[0]
    model = VAE(
        first.latent_dim,
        first.intermediate_dim,
        [c.init.value for c in cfgs],
        members=len(cfgs),
        generators=[torch.Generator().manual_seed(c.seed) for c in cfgs],
    ).to(device)

    def hyper(key: str) -> Hyper:
        return per_member([getattr(c, key) for c in cfgs], device, dtype=torch.float64)

    params = list(model.parameters())
    optimizer = make_optimizer(
        first.optimizer.value, params, hyper("lr"), hyper("rho"), hyper("eps")
    )
    return model, optimizer


def stream_seed(seed: int, epoch: int, stream: int, batch: int = 0) -> int:
    """A 64-bit seed for one stream of a member's draws in one epoch: independent of the other
    streams and epochs (numpy's SeedSequence mixes them), and the same whatever the stack."""
    return int(np.random.SeedSequence([seed, epoch, stream, batch]).generate_state(1, np.uint64)[0])


def batch_order(cfgs: Sequence[Config], epoch: int, n: int, device: torch.device) -> torch.Tensor:
    """Each member's shuffled order of the n training images in `epoch`, (M, n), on `device`
    (to a GPU from pinned memory: the copy waits for nothing). Seeded as vaeexp has always
    shuffled: runs keep their batch order."""
    orders = [
        torch.randperm(n, generator=torch.Generator().manual_seed(c.seed * 100_003 + epoch))
        for c in cfgs
    ]
    stacked = torch.stack(orders)
    if device.type != "cuda":
        return stacked.to(device)
    return stacked.pin_memory().to(device, non_blocking=True)


def epoch_noise(
    cfgs: Sequence[Config], epoch: int, n: int, device: torch.device, out: torch.Tensor | None
) -> torch.Tensor:
    """Each member's reparameterisation noise ~ N(0, 1) for every image of `epoch`, (M, n,
    latent_dim): one draw per member and epoch, not one per step (M small draws a step would
    cost a stack more than its step), into `out` if given."""
    latent_dim = cfgs[0].latent_dim
    out = out if out is not None else torch.empty(len(cfgs), n, latent_dim, device=device)
    for m, c in enumerate(cfgs):
        g = torch.Generator(device=device).manual_seed(stream_seed(c.seed, epoch, NOISE))
        torch.randn(n, latent_dim, generator=g, device=device, out=out[m])
    return out


def binarized(x: torch.Tensor, cfgs: Sequence[Config], epoch: int, batch: int) -> torch.Tensor:
    """data.binarize=dynamic: each member's batch (M, b, 784) resampled as Bernoulli draws of its
    pixels, from a generator of its own (seed, epoch, batch), so a resumed run draws the same."""
    out = torch.empty_like(x)
    for m, c in enumerate(cfgs):
        g = torch.Generator(device=x.device).manual_seed(
            stream_seed(c.seed, epoch, BINARIZE, batch)
        )
        torch.bernoulli(x[m], generator=g, out=out[m])
    return out


def dynamic_binarization(cfg: Config) -> bool:
    """Whether each batch is drawn anew as Bernoulli pixels (`binarized`)."""
    return cfg.data.binarize == Binarize.dynamic


@dataclass(frozen=True)
class StepSettings:
    """What one optimisation step needs from the members' configs, read once: the step runs
    hundreds of thousands of times. Each setting is one number when every member has the same,
    else one per member, shaped to broadcast."""

    epsilon_std: Hyper  # (M, 1, 1) when members differ
    weight: Hyper  # multiplies each member's mean nats per image to give its objective; (M,)
    kl_weight: tuple[float, ...]  # beta of each member, once warmed up
    kl_warmup_steps: tuple[int, ...]  # steps over which each member's KL weight rises from 0
    grad_clip: Hyper | None  # each member's global-norm bound ((M, 1, 1), inf: none); None: none
    bf16: bool
    check_finite: bool  # read the losses back every step: free on CPU, a sync elsewhere
    loss_terms: Callable[..., tuple[torch.Tensor, torch.Tensor]] = loss_terms

    @classmethod
    def from_configs(
        cls,
        cfgs: Sequence[Config],
        device: torch.device,
        check_finite: bool = True,
        steps_per_epoch: int | None = None,
    ) -> StepSettings:
        """`steps_per_epoch` sizes the KL warm-up; only configs with one need it."""
        if any(c.kl_warmup_epochs for c in cfgs) and steps_per_epoch is None:
            raise ValueError("kl_warmup_epochs needs steps_per_epoch")
        first = cfgs[0]
        weights = per_member([objective_weight(c.objective_scale) for c in cfgs], device)
        clips = [c.grad_clip for c in cfgs]
        return cls(
            epsilon_std=per_member([c.epsilon_std for c in cfgs], device),
            weight=weights.view(-1) if isinstance(weights, torch.Tensor) else weights,
            kl_weight=tuple(c.kl_weight for c in cfgs),
            kl_warmup_steps=tuple(c.kl_warmup_epochs * (steps_per_epoch or 0) for c in cfgs),
            grad_clip=None
            if all(c is None for c in clips)
            else per_member([math.inf if c is None else c for c in clips], device),
            bf16=first.runtime.precision == Precision.bf16,
            check_finite=check_finite,
            loss_terms=torch.compile(loss_terms) if first.runtime.compile else loss_terms,
        )

    def kl_weight_at(self, step: int, member: int = 0) -> float:
        """The KL term's weight in step `step`'s objective of member `member` (steps count from
        1): 0 at the first step, rising linearly to kl_weight over the warm-up's steps, then
        kl_weight. A plain function of the step: a resumed run continues the ramp exactly, and
        no value is read back from the device."""
        beta, warmup = self.kl_weight[member], self.kl_warmup_steps[member]
        if step > warmup:
            return beta
        return beta * (step - 1) / warmup

    def kl_weights_at(self, step: int, device: torch.device) -> Hyper:
        """Every member's KL weight at `step`: one number when they agree, else (M, 1)."""
        betas = [self.kl_weight_at(step, m) for m in range(len(self.kl_weight))]
        if all(b == betas[0] for b in betas):
            return betas[0]
        return torch.tensor(betas, device=device).view(-1, 1)


def objective_weight(scale: ObjectiveScale) -> float:
    """per_pixel is the reference's Keras loss, binary_crossentropy (a mean over the 784 pixels)
    plus mean(KL) / 784: the negative ELBO in nats per image / 784; per_image is nats per image.
    Keras's RMSprop is not scale-invariant (vaeexp.optim), so the two scales train differently,
    and per_pixel, the default, trains the reference's objective."""
    return 1 / IMAGE_DIM if scale == ObjectiveScale.per_pixel else 1.0


def train_step(
    model: VAE,
    optimizer: StackedOptimizer,
    x: torch.Tensor,
    noise: torch.Tensor,
    settings: StepSettings,
    step: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimiser step of every member on its batch, `x` (M, b, 784), with its noise `noise`
    (M, b, latent_dim) ~ N(0, 1); returns each member's per-image (recon, kl) in nats, (M, b),
    before the step: unweighted, whatever the KL weight of the objective. With `check_finite`,
    members whose loss is not finite raise MembersDiverged before anything is updated."""
    if settings.bf16:  # no cast cache: a captured step (CUDA graph) must not keep one
        with torch.autocast(x.device.type, torch.bfloat16, cache_enabled=False):
            recon, kl = settings.loss_terms(model, x, settings.epsilon_std, noise=noise)
        recon, kl = recon.float(), kl.float()
    else:
        recon, kl = settings.loss_terms(model, x, settings.epsilon_std, noise=noise)
    beta = settings.kl_weights_at(step, x.device)  # no value read back from the device
    terms = recon + kl if isinstance(beta, float) and beta == 1.0 else recon + beta * kl
    objectives = terms.mean(dim=1) * settings.weight  # (M,)
    if settings.check_finite:
        values = objectives.tolist()
        if not all(math.isfinite(v) for v in values):
            raise MembersDiverged(divergences(step, recon.sum(1).tolist(), kl.sum(1).tolist()))
    grads = torch.autograd.grad(objectives.sum(), optimizer.params)
    if settings.grad_clip is not None:
        clip_grad_norms(grads, settings.grad_clip)
    optimizer.step(grads)
    return recon.detach(), kl.detach()


def clip_grad_norms(grads: Sequence[torch.Tensor], max_norm: Hyper) -> None:
    """Scale each member's gradients so that their global norm is at most its `max_norm`, as
    torch.nn.utils.clip_grad_norm_ does for one model (norm + 1e-6 in the divisor)."""
    norms = torch.stack([g.flatten(1).norm(dim=1) for g in grads], dim=1).norm(dim=1)
    scale = (max_norm / (norms.view(-1, 1, 1) + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(scale)


@torch.no_grad()
def held_out_losses(
    model: VAE, x: torch.Tensor, epsilon_std: Hyper, batch_size: int
) -> list[dict[str, float]]:
    """Each member's mean loss terms over the test images `x` with fixed noise (the same for
    every member, as each draws it alone), so the same model always scores the same.

    `loss` is the training objective in nats, which depends on epsilon_std; `neg_elbo` is the
    true negative ELBO (epsilon ~ N(0, 1)), comparable across runs with different epsilon_std.
    """
    was_training = model.training
    model.eval()
    members = model.members
    all_ones = not isinstance(epsilon_std, torch.Tensor) and epsilon_std == 1.0
    stds = [epsilon_std] if all_ones else [epsilon_std, 1.0]
    sums = torch.zeros(len(stds), members, 2, device=x.device)
    for i, std in enumerate(stds):
        g = torch.Generator(device=x.device).manual_seed(TEST_SEED)
        for xb in x.split(batch_size):
            noise = torch.randn(len(xb), model.latent_dim, generator=g, device=x.device)
            recon, kl = loss_terms(model, xb, std, noise=noise)
            sums[i] += torch.stack((recon.view(members, -1).sum(1), kl.view(members, -1).sum(1)), 1)
    model.train(was_training)
    means = (sums / len(x)).tolist()
    out = []
    for m in range(members):
        recon, kl = means[0][m]
        out.append({"loss": recon + kl, "recon": recon, "kl": kl, "neg_elbo": sum(means[-1][m])})
    return out


def divergences(
    step: int, recon: Sequence[float], kl: Sequence[float], where: str = "training"
) -> dict[int, str]:
    """Each member whose (recon, kl) are not finite, with the message a solo run stops with."""
    reasons = {}
    for m, (r, k) in enumerate(zip(recon, kl, strict=True)):
        for term, value in (("recon", r), ("kl", k), ("recon + kl", r + k)):
            if not math.isfinite(value):
                reasons[m] = f"{where} loss diverged at step {step}: {term} is {value}"
                break
    return reasons
