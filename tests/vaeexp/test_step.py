"""One optimisation step and the test-set losses (vaeexp.step)."""

import pytest
import torch

from tests.conftest import TINY, make_cfg
from vaeexp.config import settings
from vaeexp.data import load_data
from vaeexp.model import IMAGE_DIM, VAE, loss_terms
from vaeexp.step import StepSettings, held_out_losses, setup, train_step

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def data():
    return load_data(make_cfg(*TINY).data)


def test_true_elbo_is_logged_whatever_epsilon_std(data):
    model = VAE()
    same = held_out_losses(model, data.test_x, 1.0, 64)
    assert same["neg_elbo"] == same["loss"]  # epsilon_std=1: the objective is the ELBO
    narrow = held_out_losses(model, data.test_x, 0.1, 64)
    assert narrow["neg_elbo"] == pytest.approx(same["neg_elbo"])  # the same noise, same model
    assert narrow["loss"] != narrow["neg_elbo"]


def test_evaluation_does_not_touch_training_rng(data):
    model = VAE()
    before = torch.get_rng_state()
    first = held_out_losses(model, data.test_x, 1.0, 64)
    assert torch.equal(torch.get_rng_state(), before)
    assert held_out_losses(model, data.test_x, 1.0, 64) == first  # fixed noise: same score


def test_grad_clip_bounds_the_gradient_norm(data):
    """grad_clip bounds the global norm of the optimised objective's gradients."""
    x = data.train_x[:100]
    noise = torch.randn(100, 2, generator=torch.Generator().manual_seed(3))

    def norm_after_step(*extra):
        cfg = settings(make_cfg(*TINY, *extra))
        model, optimizer = setup(cfg, CPU)
        train_step(model, optimizer, x, noise, StepSettings.from_config(cfg), step=1)
        return torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))

    free = norm_after_step()
    assert free > 1e-3
    clipped = norm_after_step("grad_clip=1e-3").item()
    assert 0.9999e-3 < clipped <= 1e-3  # torch divides by (norm + 1e-6)
    assert norm_after_step(f"grad_clip={2 * free.item()}") == pytest.approx(free.item())


def test_kl_weight_weights_the_objective_and_warms_up_from_zero(data):
    """The step's gradients are those of recon + w * KL, w = kl_weight, or during a warm-up
    w = kl_weight * (step - 1) / warm-up steps: 0 at the first step, then up by step. The terms
    it returns stay the unweighted ones."""
    x = data.train_x[:100]
    noise = torch.randn(100, 2, generator=torch.Generator().manual_seed(5))
    per_epoch = 4  # steps_per_epoch: a 1-epoch warm-up is 4 steps
    cfgs = {
        extra: settings(make_cfg(*TINY, *extra))
        for extra in ((), ("kl_weight=4",), ("kl_weight=4", "kl_warmup_epochs=1"))
    }

    def grads_of_step(step, *extra):
        cfg = cfgs[extra]
        model, optimizer = setup(cfg, CPU)
        step_settings = StepSettings.from_config(cfg, steps_per_epoch=per_epoch)
        recon, kl = train_step(model, optimizer, x, noise, step_settings, step=step)
        return [p.grad for p in model.parameters()], (recon, kl), step_settings

    def grads_of(w):  # from the same initial weights, by hand
        model, _ = setup(cfgs[()], CPU)
        recon, kl = loss_terms(model, x, 1.0, noise=noise)
        objective = recon if w == 0 else recon + w * kl
        (objective.mean() / IMAGE_DIM).backward()
        return [p.grad for p in model.parameters()], (recon, kl)

    def same(a, b):
        for ga, gb in zip(a, b, strict=True):
            torch.testing.assert_close(ga, gb)

    beta4, terms4, _ = grads_of_step(1, "kl_weight=4")
    same(beta4, grads_of(4)[0])
    same(terms4, grads_of(1)[1])  # unweighted recon and KL, as metrics read them
    warm = ("kl_weight=4", "kl_warmup_epochs=1")
    first, _, schedule = grads_of_step(1, *warm)
    same(first, grads_of(0)[0])  # the warm-up's first step: the reconstruction alone
    same(grads_of_step(3, *warm)[0], grads_of(2)[0])  # halfway: 4 * 2 / 4
    same(grads_of_step(5, *warm)[0], beta4)  # warmed up
    assert [schedule.kl_weight_at(s) for s in range(1, 7)] == [0, 1, 2, 3, 4, 4]
    assert StepSettings.from_config(cfgs[()]).kl_weight_at(1) == 1.0


def _keras_reference_step(model, x, noise, lr=1e-3, rho=0.9, eps=1e-7):
    """The parameters after one step of Keras's RMSprop on the reference's loss, written from
    Keras's definitions in float64: binary_crossentropy on the clipped sigmoid output, averaged
    over the pixels and the batch, plus add_loss(mean(kl) / 784); v = rho v + (1 - rho) g^2,
    p -= lr g / sqrt(v + eps), from v = 0."""
    p = {k: v.detach().double().requires_grad_() for k, v in model.named_parameters()}
    x, noise = x.double(), noise.double()

    def dense(name, inp):
        return inp @ p[f"{name}.weight"].T + p[f"{name}.bias"]

    h = torch.relu(dense("encoder", x))
    z_mean, z_log_var = dense("z_mean", h), dense("z_log_var", h)
    z = z_mean + torch.exp(z_log_var / 2) * noise
    y = torch.sigmoid(dense("decoder_out", torch.relu(dense("decoder_h", z)))).clamp(eps, 1 - eps)
    bce = -(x * torch.log(y) + (1 - x) * torch.log(1 - y)).mean(dim=-1)
    kl = -0.5 * torch.sum(1 + z_log_var - torch.exp(z_log_var) - z_mean.square(), dim=-1)
    loss = bce.mean() + kl.mean() / 784.0
    grads = torch.autograd.grad(loss, list(p.values()))
    return {
        k: (v - lr * g / torch.sqrt((1 - rho) * g.square() + eps)).detach()
        for (k, v), g in zip(p.items(), grads, strict=True)
    }


def test_reference_step_is_keras_rmsprop_on_the_per_pixel_objective(data):
    """The preset's first optimiser step, through the trainer's own setup and step, is Keras's;
    the nats-per-image objective, from the same weights, batch and noise, steps elsewhere."""
    x = data.train_x[:100]
    noise = torch.randn(100, 2, generator=torch.Generator().manual_seed(7))
    steps = {}
    for scale in ("per_pixel", "per_image"):
        cfg = settings(make_cfg(*TINY, "experiment=reference", f"objective_scale={scale}"))
        model, optimizer = setup(cfg, CPU)
        before = {k: v.detach().double().clone() for k, v in model.named_parameters()}
        expected = _keras_reference_step(model, x, noise)
        train_step(model, optimizer, x, noise, StepSettings.from_config(cfg), step=1)
        steps[scale] = {
            k: (v.detach().double() - before[k], expected[k] - before[k])
            for k, v in model.named_parameters()
        }
    for name, (ours, keras) in steps["per_pixel"].items():
        torch.testing.assert_close(ours, keras, rtol=1e-3, atol=1e-8, msg=name)
    largest = max((o - k).abs().max().item() for o, k in steps["per_image"].values())
    assert largest > 1e-4  # Keras's eps damps small gradients only at the per-pixel scale
    assert make_cfg().objective_scale.value == "per_pixel"  # the default trains the reference
