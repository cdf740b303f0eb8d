import pytest
import torch

from tests.conftest import TINY, make_cfg
from vaeexp import checkpoint
from vaeexp.data import load_data
from vaeexp.trainer import Diverged, StepSettings, evaluate, setup, train, train_step

CPU = torch.device("cpu")


class Recorder:
    def __init__(self):
        self.steps, self.epochs = [], []

    def on_step(self, step, metrics):
        self.steps.append((step, metrics))

    def on_epoch_end(self, epoch, step, metrics, model):
        timing = ("epoch_seconds", "images_per_second")  # wall clock: never reproducible
        self.epochs.append((epoch, step, {k: v for k, v in metrics.items() if k not in timing}))


@pytest.fixture(scope="module")
def data():
    return load_data(make_cfg(*TINY).data)


def _cfg(*extra):
    return make_cfg(*TINY, "intermediate_dim=64", "batch_size=50", *extra)


def test_same_seed_same_metrics_other_seed_not(data):
    a, b, c = Recorder(), Recorder(), Recorder()
    train(_cfg("epochs=2"), data, device=CPU, hooks=a)
    train(_cfg("epochs=2"), data, device=CPU, hooks=b)
    train(_cfg("epochs=2", "seed=1"), data, device=CPU, hooks=c)
    assert a.steps == b.steps and a.epochs == b.epochs
    assert a.epochs[-1][2]["test/loss"] != c.epochs[-1][2]["test/loss"]


def test_hook_cadence_and_epoch_metrics(data):
    rec = Recorder()
    result = train(_cfg("epochs=2", "log_every_n_steps=3"), data, device=CPU, hooks=rec)
    # 400 images / 50 = 8 steps an epoch: logs at 3, 6, the epoch's tail 8, then 9, 12, 15, 16
    assert [s for s, _ in rec.steps] == [3, 6, 8, 9, 12, 15, 16]
    assert [(e, s) for e, s, _ in rec.epochs] == [(1, 8), (2, 16)]
    m = result.metrics
    assert m["train/loss"] == pytest.approx(m["train/recon"] + m["train/kl"])
    assert m["test/loss"] == pytest.approx(m["test/recon"] + m["test/kl"])
    assert 100 < m["test/loss"] < 600  # nats per image, summed over 784 pixels
    assert result.epoch == 2 and result.step == 16


def test_resume_continues_exactly(data, tmp_path):
    straight = Recorder()
    train(_cfg("epochs=3"), data, device=CPU, hooks=straight)

    first, second = Recorder(), Recorder()
    train(_cfg("epochs=1"), data, device=CPU, hooks=first, checkpoint_path=tmp_path / "c.pt")
    state = checkpoint.load(tmp_path / "c.pt")
    assert (state["epoch"], state["step"]) == (1, 8)
    train(_cfg("epochs=3"), data, device=CPU, hooks=second, resume=state)
    assert first.steps + second.steps == straight.steps
    assert first.epochs + second.epochs == straight.epochs


def test_resume_refuses_other_architecture(data, tmp_path):
    train(_cfg("epochs=1"), data, device=CPU, checkpoint_path=tmp_path / "c.pt")
    with pytest.raises(checkpoint.CheckpointError, match="latent_dim=2, the config says 8"):
        train(
            _cfg("epochs=2", "latent_dim=8"),
            data,
            device=CPU,
            resume=checkpoint.load(tmp_path / "c.pt"),
        )


def test_divergence_stops_with_step_and_term(data, tmp_path):
    with pytest.raises(Diverged, match=r"at step \d+: (recon|kl) is (nan|inf)"):
        train(
            _cfg("epochs=1", "lr=1e30", "log_every_n_steps=1"),
            data,
            device=CPU,
            checkpoint_path=tmp_path / "c.pt",
        )
    assert not (tmp_path / "c.pt").exists()  # no checkpoint of a diverged model


def test_true_elbo_is_logged_whatever_epsilon_std(data):
    from vaeexp.model import VAE

    model = VAE()
    same = evaluate(model, data.test_x, 1.0, 64)
    assert same["neg_elbo"] == same["loss"]  # epsilon_std=1: the objective is the ELBO
    narrow = evaluate(model, data.test_x, 0.1, 64)
    assert narrow["neg_elbo"] == pytest.approx(same["neg_elbo"])  # the same noise, same model
    assert narrow["loss"] != narrow["neg_elbo"]


def test_evaluation_does_not_touch_training_rng(data):
    from vaeexp.model import VAE

    model = VAE()
    before = torch.get_rng_state()
    first = evaluate(model, data.test_x, 1.0, 64)
    assert torch.equal(torch.get_rng_state(), before)
    assert evaluate(model, data.test_x, 1.0, 64) == first  # fixed noise: same model, same score


def test_resume_takes_hyperparameters_from_the_config(data, tmp_path):
    train(_cfg("epochs=1"), data, device=CPU, checkpoint_path=tmp_path / "c.pt")
    state = checkpoint.load(tmp_path / "c.pt")
    result = train(
        _cfg("epochs=2", "lr=0.05"),
        data,
        device=CPU,
        resume=state,
        checkpoint_path=tmp_path / "c.pt",
    )
    saved = checkpoint.load(tmp_path / "c.pt")["optimizer"]
    assert saved["param_groups"][0]["lr"] == 0.05  # not the checkpoint's 1e-3
    assert saved["state"][0]["square_avg"].abs().sum() > 0 and result.epoch == 2


def test_grad_clip_bounds_the_update(data):
    clipped = train(
        _cfg("epochs=1", "grad_clip=1e-3", "optimizer=adam", "lr=1e-2"), data, device=CPU
    )
    free = train(_cfg("epochs=1", "optimizer=adam", "lr=1e-2"), data, device=CPU)
    assert clipped.metrics["test/loss"] != free.metrics["test/loss"]


_FLUSH_PROBE = """
import sys, threading, torch
from vaeexp.trainer import cpu_settings
cpu_settings(sys.argv[1] == "on", threads=2)
x = torch.full((1 << 20,), 1e-39)  # subnormal; large enough for torch to use its OpenMP threads
kept = lambda y: int((y.view(torch.int32) != 0).sum())  # bit patterns: immune to the mode itself
seen = {"main": kept(x[:8] * 1), "openmp": kept(x * 1)}
t = threading.Thread(target=lambda: seen.update(thread=kept(x[:8] * 1)))  # as the film's worker
t.start(); t.join()
print(torch.get_num_threads(), seen["main"], seen["openmp"], seen["thread"])
"""


@pytest.mark.parametrize("mode", ["on", "off"])
def test_cpu_settings_flush_subnormals_in_every_thread_or_none(mode):
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", _FLUSH_PROBE, mode], capture_output=True, text=True, check=True
    ).stdout.split()
    assert out == (["2", "0", "0", "0"] if mode == "on" else ["2", "8", str(1 << 20), "8"])


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
        cfg = make_cfg(*TINY, "experiment=reference", f"objective_scale={scale}")
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
