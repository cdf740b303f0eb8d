"""The film's worker thread: everything a frame needs after its encoder pass, off the training
loop. It saves the frame, computes its diagnostics, draws and logs it (when its axes are known up
front) while training goes on.

Memory is flat: the queue holds at most `QUEUE_FRAMES` frames of latent means (training waits
when it is full, as at the reference's every-step cadence), and frames go to disk.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from vaeexp.film import diagnostics
from vaeexp.film.frames import FrameStore
from vaeexp.film.outputs import FilmOutputs
from vaeexp.trainer import Logger

# The film's records keep the one logger name they have always had: the recorder's.
log = logging.getLogger("vaeexp.film.recorder")

QUEUE_FRAMES = 64
METRICS_SECONDS = 10.0


class FilmError(RuntimeError):
    """The film's worker failed; the message names the frame."""


class FilmWorker:
    """Takes ("latent" | "decoder", step, epoch, losses, payload) items until None; a latent
    frame's losses and means arrive as `to_host` copies, read here. An OSError (a full disk,
    say) stops the film and training goes on; any other error is kept in `error` for the
    training thread to raise."""

    def __init__(
        self,
        sink: Logger,
        store: FrameStore,
        outputs: FilmOutputs,
        labels: np.ndarray,
        order: np.ndarray,
        knn_k: int,
        live: bool,
        timings: dict[str, float],
    ) -> None:
        self.sink, self.store, self.outputs = sink, store, outputs
        self.labels, self.order, self.knn_k, self.live = labels, order, knn_k, live
        self.timings = timings
        self.queries, self.refs = diagnostics.split(labels)
        self.queue: queue.Queue = queue.Queue(maxsize=QUEUE_FRAMES)
        self.error: BaseException | None = None
        self.stopped = ""  # why the film stopped early (an OSError), if it did
        self.metrics: dict[int, dict[str, float]] = {}
        self.metrics_sent = time.monotonic()
        self.thread = threading.Thread(target=self._work, name="vaeexp-film", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def put(self, item: tuple[str, int, int, Any, Any]) -> None:
        """Queue a frame's work; blocks while the queue is full."""
        self.queue.put(item)

    def join(self) -> None:
        """Let the worker finish what is queued, and wait for it."""
        self.queue.put(None)
        self.thread.join()

    def send_metrics(self) -> None:
        """The frames' diagnostics so far, to the sink in step order."""
        pending, self.metrics = self.metrics, {}
        for step, values in sorted(pending.items()):
            self.sink.log_metrics(values, step)
        self.metrics_sent = time.monotonic()

    def _work(self) -> None:
        torch.set_num_threads(1)  # the kNN of wide latents uses torch; the cores are training's
        with contextlib.suppress(OSError, AttributeError):  # Linux: a thread has its own nice
            # lowest priority: training's threads keep the cores, the film takes what is left
            # (without it, training's OpenMP threads wait on a descheduled peer and steps slow)
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        item = None
        try:
            while (item := self.queue.get()) is not None:
                kind, step, epoch, losses, payload = item
                if kind == "latent":
                    self._frame(step, epoch, losses, payload)
                else:
                    self.outputs.decoder_frame(step, epoch, payload)
                if time.monotonic() - self.metrics_sent > METRICS_SECONDS:
                    self.send_metrics()
        except OSError as e:  # a full disk, say: the film stops, training goes on
            self.stopped = f"the film stopped at step {item[1] if item else '?'}: {e}"
            log.warning("%s; training goes on without it", self.stopped)
            self._drain()
        except BaseException as e:  # a bug: training stops with it
            step = item[1] if item else "?"
            self.error = FilmError(f"film frame at step {step}: {type(e).__name__}: {e}")
            self.error.__cause__ = e
            self._drain()

    def _drain(self) -> None:
        while self.queue.get() is not None:  # never leave training blocked on a full queue
            pass

    def _frame(
        self,
        step: int,
        epoch: int,
        terms: Callable[[], np.ndarray],
        means_on_host: Callable[[], np.ndarray],
    ) -> None:
        """`terms` and `means_on_host` wait for their copies off the device (vaeexp.film.capture
        .to_host): training never does."""
        losses = tuple(float(v) for v in terms())
        started = time.perf_counter()
        means = means_on_host()[self.order]
        self.store.append(step, epoch, losses, means)
        if np.isfinite(means).all():
            self.metrics[step] = {
                "film/knn_accuracy": diagnostics.knn_accuracy(
                    means, self.labels, self.queries, self.refs, self.knn_k
                ),
                "film/active_units": float(diagnostics.active_units(means)),
            }
        self.timings["diagnostics"] += time.perf_counter() - started
        if self.live:
            self.outputs.draw(len(self.store.steps) - 1, step, epoch, losses, means)
