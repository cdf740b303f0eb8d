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
    max_samples: int = 1024,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Per-image lower bound L_k on log p(x), in nats; L_1 is the ELBO and L_k -> log p(x).

    Images are processed in chunks so that k * chunk latent samples are decoded at once
    (vectorised over samples and images); `max_samples` keeps a chunk's logits near the cache.
    """
    was_training = model.training
    model.eval()
    chunk = max(1, max_samples // k)
    # One buffer for every chunk's logits: a fresh block per chunk would fragment glibc's heap by
    # a different amount in each run, and with it the run's peak memory.
    rows, pixels = k * min(chunk, len(x)), model.decoder_out.out_features
    buffer = torch.empty(rows, pixels, device=x.device, dtype=x.dtype)
    bounds = []
    for xb in x.split(chunk):
        mean, log_var = model.encode(xb)  # (b, d)
        eps = torch.randn((k, *mean.shape), generator=generator, device=x.device, dtype=x.dtype)
        z = mean + torch.exp(log_var / 2) * eps  # (k, b, d)
        log_pz = -0.5 * (z.square() + _LOG_2PI).sum(-1)
        log_qz = -0.5 * (eps.square() + _LOG_2PI + log_var).sum(-1)
        log_px = log_px_z(model, z, xb, buffer[: k * len(xb)])
        bounds.append(torch.logsumexp(log_px + log_pz - log_qz, 0) - math.log(k))
    model.train(was_training)
    return torch.cat(bounds)


def log_px_z(
    model: VAE, z: torch.Tensor, x: torch.Tensor, buffer: torch.Tensor | None = None
) -> torch.Tensor:
    """Bernoulli log-likelihood sum_i x_i l_i - softplus(l_i) of images x (b, 784) under codes
    z (k, b, d) of a one-member `model`, with logits l = h W + c: the same number as
    -BCE-with-logits summed over pixels. The x.l term is a 256-wide product per sample,
    h.(W x) + c.x, instead of a 784-wide one, and softplus is one fused pass where BCE makes
    several passes over the logits. `buffer` (k * b, 784), if given, holds the logits.
    """
    hidden, out = model.decoder_h, model.decoder_out
    weight, bias = out.weight[0], out.bias[0, 0]  # (hidden, 784), (784,)
    h = F.relu(z @ hidden.weight[0] + hidden.bias[0, 0])  # (k, b, hidden)
    x_dot_logits = torch.einsum("kbh,bh->kb", h, x @ weight.T) + x @ bias
    logits = torch.addmm(bias, h.flatten(0, 1), weight, out=buffer)
    softplus = F.softplus(logits, 1, 20, out=logits)  # in place
    return x_dot_logits - softplus.view(*h.shape[:2], -1).sum(-1)


def iwae_nll(model: VAE, x: torch.Tensor, k: int, seed: int = 0) -> float:
    """Mean negative L_k over `x`: an upper bound on the test NLL, deterministic for a seed."""
    g = torch.Generator(device=x.device).manual_seed(seed)
    return -iwae_log_likelihood(model, x, k, generator=g).mean().item()


def iwae_metrics(model: VAE, test_x: torch.Tensor, k: int, images: int | None) -> dict[str, float]:
    """The end-of-run bound `test_nll_iwae_k{k}` over the first `images` test images (None: all
    of them; 0: none, and no metric)."""
    if images == 0:
        return {}
    x = test_x[:images].to(next(model.parameters()).device)
    return {f"test_nll_iwae_k{k}": iwae_nll(model, x, k)}
