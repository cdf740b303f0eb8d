"""The latent film of one run: captured in the training loop, drawn and logged off it.

At a frame's step the training thread encodes the filmed test images (eval mode, no grad, no
random numbers: the metrics are identical with the film on or off). That encoder pass is the one
cost a frame cannot avoid, and done there it has both cores to itself. Everything else (the
frame's diagnostics, saving it, drawing, MLflow, the GIF) happens in one worker thread while
training goes on. Memory is flat: the queue holds at most `QUEUE_FRAMES` frames of latent means
(training waits when it is full, as at the reference's every-step cadence), and frames go to disk.

Frames are drawn as they come when their axes are known up front (latent_dim <= 2 with fixed
limits). Otherwise (a PCA fitted on the last frame, or limits=auto) they are drawn when training
ends, from the frames on disk.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from vaeexp import images
from vaeexp.config import Config, FilmPrecision
from vaeexp.data import Dataset
from vaeexp.film import diagnostics
from vaeexp.film.frames import FrameStore, title
from vaeexp.film.gif import writer
from vaeexp.film.render import (
    Canvas,
    Projection,
    canvas_for,
    draw_film,
    fit_limits,
    grey_palette,
    jitter_for,
    title_strip,
)
from vaeexp.film.schedule import Schedule
from vaeexp.model import VAE

log = logging.getLogger(__name__)

QUEUE_FRAMES = 64
CHUNK = 2000  # test images per encoder call: the fastest split on our CPUs
METRICS_SECONDS = 10.0


class FilmError(RuntimeError):
    """The film's worker failed; the message names the frame."""


class Sink(Protocol):
    """Where the film goes: MLflow in a run (tracking.MlflowHooks), anything alike in tests."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_image(self, image: Any, key: str, step: int) -> None: ...
    def log_artifact(self, path: Path, artifact_path: str) -> None: ...


def _use_bf16(precision: FilmPrecision, device: torch.device) -> bool:
    if precision != FilmPrecision.auto:
        return precision == FilmPrecision.bf16
    return device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def film_points(labels: torch.Tensor, points: int | None) -> np.ndarray:
    """Indices of the filmed test images, in drawing order: all of them, or a stratified sample
    with each class in its share. Fixed (not the run's seed), so runs film the same images."""
    y = labels.numpy()
    rng = np.random.default_rng(0)
    if points is None or points >= len(y):
        return rng.permutation(len(y))
    classes, counts = np.unique(y, return_counts=True)
    share = counts * points / len(y)
    take = np.floor(share).astype(int)
    take[np.argsort(take - share)[: points - take.sum()]] += 1  # largest remainders
    picked = [
        rng.choice(np.flatnonzero(y == c), k, replace=False)
        for c, k in zip(classes, take, strict=True)
    ]
    return rng.permutation(np.concatenate(picked))


class FilmRecorder:
    def __init__(
        self,
        cfg: Config,
        data: Dataset,
        sink: Sink,
        folder: Path,
        device: torch.device,
    ):
        film = cfg.film
        self.cfg, self.film, self.sink, self.folder = cfg, film, sink, folder
        self.schedule = Schedule.from_config(film, data.steps_per_epoch(cfg.batch_size))
        self.index = film_points(data.test_y, film.points)  # in drawing order
        filmed = np.sort(self.index)
        # All test images: the dataset's own tensor, not a 31 MB copy; means are put in drawing
        # order after encoding.
        everything = len(filmed) == len(data.test_x)
        x = data.test_x if everything else data.test_x[filmed]
        self.bf16 = _use_bf16(FilmPrecision(film.precision), device)
        # bf16: the encoder pass of a frame in ~3 ms instead of ~16 (10,000 images, 2 cores),
        # latent means within ~0.5%: a fraction of a pixel in the frame
        self.x = (x.bfloat16() if self.bf16 else x).to(device)
        self.order = np.searchsorted(filmed, self.index)
        self.labels = data.test_y.numpy()[self.index]
        self.class_names = data.class_names
        self.queries, self.refs = diagnostics.split(self.labels)
        self.live = cfg.latent_dim <= 2 and film.limits != "auto"
        self.decoder_film = film.decoder and cfg.latent_dim == 2
        self.store = FrameStore(folder, len(self.index), cfg.latent_dim)
        self.queue: queue.Queue = queue.Queue(maxsize=QUEUE_FRAMES)
        self.error: BaseException | None = None
        self.stopped = ""  # why the film stopped early (an OSError), if it did
        self.metrics: dict[int, dict[str, float]] = {}
        self.metrics_sent = time.monotonic()
        self.canvas: Canvas | None = None
        self.projection: Projection | None = None
        self.jitter = jitter_for(len(self.labels))
        self.latent_out: Any = None
        self.decoder_out: Any = None
        self.last_image: Any = None
        self.timings = {"capture": 0.0, "diagnostics": 0.0, "render": 0.0, "log": 0.0}
        # torch fixes a thread's thread count at its first parallel op, from a process-wide value
        # that the worker's set_num_threads(1) changes: settle the training thread's first, or it
        # could train on one thread and compute (slightly) different numbers.
        torch.get_num_threads()
        self.worker = threading.Thread(target=self._work, name="vaeexp-film", daemon=True)
        self.worker.start()

    # ---- the training thread ----------------------------------------------------------------

    def due(self, step: int) -> bool:
        return self.schedule.due(step)

    def capture(
        self,
        step: int,
        epoch: int,
        model: VAE,
        recon: torch.Tensor | None = None,
        kl: torch.Tensor | None = None,
    ) -> None:
        """Encode the filmed images now; the rest of the frame's work is queued."""
        self._raise_if_failed()
        if self.stopped:
            return
        started = time.perf_counter()
        was_training = model.training
        model.eval()
        with torch.inference_mode(), torch.autocast(self.x.device.type, enabled=self.bf16):
            means = torch.cat([model.encode(xb)[0] for xb in self.x.split(CHUNK)])
        means = means.float().cpu().numpy()
        model.train(was_training)
        losses = (
            (float(recon.mean()), float(kl.mean())) if recon is not None else (float("nan"),) * 2
        )
        self.timings["capture"] += time.perf_counter() - started
        self.queue.put(("latent", step, epoch, losses, means))
        if step == 0 and self.decoder_film:
            self.on_epoch_end(0, 0, model)

    def on_epoch_end(self, epoch: int, step: int, model: VAE) -> None:
        """The decoder film's frame: the decoded 20x20 grid (400 decodes, about a millisecond)."""
        if self.decoder_film and not self.stopped:
            grid = images.manifold(model, device=self.x.device)
            self.queue.put(("decoder", step, epoch, None, grid))

    def finish(self, complete: bool = True) -> None:
        """Wait for the worker, draw what is left, write and log the films and the raw frames.
        `complete=False` (the run failed or was stopped): keep what was filmed, raise nothing."""
        self.queue.put(None)
        self.worker.join()
        if self.stopped:
            with contextlib.suppress(OSError):
                self._close_writers()
                self.store.close()
            return
        try:
            self._raise_if_failed()
            if not self.live and len(self.store.steps):
                self._render_all()
            self._send_metrics()
            self._close_outputs()
            self._log_outputs()
        except Exception:
            if complete:
                raise
            log.exception("the film of this stopped run could not be completed")
        finally:
            self.store.close()

    # ---- the worker thread ------------------------------------------------------------------

    def _work(self) -> None:
        torch.set_num_threads(1)  # the kNN of wide latents uses torch; the cores are training's
        with contextlib.suppress(OSError, AttributeError):  # Linux: a thread has its own nice
            # lowest priority: training's threads keep the cores, the film takes what is left
            # (without it, training's OpenMP threads wait on a descheduled peer: 3x slower steps)
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        item = None
        try:
            while (item := self.queue.get()) is not None:
                kind, step, epoch, losses, payload = item
                if kind == "latent":
                    self._frame(step, epoch, losses, payload)
                else:
                    self._decoder_frame(step, epoch, payload)
                if time.monotonic() - self.metrics_sent > METRICS_SECONDS:
                    self._send_metrics()
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

    def _frame(self, step: int, epoch: int, losses: tuple[float, float], means: np.ndarray) -> None:
        started = time.perf_counter()
        means = means[self.order]
        self.store.append(step, epoch, losses, means)
        if np.isfinite(means).all():
            self.metrics[step] = {
                "film/knn_accuracy": diagnostics.knn_accuracy(
                    means, self.labels, self.queries, self.refs, self.film.knn_k
                ),
                "film/active_units": float(diagnostics.active_units(means)),
            }
        self.timings["diagnostics"] += time.perf_counter() - started
        if self.live:
            self._draw(len(self.store.steps) - 1, step, epoch, losses, means)

    def _draw(self, frame_no: int, step: int, epoch: int, losses, means: np.ndarray) -> None:
        started = time.perf_counter()
        if self.canvas is None:  # live: the axes are known before any frame
            self.projection = Projection.fit(means)
            limits = fit_limits([], self.projection, self.labels, self.film.limits)
            self.canvas = canvas_for(self.projection, limits, self.class_names)
        xy = self.projection(means, self.labels, self.jitter)
        image = self.canvas.render(xy, self.labels, title(step, epoch, self.cfg.epochs, losses))
        self.timings["render"] += time.perf_counter() - started
        self._emit(frame_no, step, image)

    def _emit(self, frame_no: int, step: int, image: Any) -> None:
        """A drawn frame to MLflow's slider and (every stride-th) to the GIF / MP4."""
        started = time.perf_counter()
        self.sink.log_image(image, "latent", step)
        if frame_no % self.film.stride == 0:
            for out in self._latent_writers():
                out.add(image)
            self.last_image = None
        else:
            self.last_image = image  # the film always ends on the last frame
        self.timings["log"] += time.perf_counter() - started

    def _decoder_frame(self, step: int, epoch: int, grid: np.ndarray) -> None:
        caption = (
            "before training" if step == 0 else f"epoch {epoch}/{self.cfg.epochs}  step {step}"
        )
        frame = title_strip(grid, f"decoder: {caption}")
        if self.decoder_out is None:
            size = (frame.shape[1], frame.shape[0])
            self.decoder_out = writer(
                self.folder / "decoder.gif", size, grey_palette(), self.film.fps
            )
        self.decoder_out.add(frame)

    # ---- the end ----------------------------------------------------------------------------

    def _render_all(self) -> None:
        """Draw every frame now that all are known (a PCA basis, or limits=auto)."""
        st = self.store
        titles = [
            title(s, e, self.cfg.epochs, ls)
            for s, e, ls in zip(st.steps, st.epochs, st.losses, strict=True)
        ]
        self.canvas, frames = draw_film(
            st.means(), self.labels, titles, self.class_names, self.film.limits
        )
        for i, step in enumerate(st.steps):
            started = time.perf_counter()
            image = next(frames)
            self.timings["render"] += time.perf_counter() - started
            self._emit(i, step, image)

    def _latent_writers(self) -> list[Any]:
        if self.latent_out is None:
            assert self.canvas is not None
            h, w = self.canvas.template.shape
            self.latent_out = [
                writer(self.folder / "latent.gif", (w, h), self.canvas.palette, self.film.fps)
            ]
            if self.film.mp4:
                self.latent_out.append(
                    writer(self.folder / "latent.mp4", (w, h), self.canvas.palette, self.film.fps)
                )
        return self.latent_out

    def _send_metrics(self) -> None:
        pending, self.metrics = self.metrics, {}
        for step, values in sorted(pending.items()):
            self.sink.log_metrics(values, step)
        self.metrics_sent = time.monotonic()

    def _close_outputs(self) -> None:
        if self.last_image is not None:
            for out in self._latent_writers():
                out.add(self.last_image)
        self._close_writers()
        meta = {
            "class_names": list(self.class_names),
            "epochs": int(self.cfg.epochs),
            "latent_dim": int(self.cfg.latent_dim),
            "limits": str(self.film.limits),
            "fps": int(self.film.fps),
            "stride": int(self.film.stride),
            "precision": "bf16" if self.bf16 else "fp32",
        }
        self.store.save(self.folder / "frames.npz", self.labels, self.index, meta)
        self.store.close()
        self.store.path.unlink(missing_ok=True)

    def _close_writers(self) -> None:
        for out in [*(self.latent_out or []), self.decoder_out]:
            if out is not None:
                out.close()

    def _log_outputs(self) -> None:
        for name in ("latent.gif", "latent.mp4", "decoder.gif", "frames.npz"):
            if (self.folder / name).is_file():
                self.sink.log_artifact(self.folder / name, "film")
        n = len(self.store.steps)
        if n:
            t = self.timings
            log.info(
                "film: %d frames; per frame %.1f ms capture (in the loop), and in the worker "
                "%.1f ms diagnostics, %.1f ms render, %.1f ms log",
                n,
                *(1000 * t[k] / n for k in ("capture", "diagnostics", "render", "log")),
            )

    def _raise_if_failed(self) -> None:
        if self.error is not None:
            raise self.error


@contextmanager
def filming(
    cfg: Config, data: Dataset, sink: Sink, folder: Path, device: torch.device
) -> Iterator[FilmRecorder | None]:
    """The run's film, finished whatever happens: a stopped run keeps what was filmed."""
    if not cfg.film.enabled:
        yield None
        return
    recorder = FilmRecorder(cfg, data, sink, folder, device)
    try:
        yield recorder
    except BaseException:
        recorder.finish(complete=False)
        raise
    recorder.finish()
