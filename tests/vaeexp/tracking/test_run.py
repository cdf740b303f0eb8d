"""A tracked run (vaeexp.tracking.run): the config as params, and runs that name their MLflow run
by id, so that several are open at once in one process (a job's members), each ending with its
own status; read back from a real SQLite store."""

from __future__ import annotations

import contextlib
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from tests.conftest import TINY, make_cfg, wait_for
from vaeexp.config import Config, settings
from vaeexp.data import Dataset, load_data
from vaeexp.model import IMAGE_DIM, VAE
from vaeexp.step import Diverged
from vaeexp.tracking.run import TrackedRun, flatten, log_models, tracked_run

CPU = torch.device("cpu")
CPU_KEY, MEMORY_KEY = "system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"


def test_flatten_nested_config():
    tree = {"a": 1, "data": {"name": "mnist", "mirrors": ["u", "v"], "x": {"y": None}}}
    assert flatten(tree) == {
        "a": "1",
        "data.name": "mnist",
        "data.mirrors": "['u', 'v']",
        "data.x.y": "None",
    }


@pytest.fixture(scope="module")
def data() -> Dataset:
    return load_data(make_cfg(*TINY).data, progress=False)


@pytest.fixture
def member(mlflow_store, tmp_path: Path, data: Dataset, monkeypatch: pytest.MonkeyPatch):
    """Opens a tracked run named `name` in this test's store: `member(name, *overrides)`."""
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")  # MLflow's: 10 s
    _, uri = mlflow_store

    def cfg(name: str, *overrides: str) -> Config:
        return settings(
            make_cfg(
                *TINY,
                f"tracking.uri={uri}",
                f"tracking.artifact_location={tmp_path / 'mlartifacts'}",
                f"tracking.run_name={name}",
                "tracking.log_images=false",
                *overrides,
            )
        )

    def open_run(name: str, *overrides: str, resume_run_id: str | None = None):
        return tracked_run(cfg(name, *overrides), data, CPU, tmp_path / name, [], resume_run_id)

    return open_run


def _metrics(client: MlflowClient, run: TrackedRun) -> dict[str, float]:
    return client.get_run(run.run_id).data.metrics


def test_two_runs_open_at_once_each_log_to_their_own(mlflow_store, member):
    client, _ = mlflow_store
    with contextlib.ExitStack() as runs:  # entered one after the other, ended in reverse order
        a = runs.enter_context(member("a", "tracking.system_metrics=true"))
        b = runs.enter_context(member("b", "tracking.system_metrics=false"))
        assert a.run_id != b.run_id and mlflow.active_run() is None  # no fluent run involved
        a.logger.log_metrics({"test/loss": 1.0}, 1)
        b.logger.log_metrics({"test/loss": 2.0}, 1)
        assert [client.get_run(r.run_id).info.status for r in (a, b)] == ["RUNNING"] * 2
        wait_for("a's system metrics", lambda: CPU_KEY in _metrics(client, a), timeout=60)
    for run, loss in ((a, 1.0), (b, 2.0)):
        got = client.get_run(run.run_id)
        assert got.info.status == "FINISHED" and got.info.run_name == run.name
        assert got.data.params["tracking.run_name"] == run.name
        assert got.data.metrics["test/loss"] == loss
        assert "failure_reason" not in got.data.tags
    assert {CPU_KEY, MEMORY_KEY} <= _metrics(client, a).keys()
    assert not [k for k in _metrics(client, b) if k.startswith("system/")]
    assert mlflow.active_run() is None


def test_fail_ends_one_run_failed_the_other_finished(mlflow_store, member):
    client, _ = mlflow_store
    with contextlib.ExitStack() as runs:
        a = runs.enter_context(member("a"))
        b = runs.enter_context(member("b"))
        a.fail(Diverged("training loss diverged at step 7: recon=nan"))
    failed, finished = client.get_run(a.run_id), client.get_run(b.run_id)
    assert failed.info.status == "FAILED" and failed.data.tags["diverged"] == "true"
    assert failed.data.tags["failure_reason"] == (
        "Diverged: training loss diverged at step 7: recon=nan"
    )
    assert finished.info.status == "FINISHED"
    assert not {"failure_reason", "diverged"} & finished.data.tags.keys()


def test_an_error_raised_through_it_fails_the_run_with_its_reason(mlflow_store, member):
    client, _ = mlflow_store
    with pytest.raises(RuntimeError), member("a") as a:
        raise RuntimeError("out of memory")
    run = client.get_run(a.run_id)
    assert run.info.status == "FAILED" and "diverged" not in run.data.tags
    assert run.data.tags["failure_reason"] == "RuntimeError: out of memory"


def test_resumed_run_reopens_without_its_stale_failure(mlflow_store, member):
    client, _ = mlflow_store
    with member("a") as first:
        first.fail(Diverged("step 3"))
    with member("a", "latent_dim=3", resume_run_id=first.run_id) as again:
        assert again.run_id == first.run_id
        run = client.get_run(again.run_id)
        assert run.info.status == "RUNNING"
        assert not {"failure_reason", "diverged"} & run.data.tags.keys()
        assert run.data.params["latent_dim"] == "2"  # a param is never logged twice
    assert client.get_run(first.run_id).info.status == "FINISHED"


def test_models_go_to_the_named_run_while_another_is_open(mlflow_store, member):
    client, uri = mlflow_store
    with member("a") as a, member("b") as b:
        mlflow.set_tracking_uri(uri)  # as TrackedRun.finish does
        log_models(VAE(latent_dim=2, intermediate_dim=16), torch.rand(5, IMAGE_DIM), b.run_id)
        assert mlflow.active_run() is None
        assert {client.get_run(r.run_id).info.status for r in (a, b)} == {"RUNNING"}
    experiment = client.get_run(b.run_id).info.experiment_id
    models = mlflow.search_logged_models(experiment_ids=[experiment], output_format="list")
    assert sorted(m.name for m in models) == ["decoder", "model"]
    assert {m.source_run_id for m in models} == {b.run_id}
    decoder = mlflow.pyfunc.load_model(
        f"models:/{next(m for m in models if m.name == 'decoder').model_id}"
    )
    assert decoder.predict(torch.zeros(3, 2).numpy()).shape == (3, IMAGE_DIM)
    assert {client.get_run(r.run_id).info.status for r in (a, b)} == {"FINISHED"}
