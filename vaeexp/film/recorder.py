"""The latent film of one run: when it takes a frame, captured in the training loop, drawn and
logged off it; and the films of a stack's members, captured together.

At a frame's step the training thread encodes the filmed test images (vaeexp.film.capture), for
every member of a stack in one encoder pass, and queues each member's means to its film; the
frame's diagnostics, saving it, drawing, MLflow and the GIF happen in one worker thread per film
(`FilmWorker`) while training goes on. Memory is flat: the queue holds at most
`QUEUE_FRAMES` frames of latent means (training waits when it is full, as at the reference's
every-step cadence), and frames go to disk.

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
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vaeexp.config import Config, FilmConfig
from vaeexp.data import Dataset
from vaeexp.film.capture import FilmedImages, film_points, to_host
from vaeexp.film.frames import FrameStore, active_units, knn_accuracy, knn_split
from vaeexp.film.render import FilmOutputs
from vaeexp.model import VAE
from vaeexp.trainer import Callback, Logger

__all__ = ["FilmError", "FilmRecorder", "StackFilm", "filming"]

log = logging.getLogger(__name__)

QUEUE_FRAMES = 64
METRICS_SECONDS = 10.0
# Where the film's time goes, logged when it ends: the capture in the training loop, then the
# worker's parts; wall-clock seconds, so they differ from run to run.
TIMING_METRICS = {
    part: f"film/{part}_seconds" for part in ("capture", "diagnostics", "render", "log")
}
FRAMES_METRIC = "film/frames"


@dataclass(frozen=True)
class Schedule:
    """When the film takes a frame: dense early, when the latent space forms, sparse later.
    Steps count optimizer steps from 1; step 0 is the untrained model."""

    steps_per_epoch: int
    every_step_until: int | None  # None: every step of the run
    every_n_steps: int
    until_epoch: int

    @classmethod
    def from_config(cls, film: FilmConfig, steps_per_epoch: int) -> Schedule:
        return cls(steps_per_epoch, film.every_step_until, film.every_n_steps, film.until_epoch)

    def due(self, step: int) -> bool:
        """Whether `step` gets a frame."""
        if self.every_step_until is None or step <= self.every_step_until:
            return True
        if step % self.steps_per_epoch == 0:  # each epoch's end
            return True
        return step <= self.until_epoch * self.steps_per_epoch and step % self.every_n_steps == 0

    def steps(self, epochs: int) -> list[int]:
        """Every frame's step in a run of `epochs` epochs, step 0 included."""
        return [s for s in range(epochs * self.steps_per_epoch + 1) if self.due(s)]


class FilmError(RuntimeError):
    """The film's worker failed; the message names the frame."""


class FilmWorker:
    """The film's worker thread: everything a frame needs after its encoder pass, off the
    training loop. It saves the frame, computes its diagnostics, draws and logs it (when its axes
    are known up front) while training goes on.

    Takes ("latent" | "decoder", step, epoch, losses, payload) items until None; a latent
    frame's losses and means arrive as `to_host` copies, read here. An OSError (a full disk,
    say) stops the film and training goes on; any other error is kept in `error` for the
    training thread to raise."""

    def __init__(
        self,
        logger: Logger,
        store: FrameStore,
        outputs: FilmOutputs,
        labels: np.ndarray,
        order: np.ndarray,
        knn_k: int,
        live: bool,
        timings: dict[str, float],
    ) -> None:
        self.logger, self.store, self.outputs = logger, store, outputs
        self.labels, self.order, self.knn_k, self.live = labels, order, knn_k, live
        self.timings = timings
        self.queries, self.refs = knn_split(labels)
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
        """The frames' diagnostics so far, to the logger, in step order."""
        pending, self.metrics = self.metrics, {}
        for step, values in sorted(pending.items()):
            self.logger.log_metrics(values, step)
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
                "film/knn_accuracy": knn_accuracy(
                    means, self.labels, self.queries, self.refs, self.knn_k
                ),
                "film/active_units": float(active_units(means)),
            }
        self.timings["diagnostics"] += time.perf_counter() - started
        if self.live:
            self.outputs.draw(len(self.store.steps) - 1, step, epoch, losses, means)


class FilmRecorder:
    """One run's film: its frames, queued by the training thread (`StackFilm` captures them),
    saved, drawn and logged by its worker thread, and finished once training ends."""

    def __init__(
        self,
        cfg: Config,
        data: Dataset,
        logger: Logger,
        folder: Path,
        device: torch.device,
        images: FilmedImages | None = None,
    ) -> None:
        """`images`: the filmed images on the device, shared by a stack's films."""
        film = cfg.film
        self.cfg, self.film, self.folder, self.logger = cfg, film, folder, logger
        self.index = film_points(data.test_y, film.points)  # in drawing order
        filmed = np.sort(self.index)  # in test-set order, as they are encoded
        self.images = images or FilmedImages(
            data.test_x, filmed, cfg.runtime.film_precision, device
        )
        order = np.searchsorted(filmed, self.index)
        self.labels = data.test_y.numpy()[self.index]
        self.class_names = data.class_names
        self.live = cfg.latent_dim <= 2 and film.limits != "auto"
        self.decoder_film = film.decoder and cfg.latent_dim == 2
        self.store = FrameStore(folder, len(self.index), cfg.latent_dim)
        self.timings = dict.fromkeys(TIMING_METRICS, 0.0)
        self.outputs = FilmOutputs(cfg, logger, folder, self.labels, self.class_names, self.timings)
        self.worker = FilmWorker(
            logger,
            self.store,
            self.outputs,
            self.labels,
            order,
            film.knn_k,
            self.live,
            self.timings,
        )
        # torch fixes a thread's thread count at its first parallel op, from a process-wide value
        # that the worker's set_num_threads(1) changes: settle the training thread's first, or it
        # could train on one thread and compute (slightly) different numbers.
        torch.get_num_threads()
        self.worker.start()

    # ---- the training thread ----------------------------------------------------------------

    @property
    def filming(self) -> bool:
        self._raise_if_failed()
        return not self.worker.stopped

    def add_frame(
        self,
        step: int,
        epoch: int,
        terms: Callable[[], np.ndarray],
        means: Callable[[], np.ndarray],
        seconds: float = 0.0,
    ) -> None:
        """Queue a latent frame: its (recon, kl) and its means, each a `to_host` copy the worker
        waits for; `seconds`, this film's share of the encoder pass."""
        self.timings["capture"] += seconds  # on a GPU: queued, not done
        self.worker.put(("latent", step, epoch, terms, means))

    def add_decoder_frame(self, step: int, epoch: int, grid: np.ndarray) -> None:
        """The decoder film's frame, once an epoch (and before training)."""
        self.worker.put(("decoder", step, epoch, None, grid))

    # ---- the end ----------------------------------------------------------------------------

    def finish(self, complete: bool = True) -> None:
        """Wait for the worker, draw what is left, write and log the films and the raw frames.
        `complete=False` (the run failed or was stopped): keep what was filmed, raise nothing."""
        self.worker.join()
        if self.worker.stopped:
            with contextlib.suppress(OSError):
                self.outputs.close_writers()
                self.store.close()
            return
        try:
            self._raise_if_failed()
            if not self.live and len(self.store.steps):
                self.outputs.draw_all(self.store)
            self.worker.send_metrics()
            self.outputs.close()
            self._save_frames()
            self.outputs.log_artifacts()
            self._log_timings()
        except Exception:
            if complete:
                raise
            log.exception("the film of this stopped run could not be completed")
        finally:
            self.store.close()

    def _save_frames(self) -> None:
        """The raw frames as one frames.npz, to re-render from (python -m vaeexp.film)."""
        meta = {
            "class_names": list(self.class_names),
            "epochs": int(self.cfg.epochs),
            "latent_dim": int(self.cfg.latent_dim),
            "limits": str(self.film.limits),
            "fps": int(self.film.fps),
            "stride": int(self.film.stride),
            "precision": "bf16" if self.images.bf16 else "fp32",
        }
        self.store.save(self.folder / "frames.npz", self.labels, self.index, meta)
        self.store.close()
        self.store.path.unlink(missing_ok=True)

    def _log_timings(self) -> None:
        """Each part's seconds over all frames, and the number of frames, as metrics at the last
        frame's step (bench/film.py reads them)."""
        steps = self.store.steps
        if steps:
            seconds = {TIMING_METRICS[part]: t for part, t in self.timings.items()}
            self.logger.log_metrics(seconds | {FRAMES_METRIC: float(len(steps))}, steps[-1])

    def _raise_if_failed(self) -> None:
        if self.worker.error is not None:
            raise self.worker.error


class StackFilm(Callback):
    """The films of a stack's members as the training loop sees them: at each step the schedule
    names (and the untrained model at step 0), one encoder pass over the filmed images gives
    every filming member's frame, each handed to its own `FilmRecorder`."""

    def __init__(self, recorders: list[FilmRecorder], steps_per_epoch: int) -> None:
        self.recorders = recorders
        self.schedule = Schedule.from_config(recorders[0].film, steps_per_epoch)
        self.images = recorders[0].images
        self.stopped: set[int] = set()  # members that diverged

    def on_train_start(self, step: int, model: VAE) -> None:
        if step == 0:
            self.capture(0, 0, model)  # the untrained latent space

    def on_step(
        self, step: int, epoch: int, model: VAE, recon: torch.Tensor, kl: torch.Tensor
    ) -> None:
        if self.schedule.due(step):  # dense early, sparse later
            self.capture(step, epoch, model, recon.detach(), kl.detach())

    def on_epoch_end(
        self, epoch: int, step: int, metrics: dict[int, dict[str, float]], model: VAE
    ) -> None:
        self._decoder_frames(epoch, step, model)

    def on_diverged(self, member: int, reason: str) -> None:
        self.stopped.add(member)

    def capture(
        self,
        step: int,
        epoch: int,
        model: VAE,
        recon: torch.Tensor | None = None,
        kl: torch.Tensor | None = None,
    ) -> None:
        """Encode the filmed images for every filming member at once; the rest of each frame's
        work is queued for its film's worker."""
        filming = [m for m, r in enumerate(self.recorders) if m not in self.stopped and r.filming]
        if not filming:
            return
        started = time.perf_counter()
        means = to_host(self.images.means(model))
        terms = (
            torch.stack((recon.mean(1), kl.mean(1)), dim=1)
            if recon is not None
            else torch.full((model.members, 2), float("nan"))
        )
        terms = to_host(terms.float())
        share = (time.perf_counter() - started) / len(filming)
        for m in filming:
            self.recorders[m].add_frame(step, epoch, _row(terms, m), _row(means, m), share)
        if step == 0:
            self._decoder_frames(0, 0, model)

    def _decoder_frames(self, epoch: int, step: int, model: VAE) -> None:
        filming = [
            m
            for m, r in enumerate(self.recorders)
            if m not in self.stopped and r.decoder_film and r.filming
        ]
        if filming:
            grids = self.images.decoded_grids(model)
            for m in filming:
                self.recorders[m].add_decoder_frame(step, epoch, grids[m])

    def finish(self, complete: bool = True) -> None:
        """Finish every member's film; a diverged member's as a stopped run's."""
        errors = []
        for m, recorder in enumerate(self.recorders):
            try:
                recorder.finish(complete and m not in self.stopped)
            except Exception as e:  # the other films are still finished
                errors.append(e)
        if errors:
            raise errors[0]


def _row(host: Callable[[], np.ndarray], member: int) -> Callable[[], np.ndarray]:
    return lambda: host()[member]


@contextmanager
def filming(
    cfgs: Sequence[Config],
    data: Dataset,
    loggers: Sequence[Logger],
    folders: Sequence[Path],
    device: torch.device,
) -> Iterator[StackFilm | None]:
    """The films of a stack's members (a run is a stack of one), finished whatever happens: a
    stopped run keeps what was filmed."""
    cfg = cfgs[0]
    if not cfg.film.enabled:
        yield None
        return
    recorders: list[FilmRecorder] = []
    try:
        for member_cfg, logger, folder in zip(cfgs, loggers, folders, strict=True):
            shared = recorders[0].images if recorders else None
            recorders.append(FilmRecorder(member_cfg, data, logger, folder, device, shared))
    except BaseException:
        for recorder in recorders:
            recorder.finish(complete=False)
        raise
    film = StackFilm(recorders, data.steps_per_epoch(cfg.batch_size))
    try:
        yield film
    except BaseException:
        film.finish(complete=False)
        raise
    film.finish()
