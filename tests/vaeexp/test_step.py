"""One optimisation step and the test-set losses (vaeexp.step)."""

import pytest
import torch

from tests.conftest import TINY, make_cfg
from vaeexp.config import settings
from vaeexp.data import load_data
from vaeexp.model import IMAGE_DIM, VAE, loss_terms
from vaeexp.step import StepSettings, held_out_losses, setup, train_step

CPU = torch.device("cpu")


def one_step(cfg, x, noise, step=1, steps_per_epoch=None):
    """Set up `cfg` alone and take one step on batch x (b, 784) with noise (b, latent_dim); the
    model, and the gradients of that step."""
    model, optimizer = setup([cfg], CPU)
    settings = StepSettings.from_configs([cfg], CPU, steps_per_epoch=steps_per_epoch)
    grads = []
    step_of = optimizer.step
    optimizer.step = lambda g: (grads.extend(g), step_of(g))  # what the update was given
    terms = train_step(model, optimizer, x[None], noise[None], settings, step=step)
    return model, grads, terms


@pytest.fixture(scope="module")
def data():
    return load_data(make_cfg(*TINY).data)


def test_true_elbo_is_logged_whatever_epsilon_std(data):
    model = VAE()
    (same,) = held_out_losses(model, data.test_x, 1.0, 64)
    assert same["neg_elbo"] == same["loss"]  # epsilon_std=1: the objective is the ELBO
    (narrow,) = held_out_losses(model, data.test_x, 0.1, 64)
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
        _, grads, _ = one_step(settings(make_cfg(*TINY, *extra)), x, noise)
        return torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))

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
        _, grads, (recon, kl) = one_step(cfg, x, noise, step, per_epoch)
        schedule = StepSettings.from_configs([cfg], CPU, steps_per_epoch=per_epoch)
        return grads, (recon[0], kl[0]), schedule

    def grads_of(w):  # from the same initial weights, by hand
        model, optimizer = setup([cfgs[()]], CPU)
        recon, kl = loss_terms(model, x[None], 1.0, noise=noise[None])
        objective = recon if w == 0 else recon + w * kl
        grads = torch.autograd.grad(objective.mean() / IMAGE_DIM, optimizer.params)
        return list(grads), (recon[0].detach(), kl[0].detach())

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
    assert StepSettings.from_configs([cfgs[()]], CPU).kl_weight_at(1) == 1.0


def _keras_reference_step(model, x, noise, lr=1e-3, rho=0.9, eps=1e-7):
    """The parameters after one step of Keras's RMSprop on the reference's loss, written from
    Keras's definitions in float64: binary_crossentropy on the clipped sigmoid output, averaged
    over the pixels and the batch, plus add_loss(mean(kl) / 784); v = rho v + (1 - rho) g^2,
    p -= lr g / sqrt(v + eps), from v = 0."""
    p = {k: v.detach()[0].double().requires_grad_() for k, v in model.named_parameters()}
    x, noise = x.double(), noise.double()

    def dense(name, inp):  # a member's weight is (in, out), its bias (1, out)
        return inp @ p[f"{name}.weight"] + p[f"{name}.bias"]

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
        model, optimizer = setup([cfg], CPU)
        before = {k: v.detach().double().clone() for k, v in model.named_parameters()}
        expected = _keras_reference_step(model, x, noise)
        train_step(model, optimizer, x[None], noise[None], _settings([cfg]), step=1)
        steps[scale] = {
            k: (v.detach()[0].double() - before[k][0], expected[k] - before[k][0])
            for k, v in model.named_parameters()
        }
    for name, (ours, keras) in steps["per_pixel"].items():
        torch.testing.assert_close(ours, keras, rtol=1e-3, atol=1e-8, msg=name)
    largest = max((o - k).abs().max().item() for o, k in steps["per_image"].values())
    assert largest > 1e-4  # Keras's eps damps small gradients only at the per-pixel scale
    assert make_cfg().objective_scale.value == "per_pixel"  # the default trains the reference


def test_a_member_of_a_stack_steps_as_keras_whatever_its_neighbours(data):
    """A member in a stack of four, whose others have other seeds, learning rates, rho, eps,
    epsilon_std and objective scales and their own batches and noise, takes Keras's step for
    its own settings: nothing of the others reaches its update."""
    g = torch.Generator().manual_seed(11)
    others = [
        ("seed=1", "lr=3e-3", "rho=0.8", "epsilon_std=0.5"),
        ("seed=2", "lr=1e-2", "eps=1e-4", "objective_scale=per_image"),
        ("seed=3", "lr=5e-4", "rho=0.95", "grad_clip=0.01"),
    ]
    ours = ("seed=5", "lr=2e-3", "rho=0.85", "eps=1e-6")
    order = [others[0], ours, others[1], others[2]]  # ours is member 1
    cfgs = [settings(make_cfg(*TINY, "experiment=reference", *o)) for o in order]
    x = data.train_x[torch.randperm(len(data.train_x), generator=g)[:400]].view(4, 100, -1)
    noise = torch.randn(4, 100, 2, generator=g)
    model, optimizer = setup(cfgs, CPU)
    alone = model.member(1)
    expected = _keras_reference_step(alone, x[1], noise[1], lr=2e-3, rho=0.85, eps=1e-6)
    before = {k: v.detach()[1].double().clone() for k, v in model.named_parameters()}
    train_step(model, optimizer, x, noise, _settings(cfgs), step=1)
    for name, v in model.named_parameters():
        moved, keras = v.detach()[1].double() - before[name], expected[name] - before[name]
        torch.testing.assert_close(moved, keras, rtol=1e-3, atol=1e-8, msg=name)


def _settings(cfgs):
    return StepSettings.from_configs(cfgs, CPU)
