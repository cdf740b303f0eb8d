"""End to end: `python -m vaeexp ...` in a subprocess against a temporary SQLite store, read back
through MlflowClient as any user of the store would."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from tests.conftest import TINY, env_for, only_run, run_cli, sweep_runs
from vaeexp import checkpoint
from vaeexp.model import VAE
from vaeexp.paths import CONF_DIR, PROJECT_ROOT

ARGS = [*TINY, "epochs=2", "intermediate_dim=64", "batch_size=50", "log_every_n_steps=3"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    elsewhere = root / "some" / "other" / "folder"  # runs land in the store whatever the cwd
    elsewhere.mkdir(parents=True)
    env = env_for(root) | {"MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1"}  # MLflow's: 10 s
    result = run_cli(*ARGS, env=env, cwd=elsewhere)
    assert result.returncode == 0, result.stderr[-3000:]
    client, experiment, run = only_run(env)
    return env, client, experiment, run, result


def test_run_finished_with_name_params_and_tags(finished):
    env, _client, experiment, run, _ = finished
    assert run.info.status == "FINISHED"
    assert run.info.run_name == (
        "data=mnist_bundled,data.train_limit=400,data.test_limit=100,"
        "epochs=2,intermediate_dim=64,batch_size=50,log_every_n_steps=3"
    )
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert experiment.artifact_location == (Path(env["VAEEXP_RUNS"]) / "mlartifacts").as_uri()
    p = run.data.params
    assert p["latent_dim"] == "2" and p["intermediate_dim"] == "64" and p["epochs"] == "2"
    assert p["optimizer"] == "rmsprop" and p["data.binarize"] == "none" and p["lr"] == "0.001"
    assert p["data.resolved"] == "mnist_bundled" and p["data.n_train"] == "400"
    t = run.data.tags
    assert t["data.resolved"] == "mnist_bundled" and t["data.binarize"] == "none"
    assert "epochs=2" in t["hydra_overrides"] and "data=mnist_bundled" in t["hydra_overrides"]
    out = Path(t["output_dir"])
    assert out.is_relative_to(Path(env["VAEEXP_RUNS"])) and (out / "checkpoint.pt").is_file()
    if (
        subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True
        ).returncode
        == 0
    ):
        assert len(t["mlflow.source.git.commit"]) == 40


def test_system_metrics_beside_the_runs_own(finished):
    _, _, _, run, result = finished
    system = {k for k in run.data.metrics if k.startswith("system/")}
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= system
    if not torch.cuda.is_available():
        assert not any("gpu" in k for k in system)
    assert "system metrics" not in result.stderr  # MLflow's INFO lines about its monitor


def test_metric_histories(finished):
    _, client, _, run, _ = finished
    rid = run.info.run_id

    def history(key):
        return [(m.step, m.value) for m in client.get_metric_history(rid, key)]

    # 400 images / 50 = 8 steps an epoch; every 3 steps plus each epoch's tail
    assert [s for s, _ in history("train/loss_step")] == [3, 6, 8, 9, 12, 15, 16]
    keys = (
        "train/loss",
        "train/recon",
        "train/kl",
        "test/loss",
        "test/recon",
        "test/kl",
        "test/neg_elbo",
    )
    for key in keys:
        values = history(key)
        assert [s for s, _ in values] == [1, 2], key
        assert all(np.isfinite(v) and v >= 0 for _, v in values), key
    (_, loss), (_, recon), (_, kl) = (
        history(k)[-1] for k in ("test/loss", "test/recon", "test/kl")
    )
    assert loss == pytest.approx(recon + kl)
    assert 100 < loss < 600
    [(step, nll)] = history("test_nll_iwae_k1000")  # the end-of-run bound
    assert step == 2 and 100 < nll < loss + 5


def test_artifacts_hydra_files_and_images(finished):
    _, client, _, run, _ = finished
    rid = run.info.run_id
    hydra = {f.path for f in client.list_artifacts(rid, "hydra")}
    assert hydra == {"hydra/config.yaml", "hydra/hydra.yaml", "hydra/overrides.yaml"}
    images = [f.path for f in client.list_artifacts(rid, "images") if f.path.endswith(".png")]
    for key in ("reconstructions", "samples", "manifold"):
        for step in (1, 2):  # one per epoch: the UI's image slider
            assert any(f"images/{key}+step+{step}+" in p for p in images), (key, step, images)
    assert run.data.tags["mlflow.loggedImages"] == "True"


def test_logged_models_load_and_decode(finished):
    env, _client, experiment, run, _ = finished
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    models = {
        m.name: m
        for m in mlflow.search_logged_models(
            experiment_ids=[experiment.experiment_id], output_format="list"
        )
    }
    assert set(models) == {"model", "decoder"}
    assert all(m.source_run_id == run.info.run_id for m in models.values())

    state = checkpoint.load(run.data.tags["output_dir"])
    vae = VAE(latent_dim=2, intermediate_dim=64)
    vae.load_state_dict(state["model"])
    z = np.random.default_rng(0).normal(size=(7, 2)).astype(np.float32)
    decoder = mlflow.pyfunc.load_model(f"models:/{models['decoder'].model_id}")
    assert decoder.metadata.get_input_schema().inputs[0].shape == (-1, 2)
    decoded = decoder.predict(z)
    assert decoded.shape == (7, 784) and decoded.min() >= 0 and decoded.max() <= 1
    np.testing.assert_allclose(
        decoded, vae.decode(torch.from_numpy(z)).detach().numpy(), atol=1e-6
    )  # the logged decoder is the trained one
    recon = mlflow.pyfunc.load_model(f"models:/{models['model'].model_id}")
    x = np.random.default_rng(1).random((3, 784), dtype=np.float32)
    assert recon.predict(x).shape == (3, 784)


def test_resume_continues_same_run(finished, tmp_path):
    env, client, _, run, _ = finished
    out = run.data.tags["output_dir"]
    args = [a for a in ARGS if a != "epochs=2"]
    result = run_cli(*args, "epochs=3", f"resume={out}", env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    client, _, again = only_run(env)  # the same run, not a new one
    assert again.info.run_id == run.info.run_id and again.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "test/loss")]
    assert steps == [1, 2, 3]
    loss_steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss_step")]
    assert loss_steps == [3, 6, 8, 9, 12, 15, 16, 18, 21, 24]


def test_divergence_ends_failed_with_reason(tmp_path):
    env = env_for(tmp_path)
    result = run_cli(*ARGS, "lr=1e30", "log_every_n_steps=1", env=env)
    assert result.returncode == 1
    assert (
        result.stderr.strip().splitlines()[-1].startswith("vaeexp: error: training loss diverged")
    )
    _, _, run = only_run(env)
    assert run.info.status == "FAILED"
    assert run.data.tags["failure_reason"].startswith("Diverged: training loss diverged at step")
    assert all(np.isfinite(v) for v in run.data.metrics.values())


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_ends_killed(tmp_path, sig):
    env = {**os.environ, **env_for(tmp_path), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "vaeexp", *ARGS, "epochs=500"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=tmp_path,
    )
    for line in proc.stdout:
        if "epoch 2/500" in line:
            break
    proc.send_signal(sig)
    rest = proc.communicate(timeout=60)[0]
    assert proc.returncode == 130, rest
    assert "interrupted" in rest
    client, _, run = only_run(env_for(tmp_path))
    assert run.info.status == "KILLED"
    # epoch 1 was complete before the signal: its metrics are kept
    assert next(m.step for m in client.get_metric_history(run.info.run_id, "test/loss")) == 1


def test_task_returns_final_test_loss(store, tmp_path):
    """Sweepers minimise what the task function returns; call it as Hydra's run_job does."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf, open_dict

    from vaeexp.app import task

    overrides = [*ARGS, "epochs=1", "tracking.log_model=false", "tracking.log_images=false"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        full = compose("config", overrides=overrides, return_hydra_config=True)
    with open_dict(full):
        full.hydra.runtime.output_dir = str(tmp_path)
        full.hydra.job.num = 0
    HydraConfig.instance().set_config(full)
    cfg = OmegaConf.masked_copy(full, [k for k in full if k != "hydra"])
    value = task(cfg)
    _, _, run = only_run(store)
    assert isinstance(value, float) and value == pytest.approx(run.data.metrics["test/loss"])


def test_sweep_is_one_parent_run_with_a_child_per_job(tmp_path):
    env = env_for(tmp_path)
    result = run_cli(
        "-m",
        "latent_dim=2,3",
        "intermediate_dim=16,32",
        *TINY,
        "epochs=1",
        "tracking.log_model=false",
        "iwae.images=0",
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    _, parent, children = sweep_runs(env["MLFLOW_TRACKING_URI"])
    runs = [parent, *children]
    assert parent.info.run_name.startswith("sweep latent_dim=2,3 intermediate_dim=16,32")
    assert parent.data.params["sweep.overrides"].startswith("latent_dim=2,3 intermediate_dim=16,32")
    assert sorted(",".join(r.info.run_name.split(",")[:2]) for r in children) == [
        "latent_dim=2,intermediate_dim=16",
        "latent_dim=2,intermediate_dim=32",
        "latent_dim=3,intermediate_dim=16",
        "latent_dim=3,intermediate_dim=32",
    ]
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parent.info.run_id}
    assert {r.data.tags["sweep"] for r in runs} == {parent.data.tags["sweep"]}  # one sweep tag
    assert all(r.info.status == "FINISHED" for r in runs)
    best = min(children, key=lambda r: r.data.metrics["test/loss"])
    assert parent.data.tags["best_child_run_id"] == best.info.run_id
    assert parent.data.metrics["best_test_loss"] == best.data.metrics["test/loss"]
    folders = {Path(r.data.tags["output_dir"]) for r in children}
    assert len(folders) == 4 and {f.parent for f in folders} == {Path(parent.data.tags["sweep"])}


def test_single_run_has_no_parent(finished):
    _, _, _, run, _ = finished
    assert "mlflow.parentRunId" not in run.data.tags and "sweep" not in run.data.tags


def test_kl_weight_sweep_names_logs_and_reports_each_weight(tmp_path):
    """A sweep of the KL weight with a warm-up: each job's name and params carry both settings,
    `train/kl_weight` climbs epoch by epoch, and the sweep's report sets kl_weight beside the
    test reconstruction and KL."""
    env = env_for(tmp_path)
    result = run_cli(
        "-m",
        "kl_weight=1,4",
        "kl_warmup_epochs=2",
        *TINY,
        "epochs=2",
        "intermediate_dim=16",
        "batch_size=50",
        "tracking.log_model=false",
        "tracking.log_images=false",
        "iwae.images=0",
        "film=off",
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    client, parent, children = sweep_runs(env["MLFLOW_TRACKING_URI"])
    children = sorted(children, key=lambda r: r.info.run_name)
    assert [r.info.run_name.split(",")[:2] for r in children] == [
        ["kl_weight=1", "kl_warmup_epochs=2"],
        ["kl_weight=4", "kl_warmup_epochs=2"],
    ]
    for run, weight in zip(children, (1.0, 4.0), strict=True):
        assert run.data.params["kl_weight"] == str(weight)
        assert run.data.params["kl_warmup_epochs"] == "2"
        history = client.get_metric_history(run.info.run_id, "train/kl_weight")
        assert sorted((m.step, m.value) for m in history) == [(1, weight / 2), (2, weight)]
    report = Path(parent.data.tags["sweep"]) / "report"
    with (report / "runs.csv").open() as f:
        rows = {r["kl_weight"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"1.0", "4.0"}
    for row in rows.values():
        recon, kl = float(row["test recon"]), float(row["test KL"])
        assert float(row["test loss"]) == pytest.approx(recon + kl, abs=0.02)
        assert (
            f"test loss {row['test loss']}; recon {row['test recon']}, KL {row['test KL']}"
            in (report / "report.html").read_text()
        )
