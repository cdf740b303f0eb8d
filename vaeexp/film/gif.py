"""Films on disk, written frame by frame so memory stays flat however long the film.

Pillow's and imageio's GIF writers keep every frame until the file is closed (imageio's legacy
streaming writer produces a broken header with Pillow 13), so GIFs are written here: one global
palette, each frame LZW-encoded by Pillow as it comes. MP4 goes through imageio's ffmpeg writer.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import GifImagePlugin, Image


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
