"""Checksum-verified downloads from a list of mirrors, written atomically into a cache folder."""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm


class DownloadError(RuntimeError):
    """No mirror delivered a file with the expected checksum."""


def md5sum(path: str | Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch(
    filename: str,
    mirrors: Sequence[str],
    md5: str,
    folder: str | Path,
    *,
    timeout: float = 30.0,
    progress: bool = True,
) -> Path:
    """Download `filename` from the first mirror that serves it with checksum `md5`.

    The file appears in `folder` only once complete and verified (temp file, then rename), so an
    interrupted download never leaves a file that looks valid.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / filename
    failures = []
    for mirror in mirrors:
        url = mirror.rstrip("/") + "/" + filename
        fd, tmp = tempfile.mkstemp(prefix=f".{filename}.", suffix=".part", dir=folder)
        try:
            with os.fdopen(fd, "wb") as out:
                _copy(url, out, timeout, progress)
            got = md5sum(tmp)
            if got != md5:
                failures.append(f"{url}: checksum mismatch (md5 {got}, expected {md5})")
                continue
            os.replace(tmp, target)
            return target
        except urllib.error.HTTPError as e:
            failures.append(f"{url}: HTTP {e.code} {e.reason}")
        except (urllib.error.URLError, OSError) as e:
            failures.append(f"{url}: {getattr(e, 'reason', e)}")
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    raise DownloadError(f"could not download {filename}: " + "; ".join(failures))


def _copy(url: str, out, timeout: float, progress: bool) -> None:
    request = urllib.request.Request(url, headers={"User-Agent": "vaeexp"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        total = int(response.headers.get("Content-Length") or 0) or None
        with tqdm(
            total=total,
            unit="B",
            unit_scale=True,
            desc=url.rsplit("/", 1)[-1],
            disable=not progress,
            leave=False,
        ) as bar:
            for chunk in iter(lambda: response.read(1 << 16), b""):
                out.write(chunk)
                bar.update(len(chunk))
