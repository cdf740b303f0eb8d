"""`python -m vaeexp.sync` (vaeexp.sync): a run folder whose store went away, delivered later to a
real SQLite store, or kept while the store is still away."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
from PIL import Image

from tests.conftest import TINY, make_cfg
from vaeexp import checkpoint
from vaeexp.config import plain, settings
from vaeexp.model import VAE
from vaeexp.sync import main, sync
from vaeexp.tracking.outbox import MANIFEST, Outbox

GREY = np.arange(28 * 28, dtype=np.uint16).reshape(28, 28).astype(np.uint8)
POINTS = [Metric("test/loss", 200.0 - e, 1_700_000_000_000 + e, e) for e in (1, 2, 3)]


def failed_run(folder: Path, down, run_id: str, models: bool, lost_log: bool = False) -> None:
    """Leave `folder` as a run leaves it when its store went away during training: a checkpoint,
    the kept image as a PNG, and undelivered.json listing 3 metric points, the image, the
    models (if `models`) and the final status KILLED; with `lost_log`, also the run's log, which
    is then deleted, so that delivering it fails for real."""
    bad, bad_uri = down
    cfg = plain(settings(make_cfg(*TINY, "intermediate_dim=16")))
    vae = VAE(cfg["latent_dim"], cfg["intermediate_dim"])
    checkpoint.save(folder / checkpoint.FILENAME, {"model": vae.state_dict(), "config": cfg})
    (folder / "run.log").write_text("the log")
    box = Outbox(bad, run_id, bad_uri, folder)
    box.metrics_out(POINTS)
    for call in (
        lambda: box.image_out(GREY, "samples", step=3),
        lambda: lost_log and box.artifact_out(folder / "run.log"),
        lambda: models and box.models_out(lambda: bad.log_artifact(run_id, str(folder), "m")),
        lambda: box.status_out("KILLED", lambda status: bad.set_terminated(run_id, status)),
    ):
        box.offline_until = 0  # really try the store each time
        call()
    assert box.failures == 3 + models + lost_log and box.models is models
    box.write_manifest()
    if lost_log:
        (folder / "run.log").unlink()


def image_steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    pattern = re.compile(rf"images/{key}\+step\+(\d+)\+timestamp\+\d+\+[\w-]+\.png$")
    files = [f.path for f in client.list_artifacts(run_id, "images")]
    return [int(m.group(1)) for f in files if (m := pattern.match(f))]


def assert_delivered(client: MlflowClient, run_id: str, folder: Path, manifest: dict) -> None:
    history = client.get_metric_history(run_id, "test/loss")
    assert [(m.step, m.value, m.timestamp) for m in history] == [
        (m.step, m.value, m.timestamp) for m in POINTS
    ]
    assert image_steps(client, run_id, "samples") == [3]
    assert client.get_run(run_id).info.status == "KILLED"
    assert not (folder / MANIFEST).exists()
    # renamed as it was: the record of what was delivered
    assert json.loads((folder / f"{MANIFEST}.delivered").read_text()) == manifest


def test_sync_delivers_metrics_image_and_final_status(down, working, tmp_path):
    client, uri, run_id = working
    folder = tmp_path / "run"
    failed_run(folder, down, run_id, models=False)
    manifest = json.loads((folder / MANIFEST).read_text())

    box = sync(folder, uri=uri)  # delivered elsewhere than the recorded, unreachable, store
    assert box.pending() == "" and box.uri == uri
    assert_delivered(client, run_id, folder, manifest)
    experiment = client.get_run(run_id).info.experiment_id
    assert client.search_logged_models([experiment]) == []


def test_sync_keeps_the_manifest_while_the_store_is_still_away(down, tmp_path, caplog):
    folder = tmp_path / "run"
    failed_run(folder, down, "0123456789abcdef" * 2, models=True)
    before = json.loads((folder / MANIFEST).read_text())

    box = sync(folder)  # to the recorded, still unreachable, store
    assert box.pending() == "3 metric points, 1 images, the models, the final status KILLED"
    assert json.loads((folder / MANIFEST).read_text()) == before
    assert not (folder / f"{MANIFEST}.delivered").exists()
    [image] = before["images"]
    with Image.open(image["path"]) as kept:
        assert np.array_equal(np.asarray(kept), GREY)
    assert "training goes on" in caplog.text


def test_sync_rewrites_the_manifest_with_what_is_left(down, working, tmp_path):
    client, uri, run_id = working
    folder = tmp_path / "run"
    failed_run(folder, down, run_id, models=False, lost_log=True)

    box = sync(folder, uri=uri)
    assert box.pending() == "1 artifacts, the final status KILLED"  # the status waits for all
    left = json.loads((folder / MANIFEST).read_text())
    assert left["metrics"] == [] and left["images"] == []  # delivered: not sent again
    assert left["artifacts"] == [[str(folder / "run.log"), None]] and left["status"] == "KILLED"
    assert left["tracking_uri"] == uri  # the next try goes where the rest went
    assert len(client.get_metric_history(run_id, "test/loss")) == len(POINTS)
    assert image_steps(client, run_id, "samples") == [3]
    assert client.get_run(run_id).info.status == "RUNNING"


def test_main_delivers_and_says_so(down, working, tmp_path, capsys):
    client, uri, run_id = working
    folder = tmp_path / "run"
    failed_run(folder, down, run_id, models=False)
    main([str(folder), "--uri", uri])
    assert capsys.readouterr().out == f"vaeexp.sync: run {run_id} is complete in {uri}\n"
    assert client.get_run(run_id).info.status == "KILLED"
    assert (folder / f"{MANIFEST}.delivered").is_file() and not (folder / MANIFEST).exists()


def test_main_says_what_is_still_undelivered(down, tmp_path):
    folder = tmp_path / "run"
    failed_run(folder, down, "0123456789abcdef" * 2, models=False)
    with pytest.raises(SystemExit) as stop:
        main([str(folder)])
    assert stop.value.code == (
        f"vaeexp.sync: error: {down[1]} still does not take 3 metric points, 1 images, "
        "the final status KILLED; kept for the next try"
    )
    assert (folder / MANIFEST).is_file()


def test_main_refuses_a_folder_without_manifest(tmp_path):
    with pytest.raises(SystemExit) as stop:
        main([str(tmp_path)])
    assert stop.value.code == (
        f"vaeexp.sync: error: {tmp_path / MANIFEST} not found: nothing to deliver"
    )
