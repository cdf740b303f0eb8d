"""The end of a sweep (vaeexp.sweep: its callback's end, and `tally`) on sweeps made up in a real
MLflow store: ended again as a resumed sweep ends, regrouped, and with more children than one
page of MLflow's search holds."""

from __future__ import annotations

import math
from pathlib import Path

from omegaconf import OmegaConf

from tests.compare_support import add_run, bulk_children, fake_sweep
from tests.conftest import metric_steps
from vaeexp.compare import report
from vaeexp.compare.parent import KEYS_TAG
from vaeexp.paths import PARENT_FILE
from vaeexp.sweep import SweepRun, sweep_tag, tally

LOSS = {("latent_dim=2", 0): 510.0, ("latent_dim=2", 1): 500.0}
LOSS |= {("latent_dim=8", 0): 480.0, ("latent_dim=8", 1): 484.0}


def test_a_sweep_ended_again_or_regrouped_logs_nothing_twice(tmp_path: Path, mlflow_store):
    client, uri = mlflow_store
    experiment = client.create_experiment("vaeexp", str(tmp_path / "mlartifacts"))
    settings = [{"latent_dim": "2"}, {"latent_dim": "8"}]
    parent, _ = fake_sweep(client, experiment, settings, range(2), LOSS, tmp_path / "files")
    folder = tmp_path / "sweep"
    folder.mkdir()
    (folder / PARENT_FILE).write_text(parent)
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(folder)}}, "tracking": {"uri": uri}})
    group = "group/latent_dim-8/test_loss_mean"
    for _ in range(2):  # the sweep's end, then the end of the same sweep resumed
        SweepRun().on_multirun_end(config)
        assert metric_steps(client, parent, "best_test_loss") == [0]
        assert metric_steps(client, parent, group) == [0]
    assert client.get_run(parent).data.tags["jobs.finished"] == "4"

    # a better run joins (a sweep continued with more jobs): one new point each, after the first
    add_run(client, experiment, {"latent_dim": "8", "seed": "2"}, parent=parent, final=470.0)
    SweepRun().on_multirun_end(config)
    history = client.get_metric_history(parent, "best_test_loss")
    assert sorted((m.step, m.value) for m in history) == [(0, 480.0), (1, 470.0)]
    assert metric_steps(client, parent, group) == [0, 1]

    # regrouped by seed: the latent_dim groups' metrics are superseded, and the page says so
    report(client, tmp_path / "by-seed", parent=parent, group_by=["seed"])
    top = client.get_run(parent).data
    assert math.isnan(top.metrics[group]) and metric_steps(client, parent, group) == [0, 1, 2]
    assert top.metrics["group/seed-0/test_loss_mean"] == 495.0
    assert top.tags[KEYS_TAG] == "seed"
    page = (tmp_path / "by-seed" / "report.html").read_text()
    assert "The parent run&#39;s group metrics are this report&#39;s (group.keys: seed)" in page


def test_a_sweep_counts_every_child_past_a_page_of_search(tmp_path: Path, mlflow_store):
    """MLflow's search returns 1,000 runs a page, newest first: the first child started is on
    the second page. Here it is the best one; the next one's job was killed, unsaid."""
    client, uri = mlflow_store
    experiment = client.create_experiment("vaeexp", str(tmp_path / "mlartifacts"))
    parent = client.create_run(experiment).info.run_id
    children = [("FINISHED", 400.0), ("RUNNING", None), ("FAILED", None)]
    children += [("FINISHED", 500.0 + i) for i in range(999)]
    ids = bulk_children(uri, experiment, parent, children)
    jobs = tally(client, parent)
    assert len(jobs.children) == 1002
    assert jobs.counts() == {"finished": 1000, "failed": 1, "killed": 1}
    assert jobs.best.info.run_id == ids[0]
    assert client.get_run(ids[1]).info.status == "KILLED"  # no child is left RUNNING


def test_a_sweep_is_the_same_sweep_whatever_is_said_of_where_and_how_long():
    base = sweep_tag(["latent_dim=2,8", "seed=0,1"])
    assert sweep_tag(["seed=0,1", "latent_dim=2,8", "resume=auto"]) == base
    assert sweep_tag(["latent_dim=2,8", "seed=0,1", "epochs=20"]) != base  # another sweep
    assert sweep_tag(["latent_dim=2,8", "seed=0,1", "tracking.uri=http://x:5000"]) == base
    assert sweep_tag(["latent_dim=2,8", "seed=0,1,2"]) != base
    assert sweep_tag(["latent_dim=2,8", "seed=0,1", "lr=0.01"]) != base
    assert sweep_tag(["latent_dim=2,8", "seed=0,1", "hydra/launcher=joblib"]) == base  # how
    assert sweep_tag(["latent_dim=2,8", "seed=0,1", "~film"]) != base  # a group removed
