import pytest
import torch

from tests.conftest import TINY, make_cfg
from vaeexp import checkpoint
from vaeexp.config import settings
from vaeexp.data import load_data
from vaeexp.resumable import Checkpoints
from vaeexp.step import Diverged
from vaeexp.trainer import train

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
    return settings(make_cfg(*TINY, "intermediate_dim=64", "batch_size=50", *extra))


def test_same_seed_same_metrics_other_seed_not(data):
    a, b, c = Recorder(), Recorder(), Recorder()
    train(_cfg("epochs=2"), data, CPU, hooks=[a])
    train(_cfg("epochs=2"), data, CPU, hooks=[b])
    train(_cfg("epochs=2", "seed=1"), data, CPU, hooks=[c])
    assert a.steps == b.steps and a.epochs == b.epochs
    assert a.epochs[-1][2]["test/loss"] != c.epochs[-1][2]["test/loss"]


def test_hook_cadence_and_epoch_metrics(data):
    rec = Recorder()
    result = train(_cfg("epochs=2", "log_every_n_steps=3"), data, CPU, hooks=[rec])
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
    train(_cfg("epochs=3"), data, CPU, hooks=[straight])

    first, second = Recorder(), Recorder()
    train(_cfg("epochs=1"), data, CPU, hooks=[first], checkpoints=Checkpoints(tmp_path / "c.pt"))
    state = checkpoint.load(tmp_path / "c.pt")
    assert (state["epoch"], state["step"]) == (1, 8)
    train(_cfg("epochs=3"), data, CPU, hooks=[second], checkpoints=Checkpoints(resume=state))
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
