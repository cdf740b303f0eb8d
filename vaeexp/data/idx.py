"""Reader for MNIST-format IDX files (http://yann.lecun.com/exdb/mnist/), gzipped or raw.

Every header field is checked against the payload, so a truncated download or a file that is not
IDX fails here with the file's name, not later as a strange shape inside torch. Written by hand:
torchvision's reader cannot be imported here, and the other readers on PyPI check nothing.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_FIX = "delete it so it is downloaded again, or replace it with a good copy"


class IdxError(ValueError):
    """A file that is not a complete IDX file."""


def read_idx(path: str | Path) -> np.ndarray:
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except FileNotFoundError:
        raise IdxError(f"{path}: no such file") from None
    except (OSError, EOFError, zlib.error) as e:
        raise IdxError(f"{path}: corrupt or truncated gzip data ({e}); {_FIX}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _DTYPES or not 1 <= raw[3] <= 4:
        raise IdxError(f"{path}: not an IDX file (bad magic number {raw[:4].hex()}); {_FIX}")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise IdxError(f"{path}: truncated IDX header; {_FIX}")
    dims = tuple(int(d) for d in np.frombuffer(raw, ">u4", ndim, offset=4))
    dtype = np.dtype(_DTYPES[raw[2]])
    expected = int(np.prod(dims)) * dtype.itemsize
    found = len(raw) - header
    if found != expected:
        what = "truncated" if found < expected else "has trailing bytes"
        raise IdxError(
            f"{path}: IDX file {what}: header says shape {dims} ({expected} bytes), "
            f"found {found} bytes; {_FIX}"
        )
    # astype copies only when the bytes need swapping (not for uint8 images); read-only otherwise
    return (
        np.frombuffer(raw, dtype, offset=header)
        .reshape(dims)
        .astype(dtype.newbyteorder("="), copy=False)
    )


def write_idx(path: str | Path, array: np.ndarray) -> None:
    """Write an IDX file (gzipped if the name ends in .gz); used by tests and data tools."""
    code = {np.dtype(v).newbyteorder("="): k for k, v in _DTYPES.items()}[array.dtype]
    head = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
    body = head + array.astype(np.dtype(_DTYPES[code])).tobytes()
    path = Path(path)
    path.write_bytes(gzip.compress(body) if path.suffix == ".gz" else body)
