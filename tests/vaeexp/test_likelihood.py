import math

import pytest
import torch
import torch.nn.functional as F

from vaeexp.likelihood import iwae_log_likelihood, iwae_nll, log_px_z
from vaeexp.model import VAE, loss_terms


def _model_and_exact_marginal():
    """A 1-d latent: log p(x) = log of an integral over z, computed by dense quadrature."""
    torch.manual_seed(0)
    model = VAE(latent_dim=1, intermediate_dim=32).double()
    with torch.no_grad():
        model.decoder_out.weight.mul_(0.2)  # a broad posterior, so few samples are needed
    x = torch.rand(16, 784, dtype=torch.float64).round()
    z = torch.linspace(-10, 10, 20_001, dtype=torch.float64).unsqueeze(1)
    with torch.no_grad():
        logits = model.decode_logits(z)
        log_prior = -0.5 * (z[:, 0] ** 2 + math.log(2 * math.pi)) + math.log(z[1, 0] - z[0, 0])
        exact = torch.stack(
            [
                torch.logsumexp(
                    log_prior
                    - F.binary_cross_entropy_with_logits(
                        logits, xi.expand_as(logits), reduction="none"
                    ).sum(1),
                    0,
                )
                for xi in x
            ]
        )
    return model, x, exact


@pytest.mark.slow  # 40,000 samples of 16 images, against a dense quadrature
def test_iwae_converges_to_the_exact_marginal_from_below():
    model, x, exact = _model_and_exact_marginal()

    def gap(k: int) -> float:  # averaged over seeds: one seed's estimate is noisy to ~0.1 nats
        bounds = [
            iwae_log_likelihood(model, x, k, generator=torch.Generator().manual_seed(s)) - exact
            for s in range(4)
        ]
        return torch.stack(bounds).mean().item()

    gaps = {k: gap(k) for k in (1, 10, 1000, 10_000)}
    assert gaps[1] < gaps[10] < gaps[1000] < 0  # a lower bound that tightens with k
    assert abs(gaps[1000]) < 0.15 and abs(gaps[10_000]) < 0.1
    assert gaps[1] < -0.3  # and the ELBO is clearly looser


@pytest.mark.slow  # 200 seeds of the bound and the exact marginal's quadrature
def test_k1_is_the_elbo():
    model, x, _ = _model_and_exact_marginal()
    many = torch.cat(
        [
            iwae_log_likelihood(model, x, 1, generator=torch.Generator().manual_seed(s))
            for s in range(200)
        ]
    )
    recon, kl = loss_terms(model, x.repeat(200, 1), 1.0, torch.Generator().manual_seed(9))
    assert abs(many.mean().item() + (recon + kl).mean().item()) < 0.1


def test_nll_is_deterministic_for_a_seed():
    model = VAE(latent_dim=2, intermediate_dim=16)
    x = torch.rand(10, 784)
    assert iwae_nll(model, x, 50) == iwae_nll(model, x, 50)
    assert iwae_nll(model, x, 50, seed=1) != iwae_nll(model, x, 50)


def test_log_px_z_is_minus_bce_summed_over_pixels():
    torch.manual_seed(0)
    model = VAE(latent_dim=3, intermediate_dim=64).double()
    with torch.no_grad():
        model.decoder_out.weight.mul_(300)  # logits far past softplus's linear threshold too
    x = torch.cat([torch.rand(4, 784), torch.rand(4, 784).round()]).double()
    z = torch.randn(5, 8, 3, dtype=torch.float64)
    with torch.no_grad():
        # a one-member model reads a 3-D input as a stack's batches: decode the codes as rows
        logits = model.decode_logits(z.flatten(0, 1)).view(5, 8, -1)
        bce = F.binary_cross_entropy_with_logits(logits, x.expand(5, -1, -1), reduction="none")
        assert logits.abs().max() > 100
        torch.testing.assert_close(log_px_z(model, z, x), -bce.sum(-1), rtol=1e-9, atol=1e-5)
