"""The latent film of one run: captured in the training loop, drawn and logged off it.

At a frame's step the training thread encodes the filmed test images (vaeexp.film.capture) and
queues the means; the frame's diagnostics, saving it, drawing, MLflow and the GIF happen in one
worker thread (vaeexp.film.worker) while training goes on.

Frames are drawn as they come when their axes are known up front (latent_dim <= 2 with fixed
limits). Otherwise (a PCA fitted on the last frame, or limits=auto) they are drawn when training
ends, from the frames on disk.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from vaeexp.config import Config
from vaeexp.data import Dataset
from vaeexp.film.capture import FilmedImages, film_points, to_host
from vaeexp.film.frames import FrameStore
from vaeexp.film.outputs import FilmOutputs
from vaeexp.film.schedule import Schedule
from vaeexp.film.worker import FilmError, FilmWorker
from vaeexp.model import VAE
from vaeexp.trainer import Callback, Logger

__all__ = ["FilmError", "FilmRecorder", "film_points", "filming"]

log = logging.getLogger(__name__)


class FilmRecorder(Callback):
    """The film as the training loop sees it: a callback that captures a frame at each step the
    schedule names (and the untrained model at step 0), then `finish` once training ends."""

    def __init__(
        self,
        cfg: Config,
        data: Dataset,
        sink: Logger,
        folder: Path,
        device: torch.device,
    ) -> None:
        film = cfg.film
        self.cfg, self.film, self.folder = cfg, film, folder
        self.schedule = Schedule.from_config(film, data.steps_per_epoch(cfg.batch_size))
        self.index = film_points(data.test_y, film.points)  # in drawing order
        filmed = np.sort(self.index)  # in test-set order, as they are encoded
        self.images = FilmedImages(data.test_x, filmed, cfg.runtime.film_precision, device)
        order = np.searchsorted(filmed, self.index)
        self.labels = data.test_y.numpy()[self.index]
        self.class_names = data.class_names
        self.live = cfg.latent_dim <= 2 and film.limits != "auto"
        self.decoder_film = film.decoder and cfg.latent_dim == 2
        self.store = FrameStore(folder, len(self.index), cfg.latent_dim)
        self.timings = {"capture": 0.0, "diagnostics": 0.0, "render": 0.0, "log": 0.0}
        self.outputs = FilmOutputs(cfg, sink, folder, self.labels, self.class_names, self.timings)
        self.worker = FilmWorker(
            sink, self.store, self.outputs, self.labels, order, film.knn_k, self.live, self.timings
        )
        # torch fixes a thread's thread count at its first parallel op, from a process-wide value
        # that the worker's set_num_threads(1) changes: settle the training thread's first, or it
        # could train on one thread and compute (slightly) different numbers.
        torch.get_num_threads()
        self.worker.start()

    # ---- the training thread ----------------------------------------------------------------

    def on_train_start(self, step: int, model: VAE) -> None:
        if step == 0:
            self.capture(0, 0, model)  # the untrained latent space

    def on_step(
        self, step: int, epoch: int, model: VAE, recon: torch.Tensor, kl: torch.Tensor
    ) -> None:
        if self.schedule.due(step):  # dense early, sparse later
            self.capture(step, epoch, model, recon.detach(), kl.detach())

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
        if self.worker.stopped:
            return
        started = time.perf_counter()
        means = to_host(self.images.means(model))
        terms = (
            torch.stack((recon.mean(), kl.mean()))
            if recon is not None
            else torch.full((2,), float("nan"))
        )
        self.timings["capture"] += time.perf_counter() - started  # on a GPU: queued, not done
        self.worker.put(("latent", step, epoch, to_host(terms.float()), means))
        if step == 0:
            self._decoder_frame(0, 0, model)

    def on_epoch_end(self, epoch: int, step: int, metrics: dict[str, float], model: VAE) -> None:
        self._decoder_frame(epoch, step, model)

    def _decoder_frame(self, epoch: int, step: int, model: VAE) -> None:
        """The decoder film's frame, once an epoch (and before training)."""
        if self.decoder_film and not self.worker.stopped:
            grid = self.images.decoded_grid(model)
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
        """Where a frame's time went (bench/film.py reads this line)."""
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
        if self.worker.error is not None:
            raise self.worker.error


@contextmanager
def filming(
    cfg: Config, data: Dataset, sink: Logger, folder: Path, device: torch.device
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
