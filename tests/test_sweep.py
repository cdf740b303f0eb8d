"""Sweeps (vaeexp/sweep.py and the launchers in conf/hydra/launcher/): real Hydra multiruns
through `python -m vaeexp -m`, against a SQLite store and a real `mlflow server` process."""

from __future__ import annotations

import re
from pathlib import Path

from mlflow.tracking import MlflowClient

from tests.conftest import TINY, env_for, free_port, mlflow_server, run_cli

# 400 images / 50 = 8 steps an epoch
QUICK = [*TINY, "intermediate_dim=16", "batch_size=50", "tracking.log_model=false"]
QUICK += ["iwae.images=0"]


def sweep_runs(uri: str, experiment: str = "vaeexp"):
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    [parent] = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r is not parent]
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parent.info.run_id}
    return client, parent, children


def image_steps(client, run_id: str, key: str) -> list[int]:
    files = [f.path for f in client.list_artifacts(run_id, "images")]
    pattern = re.compile(rf"images/{key}\+step\+(\d+)\+timestamp\+\d+\+[\w-]+\.png$")
    return sorted(int(m.group(1)) for f in files if (m := pattern.match(f)))


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
        assert run.data.params["threads.resolved"] == "1"  # 8 jobs on 2 cores: never 8 x 2
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
    assert {r.data.params["threads.resolved"] for r in children} == {"1"}  # cpus_per_task
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
