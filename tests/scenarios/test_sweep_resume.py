"""Continuing an interrupted sweep (vaeexp.sweep, `resume=auto`) with the launchers of one
machine: the same command, re-run, continues the same parent run. Jobs that finished are not
trained again, interrupted ones continue from their checkpoints, and the rest start. (On SLURM:
tests/cluster/test_slurm.py.)"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import env_for, metric_steps, run_cli, start_cli, sweep_of, wait_for

# Long enough to be interrupted mid-training (15 steps an epoch), quick to start.
TRAIN = ["data=mnist_bundled", "data.train_limit=1500", "data.test_limit=100", "epochs=6"]
TRAIN += ["runtime.progress=false", "tracking.log_model=false", "iwae.images=0", "film=off"]
TRAIN += ["latent_dim=2,3,4"]
LAUNCHERS = {"basic": [], "joblib": ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]}


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_an_interrupted_sweep_resumes_into_its_parent_run(tmp_path: Path, launcher: str):
    env = env_for(tmp_path)
    args = ["-m", *LAUNCHERS[launcher], *TRAIN]
    proc = start_cli(*args, env=env, log=tmp_path / "first.log")
    runs = tmp_path / "runs"
    folder = wait_for("the sweep", lambda: next(runs.glob("multirun/*/*/multirun.yaml"), None))
    wait_for("job 1 training", (folder.parent / "1" / "checkpoint.json").is_file)
    proc.send_signal(signal.SIGINT)  # Ctrl-C
    assert proc.wait(timeout=60) == 130
    said = (tmp_path / "first.log").read_text()
    assert "sweep interrupted" in said and "resume=auto" in said
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    parent, before = sweep_of(client)
    assert parent.info.status == "KILLED"
    assert len(before) < 3 or before[2].info.status != "FINISHED"  # stopped before the end
    finished = {r.info.run_id: r.info.end_time for r in before if r.info.status == "FINISHED"}
    if launcher == "basic":  # one job at a time: the first finished, the second stopped
        assert [r.info.status for r in before] == ["FINISHED", "KILLED"]

    again = run_cli(*args, "resume=auto", env=env, timeout=400)
    assert again.returncode == 0, again.stderr[-3000:]
    same, after = sweep_of(client)
    assert same.info.run_id == parent.info.run_id and same.info.status == "FINISHED"
    assert [r.info.status for r in after] == ["FINISHED"] * 3
    assert {r.info.run_id: r.info.end_time for r in after if r.info.run_id in finished} == finished
    # continued in place, a run stopped before its first checkpoint included
    assert {r.info.run_id for r in before} <= {r.info.run_id for r in after}
    for run in after:  # every point once: what an uninterrupted run logs
        assert metric_steps(client, run.info.run_id, "test/loss") == list(range(1, 7))
        assert len(metric_steps(client, run.info.run_id, "train/loss_step")) == len(
            set(metric_steps(client, run.info.run_id, "train/loss_step"))
        )
    assert f"parent run {parent.info.run_id}" in again.stdout
