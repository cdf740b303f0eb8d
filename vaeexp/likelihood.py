"""Test log-likelihood estimates that mean the same thing whatever a run trained with.

The training objective depends on `epsilon_std`; the ELBO and the importance-weighted bound
(Burda et al., 2016) below always use the model's own posterior, epsilon ~ N(0, 1), so runs with
different settings compare. For non-binarized pixels the Bernoulli likelihood is not a normalised
density on [0, 1]: compare numbers only between runs with the same `data.binarize`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from vaeexp.model import VAE

_LOG_2PI = math.log(2 * math.pi)


@torch.no_grad()
def iwae_log_likelihood(
    model: VAE,
    x: torch.Tensor,
    k: int = 1000,
    *,
    max_samples: int = 8192,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Per-image lower bound L_k on log p(x), in nats; L_1 is the ELBO and L_k -> log p(x).

    Images are processed in chunks so that k * chunk latent samples are decoded at once
    (vectorised over samples and images, `max_samples` bounding memory).
    """
    was_training = model.training
    model.eval()
    chunk = max(1, max_samples // k)
    bounds = []
    for xb in x.split(chunk):
        mean, log_var = model.encode(xb)  # (b, d)
        eps = torch.randn((k, *mean.shape), generator=generator, device=x.device, dtype=x.dtype)
        z = mean + torch.exp(log_var / 2) * eps  # (k, b, d)
        logits = model.decode_logits(z.flatten(0, 1)).view(k, len(xb), -1)
        log_px_z = -F.binary_cross_entropy_with_logits(
            logits, xb.expand(k, -1, -1), reduction="none"
        ).sum(-1)
        log_pz = -0.5 * (z.square() + _LOG_2PI).sum(-1)
        log_qz = -0.5 * (eps.square() + _LOG_2PI + log_var).sum(-1)
        bounds.append(torch.logsumexp(log_px_z + log_pz - log_qz, dim=0) - math.log(k))
    model.train(was_training)
    return torch.cat(bounds)


def iwae_nll(model: VAE, x: torch.Tensor, k: int, seed: int = 0) -> float:
    """Mean negative L_k over `x`: an upper bound on the test NLL, deterministic for a seed."""
    g = torch.Generator(device=x.device).manual_seed(seed)
    return -iwae_log_likelihood(model, x, k, generator=g).mean().item()
