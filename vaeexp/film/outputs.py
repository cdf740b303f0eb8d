"""What the film becomes: frames drawn on one canvas, sent to MLflow's image slider and written
to the GIF (and MP4), the decoder film's GIF, and at the end the artifacts logged to the run.

Frames are drawn as they come (`draw`) when their axes are known up front, or all at the end
(`draw_all`) from the frames on disk. GIFs are written frame by frame, so memory stays flat.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vaeexp.config import Config
from vaeexp.film.frames import FrameStore, title
from vaeexp.film.gif import GifWriter, Mp4Writer, writer
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
from vaeexp.trainer import Logger

# The film's last frame as a plain PNG under a name vaeexp owns: the comparison report reads it
# from here, not from MLflow's internal names for the `latent` image slider's files.
FINAL_FRAME = "latent_final.png"
FILM_FOLDER = "film"  # the run's artifact folder for all of these
FINAL_FRAME_ARTIFACT = f"{FILM_FOLDER}/{FINAL_FRAME}"
FILM_ARTIFACT = f"{FILM_FOLDER}/latent.gif"
ARTIFACTS = ("latent.gif", "latent.mp4", "decoder.gif", "frames.npz", FINAL_FRAME)




class FilmOutputs:
    """The film's canvas and writers. Used by the worker thread while training runs, then by the
    training thread once the worker has ended, never by both at once."""

    def __init__(
        self,
        cfg: Config,
        sink: Logger,
        folder: Path,
        labels: np.ndarray,
        class_names: Sequence[str],
        timings: dict[str, float],
    ) -> None:
        self.cfg, self.film, self.sink, self.folder = cfg, cfg.film, sink, folder
        self.labels, self.class_names, self.timings = labels, class_names, timings
        self.canvas: Canvas | None = None
        self.projection: Projection | None = None
        self.jitter = jitter_for(len(labels))
        self.latent_out: list[GifWriter | Mp4Writer] | None = None
        self.decoder_out: GifWriter | Mp4Writer | None = None
        self.last_image: Any = None  # the last frame, when the GIF's stride skipped it
        self.final_image: Any = None  # the last frame drawn, whatever the stride

    def draw(
        self, frame_no: int, step: int, epoch: int, losses: tuple[float, float], means: np.ndarray
    ) -> None:
        """A frame drawn as it comes: the axes are fixed before the first frame."""
        started = time.perf_counter()
        if self.canvas is None:
            self.projection = Projection.fit(means)
            limits = fit_limits([], self.projection, self.labels, self.film.limits)
            self.canvas = canvas_for(self.projection, limits, self.class_names)
        xy = self.projection(means, self.labels, self.jitter)
        image = self.canvas.render(xy, self.labels, title(step, epoch, self.cfg.epochs, losses))
        self.timings["render"] += time.perf_counter() - started
        self.emit(frame_no, step, image)

    def draw_all(self, store: FrameStore) -> None:
        """Every frame, once all are known: a PCA basis fitted on the last, or limits=auto."""
        titles = [
            title(s, e, self.cfg.epochs, ls)
            for s, e, ls in zip(store.steps, store.epochs, store.losses, strict=True)
        ]
        self.canvas, frames = draw_film(
            store.means(), self.labels, titles, self.class_names, self.film.limits
        )
        for i, step in enumerate(store.steps):
            started = time.perf_counter()
            image = next(frames)
            self.timings["render"] += time.perf_counter() - started
            self.emit(i, step, image)

    def emit(self, frame_no: int, step: int, image: Any) -> None:
        """A drawn frame to MLflow's slider and (every stride-th) to the GIF / MP4."""
        started = time.perf_counter()
        self.sink.log_image(image, "latent", step)
        self.final_image = image
        if frame_no % self.film.stride == 0:
            for out in self._latent_writers():
                out.add(image)
            self.last_image = None
        else:
            self.last_image = image  # the film always ends on the last frame
        self.timings["log"] += time.perf_counter() - started

    def decoder_frame(self, step: int, epoch: int, grid: np.ndarray) -> None:
        """A decoded grid, captioned, to the decoder film's GIF."""
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

    def _latent_writers(self) -> list[GifWriter | Mp4Writer]:
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

    def close(self) -> None:
        """End the films on their last frame and close them; keep that frame as a PNG."""
        if self.last_image is not None:
            for out in self._latent_writers():
                out.add(self.last_image)
        self.close_writers()
        if self.final_image is not None:
            self.final_image.save(self.folder / FINAL_FRAME)

    def close_writers(self) -> None:
        for out in [*(self.latent_out or []), self.decoder_out]:
            if out is not None:
                out.close()

    def log_artifacts(self) -> None:
        """The films, their last frame and frames.npz that were written, to the run's film/."""
        for name in ARTIFACTS:
            if (self.folder / name).is_file():
                self.sink.log_artifact(self.folder / name, FILM_FOLDER)
