import re

import pytest
import torch

from tests.conftest import TINY, make_cfg
from vaeexp import checkpoint
from vaeexp.checkpoint import Checkpoints, Position, restore_state
from vaeexp.config import settings
from vaeexp.data import load_data
from vaeexp.process import StopFlag
from vaeexp.step import setup
from vaeexp.trainer import WALL_CLOCK, Callback, train

CPU = torch.device("cpu")


class Recorder(Callback):
    """What the loop tells its member (`member`, 0: a run of its own)."""

    def __init__(self):
        self.steps, self.epochs, self.diverged = [], [], []

    def on_metrics(self, step, metrics):
        if self.member in metrics:
            self.steps.append((step, metrics[self.member]))

    def on_epoch_end(self, epoch, step, metrics, model):
        if self.member in metrics:
            mine = metrics[self.member]
            self.epochs.append(
                (epoch, step, {k: v for k, v in mine.items() if k not in WALL_CLOCK})
            )

    def on_diverged(self, member, reason):
        if member == self.member:
            self.diverged.append(reason)


@pytest.fixture(scope="module")
def data():
    return load_data(make_cfg(*TINY).data)


def _cfg(*extra):
    return settings(make_cfg(*TINY, "intermediate_dim=64", "batch_size=50", *extra))


def test_same_seed_same_metrics_other_seed_not(data):
    a, b, c = Recorder(), Recorder(), Recorder()
    train([_cfg("epochs=2")], data, CPU, callbacks=[a])
    train([_cfg("epochs=2")], data, CPU, callbacks=[b])
    train([_cfg("epochs=2", "seed=1")], data, CPU, callbacks=[c])
    assert a.steps == b.steps and a.epochs == b.epochs
    assert a.epochs[-1][2]["test/loss"] != c.epochs[-1][2]["test/loss"]


def test_hook_cadence_and_epoch_metrics(data):
    rec = Recorder()
    [result] = train([_cfg("epochs=2", "log_every_n_steps=3")], data, CPU, callbacks=[rec])
    # 400 images / 50 = 8 steps an epoch: logs at 3, 6, the epoch's tail 8, then 9, 12, 15, 16
    assert [s for s, _ in rec.steps] == [3, 6, 8, 9, 12, 15, 16]
    assert [(e, s) for e, s, _ in rec.epochs] == [(1, 8), (2, 16)]
    m = result.metrics
    assert m["train/loss"] == pytest.approx(m["train/recon"] + m["train/kl"])
    assert m["test/loss"] == pytest.approx(m["test/recon"] + m["test/kl"])
    assert 100 < m["test/loss"] < 600  # nats per image, summed over 784 pixels
    assert result.epoch == 2 and result.step == 16 and result.diverged is None
    assert result.model.members == 1  # the member on its own: what is exported and scored


def test_resume_continues_exactly(data, tmp_path):
    """A checkpoint holds no generator state: the batch order and the noise of every epoch are
    functions of (seed, epoch), so the resumed run draws, and logs, exactly what the
    uninterrupted one does, down to its final weights."""
    straight = Recorder()
    [whole] = train([_cfg("epochs=3")], data, CPU, callbacks=[straight])

    first, second = Recorder(), Recorder()
    train(
        [_cfg("epochs=1")],
        data,
        CPU,
        callbacks=[first],
        checkpoints=[Checkpoints(tmp_path / "c.pt")],
    )
    state = checkpoint.load(tmp_path / "c.pt")
    assert (state["epoch"], state["step"]) == (1, 8)
    assert not {"rng", "cuda_rng", "numpy_rng"} & state.keys()
    torch.manual_seed(12345)  # the global generator is none of training's business
    [resumed] = train(
        [_cfg("epochs=3")], data, CPU, callbacks=[second], checkpoints=[Checkpoints(resume=state)]
    )
    assert first.steps + second.steps == straight.steps
    assert first.epochs + second.epochs == straight.epochs
    resumed_weights = resumed.model.state_dict()
    for name, weights in whole.model.state_dict().items():
        assert torch.equal(weights, resumed_weights[name]), name


def test_a_stack_resumes_together_exactly_and_a_member_alone(data, tmp_path):
    """Each member of a stack checkpoints as its job alone would: the stack resumed from its
    members' checkpoints logs exactly what it would have, and a member's checkpoint continues
    alone as that member did in the stack (up to the batched products' rounding)."""
    cfgs = [_cfg("epochs=2"), _cfg("epochs=2", "seed=1", "lr=3e-3", "epsilon_std=0.5")]
    straight = [Recorder(), Recorder()]
    straight[1].member = 1
    train(cfgs, data, CPU, callbacks=straight)

    paths = [tmp_path / "0.pt", tmp_path / "1.pt"]
    first = [Recorder(), Recorder()]
    first[1].member = 1
    short = [_cfg("epochs=1"), _cfg("epochs=1", "seed=1", "lr=3e-3", "epsilon_std=0.5")]
    train(short, data, CPU, callbacks=first, checkpoints=[Checkpoints(p) for p in paths])
    states = [checkpoint.load(p) for p in paths]
    second = [Recorder(), Recorder()]
    second[1].member = 1
    train(cfgs, data, CPU, callbacks=second, checkpoints=[Checkpoints(resume=s) for s in states])
    for m in range(2):
        assert first[m].steps + second[m].steps == straight[m].steps
        assert first[m].epochs + second[m].epochs == straight[m].epochs

    alone = Recorder()
    train(cfgs[1:], data, CPU, callbacks=[alone], checkpoints=[Checkpoints(resume=states[1])])
    in_stack = [e[2]["test/loss"] for e in straight[1].epochs[1:]]
    assert [e[2]["test/loss"] for e in alone.epochs] == pytest.approx(in_stack, abs=2e-4)
    assert abs(in_stack[-1] - straight[0].epochs[-1][2]["test/loss"]) > 1  # not member 0's


def test_kl_weight_trades_reconstruction_for_kl():
    """beta-VAE's trade, after the same training from the same start: at kl_weight=4 the test KL
    ends far below kl_weight=1's, and the reconstruction worse by more than the KL saved, so the
    negative ELBO, which kl_weight=1 optimises, is worse too. Sized where the effect dwarfs what
    seeds change: 40 steps, by which kl_weight=1 has begun to use its latent code."""
    small = ["data=mnist_bundled", "data.train_limit=1000", "data.test_limit=200"]
    small += ["runtime.progress=false", "intermediate_dim=64", "batch_size=50", "epochs=2"]
    data = load_data(make_cfg(*small).data)
    one, four = (
        train([settings(make_cfg(*small, f"kl_weight={w}"))], data, CPU)[0].metrics for w in (1, 4)
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
    train([_cfg("epochs=3", *warm)], data, CPU, callbacks=[straight])
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
            [_cfg("epochs=3", *warm)],
            data,
            CPU,
            callbacks=[first],
            checkpoints=[Checkpoints(path)],
            stop=stop,
        )
    state = checkpoint.load(path)
    assert (state["epoch"], state["batch"], state["step"]) == (1, 4, 12)
    train(
        [_cfg("epochs=3", *warm)],
        data,
        CPU,
        callbacks=[second],
        checkpoints=[Checkpoints(resume=state)],
    )
    assert first.steps + second.steps == straight.steps
    assert first.epochs + second.epochs == straight.epochs


def test_resume_refuses_other_architecture(data, tmp_path):
    train([_cfg("epochs=1")], data, CPU, checkpoints=[Checkpoints(tmp_path / "c.pt")])
    with pytest.raises(checkpoint.CheckpointError, match="latent_dim=2, the config says 8"):
        train(
            [_cfg("epochs=2", "latent_dim=8")],
            data,
            CPU,
            checkpoints=[Checkpoints(resume=checkpoint.load(tmp_path / "c.pt"))],
        )


def test_divergence_stops_with_step_and_term(data, tmp_path):
    """A run whose loss stops being finite stops there, its result and its callbacks told the
    step and the term (the recipe fails the run with it), and leaves no checkpoint of it."""
    rec = Recorder()
    [result] = train(
        [_cfg("epochs=1", "lr=1e30", "log_every_n_steps=1")],
        data,
        CPU,
        callbacks=[rec],
        checkpoints=[Checkpoints(tmp_path / "c.pt")],
    )
    assert re.search(r"at step \d+: (recon|kl) is (nan|inf)", result.diverged or "")
    assert rec.diverged == [result.diverged]
    assert result.step < 8 and rec.epochs == []  # it stopped within its first epoch
    assert not (tmp_path / "c.pt").exists()  # no checkpoint of a diverged model


def test_resume_takes_hyperparameters_from_the_config(data, tmp_path):
    """The checkpoint gives the optimizer's statistics, the config its lr, rho and eps."""
    train([_cfg("epochs=1")], data, CPU, checkpoints=[Checkpoints(tmp_path / "c.pt")])
    state = checkpoint.load(tmp_path / "c.pt")
    model, optimizer = setup([_cfg("epochs=2", "lr=0.05")], CPU)
    restore_state(state, _cfg("epochs=2", "lr=0.05"), model, optimizer, 0, Position.start(1, CPU))
    assert optimizer.hyper["lr"] == 0.05  # not the checkpoint's 1e-3
    for saved, restored in zip(
        state["optimizer"]["square_avg"], optimizer.state["square_avg"], strict=True
    ):
        assert saved.abs().sum() > 0 and torch.equal(saved, restored)

    results = {
        lr: train(
            [_cfg("epochs=2", f"lr={lr}")],
            data,
            CPU,
            checkpoints=[Checkpoints(tmp_path / f"{lr}.pt", resume=state)],
        )[0]
        for lr in ("1e-3", "0.05")
    }
    assert all(r.epoch == 2 for r in results.values())
    fast, slow = results["0.05"].metrics, results["1e-3"].metrics
    assert abs(fast["train/loss"] - slow["train/loss"]) > 1  # the resumed epoch trained at 0.05
    assert checkpoint.load(tmp_path / "0.05.pt")["config"]["lr"] == 0.05


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
