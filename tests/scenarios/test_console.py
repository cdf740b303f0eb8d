"""What a user reads: one fallback warning per sweep, no third-party progress bars, and a summary
at the end of a run and of a sweep that says how to open it."""

from __future__ import annotations

from mlflow.tracking import MlflowClient

from tests.conftest import env_for, free_port, run_cli

QUICK = [
    "data.train_limit=200",
    "data.test_limit=50",
    "runtime.progress=false",
    "epochs=1",
    "intermediate_dim=32",
    "iwae.k=5",
    "iwae.images=20",
    "tracking.log_model=false",
]
BANNER = "DATA=MNIST IS NOT AVAILABLE"


def test_a_sweep_warns_once_and_ends_with_its_summary(tmp_path):
    env = env_for(tmp_path)
    offline = f"data.mirrors=[http://127.0.0.1:{free_port()}/]"  # nothing listens: refused
    result = run_cli("-m", "latent_dim=2,3", "data=mnist", offline, *QUICK, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout + result.stderr
    assert out.count(BANNER) == 1, out
    assert "Downloading artifacts" not in out and "Uploading artifacts" not in out
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("vaeexp").experiment_id])
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert [r.data.tags["data.resolved"] for r in children] == ["mnist_bundled"] * 2
    (parent,) = [r for r in runs if r not in children]
    best = min(children, key=lambda r: r.data.metrics["test/loss"])
    summary = result.stdout[result.stdout.index("vaeexp: sweep of 2 runs") :]
    assert f"best {best.info.run_name} ({best.info.run_id})" in summary
    assert "report.html" in summary and f"/runs/{parent.info.run_id}?workflowType" in summary
    assert "python -m vaeexp.ui --uri" in summary


def test_a_run_ends_with_its_summary(tmp_path):
    env = env_for(tmp_path)
    env["MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"] = "1"
    result = run_cli("data=mnist_bundled", *QUICK, "tracking.system_metrics=false", env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    (run,) = client.search_runs([client.get_experiment_by_name("vaeexp").experiment_id])
    metrics = run.data.metrics
    assert not [k for k in metrics if k.startswith("system/")]  # turned off
    summary = result.stdout[result.stdout.index(f"vaeexp: run {run.info.run_name}") :]
    assert f"({run.info.run_id}) finished" in summary
    assert f"test loss {metrics['test/loss']:.2f}" in summary
    assert f"negative ELBO {metrics['test/neg_elbo']:.2f}" in summary
    assert f"IWAE bound (k=5) {metrics['test_nll_iwae_k5']:.2f}" in summary
    assert f"folder: {run.data.tags['output_dir']}" in summary
    experiment = run.info.experiment_id
    assert f"#/experiments/{experiment}/runs/{run.info.run_id}?workflowType" in summary
