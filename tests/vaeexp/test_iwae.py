"""`python -m vaeexp.iwae` rebuilds a finished run's model and data from MLflow alone."""

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import TINY, run_cli

ARGS = [
    *TINY,
    "epochs=1",
    "intermediate_dim=32",
    "tracking.log_model=false",
    "tracking.log_images=false",
    "iwae.k=20",
    "iwae.images=30",
]


@pytest.mark.slow  # a run, then `python -m vaeexp.iwae`
def test_iwae_reproduces_the_in_run_bound_and_logs_it(store):
    assert run_cli(*ARGS, env=store).returncode == 0
    client = MlflowClient(store["MLFLOW_TRACKING_URI"])
    run = client.search_runs([client.get_experiment_by_name("vaeexp").experiment_id])[0]
    in_run = run.data.metrics["test_nll_iwae_k20"]
    assert in_run > 0
    assert in_run <= run.data.metrics["test/neg_elbo"] + 5  # a tighter bound, up to noise

    result = run_cli(
        run.info.run_id, "--k", "20", "--images", "30", env=store, module="vaeexp.iwae"
    )
    assert result.returncode == 0, result.stderr
    printed = float(result.stdout.strip().split(" = ")[1])
    assert printed == pytest.approx(in_run, abs=1e-3)  # same model, data, draws
    history = client.get_metric_history(run.info.run_id, "test_nll_iwae_k20")
    assert len(history) == 2 and history[-1].step == 1

    more = run_cli(
        run.info.run_id,
        "--k",
        "200",
        "--images",
        "30",
        "--no-log",
        env=store,
        module="vaeexp.iwae",
    )
    assert float(more.stdout.strip().split(" = ")[1]) < printed + 0.5  # more samples: tighter
    assert "test_nll_iwae_k200" not in client.get_run(run.info.run_id).data.metrics


@pytest.mark.slow  # `python -m vaeexp.iwae`
def test_unknown_run_is_a_clear_error(store):
    result = run_cli("0123456789abcdef", env=store, module="vaeexp.iwae")
    assert result.returncode != 0
    assert "vaeexp.iwae: error: no run 0123456789abcdef" in result.stderr
