"""Datasets in memory: IDX files, downloads, the bundled offline digits."""

from vaeexp.data.datasets import Dataset, DataUnavailable, load_data
from vaeexp.data.download import DownloadError, fetch
from vaeexp.data.idx import IdxError, read_idx, write_idx

__all__ = [
    "DataUnavailable",
    "Dataset",
    "DownloadError",
    "IdxError",
    "fetch",
    "load_data",
    "read_idx",
    "write_idx",
]
