"""The edges a new user meets: tracking URIs MLflow cannot use, and `resume=auto` with a run
folder of the user's choosing."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import TINY, env_for, run_cli

QUICK = [*TINY, "intermediate_dim=32", "iwae.images=0", "tracking.log_model=false"]


def _one_clean_line(result, *expected: str) -> str:
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    for text in expected:
        assert text in lines[0], lines[0]
    for leak in ("Traceback", "sqlalchemy", "MlflowException", "OperationalError"):
        assert leak not in result.stderr
    return lines[0]


def _no_store_anywhere(tmp_path: Path) -> None:
    assert not list(tmp_path.rglob("mlflow.db")), list(tmp_path.rglob("mlflow.db"))


def test_a_scheme_mlflow_does_not_know(tmp_path):
    env = env_for(tmp_path)
    result = run_cli(*QUICK, "tracking.uri=nosuch://host/db", env=env)
    _one_clean_line(result, "tracking.uri=nosuch://host/db", "scheme 'nosuch'", "sqlite:///")
    _no_store_anywhere(tmp_path)


@pytest.mark.parametrize("kind", ["text", "other_sqlite"])
def test_a_sqlite_file_that_is_not_an_mlflow_store(tmp_path, kind):
    env = env_for(tmp_path)
    foreign = tmp_path / "notes.db"
    if kind == "text":
        foreign.write_text("my lab notes, not a database\n" * 200)
    else:
        with sqlite3.connect(foreign) as db:
            db.execute("CREATE TABLE samples (id INTEGER, value REAL)")
    before = foreign.read_bytes()
    result = run_cli(*QUICK, f"tracking.uri=sqlite:///{foreign}", env=env)
    expected = "not a SQLite database" if kind == "text" else "not an MLflow store"
    _one_clean_line(result, f"tracking.uri=sqlite:///{foreign}", expected)
    assert foreign.read_bytes() == before  # nothing added to someone else's database
    _no_store_anywhere(tmp_path)


def test_resume_auto_in_a_run_folder_of_ones_own(tmp_path):
    """`hydra.run.dir=X`, re-launched with resume=auto, continues X into the same run, even
    where X is outside the project's runs/."""
    env = env_for(tmp_path)
    folder = tmp_path / "my-run"
    first = run_cli(*QUICK, "epochs=1", f"hydra.run.dir={folder}", env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    again = run_cli(*QUICK, "epochs=2", "resume=auto", f"hydra.run.dir={folder}", env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    (run,) = client.search_runs([client.get_experiment_by_name("vaeexp").experiment_id])
    assert run.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "test/loss")]
    assert steps == [1, 2]  # epoch 1 once, then epoch 2: continued, not retrained


def test_a_sweep_with_a_tracking_uri_mlflow_cannot_use(tmp_path):
    env = env_for(tmp_path)
    result = run_cli("-m", "latent_dim=2,3", *QUICK, "tracking.uri=nosuch://host/db", env=env)
    _one_clean_line(result, "tracking.uri=nosuch://host/db", "scheme 'nosuch'")
    assert "Launching" not in result.stdout  # stopped before any job
    _no_store_anywhere(tmp_path)
