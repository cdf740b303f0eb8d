"""The trainer's logger (it only logs, by run id, through the outbox), and the epoch images.

Every MLflow call is a round trip to the store (a SQLite transaction, or a request to a server)
that takes longer than a training step, so step metrics are buffered and sent with `log_batch`
at the end of each epoch (or every `FLUSH_SECONDS` inside a long one), and an epoch logs only
what it produced.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from mlflow.entities import Metric
from PIL import Image

from vaeexp import images
from vaeexp.model import VAE
from vaeexp.tracking.outbox import Outbox
from vaeexp.trainer import Callback

FLUSH_SECONDS = 15.0


class MlflowLogger(Callback):
    """The trainer's metric logger, and the `Logger` the film and the epoch images log to.
    After a hard kill, a resumed run retrains steps it may already have logged: a metric point
    or a step-wise image at or before the last step MLflow has of its key (`delivered`,
    `delivered_images`) is not sent twice."""

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

    def on_metrics(self, step: int, metrics: dict[int, dict[str, float]]) -> None:
        if self.member in metrics:
            self._add({f"train/{k}_step": v for k, v in metrics[self.member].items()}, step)
        if time.monotonic() - self.last_flush > FLUSH_SECONDS:
            self.flush()

    def on_epoch_end(
        self, epoch: int, step: int, metrics: dict[int, dict[str, float]], model: VAE
    ) -> None:
        if self.member in metrics:
            self._add(metrics[self.member] | {"epoch": epoch, "step": step}, epoch)
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


class EpochImages(Callback):
    """Each epoch's reconstructions of fixed test digits, decoded fixed prior draws and
    (latent_dim 2) the manifold of its member, handed to `log_image`."""

    def __init__(
        self,
        log_image: Callable[[np.ndarray, str, int], None],
        test_x: torch.Tensor,
        latent_dim: int,
        device: torch.device,
    ):
        self.log_image, self.latent_dim = log_image, latent_dim
        self.fixed_x = test_x[:50].to(device)  # the same digits every epoch
        g = torch.Generator().manual_seed(0)
        self.fixed_z = torch.randn(100, latent_dim, generator=g).to(device)

    def on_epoch_end(
        self, epoch: int, step: int, metrics: dict[int, dict[str, float]], model: VAE
    ) -> None:
        if self.member not in metrics:  # it stopped
            return
        model = model.member(self.member).eval()
        self.log_image(images.reconstructions(model, self.fixed_x), "reconstructions", epoch)
        self.log_image(images.samples(model, self.fixed_z), "samples", epoch)
        if self.latent_dim == 2:
            self.log_image(images.manifold(model, device=self.fixed_x.device), "manifold", epoch)
