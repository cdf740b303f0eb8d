"""`hydra/launcher=stacked` (vaeexp.stacked) through `python -m vaeexp -m`: each member of a
group is recorded as its job alone would be, the group stops and resumes as one, and a dry run
lists the groups."""

from __future__ import annotations

import re
import signal
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import (
    TINY,
    env_for,
    image_steps,
    metric_steps,
    run_cli,
    start_cli,
    sweep_runs,
    wait_for,
)
from vaeexp.film.recorder import TIMING_METRICS
from vaeexp.trainer import WALL_CLOCK

# 400 images / 50 = 8 steps an epoch; two seeds, and a learning rate that diverges at once
SWEEP = ["seed=0,1", "lr=1e-3,1e30", *TINY, "batch_size=50", "epochs=2", "iwae.images=20"]
SWEEP += ["log_every_n_steps=4"]
# Numbers of the machine or of when things happened: never the same twice.
CLOCKS = {*WALL_CLOCK, *TIMING_METRICS.values()}
# Where a run's files are, and which group trained it: the only tags that may differ.
PLACES = {"output_dir", "sweep", "mlflow.parentRunId", "stacked.group", "mlflow.source.name"}
# Measured: a member differs from its job alone by a few 1e-6 nats (tests/vaeexp/test_stacked.py)
TOLERANCE = 1e-3


def _children(env: dict[str, str]) -> tuple[MlflowClient, dict[str, object]]:
    client, parent, children = sweep_runs(env["MLFLOW_TRACKING_URI"])
    assert parent.info.status == "FAILED"  # two of its jobs diverged
    assert parent.data.tags["jobs.failed"] == "2" and parent.data.tags["jobs.finished"] == "2"
    return client, {r.info.run_name: r for r in children}


def _record(client: MlflowClient, run, root: Path) -> dict[str, object]:
    """What a run holds, less its clocks and places: what must be the same either way. Paths
    under `root`, the sweep's own folders, and its parent's id are written from them."""
    rid, parent = run.info.run_id, run.data.tags["mlflow.parentRunId"]

    def here(values: dict[str, str]) -> dict[str, str]:
        return {
            k: v.replace(str(root), "<root>").replace(parent, "<parent>") for k, v in values.items()
        }

    keys = [k for k in run.data.metrics if k not in CLOCKS and not k.startswith("system/")]
    artifacts = {f.path for f in client.list_artifacts(rid)}
    film = {f.path for f in client.list_artifacts(rid, "film")}
    models = client.search_logged_models([run.info.experiment_id], f"source_run_id = '{rid}'")
    return {
        "status": run.info.status,
        "params": here(run.data.params),
        "tags": here({k: v for k, v in run.data.tags.items() if k not in PLACES}),
        "metrics": {k: client.get_metric_history(rid, k) for k in keys},
        "images": {k: image_steps(client, rid, k) for k in ("latent", "reconstructions")},
        "artifacts": artifacts | film,
        "models": sorted(m.name for m in models),
    }


def test_each_member_is_recorded_as_its_job_alone(tmp_path: Path):
    """The same sweep with Hydra's basic launcher, one job after another, and stacked, as one
    group of four: the same runs, names, params, tags (but the group's), statuses, metrics at
    every step and epoch, images, film, checkpoint, models and IWAE bound; the diverged jobs
    FAILED and tagged, the others FINISHED."""
    alone, stacked = env_for(tmp_path / "alone"), env_for(tmp_path / "stacked")
    for env, extra in ((alone, []), (stacked, ["hydra/launcher=stacked"])):
        started = time.perf_counter()
        result = run_cli("-m", *SWEEP, *extra, env=env)
        print(f"{extra}: {time.perf_counter() - started:.1f} s")
        assert result.returncode == 0, result.stderr[-3000:]
    assert "stacked group 1 of 1: 4 jobs" in result.stdout + result.stderr
    client_a, runs_a = _children(alone)
    client_s, runs_s = _children(stacked)
    assert sorted(runs_a) == sorted(runs_s) and len(runs_a) == 4
    for name, run in runs_s.items():
        assert run.data.tags["stacked.group"] == "jobs 0, 1, 2, 3"
        mine = _record(client_s, run, tmp_path / "stacked")
        theirs = _record(client_a, runs_a[name], tmp_path / "alone")
        for part in ("status", "params", "tags", "images", "artifacts", "models"):
            assert mine[part] == theirs[part], (name, part)
        assert mine["metrics"].keys() == theirs["metrics"].keys(), name
        for key, history in mine["metrics"].items():
            ours = [(m.step, m.value) for m in history]
            expected = [(m.step, m.value) for m in theirs["metrics"][key]]
            assert [s for s, _ in ours] == [s for s, _ in expected], (name, key)
            assert [v for _, v in ours] == pytest.approx([v for _, v in expected], abs=TOLERANCE)
        if run.info.status == "FINISHED":
            assert "test_nll_iwae_k1000" in mine["metrics"]
            assert {"checkpoint.pt", "film/latent.gif"} <= mine["artifacts"]
            assert mine["models"] == ["decoder", "model"]
        else:
            assert run.data.tags["diverged"] == "true"
            assert "diverged at step" in run.data.tags["failure_reason"]


# Long enough to be interrupted after its first epoch (20 steps an epoch), quick to start.
LONG = ["data=mnist_bundled", "data.train_limit=2000", "data.test_limit=100", "epochs=5"]
LONG += ["runtime.progress=false", "tracking.log_model=false", "iwae.images=0", "film=off"]


def test_a_stopped_group_resumes_each_member_into_its_own_run(tmp_path: Path):
    """SIGTERM stops the group after a step: every member's run is KILLED with its checkpoint.
    The same command with resume=auto continues the group, each member in its own run, every
    epoch's point once."""
    env = env_for(tmp_path)
    args = ["-m", "seed=0,1,2", "hydra/launcher=stacked", *LONG]
    proc = start_cli(*args, env=env, log=tmp_path / "first.log")
    runs = tmp_path / "runs"
    folder = wait_for("the sweep", lambda: next(runs.glob("multirun/*/*/multirun.yaml"), None))
    for job in range(3):
        wait_for(f"job {job}'s checkpoint", (folder.parent / str(job) / "checkpoint.json").is_file)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 130
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    _, parent, before = sweep_runs(env["MLFLOW_TRACKING_URI"])
    assert parent.info.status == "KILLED"
    assert [r.info.status for r in before] == ["KILLED"] * 3
    stopped = {r.info.run_id: metric_steps(client, r.info.run_id, "test/loss") for r in before}
    assert all(0 < len(steps) < 5 for steps in stopped.values())

    again = run_cli(*args, "resume=auto", env=env, timeout=400)
    assert again.returncode == 0, again.stderr[-3000:]
    _, same, after = sweep_runs(env["MLFLOW_TRACKING_URI"])
    assert same.info.run_id == parent.info.run_id and same.info.status == "FINISHED"
    assert {r.info.run_id for r in after} == set(stopped)
    for run in after:
        assert run.info.status == "FINISHED"
        assert metric_steps(client, run.info.run_id, "test/loss") == [1, 2, 3, 4, 5]
        assert run.data.tags["stacked.group"] == "jobs 0, 1, 2"


def test_groups_side_by_side_each_in_a_process_of_its_own(tmp_path: Path):
    """`hydra.launcher.parallel_groups=2` (what two visible GPUs give): the two groups train at
    once, each in a worker process on its share of the cores, each member in its own run."""
    env = env_for(tmp_path)
    result = run_cli(
        "-m", "seed=0,1", "latent_dim=2,3", "hydra/launcher=stacked",
        "hydra.launcher.parallel_groups=2", *LONG[:3], "epochs=2", *LONG[4:], env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "4 jobs in 2 groups (2, 2 members), 2 at a time" in result.stdout + result.stderr
    _, parent, children = sweep_runs(env["MLFLOW_TRACKING_URI"])
    assert parent.info.status == "FINISHED" and len(children) == 4
    groups = {r.data.params["latent_dim"]: r.data.tags["stacked.group"] for r in children}
    assert groups == {"2": "jobs 0, 2", "3": "jobs 1, 3"}
    for run in children:
        assert run.info.status == "FINISHED"
        assert run.data.params["runtime.threads.resolved"] == "1"  # 2 groups on 2 cores


def test_dry_run_lists_the_groups(tmp_path: Path):
    env = env_for(tmp_path)
    result = run_cli(
        "-m", "seed=0,1,2", "latent_dim=2,8", "hydra/launcher=stacked",
        "hydra.launcher.max_members=2", "dry_run=true", *TINY, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    said = result.stdout
    assert "6 jobs in 4 stacked groups (hydra.launcher.max_members=2)" in said
    groups = re.findall(r"group \d+: (\d+) members", said)
    assert groups == ["2", "1", "2", "1"]
    assert re.search(r"job 0: seed=0 latent_dim=2", said) and "job 5: seed=2 latent_dim=8" in said
    assert not (tmp_path / "runs" / "mlflow.db").exists()  # nothing created
