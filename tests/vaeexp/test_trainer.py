import pytest
import torch

from tests.conftest import TINY, make_cfg
from vaeexp import checkpoint
from vaeexp.checkpoint import Checkpoints
from vaeexp.config import settings
from vaeexp.data import load_data
from vaeexp.process import StopFlag
from vaeexp.step import Diverged
from vaeexp.trainer import WALL_CLOCK, Callback, train

CPU = torch.device("cpu")


class Recorder(Callback):
    def __init__(self):
        self.steps, self.epochs = [], []

    def on_metrics(self, step, metrics):
        self.steps.append((step, metrics))

    def on_epoch_end(self, epoch, step, metrics, model):
        self.epochs.append((epoch, step, {k: v for k, v in metrics.items() if k not in WALL_CLOCK}))


@pytest.fixture(scope="module")
def data():
    return load_data(make_cfg(*TINY).data)


def _cfg(*extra):
    return settings(make_cfg(*TINY, "intermediate_dim=64", "batch_size=50", *extra))


def test_same_seed_same_metrics_other_seed_not(data):
    a, b, c = Recorder(), Recorder(), Recorder()
    train(_cfg("epochs=2"), data, CPU, callbacks=[a])
    train(_cfg("epochs=2"), data, CPU, callbacks=[b])
    train(_cfg("epochs=2", "seed=1"), data, CPU, callbacks=[c])
    assert a.steps == b.steps and a.epochs == b.epochs
    assert a.epochs[-1][2]["test/loss"] != c.epochs[-1][2]["test/loss"]


def test_hook_cadence_and_epoch_metrics(data):
    rec = Recorder()
    result = train(_cfg("epochs=2", "log_every_n_steps=3"), data, CPU, callbacks=[rec])
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
    train(_cfg("epochs=3"), data, CPU, callbacks=[straight])

    first, second = Recorder(), Recorder()
    train(
        _cfg("epochs=1"), data, CPU, callbacks=[first], checkpoints=Checkpoints(tmp_path / "c.pt")
    )
    state = checkpoint.load(tmp_path / "c.pt")
    assert (state["epoch"], state["step"]) == (1, 8)
    train(_cfg("epochs=3"), data, CPU, callbacks=[second], checkpoints=Checkpoints(resume=state))
    assert first.steps + second.steps == straight.steps
    assert first.epochs + second.epochs == straight.epochs


def test_kl_weight_trades_reconstruction_for_kl():
    """beta-VAE's trade, after the same training from the same start: at kl_weight=4 the test KL
    ends far below kl_weight=1's, and the reconstruction worse by more than the KL saved, so the
    negative ELBO, which kl_weight=1 optimises, is worse too. Sized where the effect dwarfs what
    seeds change: 40 steps, by which kl_weight=1 has begun to use its latent code."""
    small = ["data=mnist_bundled", "data.train_limit=1000", "data.test_limit=200"]
    small += ["runtime.progress=false", "intermediate_dim=64", "batch_size=50", "epochs=2"]
    data = load_data(make_cfg(*small).data)
    one, four = (
        train(settings(make_cfg(*small, f"kl_weight={w}")), data, CPU).metrics for w in (1, 4)
    )
    assert four["test/kl"] < one["test/kl"] / 2
    assert four["test/recon"] - one["test/recon"] > one["test/kl"] - four["test/kl"]
    assert four["test/neg_elbo"] > one["test/neg_elbo"]


def test_kl_warmup_is_logged_and_resumes_mid_epoch_exactly(data, tmp_path):
    """The weight rises by step, so a run stopped mid-epoch in its warm-up and resumed logs
    exactly what an uninterrupted one does; train/kl_weight is the weight each warm-up epoch
    reached, and is no longer logged once it is constant."""
    warm = ("kl_weight=4", "kl_warmup_epochs=2", "log_every_n_steps=3")
    straight = Recorder()
    train(_cfg("epochs=3", *warm), data, CPU, callbacks=[straight])
    assert [m.get("train/kl_weight") for _, _, m in straight.epochs] == [2.0, 4.0, None]

    stop = StopFlag()

    class StopAt(Recorder):  # a Ctrl-C at step 12: epoch 2 of 8-step epochs, mid-warm-up
        def on_metrics(self, step, metrics):
            super().on_metrics(step, metrics)
            if step == 12:
                stop.request("test")

    first, second = StopAt(), Recorder()
    path = tmp_path / "c.pt"
    with pytest.raises(KeyboardInterrupt):
        train(
            _cfg("epochs=3", *warm),
            data,
            CPU,
            callbacks=[first],
            checkpoints=Checkpoints(path),
            stop=stop,
        )
    state = checkpoint.load(path)
    assert (state["epoch"], state["batch"], state["step"]) == (1, 4, 12)
    train(
        _cfg("epochs=3", *warm),
        data,
        CPU,
        callbacks=[second],
        checkpoints=Checkpoints(resume=state),
    )
    assert first.steps + second.steps == straight.steps
    assert first.epochs + second.epochs == straight.epochs


def test_resume_refuses_other_architecture(data, tmp_path):
    train(_cfg("epochs=1"), data, CPU, checkpoints=Checkpoints(tmp_path / "c.pt"))
    with pytest.raises(checkpoint.CheckpointError, match="latent_dim=2, the config says 8"):
        train(
            _cfg("epochs=2", "latent_dim=8"),
            data,
            CPU,
            checkpoints=Checkpoints(resume=checkpoint.load(tmp_path / "c.pt")),
        )


def test_divergence_stops_with_step_and_term(data, tmp_path):
    with pytest.raises(Diverged, match=r"at step \d+: (recon|kl) is (nan|inf)"):
        train(
            _cfg("epochs=1", "lr=1e30", "log_every_n_steps=1"),
            data,
            CPU,
            checkpoints=Checkpoints(tmp_path / "c.pt"),
        )
    assert not (tmp_path / "c.pt").exists()  # no checkpoint of a diverged model


def test_resume_takes_hyperparameters_from_the_config(data, tmp_path):
    train(_cfg("epochs=1"), data, CPU, checkpoints=Checkpoints(tmp_path / "c.pt"))
    state = checkpoint.load(tmp_path / "c.pt")
    result = train(
        _cfg("epochs=2", "lr=0.05"),
        data,
        CPU,
        checkpoints=Checkpoints(tmp_path / "c.pt", resume=state),
    )
    saved = checkpoint.load(tmp_path / "c.pt")["optimizer"]
    assert saved["param_groups"][0]["lr"] == 0.05  # not the checkpoint's 1e-3
    assert saved["state"][0]["square_avg"].abs().sum() > 0 and result.epoch == 2


_FLUSH_PROBE = """
import sys, threading, torch
from vaeexp.process import cpu_settings
cpu_settings(sys.argv[1] == "on", threads=2)
x = torch.full((1 << 20,), 1e-39)  # subnormal; large enough for torch to use its OpenMP threads
kept = lambda y: int((y.view(torch.int32) != 0).sum())  # bit patterns: immune to the mode itself
seen = {"main": kept(x[:8] * 1), "openmp": kept(x * 1)}
t = threading.Thread(target=lambda: seen.update(thread=kept(x[:8] * 1)))  # as the film's worker
t.start(); t.join()
print(torch.get_num_threads(), seen["main"], seen["openmp"], seen["thread"])
"""


@pytest.mark.slow  # a Python process that imports torch
@pytest.mark.parametrize("mode", ["on", "off"])
def test_cpu_settings_flush_subnormals_in_every_thread_or_none(mode):
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", _FLUSH_PROBE, mode], capture_output=True, text=True, check=True
    ).stdout.split()
    assert out == (["2", "0", "0", "0"] if mode == "on" else ["2", "8", str(1 << 20), "8"])
