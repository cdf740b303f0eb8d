"""Sweeps (vaeexp/sweep.py and the launchers in conf/hydra/launcher/): real Hydra multiruns
through `python -m vaeexp -m`, against a SQLite store and a real `mlflow server` process."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import (
    TINY,
    env_for,
    free_port,
    image_steps,
    mlflow_server,
    run_cli,
    sweep_runs,
)

# 400 images / 50 = 8 steps an epoch
QUICK = [*TINY, "intermediate_dim=16", "batch_size=50", "tracking.log_model=false"]
QUICK += ["iwae.images=0"]


def test_joblib_eight_jobs_at_once_on_one_sqlite_store_lose_nothing(tmp_path):
    """Eight writers side by side on one SQLite file: MLflow's store waits for the file's lock
    (its sessions set SQLite's busy timeout), so no job fails `database is locked`."""
    env = env_for(tmp_path)
    result = run_cli(
        "-m",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=8",
        "latent_dim=range(2,10)",
        *QUICK,
        "epochs=2",
        "log_every_n_steps=1",
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "database is locked" not in result.stdout + result.stderr
    client, parent, children = sweep_runs(env["MLFLOW_TRACKING_URI"])
    assert len(children) == 8 and parent.info.status == "FINISHED"
    film_steps = [*range(11), 16]  # film: every step to 10, then the epochs' ends
    for run in children:
        rid = run.info.run_id
        assert run.info.status == "FINISHED"
        assert run.data.params["runtime.threads.resolved"] == "1"  # 8 jobs on 2 cores: never 8 x 2
        steps = [m.step for m in client.get_metric_history(rid, "train/loss_step")]
        assert steps == list(range(1, 17)), run.info.run_name  # every step's point, once
        for key in ("test/loss", "test/recon", "test/kl", "train/loss"):
            assert [m.step for m in client.get_metric_history(rid, key)] == [1, 2]
        assert [m.step for m in client.get_metric_history(rid, "film/knn_accuracy")] == film_steps
        assert image_steps(client, rid, "latent") == film_steps
        assert image_steps(client, rid, "reconstructions") == [1, 2]
        assert image_steps(client, rid, "samples") == [1, 2]
        manifold = [1, 2] if run.data.params["latent_dim"] == "2" else []
        assert image_steps(client, rid, "manifold") == manifold
        files = {f.path for f in client.list_artifacts(rid, "film")}
        assert {"film/latent.gif", "film/frames.npz"} <= files
    # the report, from the launching process, on the parent
    report = {f.path for f in client.list_artifacts(parent.info.run_id, "report")}
    assert {"report/report.html", "report/runs.csv", "report/contact_sheet.png"} <= report


def test_sweep_against_a_real_tracking_server(tmp_path):
    server_root = tmp_path / "server"
    server_root.mkdir()
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = mlflow_server(server_root, port)
    try:
        env = {**env_for(tmp_path), "MLFLOW_TRACKING_URI": ""}  # the config names the server
        result = run_cli(
            "-m", "tracking=server", f"tracking.uri={uri}", "latent_dim=2,3", *QUICK, "epochs=1",
            env=env,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        client, parent, children = sweep_runs(uri)
        assert len(children) == 2 and all(r.info.status == "FINISHED" for r in children)
        assert parent.info.status == "FINISHED"
        for run in children:
            rid = run.info.run_id
            assert [m.step for m in client.get_metric_history(rid, "test/loss")] == [1]
            assert image_steps(client, rid, "latent") == list(range(9))
            assert {f.path for f in client.list_artifacts(rid, "film")} >= {"film/latent.gif"}
        report = {f.path for f in client.list_artifacts(parent.info.run_id, "report")}
        assert "report/report.html" in report
        assert not (tmp_path / "runs" / "mlflow.db").exists()  # nothing went to a local store
        assert "View run" not in result.stdout  # MLflow's links open the GenAI view; ours do not
        assert "?workflowType=machine_learning" in result.stdout
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_submitit_local_runs_jobs_as_processes(tmp_path):
    env = env_for(tmp_path)
    result = run_cli(
        "-m", "hydra/launcher=processes", "latent_dim=2,3", *QUICK, "epochs=1", "film=off",
        env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    _client, parent, children = sweep_runs(env["MLFLOW_TRACKING_URI"])
    assert sorted(r.data.params["latent_dim"] for r in children) == ["2", "3"]
    assert all(r.info.status == "FINISHED" for r in children)
    assert {r.data.params["runtime.threads.resolved"] for r in children} == {"1"}  # cpus_per_task
    sweep = Path(parent.data.tags["sweep"])
    assert list((sweep / ".submitit").glob("*/*_submitted.pkl"))  # submitit's own job files


def test_optuna_study_goes_on_past_a_diverged_trial(tmp_path):
    env = env_for(tmp_path)
    result = run_cli(
        "-m",
        "hparams_search=optuna",
        "hydra.sweeper.n_trials=4",
        "hydra.sweeper.params.latent_dim='choice(2,3)'",  # quoted: a value, not a grid
        "hydra.sweeper.params.intermediate_dim='choice(16)'",
        "hydra.sweeper.params.batch_size='choice(50)'",
        "hydra.sweeper.params.lr='choice(0.001,1e30)'",
        *[o for o in QUICK if not o.startswith(("intermediate_dim", "batch_size"))],
        "epochs=1",
        "film=off",
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Best parameters" in result.stdout + result.stderr  # the study finished
    _client, parent, children = sweep_runs(env["MLFLOW_TRACKING_URI"])
    assert len(children) == 4
    diverged = [r for r in children if r.data.params["lr"] == "1e+30"]
    fine = [r for r in children if r.data.params["lr"] == "0.001"]
    assert diverged and fine, [r.data.params["lr"] for r in children]
    for run in diverged:
        assert run.info.status == "FAILED" and run.data.tags["diverged"] == "true"
        assert run.data.tags["failure_reason"].startswith("Diverged:")
    assert all(r.info.status == "FINISHED" for r in fine)
    assert parent.info.status == "FAILED"  # a child failed: the parent says so
    assert parent.data.tags["best_child_run_id"] in {r.info.run_id for r in fine}


# One bad job, with each launcher and the Optuna sweeper: (arguments, how its line starts).
BAD_JOB = {
    "basic": (["latent_dim=2,-1"], "job #1 (latent_dim=-1): latent_dim=-1 is not allowed: "),
    "joblib": (
        ["hydra/launcher=joblib", "batch_size=100,0"],
        "job #1 (batch_size=0): batch_size=0",
    ),
    "slurm": (["hydra/launcher=slurm", "latent_dim=2,-1"], "job #1 (latent_dim=-1): latent_dim=-1"),
    "optuna": (
        ["hparams_search=optuna", "hydra.sweeper.params.lr='interval(0, 0.01)'"],
        "the Optuna search space lr=interval(0, 0.01): lr=0.0 is not allowed: must be a finite",
    ),
}


@pytest.mark.parametrize("how", sorted(BAD_JOB))
def test_a_bad_job_stops_its_sweep_before_anything_starts(tmp_path, how):
    """Every job is composed and validated in the launching process first (SLURM's check of the
    request, which needs SLURM, comes after): one line, exit 2, and no store, run or folder."""
    args, said = BAD_JOB[how]
    result = run_cli("-m", *QUICK, "epochs=1", "film=off", *args, env=env_for(tmp_path))
    assert result.returncode == 2, result.stderr[-3000:]
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"vaeexp: error: {said}"), line
    assert not (tmp_path / "runs").exists()  # no MLflow store, parent or child, no sweep folder


LAUNCHERS = {"basic": [], "joblib": ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]}


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_a_job_failing_while_its_sweep_runs_leaves_no_parent_running(tmp_path, launcher):
    """A job that fails as it starts (here: it continues an MLflow run that does not exist)
    ends the sweep with its line; the parent ends FAILED with its jobs counted, the failed job
    has a FAILED run saying why, and the report is written. (Missing data is refused before
    the sweep starts, in the launching process.)"""
    env = env_for(tmp_path)
    missing = "0" * 32
    result = run_cli(
        "-m", *LAUNCHERS[launcher], f"resume=null,{missing}", *QUICK, "epochs=1", "film=off",
        env=env,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"vaeexp: error: resume={missing}: no such MLflow run in ")
    client, parent, children = sweep_runs(env["MLFLOW_TRACKING_URI"])
    assert parent.info.status == "FAILED"
    counts = {k: int(parent.data.tags[f"jobs.{k}"]) for k in ("finished", "failed", "killed")}
    [failed] = [r for r in children if r.info.status == "FAILED"]
    assert failed.data.tags["failure_reason"].startswith(f"CheckpointError: resume={missing}: ")
    assert failed.data.tags["hydra_overrides"].startswith(f"resume={missing} ")
    assert {r.info.status for r in children} <= {"FINISHED", "FAILED", "KILLED"}
    if launcher == "basic":  # one job after the other: the first finished
        assert counts == {"finished": 1, "failed": 1, "killed": 0}
        assert parent.data.metrics["best_test_loss"] > 0
    else:  # joblib stops its other worker: that job finished, was killed or had not started
        assert counts["failed"] == 1 and counts["finished"] + counts["killed"] <= 1
    assert "report/report.html" in {
        f.path for f in client.list_artifacts(parent.info.run_id, "report")
    }
    assert "resume=auto" in result.stdout  # how to continue it
