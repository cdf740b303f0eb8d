"""The reference MLP VAE and its loss terms, in nats per image (the step scales them to the
optimised objective: see `vaeexp.step.objective_weight`), as a *stack* of independent members.

784 -> Dense(h, relu) -> (z_mean, z_log_var) -> z = mean + exp(log_var / 2) * N(0, epsilon_std^2)
-> Dense(h, relu) -> Dense(784, sigmoid); loss = binary cross-entropy summed over pixels + KL.

Every layer holds M members' weights with a leading member dimension, and applies them with one
batched product (`torch.baddbmm`), so one kernel does the work of M models: a sweep's settings
train together (vaeexp.stacked), and a single run is a stack of one. Members never mix: each
product, sum and optimiser update is per member, so each member computes what it would alone,
to the rounding of a batched product.

Inputs are (M, n, 784), one batch per member, or (n, 784), the same images for every member.
A one-member model given (n, 784) answers in (n, ...): it is the plain VAE that inference, the
exported models and the images use.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

IMAGE_DIM = 28 * 28
INITS = ("glorot", "torch")


class StackedLinear(nn.Module):
    """M Dense layers: weight (M, in, out), bias (M, 1, out)."""

    def __init__(self, members: int, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(members, in_features, out_features))
        self.bias = nn.Parameter(torch.zeros(members, 1, out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:  # the same rows for every member: one product against all of them
            return torch.matmul(x, self.weight) + self.bias
        return torch.baddbmm(self.bias, x, self.weight)

    @torch.no_grad()
    def initialise(self, member: int, init: str, generator: torch.Generator | None) -> None:
        """Draw one member's weights as Keras (glorot: Glorot-uniform, zero bias) or torch's
        nn.Linear would, in torch's (out, in) layout, so a member's draws do not depend on the
        stack around it."""
        weight = torch.empty(self.out_features, self.in_features)
        if init == "glorot":
            nn.init.xavier_uniform_(weight, generator=generator)
            bias = torch.zeros(self.out_features)
        elif init == "torch":
            nn.init.kaiming_uniform_(weight, a=math.sqrt(5), generator=generator)
            bound = 1 / math.sqrt(self.in_features)
            bias = torch.empty(self.out_features).uniform_(-bound, bound, generator=generator)
        else:
            raise ValueError(f"init={init} is not allowed: must be one of {', '.join(INITS)}")
        self.weight[member].copy_(weight.T)
        self.bias[member, 0].copy_(bias)


class VAE(nn.Module):
    LAYERS = ("encoder", "z_mean", "z_log_var", "decoder_h", "decoder_out")

    def __init__(
        self,
        latent_dim: int = 2,
        intermediate_dim: int = 256,
        init: str | Sequence[str] = "glorot",
        members: int = 1,
        generators: list[torch.Generator] | None = None,
    ):
        """`init` is one for all members or one each; `generators`, one per member, draw each
        member's initial weights (None: torch's global generator)."""
        super().__init__()
        self.latent_dim, self.intermediate_dim, self.members = latent_dim, intermediate_dim, members
        self.encoder = StackedLinear(members, IMAGE_DIM, intermediate_dim)
        self.z_mean = StackedLinear(members, intermediate_dim, latent_dim)
        self.z_log_var = StackedLinear(members, intermediate_dim, latent_dim)
        self.decoder_h = StackedLinear(members, latent_dim, intermediate_dim)
        self.decoder_out = StackedLinear(members, intermediate_dim, IMAGE_DIM)
        for m in range(members):
            member_init = init if isinstance(init, str) else init[m]
            self.initialise(m, member_init, generators[m] if generators else None)

    def layers(self) -> list[StackedLinear]:
        return [getattr(self, name) for name in self.LAYERS]

    def initialise(self, member: int, init: str, generator: torch.Generator | None) -> None:
        """Keras's defaults (glorot) or torch's; torch's own init trains to a different loss."""
        for layer in self.layers():
            layer.initialise(member, init, generator)

    def _squeeze(self, x: torch.Tensor, *outs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if x.dim() == 2 and self.members == 1:
            return tuple(o[0] for o in outs)
        return outs

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = F.relu(self.encoder(x))
        return self._squeeze(x, self.z_mean(h), self.z_log_var(h))  # type: ignore[return-value]

    def decode_logits(self, z: torch.Tensor) -> torch.Tensor:
        (logits,) = self._squeeze(z, self.decoder_out(F.relu(self.decoder_h(z))))
        return logits

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Pixel probabilities for latent codes z (n, latent_dim) -> (n, 784), per member."""
        return torch.sigmoid(self.decode_logits(z))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Deterministic reconstruction (decoded posterior mean): what a served model returns."""
        return self.decode(self.encode(x)[0])

    def member(self, index: int, copy: bool = False) -> VAE:
        """Member `index` as a one-member VAE: what the images, the IWAE bound, the checkpoint
        and the exported models of that member use. Its weights are a view of the stack's, or,
        with `copy`, its own (what outlives the stack, and what torch.export saves whole)."""
        one = VAE(self.latent_dim, self.intermediate_dim, members=0)
        one.members = 1
        for name in self.LAYERS:
            mine, theirs = getattr(self, name), getattr(one, name)
            weight, bias = (
                mine.weight.detach()[index : index + 1],
                mine.bias.detach()[index : index + 1],
            )
            if copy:
                weight, bias = weight.clone(), bias.clone()
            theirs.weight, theirs.bias = nn.Parameter(weight, False), nn.Parameter(bias, False)
        return one.train(self.training)


def loss_terms(
    model: VAE,
    x: torch.Tensor,
    epsilon_std: float | torch.Tensor = 1.0,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image reconstruction and KL terms in nats, each of shape (M, n) (or (n,) for a plain
    one-member VAE and (n, 784) images).

    BCE is computed from logits: the same value as BCE on the sigmoid output, without its
    log(0) clipping, which is also what TF-Keras does internally for a sigmoid output.
    `noise` ~ N(0, 1), shaped as the means, may be passed in (the trainer draws it per member).
    `epsilon_std` is a number, or one per member shaped (M, 1, 1).
    """
    mean, log_var = model.encode(x)
    if noise is None:
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    z = mean + torch.exp(log_var / 2) * (epsilon_std * noise)
    logits = model.decode_logits(z)
    target = x if x.dim() == logits.dim() else x.expand_as(logits)
    recon = F.binary_cross_entropy_with_logits(logits, target, reduction="none").sum(dim=-1)
    return recon, kl_divergence(mean, log_var)


def kl_divergence(mean: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(log_var)) || N(0, I)) per row, in closed form."""
    return -0.5 * torch.sum(1 + log_var - mean.square() - log_var.exp(), dim=-1)
