"""What the film becomes: frames drawn on one canvas, sent to MLflow's image slider and written
to the GIF (and MP4), the decoder film's GIF, and at the end the artifacts logged to the run
(`FilmOutputs`).

Frames are drawn straight into a palette image: one matplotlib template, then numpy per frame.
The reference opens a new matplotlib figure per frame and never closes it: a frame costs a whole
figure's drawing, and memory grows with every frame. Here matplotlib draws the axes, ticks and
legend once; each frame copies that template, stamps every point as a small disc with numpy, and
writes its title with Pillow, so no figure is drawn per frame. Frames are palette ("P") images
sharing one palette, so the GIF needs no per-frame quantisation.

Frames are drawn as they come (`FilmOutputs.draw`) when their axes are known up front, or all at
the end (`draw_all`) from the frames on disk. Films are written frame by frame, so memory stays
flat however long the film. Pillow's and imageio's GIF writers keep every frame until the file is
closed (imageio's streaming writer produces a broken header with Pillow 13), so GIFs are written
here (`GifWriter`): one global palette, each frame LZW-encoded by Pillow as it comes. MP4 goes
through imageio's ffmpeg writer.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from PIL import GifImagePlugin, Image, ImageDraw, ImageFont

from vaeexp.config import Config
from vaeexp.film.frames import FrameStore, title
from vaeexp.trainer import Logger

# The film's last frame as a plain PNG under a name vaeexp owns: the comparison report reads it
# from here, not from MLflow's internal names for the `latent` image slider's files.
FINAL_FRAME = "latent_final.png"
FILM_FOLDER = "film"  # the run's artifact folder for all of these
FINAL_FRAME_ARTIFACT = f"{FILM_FOLDER}/{FINAL_FRAME}"
FILM_ARTIFACT = f"{FILM_FOLDER}/latent.gif"
ARTIFACTS = ("latent.gif", "latent.mp4", "decoder.gif", "frames.npz", FINAL_FRAME)

SIZE = (640, 480)  # the reference's matplotlib default figure, 6.4 x 4.8 in at 100 dpi
TITLE_HEIGHT = 30
GREYS = 16  # palette entries for anti-aliased title text
# matplotlib's tab10: ten colours told apart at a glance, the classes 0-9
TAB10 = np.array(
    [
        (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
        (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
    ],
    np.uint8,
)  # fmt: skip
# a 4-pixel-wide round dot, the size of matplotlib's default scatter marker at this scale
DISC = [(dx, dy) for dx in range(-1, 3) for dy in range(-1, 3) if abs(dx - 0.5) + abs(dy - 0.5) < 3]


@dataclass(frozen=True)
class Projection:
    """Latent means (n, d) to the plane. d = 2: as is; d = 1: value against class (jittered);
    d > 2: one PCA basis for the whole film, so frames do not jitter."""

    kind: str  # identity | value_by_class | pca
    mean: np.ndarray | None = None
    basis: np.ndarray | None = None  # (d, 2)
    explained: tuple[float, float] = (0.0, 0.0)

    @classmethod
    def fit(cls, last_frame: np.ndarray) -> Projection:
        d = last_frame.shape[1]
        if d == 1:
            return cls("value_by_class")
        if d == 2:
            return cls("identity")
        x = last_frame.astype(np.float64)
        x = x[np.isfinite(x).all(axis=1)]  # a diverged model's inf/NaN rows fit nothing
        if len(x) < 3:
            basis = np.eye(d, 2)
            return cls("pca", np.zeros(d), basis, (float("nan"), float("nan")))
        mean = x.mean(axis=0)
        _, s, vt = np.linalg.svd(x - mean, full_matrices=False)
        var = s**2 / max((s**2).sum(), 1e-300)
        return cls("pca", mean, vt[:2].T, (float(var[0]), float(var[1])))

    def __call__(self, means: np.ndarray, labels: np.ndarray, jitter: np.ndarray) -> np.ndarray:
        means = means.astype(np.float32)
        if self.kind == "identity":
            return means
        if self.kind == "value_by_class":
            return np.stack((means[:, 0], labels + jitter), axis=1)
        return ((means - self.mean) @ self.basis).astype(np.float32)

    def axis_labels(self) -> tuple[str, str]:
        if self.kind == "identity":
            return "z[0]", "z[1]"
        if self.kind == "value_by_class":
            return "z", ""
        if not np.isfinite(self.explained[0]):  # nothing finite to fit: the first two axes
            return "z[0]", "z[1]"
        return f"PC1 ({self.explained[0]:.0%} of variance)", f"PC2 ({self.explained[1]:.0%})"


class Canvas:
    """Renders frames of one film: fixed axes, palette, legend."""

    def __init__(
        self,
        class_names: Sequence[str],
        xlim: tuple[float, float],
        ylim: tuple[float, float],
        axis_labels: tuple[str, str],
        by_class: bool = False,
    ) -> None:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.lines import Line2D

        w, h = SIZE
        fig = Figure(figsize=(w / 100, h / 100), dpi=100, facecolor="white")
        FigureCanvasAgg(fig)
        ax = fig.add_axes((0.12, 0.1, 0.64, 0.83))
        ax.set_xlim(*xlim)
        ax.set_ylim(*ylim)
        ax.set_xlabel(axis_labels[0])
        ax.set_ylabel(axis_labels[1])
        if by_class:
            ax.set_yticks(range(len(class_names)), class_names)
        handles = [
            Line2D([], [], ls="", marker="o", ms=7, color=TAB10[i % 10] / 255, label=name)
            for i, name in enumerate(class_names)
        ]
        fig.legend(handles=handles, loc="center left", bbox_to_anchor=(0.77, 0.52), frameon=False)
        fig.canvas.draw()
        rgb = np.asarray(fig.canvas.buffer_rgba())[..., :3]
        # Data -> pixel (row 0 at the top), and the plot area's pixel box.
        (x0, y0), (x1, y1) = ax.transData.transform([(xlim[0], ylim[0]), (xlim[1], ylim[1])])
        self.ax_scale = np.array(
            [(x1 - x0) / (xlim[1] - xlim[0]), -(y1 - y0) / (ylim[1] - ylim[0])]
        )
        self.ax_offset = np.array(
            [x0 - xlim[0] * self.ax_scale[0], h - y0 - ylim[0] * self.ax_scale[1]]
        )
        bbox = ax.get_window_extent()
        self.box = (
            int(np.ceil(bbox.x0)) + 1,
            int(bbox.x1) - 1,
            h - int(bbox.y1) + 1,
            h - int(np.ceil(bbox.y0)) - 1,
        )

        # Palette: 10 class colours, GREYS greys for text, then the template's own colours.
        template = Image.fromarray(np.ascontiguousarray(rgb)).quantize(
            colors=256 - 10 - GREYS, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE
        )
        greys = np.repeat(np.linspace(0, 255, GREYS).round().astype(np.uint8)[:, None], 3, axis=1)
        own = np.array(template.getpalette()[: 3 * (256 - 10 - GREYS)], np.uint8).reshape(-1, 3)
        self.palette = np.concatenate((TAB10, greys, own)).tobytes().ljust(768, b"\0")
        self.template = (np.asarray(template, np.uint8) + 10 + GREYS).astype(np.uint8)
        self.n_classes = len(class_names)
        self.font = font()
        self.grey_of = (np.arange(256) * (GREYS - 1) / 255).round().astype(np.uint8) + 10
        self.disc = np.array(DISC)

    def render(self, xy: np.ndarray, colour: np.ndarray, title: str) -> Image.Image:
        """Points (n, 2) in data units, drawn in the given order; colour: class index per point."""
        h, w = self.template.shape
        frame = self.template.copy()
        xy = np.where(np.isfinite(xy), xy, 1e9)  # a diverged model's inf/NaN: off the axes
        px = np.rint(np.clip(xy * self.ax_scale + self.ax_offset, -1e6, 1e6)).astype(np.int32)
        left, right, top, bottom = self.box
        inside = (
            (px[:, 0] >= left + 2) & (px[:, 0] <= right - 2)
            & (px[:, 1] >= top + 2) & (px[:, 1] <= bottom - 2)
        )  # fmt: skip
        px, c = px[inside], (colour[inside] % 10).astype(np.uint8)
        flat = px[:, 1] * w + px[:, 0]
        offsets = self.disc[:, 1] * w + self.disc[:, 0]
        # point-major order: a later point covers an earlier one completely
        frame.reshape(-1)[(flat[:, None] + offsets).reshape(-1)] = np.repeat(c, len(offsets))
        outside = len(xy) - int(inside.sum())
        if outside:
            title += f"  ({outside} off the axes)"
        self._title(frame, title)
        image = Image.frombuffer("P", (w, h), frame, "raw", "P", 0, 1)
        image.putpalette(self.palette)
        return image

    def _title(self, frame: np.ndarray, text: str) -> None:
        strip = Image.new("L", (frame.shape[1], TITLE_HEIGHT), 255)
        ImageDraw.Draw(strip).text((10, 7), text, fill=0, font=self.font)
        ink = np.asarray(strip)
        mask = ink < 250
        frame[:TITLE_HEIGHT][mask] = self.grey_of[ink[mask]]


@cache
def font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """matplotlib's DejaVu Sans, so titles match the axes; Pillow's own font without it."""
    try:
        from matplotlib import font_manager

        return ImageFont.truetype(font_manager.findfont("DejaVu Sans"), 14)
    except (OSError, ImportError):
        return ImageFont.load_default()


def title_strip(image: np.ndarray, text: str) -> np.ndarray:
    """A grey uint8 image with a white strip on top carrying `text` (the decoder film's frames)."""
    strip = Image.new("L", (image.shape[1], TITLE_HEIGHT), 255)
    ImageDraw.Draw(strip).text((6, 7), text, fill=0, font=font())
    return np.concatenate((np.asarray(strip), image))


def grey_palette() -> bytes:
    """256 greys: the decoder film's grey images are their own palette indices."""
    return np.repeat(np.arange(256, dtype=np.uint8)[:, None], 3, axis=1).tobytes()


def jitter_for(n: int) -> np.ndarray:
    """Fixed vertical jitter for the 1-d film (value against class), the same every frame."""
    return np.random.default_rng(1).uniform(-0.35, 0.35, n).astype(np.float32)


def fit_limits(
    frames: Sequence[np.ndarray] | np.ndarray,
    projection: Projection,
    labels: np.ndarray,
    limits: str,
) -> tuple[tuple[float, float], tuple[float, float]]:
    """The axes of the whole film: -L..L, or `auto`: what holds 99% of the points of every frame,
    with a margin (a few stray points do not shrink the film to a dot)."""
    by_class = projection.kind == "value_by_class"
    y_class = (-0.6, int(labels.max()) + 0.6) if by_class else None
    if limits != "auto":
        half = float(limits)
        return (-half, half), y_class or (-half, half)
    jitter = jitter_for(len(labels))
    lo, hi = np.full(2, np.inf), np.full(2, -np.inf)
    for means in frames:
        xy = projection(np.asarray(means), labels, jitter)
        xy = xy[np.isfinite(xy).all(axis=1)]
        if len(xy):
            lo = np.minimum(lo, np.percentile(xy, 0.5, axis=0))
            hi = np.maximum(hi, np.percentile(xy, 99.5, axis=0))
    if not np.isfinite(lo).all():
        lo, hi = np.full(2, -1.0), np.full(2, 1.0)
    pad = np.maximum((hi - lo) * 0.05, 1e-3)
    x, y = (
        (float(lo[0] - pad[0]), float(hi[0] + pad[0])),
        (float(lo[1] - pad[1]), float(hi[1] + pad[1])),
    )
    return x, y_class or y


def canvas_for(
    projection: Projection,
    limits: tuple[tuple[float, float], tuple[float, float]],
    class_names: Sequence[str],
) -> Canvas:
    """The canvas for a projection: class names on the y axis for the 1-d film."""
    by_class = projection.kind == "value_by_class"
    return Canvas(class_names, *limits, projection.axis_labels(), by_class=by_class)


def draw_film(
    means: Sequence[np.ndarray] | np.ndarray,
    labels: np.ndarray,
    titles: Sequence[str],
    class_names: Sequence[str],
    limits: str,
) -> tuple[Canvas, Iterator[Image.Image]]:
    """Every frame of a film whose frames are all known: one PCA basis fitted on the last frame
    and one set of axes for the whole film. Frames are drawn lazily, one at a time."""
    # the last frame, or the last one that is all finite (a run that diverged at the end)
    good = [i for i in range(len(means)) if np.isfinite(np.asarray(means[i])).all()]
    projection = Projection.fit(np.asarray(means[good[-1] if good else -1], np.float32))
    canvas = canvas_for(projection, fit_limits(means, projection, labels, limits), class_names)
    jitter = jitter_for(len(labels))

    def frames() -> Iterator[Image.Image]:
        for m, text in zip(means, titles, strict=True):
            yield canvas.render(projection(np.asarray(m, np.float32), labels, jitter), labels, text)

    return canvas, frames()


class GifWriter:
    """A looping GIF with one global palette, each frame written as it is added."""

    def __init__(self, path: Path, size: tuple[int, int], palette: bytes, fps: float) -> None:
        self.path, self.size, self.palette = path, size, palette.ljust(768, b"\0")[:768]
        self.delay_ms = round(1000 / fps)
        self.frames = 0
        self._f: BinaryIO = open(path, "wb")  # noqa: SIM115 (closed by close())
        w, h = size
        self._f.write(b"GIF89a" + struct.pack("<HHBBB", w, h, 0xF7, 0, 0) + self.palette)
        self._f.write(b"!\xff\x0bNETSCAPE2.0\x03\x01\x00\x00\x00")  # loop forever

    def add(self, frame: Image.Image | np.ndarray) -> None:
        """A "P" image with this film's palette, or a uint8 (h, w) array of palette indices."""
        if isinstance(frame, np.ndarray):
            frame = Image.fromarray(frame, "L").convert("P")  # indices kept as they are
        if frame.size != self.size or frame.mode != "P":
            raise ValueError(f"GIF frame must be a {self.size} palette image, got {frame.size}")
        frame.encoderconfig = ()  # left over by an earlier save (MLflow's PNG) it breaks LZW
        # getdata writes the frame's delay, its descriptor (no local palette) and LZW data
        for chunk in GifImagePlugin.getdata(frame, duration=self.delay_ms):
            self._f.write(chunk)
        self.frames += 1

    def close(self) -> None:
        if not self._f.closed:
            self._f.write(b";")
            self._f.close()


class Mp4Writer:
    """An H.264 MP4 of palette frames, through imageio's ffmpeg writer."""

    def __init__(self, path: Path, palette: bytes, fps: float) -> None:
        import imageio.v2 as imageio

        self.colours = np.frombuffer(palette.ljust(768, b"\0")[:768], np.uint8).reshape(256, 3)
        self._w = imageio.get_writer(
            path, format="FFMPEG", fps=fps, codec="libx264", quality=8, macro_block_size=16
        )
        self.frames = 0

    def add(self, frame: Image.Image | np.ndarray) -> None:
        self._w.append_data(self.colours[np.asarray(frame)])
        self.frames += 1

    def close(self) -> None:
        self._w.close()


def writer(path: Path, size: tuple[int, int], palette: bytes, fps: float) -> GifWriter | Mp4Writer:
    """The writer for `path`'s suffix: .mp4, else a GIF."""
    if path.suffix == ".mp4":
        return Mp4Writer(path, palette, fps)
    return GifWriter(path, size, palette, fps)


class FilmOutputs:
    """The film's canvas and writers. Used by the worker thread while training runs, then by the
    training thread once the worker has ended, never by both at once."""

    def __init__(
        self,
        cfg: Config,
        logger: Logger,
        folder: Path,
        labels: np.ndarray,
        class_names: Sequence[str],
        timings: dict[str, float],
    ) -> None:
        self.cfg, self.film, self.logger, self.folder = cfg, cfg.film, logger, folder
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
        self.logger.log_image(image, "latent", step)
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
                self.logger.log_artifact(self.folder / name, FILM_FOLDER)
