"""The MLflow store (vaeexp.tracking.store): its experiment, made once."""

from concurrent.futures import ThreadPoolExecutor

from mlflow.tracking import MlflowClient

from vaeexp.tracking.store import EXPERIMENT_KIND, ensure_experiment


def test_experiment_created_once_with_kind_tag(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    location = (tmp_path / "art").as_uri()
    with ThreadPoolExecutor(4) as pool:  # concurrent jobs race to create it
        ids = set(pool.map(lambda _: ensure_experiment(client, "vaeexp", location), range(4)))
    assert len(ids) == 1
    experiment = client.get_experiment(ids.pop())
    assert experiment.tags.items() >= EXPERIMENT_KIND.items()
    assert experiment.artifact_location == location
