"""MLflow delivery that outlives its store (vaeexp.tracking.outbox), against a real SQLite store
and a real address where nothing listens."""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from pathlib import Path

import numpy as np
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
from PIL import Image

from vaeexp.tracking.outbox import MANIFEST, Outbox

GREY = np.arange(28 * 28, dtype=np.uint16).reshape(28, 28).astype(np.uint8)  # a gradient


def points(n: int, key: str = "train/loss_step", first: int = 0) -> list[Metric]:
    return [Metric(key, 100.0 - i, 1_700_000_000_000 + i, 10 * i) for i in range(first, n)]


def history(client: MlflowClient, run_id: str, key: str = "train/loss_step") -> list[tuple]:
    return [(m.step, m.value, m.timestamp) for m in client.get_metric_history(run_id, key)]


def image_files(client: MlflowClient, run_id: str, key: str) -> dict[int, str]:
    """step -> artifact path of a key's full-size images in MLflow's image slider."""
    key = key.replace("/", "~")
    pattern = re.compile(rf"images/{re.escape(key)}\+step\+(\d+)\+timestamp\+\d+\+[\w-]+\.png$")
    files = [f.path for f in client.list_artifacts(run_id, "images")]
    return {int(m.group(1)): f for f in files if (m := pattern.match(f))}


def palette_image() -> Image.Image:
    """A palette image like the film's frames: two stripes in colours no grey palette has."""
    image = Image.fromarray(np.repeat(np.arange(2, dtype=np.uint8), 8)[None].repeat(8, 0), "P")
    image.putpalette(bytes([255, 127, 14, 44, 160, 44]).ljust(768, b"\0"))
    return image


def downloaded(client: MlflowClient, run_id: str, path: str, dst: Path) -> Image.Image:
    dst.mkdir(exist_ok=True)
    with Image.open(client.download_artifacts(run_id, path, str(dst))) as image:
        return image.copy()


def test_a_working_store_gets_everything_at_once(working, tmp_path):
    client, uri, run_id = working
    box = Outbox(client, run_id, uri, tmp_path / "run")
    note = tmp_path / "note.txt"
    note.write_text("hello")
    box.metrics_out(points(3))
    box.image_out(GREY, "samples", step=2)
    box.image_out(palette_image(), "film/latent", step=5)
    box.artifact_out(note, "film")
    assert box.pending() == "" and box.failures == 0
    assert history(client, run_id) == [(10 * i, 100.0 - i, 1_700_000_000_000 + i) for i in range(3)]
    assert list(image_files(client, run_id, "samples")) == [2]
    assert list(image_files(client, run_id, "film/latent")) == [5]
    assert [f.path for f in client.list_artifacts(run_id, "film")] == ["film/note.txt"]
    assert not (tmp_path / "run").exists()  # nothing kept on disk


def test_an_unreachable_store_keeps_everything_and_warns_once(down, tmp_path, caplog):
    bad, bad_uri = down
    folder = tmp_path / "run"
    note = tmp_path / "note.txt"
    note.write_text("hello")
    box = Outbox(bad, uuid.uuid4().hex, bad_uri, folder)
    with caplog.at_level(logging.WARNING, logger="vaeexp.tracking.outbox"):
        box.metrics_out(points(3))
        assert box.failures == 1 and box.offline_until > time.monotonic()
        box.offline_until = 0  # each call below really tries the store again
        box.image_out(GREY, "film/latent", step=4)
        box.offline_until = 0
        box.artifact_out(note, "film")
    assert box.failures == 3
    [warning] = [r for r in caplog.records if r.name == "vaeexp.tracking.outbox"]
    assert warning.levelno == logging.WARNING
    assert bad_uri in warning.getMessage() and "while logging metrics" in warning.getMessage()
    assert "training goes on" in warning.getMessage()

    assert box.pending() == "3 metric points, 1 images, 1 artifacts"
    assert [(m.key, m.value, m.timestamp, m.step) for m in box.metrics] == [
        (m.key, m.value, m.timestamp, m.step) for m in points(3)
    ]
    png = folder / "undelivered" / "film~latent+step+4.png"
    assert box.images == [{"key": "film/latent", "step": 4, "path": str(png)}]
    with Image.open(png) as kept:
        assert np.array_equal(np.asarray(kept), GREY)
    assert box.artifacts == [[str(note), "film"]]


def test_kept_while_offline_and_delivered_after_the_retry_window(down, working, tmp_path):
    bad, bad_uri = down
    client, _uri, run_id = working
    box = Outbox(bad, run_id, bad_uri, tmp_path / "run")
    box.metrics_out(points(2))
    assert box.pending() == "2 metric points"
    box.client = client  # the store is back at the same address ...
    box.metrics_out(points(5, first=2))
    assert box.pending() == "5 metric points"  # ... but not tried again before offline_until
    assert history(client, run_id) == []
    box.offline_until = 0
    assert box.retry() is True
    assert box.pending() == "" and box.metrics == []
    assert history(client, run_id) == [(10 * i, 100.0 - i, 1_700_000_000_000 + i) for i in range(5)]


def test_manifest_round_trip_then_delivery(down, working, tmp_path):
    bad, bad_uri = down
    client, uri, run_id = working
    folder = tmp_path / "run"
    folder.mkdir()
    note = folder / "run.log"
    note.write_text("the log")
    box = Outbox(bad, run_id, bad_uri, folder)
    box.metrics_out(points(4))
    for call in (
        lambda: box.image_out(GREY, "samples", step=1),
        lambda: box.image_out(palette_image(), "film/latent", step=7),
        lambda: box.artifact_out(note),
        lambda: box.models_out(lambda: bad.log_artifact(run_id, str(note), "model")),
        lambda: box.status_out("FINISHED", lambda status: bad.set_terminated(run_id, status)),
    ):
        box.offline_until = 0
        call()
    pending = "4 metric points, 2 images, 1 artifacts, the models, the final status FINISHED"
    assert box.pending() == pending

    assert box.write_manifest() == folder / MANIFEST
    assert json.loads((folder / MANIFEST).read_text())["tracking_uri"] == bad_uri
    again = Outbox.from_manifest(folder)
    assert (again.run_id, again.uri, again.folder) == (run_id, bad_uri, folder)
    assert again.metrics == box.metrics  # key, value, timestamp and step
    assert again.images == box.images and again.artifacts == [[str(note), None]]
    assert again.models is True and again.status == "FINISHED" and again.pending() == pending
    for image in again.images:
        assert Path(image["path"]).is_file()

    there = Outbox.from_manifest(folder, uri=uri)  # delivered elsewhere than recorded
    assert there.uri == uri and there.retry() is True
    assert there.pending() == "the models, the final status FINISHED"  # vaeexp.sync's part
    assert history(client, run_id) == [(10 * i, 100.0 - i, 1_700_000_000_000 + i) for i in range(4)]
    [samples] = image_files(client, run_id, "samples").values()
    assert np.array_equal(np.asarray(downloaded(client, run_id, samples, tmp_path / "a")), GREY)
    [latent] = image_files(client, run_id, "film/latent").values()
    frame = downloaded(client, run_id, latent, tmp_path / "b")
    assert frame.mode == "P"  # a kept palette image arrives as one, with its colours
    assert np.array_equal(
        np.asarray(frame.convert("RGB")), np.asarray(palette_image().convert("RGB"))
    )
    assert [f.path for f in client.list_artifacts(run_id)] == ["images", "run.log"]


def test_models_and_final_status_are_kept_until_sent(down, working, tmp_path):
    bad, bad_uri = down
    client, _uri, run_id = working
    weights = tmp_path / "weights.bin"
    weights.write_bytes(b"\0" * 16)
    box = Outbox(bad, run_id, bad_uri, tmp_path / "run")

    assert box.models_out(lambda: bad.log_artifact(run_id, str(weights), "model")) is False
    assert box.models is True and box.pending() == "the models"
    # offline: not even tried, though this call would succeed
    assert box.status_out("FAILED", lambda s: client.set_terminated(run_id, s)) is False
    assert box.status == "FAILED" and client.get_run(run_id).info.status == "RUNNING"
    box.offline_until = 0
    assert box.status_out("FAILED", lambda s: bad.set_terminated(run_id, s)) is False
    assert box.pending() == "the models, the final status FAILED"

    box.offline_until = 0
    assert box.models_out(lambda: client.log_artifact(run_id, str(weights), "model")) is True
    assert box.models is False
    assert box.status_out("FAILED", lambda s: client.set_terminated(run_id, s)) is True
    assert box.status is None and box.pending() == ""
    assert client.get_run(run_id).info.status == "FAILED"
    assert [f.path for f in client.list_artifacts(run_id, "model")] == ["model/weights.bin"]
