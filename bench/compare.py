"""Comparison report speed: `python bench/compare.py` builds a made-up sweep of 200 runs (50
settings x 4 seeds) in a SQLite MLflow store, each with 50 epochs of metric histories, vaeexp's
params, a 50-epoch latent film (84 frames of 10,000 points, drawn by vaeexp's renderer) and its
final frame, and times `vaeexp.compare.report` on it, logging to the parent run, against the
same for 20 runs (5 settings x 4 seeds). Goal: 200 runs in under a minute. Also times the
200-run report through a tracking server (`mlflow server` on 127.0.0.1 over the same store),
each with runs read side by side (the default 8 workers) and one at a time, and opening the
page in headless Chromium. Writes its section of RESULTS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import median, write_section

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/compare_support.py
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

from mlflow.tracking import MlflowClient

from tests.compare_support import fake_sweep
from vaeexp.compare import report
from vaeexp.compare.parent import GROUP_TAG
from vaeexp.film.__main__ import rerender
from vaeexp.film.frames import Frames
from vaeexp.film.render import FINAL_FRAME

SEEDS = 4
EXTRA_PARAMS = {f"film.setting_{i}": str(i) for i in range(55)}  # a real run logs ~65 params
HISTORIES = ("test/recon", "test/kl", "test/neg_elbo", "train/loss", "train/recon", "train/kl")


def film(folder: Path) -> tuple[Path, Path]:
    """A 50-epoch-sized latent film (84 frames, 10,000 points) and its last frame as a PNG."""
    from PIL import Image

    rng = np.random.default_rng(0)
    n, count = 10_000, 84
    labels = rng.integers(0, 10, n)
    centres = rng.normal(0, 2.5, (10, 2))
    means = np.empty((count, n, 2), np.float16)
    for f in range(count):
        a = min(1.0, f / 40)
        means[f] = rng.normal(0, 1, (n, 2)) * (1.5 - a) + a * centres[labels]
    meta = {"epochs": 50, "class_names": [str(i) for i in range(10)], "limits": "10"}
    steps = np.arange(count)
    frames = Frames(steps, steps // 2, np.ones((count, 2)), means, labels, meta)
    gif = folder / "latent.gif"
    rerender(frames, gif, fps=10, stride=1)
    (folder / "frame").mkdir()
    with Image.open(gif) as image:
        image.seek(image.n_frames - 1)
        image.convert("RGB").quantize(64).save(folder / "frame" / FINAL_FRAME)  # "P" as vaeexp
    return gif, folder / "frame" / FINAL_FRAME


def build(root: Path, settings: int, gif: Path, frame: Path) -> tuple[MlflowClient, str]:
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.create_experiment("vaeexp", str(root / "mlartifacts"))
    grid = [
        {"latent_dim": str(2 + d % 10), "lr": f"{10 ** -(2 + d // 10):g}"} for d in range(settings)
    ]
    rng = np.random.default_rng(1)
    loss = {
        (",".join(f"{k}={v}" for k, v in s.items()), seed): float(150 + rng.normal(0, 1))
        for s in grid
        for seed in range(SEEDS)
    }
    loss[next(iter(loss))] = None  # one diverged run
    parent, _ = fake_sweep(
        client,
        experiment,
        grid,
        range(SEEDS),
        loss,
        root,
        frame=frame,
        film=gif,
        params=EXTRA_PARAMS,
        histories=HISTORIES,
    )
    return client, parent


def timed_report(client: MlflowClient, parent: str, out: Path, workers: int) -> float:
    for run in client.search_runs(
        [client.get_run(parent).info.experiment_id], f"tags.mlflow.parentRunId = '{parent}'"
    ):
        if GROUP_TAG in run.data.tags:  # every child is tagged anew, as after a sweep
            client.delete_tag(run.info.run_id, GROUP_TAG)
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    report(client, out, parent=parent, workers=workers)
    return time.perf_counter() - start


def open_in_chromium(page: Path) -> float | None:
    """Seconds from starting headless Chromium to its screenshot of the page, loaded and drawn
    (--dump-dom would time serialising the embedded films back out instead)."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        return None
    start = time.perf_counter()
    subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--virtual-time-budget=5000",
            f"--screenshot={page.with_suffix('.png')}",
            page.as_uri(),
        ],
        capture_output=True,
        timeout=300,
        check=True,
        cwd=page.parent,
    )
    return time.perf_counter() - start


@contextlib.contextmanager
def tracking_server(db: Path):
    """A client of `mlflow server` on 127.0.0.1 over the SQLite store `db` (artifacts stay
    where the runs' artifact URIs say: the server carries the metadata round trips)."""
    import urllib.request

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1"]
    command += ["--port", str(port), "--backend-store-uri", f"sqlite:///{db}"]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(240):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                    break
            except OSError:
                time.sleep(0.5)
        yield MlflowClient(f"http://127.0.0.1:{port}")
    finally:
        server.terminate()
        server.wait(timeout=60)


def interleaved(variants: dict[str, tuple], reps: int, tmp: Path) -> dict[str, list[float]]:
    """Each variant's (client, parent, workers) report timed `reps` times, in turn."""
    walls: dict[str, list[float]] = {k: [] for k in variants}
    for rep in range(reps):
        for name, (client, parent, workers) in variants.items():
            walls[name].append(timed_report(client, parent, tmp / name, workers))
            print(f"  rep {rep + 1} {name}: {walls[name][-1]:.1f} s", flush=True)
    return walls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="vaeexp-bench-compare-"))
    try:
        started = time.perf_counter()
        gif, frame = film(tmp)
        stores = {n: build(tmp / f"store{n}", n // SEEDS, gif, frame) for n in (20, 200)}
        print(f"  stores built in {time.perf_counter() - started:.0f} s", flush=True)
        local = {"20": (*stores[20], 8), "200": (*stores[200], 8), "200-1": (*stores[200], 1)}
        walls = interleaved(local, args.reps, tmp)
        with tracking_server(tmp / "store200" / "mlflow.db") as http:  # not while timing local
            timed_report(http, stores[200][1], tmp / "warm-up", 8)  # the server's first requests
            remote = {"http": (http, stores[200][1], 8), "http-1": (http, stores[200][1], 1)}
            walls |= interleaved(remote, args.reps, tmp)
        rows = _rows({k: median(v) for k, v in walls.items()}, walls["200"], tmp, gif, args.reps)
        for row in rows:
            print(f"{row[0]:<64} {row[1]:>8}  {row[2]}")
        if not args.no_write:
            write_section("compare", "python bench/compare.py", args.reps, rows)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _rows(
    wall: dict[str, float], runs: list[float], tmp: Path, gif: Path, reps: int
) -> list[tuple[str, str, str]]:
    page = tmp / "200" / "report.html"
    beside = len(list((tmp / "200" / "films").iterdir()))
    size = page.stat().st_size / 2**20
    each = ", ".join(f"{w:.1f}" for w in runs)
    rows = [
        ("20-run report (5 settings x 4 seeds): wall (s)", f"{wall['20']:.1f}", "SQLite store"),
        ("200-run report (50 x 4 seeds): wall (s)", f"{wall['200']:.1f}", f"goal < 60; {each}"),
        ("ratio 200 / 20 runs", f"{wall['200'] / wall['20']:.1f}x", "10x the runs"),
        ("200-run report, workers=1: wall (s)", f"{wall['200-1']:.1f}", "runs read one at a time"),
        ("200-run report through mlflow server: wall (s)", f"{wall['http']:.1f}", "8 workers"),
        (
            "the same, workers=1: wall (s)",
            f"{wall['http-1']:.1f}",
            f"{wall['http-1'] / wall['http']:.1f}x the 8 workers' time",
        ),
        ("200-run report.html: size (MB)", f"{size:.1f}", f"{200 - beside} films embedded"),
        ("films beside report.html, in films/", str(beside), "past the 32 MB budget"),
        ("one run's film (MB)", f"{gif.stat().st_size / 2**20:.2f}", "84 frames, 10,000 points"),
    ]
    blank = tmp / "blank.html"
    blank.write_text("<!doctype html><title>blank</title>")
    chromium = [(open_in_chromium(page), open_in_chromium(blank)) for _ in range(reps)]
    if chromium[0][0] is not None:
        opened, empty = median([a for a, _ in chromium]), median([b for _, b in chromium])
        what = "200-run report.html drawn by headless Chromium: wall (s)"
        rows.append((what, f"{opened:.1f}", f"a blank page: {empty:.1f} (the browser's start)"))
    return rows


if __name__ == "__main__":
    main()
