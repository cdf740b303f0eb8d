import math

import torch
import torch.nn.functional as F

from vaeexp.model import IMAGE_DIM, VAE, kl_divergence, loss_terms


def test_shapes():
    model = VAE(latent_dim=3, intermediate_dim=16)
    x = torch.rand(5, IMAGE_DIM)
    mean, log_var = model.encode(x)
    assert mean.shape == log_var.shape == (5, 3)
    assert model.decode(mean).shape == (5, IMAGE_DIM)
    recon, kl = loss_terms(model, x)
    assert recon.shape == kl.shape == (5,)
    out = model(x)
    assert out.shape == (5, IMAGE_DIM) and out.min() >= 0 and out.max() <= 1


def test_stack_shapes():
    """A stack answers a row per member: for its own batch each, (M, n, 784), or for the same
    images, (n, 784)."""
    model = VAE(latent_dim=3, intermediate_dim=16, members=4)
    assert model.encoder.weight.shape == (4, IMAGE_DIM, 16) and model.encoder.bias.shape == (
        4,
        1,
        16,
    )
    for x in (torch.rand(4, 5, IMAGE_DIM), torch.rand(5, IMAGE_DIM)):
        mean, log_var = model.encode(x)
        assert mean.shape == log_var.shape == (4, 5, 3)
        assert model.decode(mean).shape == (4, 5, IMAGE_DIM)
        recon, kl = loss_terms(model, x)
        assert recon.shape == kl.shape == (4, 5)


def test_members_are_their_own_models():
    """Member m of a stack is the one-member VAE its own generator draws, whatever else is in
    the stack; `member(m)` is a view of its weights that answers as the stack's row m."""
    seeds, inits = [3, 7, 3], ["glorot", "torch", "torch"]
    model = VAE(
        2, 16, inits, members=3, generators=[torch.Generator().manual_seed(s) for s in seeds]
    )
    x = torch.rand(6, IMAGE_DIM)
    stacked = model(x)
    for m, (seed, init) in enumerate(zip(seeds, inits, strict=True)):
        alone = VAE(2, 16, init, generators=[torch.Generator().manual_seed(seed)])
        view = model.member(m)
        for name, value in alone.state_dict().items():
            assert torch.equal(view.state_dict()[name], value), (m, name)
        torch.testing.assert_close(view(x), stacked[m])
    assert not torch.equal(model.encoder.weight[1], model.encoder.weight[2])  # seed or init
    view = model.member(2)
    with torch.no_grad():
        model.encoder.bias[2].add_(1.0)
    assert torch.equal(view.encoder.bias, model.encoder.bias[2:3])  # a view, not a copy


def test_glorot_init_zero_biases():
    torch.manual_seed(0)
    model = VAE(latent_dim=2, intermediate_dim=256)
    for layer in (model.encoder, model.decoder_out):
        assert torch.count_nonzero(layer.bias) == 0
        limit = math.sqrt(6 / (layer.in_features + layer.out_features))
        assert layer.weight.shape == (1, layer.in_features, layer.out_features)
        assert layer.weight.abs().max() <= limit
        assert layer.weight.abs().max() > 0.9 * limit
    assert torch.count_nonzero(VAE(init="torch").encoder.bias) > 0


def test_kl_closed_form_matches_monte_carlo():
    g = torch.Generator().manual_seed(0)
    mean = torch.tensor([[0.5, -1.0, 2.0]])
    log_var = torch.tensor([[-1.0, 0.3, 0.0]])
    std = torch.exp(log_var / 2)
    z = mean + std * torch.randn(400_000, 3, generator=g)
    q = torch.distributions.Normal(mean, std).log_prob(z).sum(1)
    p = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(1)
    mc = (q - p).mean()
    assert abs(kl_divergence(mean, log_var).item() - mc.item()) < 0.01
    assert kl_divergence(torch.zeros(1, 4), torch.zeros(1, 4)).item() == 0


def test_recon_is_bce_summed_over_784_pixels():
    """The reference: original_dim * mean binary cross-entropy, i.e. the sum over pixels."""
    model = VAE(latent_dim=2, intermediate_dim=8)
    x = torch.rand(4, IMAGE_DIM)
    recon, _ = loss_terms(model, x, epsilon_std=0.0)  # no noise: z is the posterior mean
    probs = model.decode(model.encode(x)[0])
    expected = IMAGE_DIM * F.binary_cross_entropy(probs, x, reduction="none").mean(dim=1)
    torch.testing.assert_close(recon, expected, rtol=1e-5, atol=1e-3)


def test_epsilon_std_scales_the_noise():
    model = VAE(latent_dim=2, intermediate_dim=8)
    x = torch.rand(3, IMAGE_DIM)
    a, _ = loss_terms(model, x, 0.0, torch.Generator().manual_seed(1))
    b, _ = loss_terms(model, x, 0.0, torch.Generator().manual_seed(2))
    c, _ = loss_terms(model, x, 1.0, torch.Generator().manual_seed(2))
    torch.testing.assert_close(a, b)  # epsilon_std=0: deterministic
    assert not torch.allclose(b, c)
