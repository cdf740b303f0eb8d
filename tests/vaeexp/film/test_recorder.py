"""The film's recorder (vaeexp.film.recorder): which steps it films, and the worker thread that
must leave the training thread's torch threads alone."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from vaeexp.film.recorder import Schedule


def test_schedule_dense_early_sparse_later():
    s = Schedule(steps_per_epoch=100, every_step_until=3, every_n_steps=25, until_epoch=2)
    assert s.steps(4) == [0, 1, 2, 3, 25, 50, 75, 100, 125, 150, 175, 200, 300, 400]
    every = Schedule(100, None, 25, 2)  # the reference: every step
    assert every.steps(2) == list(range(201))
    odd = Schedule(7, 0, 5, 1)  # epoch ends are always filmed, off the N-step grid too
    assert odd.steps(3) == [0, 5, 7, 14, 21]


@pytest.mark.slow  # two Python processes that import torch
def test_training_keeps_its_threads_when_the_film_starts_first():
    """torch fixes a thread's thread count at its first parallel op from a process-wide value
    that the film's worker lowers: the training thread must not inherit it."""
    code = (
        "import torch\n"
        "from tests.conftest import make_cfg\n"
        "from vaeexp.data import load_data\n"
        "from vaeexp.film import FilmRecorder\n"
        "cfg = make_cfg('data=mnist_bundled', 'runtime.film_precision=fp32')\n"  # no torch op yet
        "data = load_data(cfg.data)\n"
        "class Discard:\n"
        "    def __getattr__(self, name): return lambda *a, **k: None\n"
        "r = FilmRecorder(cfg, data, Discard(), __import__('pathlib').Path('{tmp}'), "
        "torch.device('cpu'))\n"
        "import time; time.sleep(0.5)\n"
        "print(torch.get_num_threads())\n"
        "r.finish()\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # torch's own count
    fresh = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    )
    with tempfile.TemporaryDirectory() as tmp:
        filmed = subprocess.run(
            [sys.executable, "-c", code.replace("{tmp}", tmp)],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parents[3],  # the repository: tests.conftest
            env=env,
        )
    assert filmed.returncode == 0, filmed.stderr[-2000:]
    assert filmed.stdout.split()[-1] == fresh.stdout.strip()
