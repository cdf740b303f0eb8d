from concurrent.futures import ThreadPoolExecutor

from mlflow.tracking import MlflowClient

from vaeexp.config import run_name
from vaeexp.tracking.record import flatten
from vaeexp.tracking.store import EXPERIMENT_KIND, ensure_experiment


def test_run_name_keeps_what_changes_training():
    overrides = [
        "latent_dim=8",
        "+foo=1",
        "tracking.uri=x",
        "progress=false",
        "data=kmnist",
        "hydra.run.dir=/x",
        "device=cpu",
        "resume=/a/b",
        "iwae.k=5",
    ]
    assert run_name(overrides) == "latent_dim=8,foo=1,data=kmnist"
    assert run_name([]) == "defaults"


def test_flatten_nested_config():
    tree = {"a": 1, "data": {"name": "mnist", "mirrors": ["u", "v"], "x": {"y": None}}}
    assert flatten(tree) == {
        "a": "1",
        "data.name": "mnist",
        "data.mirrors": "['u', 'v']",
        "data.x.y": "None",
    }


def test_experiment_created_once_with_kind_tag(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    location = (tmp_path / "art").as_uri()
    with ThreadPoolExecutor(4) as pool:  # concurrent jobs race to create it
        ids = set(pool.map(lambda _: ensure_experiment(client, "vaeexp", location), range(4)))
    assert len(ids) == 1
    experiment = client.get_experiment(ids.pop())
    assert experiment.tags.items() >= EXPERIMENT_KIND.items()
    assert experiment.artifact_location == location
