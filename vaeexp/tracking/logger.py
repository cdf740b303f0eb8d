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
    steps it may already have logged: points at or before `logged_step` / `logged_epoch` were
    delivered and are not sent twice."""

    def __init__(self, outbox: Outbox, logged_step: int = 0, logged_epoch: int = 0):
        self.outbox = outbox
        self.pending: list[Metric] = []
        self.lock = threading.Lock()  # the film logs from its own thread
        self.logged_step, self.logged_epoch = logged_step, logged_epoch
        self.last_flush = time.monotonic()

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        if step <= self.logged_step:
            return
        self._add({f"train/{k}_step": v for k, v in metrics.items()}, step)
        if time.monotonic() - self.last_flush > FLUSH_SECONDS:
            self.flush()

    def on_epoch_end(self, epoch: int, step: int, metrics: dict[str, float], model: VAE) -> None:
        if epoch <= self.logged_epoch:
            return
        self._add(metrics | {"epoch": epoch, "step": step}, epoch)
        self.flush()

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._add(metrics, step)
        self.flush()

    def log_image(self, image: np.ndarray | Image.Image, key: str, step: int) -> None:
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
        with self.lock:
            self.pending += [Metric(k, float(v), now, step) for k, v in metrics.items()]
