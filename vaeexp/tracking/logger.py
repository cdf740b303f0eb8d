"""The trainer's logger: it only logs, by run id, through the outbox.

Every MLflow call costs milliseconds against a SQLite store, more than a training step, so step
metrics are buffered and sent with `log_batch` at the end of each epoch (or every
`FLUSH_SECONDS` inside a long one), and an epoch logs only what it produced.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
from mlflow.entities import Metric
from PIL import Image

from vaeexp.model import VAE
from vaeexp.tracking.outbox import Outbox

FLUSH_SECONDS = 15.0


class MlflowLogger:
    """The trainer's metric hook and the film's sink. After a hard kill, a resumed run retrains
    steps it may already have logged: a metric point or a step-wise image at or before the last
    step MLflow has of its key (`delivered`, `delivered_images`) is not sent twice."""

    def __init__(
        self,
        outbox: Outbox,
        delivered: dict[str, int] | None = None,
        delivered_images: dict[str, int] | None = None,
    ):
        self.outbox = outbox
        self.pending: list[Metric] = []
        self.lock = threading.Lock()  # the film logs from its own thread
        self.delivered, self.delivered_images = delivered or {}, delivered_images or {}
        self.last_flush = time.monotonic()

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        self._add({f"train/{k}_step": v for k, v in metrics.items()}, step)
        if time.monotonic() - self.last_flush > FLUSH_SECONDS:
            self.flush()

    def on_epoch_end(self, epoch: int, step: int, metrics: dict[str, float], model: VAE) -> None:
        self._add(metrics | {"epoch": epoch, "step": step}, epoch)
        self.flush()

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._add(metrics, step)
        self.flush()

    def log_image(self, image: np.ndarray | Image.Image, key: str, step: int) -> None:
        if step > self.delivered_images.get(key, -1):
            self.outbox.image_out(image, key, step)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self.outbox.artifact_out(path, artifact_path)

    def flush(self) -> None:
        with self.lock:
            pending, self.pending = self.pending, []
            self.last_flush = time.monotonic()
        self.outbox.metrics_out(pending)

    def _add(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        points = [
            Metric(k, float(v), now, step)
            for k, v in metrics.items()
            if step > self.delivered.get(k, -1)
        ]
        with self.lock:
            self.pending += points
