"""MLflow delivery that outlives its tracking server, so a server outage never stops training.

Every call made while training goes through `Outbox.call`: a failure is warned about once, the
metrics and images that could not be sent are kept (images as PNG files in the run folder) and
retried after `RETRY_SECONDS`, and what is still undelivered at the end is written to
`undelivered.json` in the run folder for `python -m vaeexp.sync <run folder>`.

Written by hand: MLflow's own async logging drops what fails after its retries, and no library
keeps a run's metrics, images, models and final status on disk for a later delivery.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
from PIL import Image

log = logging.getLogger(__name__)

MANIFEST = "undelivered.json"
RETRY_SECONDS = 30.0
# How long a call waits for a server's answer. One that is down refuses the connection at once;
# a busy one (a sweep's jobs all starting at once on a small machine) answers late, but answers.
ANSWER_SECONDS = 60


class DeliveryIncomplete(RuntimeError):
    """Training finished, but some of its record is only on local disk."""


def fail_fast_over_http() -> None:
    """MLflow retries an HTTP call 7 times with exponential backoff (minutes) by default; we keep
    what fails and retry later instead. It does wait for a busy server's answer (ANSWER_SECONDS):
    one that many jobs write at once answers late, and giving up on it sooner fails their runs.
    A user's own settings win."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(ANSWER_SECONDS))


class Outbox:
    """Thread-safe: the film's worker thread logs through the same outbox as training."""

    def __init__(self, client: MlflowClient, run_id: str, uri: str, folder: Path):
        self.client, self.run_id, self.uri, self.folder = client, run_id, uri, folder
        self.metrics: list[Metric] = []
        self.images: list[dict[str, Any]] = []  # key, step, path of a PNG kept on disk
        self.artifacts: list[list[str | None]] = []  # [local file, artifact folder or None]
        self.models = False  # the exported models still to be logged
        self.status: str | None = None  # the final status still to be set
        self.offline_until = 0.0
        self.failures = 0
        self.lock = threading.RLock()

    def call(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> bool:
        """Run one MLflow call; False (and nothing raised) if the store is unavailable."""
        with self.lock:
            return self._call(what, fn, *args, **kwargs)

    def _call(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> bool:
        if time.monotonic() < self.offline_until:
            return False
        try:
            fn(*args, **kwargs)
            return True
        except Exception as e:  # connection refused, HTTP 5xx, a full disk under a local store
            self.offline_until = time.monotonic() + RETRY_SECONDS
            self.failures += 1
            if self.failures == 1:
                log.warning(
                    "MLflow at %s failed while %s (%s: %s); training goes on, and what "
                    "cannot be delivered is kept and retried every %.0f s",
                    self.uri,
                    what,
                    type(e).__name__,
                    str(e).splitlines()[0][:200],
                    RETRY_SECONDS,
                )
            return False

    def metrics_out(self, metrics: list[Metric]) -> None:
        with self.lock:
            self.metrics += metrics
            self.retry()

    def image_out(self, image: np.ndarray | Image.Image, key: str, step: int) -> None:
        with self.lock:
            if not self.call(
                "logging an image", self.client.log_image, self.run_id, image, key=key, step=step
            ):
                path = self.folder / "undelivered" / f"{key.replace('/', '~')}+step+{step}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                (image if isinstance(image, Image.Image) else Image.fromarray(image)).save(path)
                self.images.append({"key": key, "step": step, "path": str(path)})

    def artifact_out(self, path: Path, artifact_path: str | None = None) -> None:
        with self.lock:
            if not self._send_artifact(str(path), artifact_path):
                self.artifacts.append([str(path), artifact_path])

    def _send_artifact(self, path: str, artifact_path: str | None) -> bool:
        log_artifact = self.client.log_artifact
        return self.call("logging an artifact", log_artifact, self.run_id, path, artifact_path)

    def retry(self) -> bool:
        """Send what is kept, oldest first; True when nothing is left."""
        with self.lock:
            return self._retry()

    def _retry(self) -> bool:
        while self.metrics:
            if not self.call(
                "logging metrics", self.client.log_batch, self.run_id, metrics=self.metrics[:1000]
            ):  # MLflow's per-batch limit
                return False
            del self.metrics[:1000]
        for image in list(self.images):
            try:
                with Image.open(image["path"]) as kept:
                    pixels = kept.copy()  # a palette image stays one, with its colours
            except OSError as e:  # removed or damaged on disk: nothing left to send
                log.warning("a kept image is gone, not delivered: %s", e)
                self.images.remove(image)
                continue
            if not self.call(
                "logging an image",
                self.client.log_image,
                self.run_id,
                pixels,
                key=image["key"],
                step=image["step"],
            ):
                return False
            self.images.remove(image)
        for entry in list(self.artifacts):
            if not self._send_artifact(*entry):
                return False
            self.artifacts.remove(entry)
        return True

    def models_out(self, send: Callable[[], None]) -> bool:
        """Log the models with `send`; kept for a later delivery if it fails. True if sent."""
        with self.lock:
            self.models = not self.call("logging the models", send)
            return not self.models

    def status_out(self, status: str, send: Callable[[str], None]) -> bool:
        """End the run with `send(status)`; the status is kept if it fails. True if sent."""
        with self.lock:
            sent = self.call("ending the run", send, status)
            self.status = None if sent else status
            return sent

    def pending(self) -> str:
        """What is undelivered, in words; empty when everything arrived."""
        parts = [
            f"{len(self.metrics)} metric points" if self.metrics else "",
            f"{len(self.images)} images" if self.images else "",
            f"{len(self.artifacts)} artifacts" if self.artifacts else "",
            "the models" if self.models else "",
            f"the final status {self.status}" if self.status else "",
        ]
        return ", ".join(p for p in parts if p)

    def write_manifest(self) -> Path:
        path = self.folder / MANIFEST
        path.write_text(
            json.dumps(
                {
                    "run_id": self.run_id,
                    "tracking_uri": self.uri,
                    "status": self.status,
                    "models": self.models,
                    "artifacts": self.artifacts,
                    "images": self.images,
                    "metrics": [[m.key, m.value, m.timestamp, m.step] for m in self.metrics],
                },
                indent=1,
            )
        )
        return path

    @classmethod
    def from_manifest(cls, folder: Path, uri: str | None = None) -> Outbox:
        data = json.loads((folder / MANIFEST).read_text())
        uri = uri or data["tracking_uri"]
        box = cls(MlflowClient(uri), data["run_id"], uri, folder)
        box.metrics = [Metric(k, v, ts, step) for k, v, ts, step in data["metrics"]]
        box.images = data["images"]
        box.artifacts = [[a, None] if isinstance(a, str) else a for a in data["artifacts"]]
        box.models, box.status = data["models"], data["status"]
        return box
