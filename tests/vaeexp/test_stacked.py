"""Stacked training (vaeexp.stacked and the trainer's stack): which jobs form a group, and that
a member of a group trains exactly as its job alone."""

from __future__ import annotations

import itertools

import pytest
import torch

from tests.conftest import TINY, make_cfg
from vaeexp.config import settings
from vaeexp.data import load_data
from vaeexp.stacked import groups
from vaeexp.trainer import Callback, train

CPU = torch.device("cpu")
# Measured: members differ from their jobs alone by at most a few 1e-6 nats (the reduction
# order of a batched product differs); a shared draw or a leaked gradient moves whole nats.
TOLERANCE = 2e-4


class EpochLosses(Callback):
    """Each member's test loss at the end of each epoch."""

    def __init__(self) -> None:
        self.losses: dict[int, list[float]] = {}

    def on_epoch_end(self, epoch, step, metrics, model) -> None:
        for m, values in metrics.items():
            self.losses.setdefault(m, []).append(values["test/loss"])


@pytest.fixture(scope="module")
def data():
    return load_data(settings(make_cfg(*TINY)).data)


MEMBERS = [  # seeds, learning rates and noise scales all differ
    ("seed=0", "lr=1e-3", "epsilon_std=1.0"),
    ("seed=1", "lr=3e-3", "epsilon_std=0.5"),
    ("seed=2", "lr=1e-3", "epsilon_std=1.0", "optimizer=rmsprop", "grad_clip=0.05"),
    ("seed=3", "lr=2e-3", "epsilon_std=0.7", "kl_weight=2"),
]


def test_each_member_trains_exactly_as_its_job_alone(data):
    """A group of four trains 2 epochs; each member's test loss after each epoch is its job's
    alone. Members that shared noise, batch order or initial weights, or whose gradients
    reached one another, would not be."""
    cfgs = [settings(make_cfg(*TINY, "epochs=2", *m)) for m in MEMBERS]
    stacked = EpochLosses()
    train(cfgs, data, CPU, callbacks=[stacked])
    alone = []
    for cfg in cfgs:
        solo = EpochLosses()
        train([cfg], data, CPU, callbacks=[solo])
        alone.append(solo.losses[0])
    for m in range(len(cfgs)):
        assert len(stacked.losses[m]) == 2
        assert stacked.losses[m] == pytest.approx(alone[m], abs=TOLERANCE), MEMBERS[m]
    firsts = sorted(losses[0] for losses in alone)
    assert min(b - a for a, b in itertools.pairwise(firsts)) > 100 * TOLERANCE


def test_a_diverged_member_stops_and_the_others_go_on(data):
    """A member whose loss stops being finite ends diverged, after its first step; the others
    train on as they would alone."""
    cfgs = [settings(make_cfg(*TINY, "epochs=2", *m)) for m in (MEMBERS[0], ("lr=1e30",))]
    results = train(cfgs, data, CPU)
    assert results[1].diverged and "diverged at step" in results[1].diverged
    assert results[0].diverged is None and results[0].epoch == 2
    (alone,) = train(cfgs[:1], data, CPU)
    assert results[0].metrics["test/loss"] == pytest.approx(
        alone.metrics["test/loss"], abs=TOLERANCE
    )


def test_groups_share_everything_but_per_member_settings():
    jobs = [
        make_cfg(*TINY, "seed=0", "lr=1e-3"),
        make_cfg(*TINY, "seed=1", "lr=3e-3", "epsilon_std=0.5", "iwae.k=10"),
        make_cfg(*TINY, "seed=0", "latent_dim=8"),  # another shape: a group of its own
        make_cfg(*TINY, "seed=2", "batch_size=50"),  # another batch size: its own
        make_cfg(*TINY, "seed=3", "kl_weight=4", "init=torch"),
        make_cfg(*TINY, "seed=1", "latent_dim=8"),
    ]
    assert groups(jobs, max_members=64) == [[0, 1, 4], [2, 5], [3]]
    assert groups(jobs, max_members=2) == [[0, 1], [4], [2, 5], [3]]
