"""The reference MLP VAE and its loss terms, in nats per image (the step scales them to the
optimised objective: see `vaeexp.step.objective_weight`).

784 -> Dense(h, relu) -> (z_mean, z_log_var) -> z = mean + exp(log_var / 2) * N(0, epsilon_std^2)
-> Dense(h, relu) -> Dense(784, sigmoid); loss = binary cross-entropy summed over pixels + KL.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

IMAGE_DIM = 28 * 28


class VAE(nn.Module):
    def __init__(self, latent_dim: int = 2, intermediate_dim: int = 256, init: str = "glorot"):
        super().__init__()
        self.latent_dim = latent_dim
        self.encoder = nn.Linear(IMAGE_DIM, intermediate_dim)
        self.z_mean = nn.Linear(intermediate_dim, latent_dim)
        self.z_log_var = nn.Linear(intermediate_dim, latent_dim)
        self.decoder_h = nn.Linear(latent_dim, intermediate_dim)
        self.decoder_out = nn.Linear(intermediate_dim, IMAGE_DIM)
        if init == "glorot":  # Keras's defaults; torch's own init trains to a different loss
            for layer in self.modules():
                if isinstance(layer, nn.Linear):
                    nn.init.xavier_uniform_(layer.weight)
                    nn.init.zeros_(layer.bias)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = F.relu(self.encoder(x))
        return self.z_mean(h), self.z_log_var(h)

    def decode_logits(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder_out(F.relu(self.decoder_h(z)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Pixel probabilities for latent codes z (n, latent_dim) -> (n, 784)."""
        return torch.sigmoid(self.decode_logits(z))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Deterministic reconstruction (decoded posterior mean): what a served model returns."""
        return self.decode(self.encode(x)[0])


def loss_terms(
    model: VAE,
    x: torch.Tensor,
    epsilon_std: float = 1.0,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image reconstruction and KL terms in nats, each of shape (n,).

    BCE is computed from logits: the same value as BCE on the sigmoid output, without its
    log(0) clipping, which is also what TF-Keras does internally for a sigmoid output.
    `noise` (n, latent_dim) ~ N(0, 1) may be passed in, so that a compiled copy of this
    function draws exactly what eager code draws.
    """
    mean, log_var = model.encode(x)
    if noise is None:
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    z = mean + torch.exp(log_var / 2) * (epsilon_std * noise)
    logits = model.decode_logits(z)
    recon = F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(dim=1)
    return recon, kl_divergence(mean, log_var)


def kl_divergence(mean: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(log_var)) || N(0, I)) per row, in closed form."""
    return -0.5 * torch.sum(1 + log_var - mean.square() - log_var.exp(), dim=1)
