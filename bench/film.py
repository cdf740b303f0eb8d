"""The latent film's cost: `python bench/film.py` prints a table and writes bench/RESULTS.md.

1. The reference's callback, as it is written: per frame, the encoder over the 10,000 test
   digits, a new matplotlib figure (never closed), a scatter and a JPEG.
2. The reference cadence in vaeexp: one epoch of full Fashion-MNIST (reference settings) with a
   frame at every step (film=reference), against the same epoch with film=off, each a whole
   `python -m vaeexp` process: per-frame cost all in = (on - off) / frames.
3. The default schedule: a 5-epoch run with the default film against film=off.
Each vaeexp pair is run interleaved, `--reps` times; medians. Needs the Debian package
`dataset-fashion-mnist`.
"""

from __future__ import annotations

import resource
import tempfile
import time
from pathlib import Path

import torch
from common import bench_args, median, timed_cli, write_section
from hydra import compose, initialize_config_dir
from mlflow.tracking import MlflowClient

from vaeexp.config import Config, register, settings
from vaeexp.film.recorder import FRAMES_METRIC, TIMING_METRICS
from vaeexp.paths import CONF_DIR

ONE_EPOCH = ["experiment=reference", "data=fashion_mnist", "runtime.progress=false", "epochs=1"]
ONE_EPOCH += ["iwae.images=0", "tracking.log_model=false"]


def config(*overrides: str) -> Config:
    """The typed config as `python -m vaeexp <overrides>` composes it."""
    register()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return settings(compose("config", overrides=list(overrides)))


def film_split(store: str) -> tuple[float, ...]:
    """(frames, then ms per frame of capture, diagnostics, render and log) of the store's latest
    run, from the metrics its film logs when it ends."""
    client = MlflowClient(store)
    experiment = client.get_experiment_by_name("vaeexp").experiment_id
    run = client.search_runs([experiment], order_by=["attributes.start_time DESC"])[0]
    metrics = run.data.metrics
    frames = metrics[FRAMES_METRIC]
    return (frames, *(1000 * metrics[name] / frames for name in TIMING_METRICS.values()))


def reference_callback(frames: int) -> tuple[float, float]:
    """(seconds per frame, MB of memory kept per frame) of the reference's callback."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from vaeexp.data import load_data
    from vaeexp.model import VAE

    data = load_data(config("data=fashion_mnist", "runtime.progress=false").data, progress=False)
    model = VAE(2, 256).eval()
    x, y = data.test_x, data.test_y.numpy()
    with tempfile.TemporaryDirectory() as tmp:
        rss = []
        start = time.perf_counter()
        for i in range(frames):
            with torch.no_grad():
                z = model.encode(x)[0].numpy()  # Keras: encoder.predict(x_test)
            plt.figure(figsize=(6, 6))  # a new figure per frame, never closed
            plt.scatter(z[:, 0], z[:, 1], c=y, cmap="tab10")
            plt.colorbar()
            plt.xlim(-10, 10)
            plt.ylim(-10, 10)
            plt.savefig(f"{tmp}/frame{i:04d}.jpg")
            rss.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        seconds = (time.perf_counter() - start) / frames
    growth = (rss[-1] - rss[len(rss) // 2]) / (len(rss) - 1 - len(rss) // 2)
    return seconds, growth


def main() -> None:
    args = bench_args(__doc__)
    rows: list[tuple[str, str, str]] = []

    def row(what: str, value: str, note: str = "") -> None:
        rows.append((what, value, note))
        print(f"{what:<68} {value:>10}  {note}", flush=True)

    ref_s, ref_mb = reference_callback(40)
    row("1. reference callback, per frame (ms)", f"{1000 * ref_s:.0f}", "matplotlib, new figure")
    row("1. reference callback, memory kept per frame (MB)", f"{ref_mb:.1f}")

    tmp = Path(tempfile.mkdtemp(prefix="vaeexp-bench-film-"))
    env = {"VAEEXP_RUNS": str(tmp), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}"}
    walls: dict[str, list[float]] = {k: [] for k in ("off1", "ref", "off5", "default")}
    peaks: dict[str, list[float]] = {k: [] for k in walls}
    splits: dict[str, list[tuple[float, ...]]] = {"ref": [], "default": []}
    runs = {
        "off1": [*ONE_EPOCH, "film=off"],
        "ref": [*ONE_EPOCH, "film=reference"],
        "off5": [
            "experiment=reference",
            "data=fashion_mnist",
            "runtime.progress=false",
            "epochs=5",
            "film=off",
        ],
        "default": [
            "experiment=reference",
            "data=fashion_mnist",
            "runtime.progress=false",
            "epochs=5",
        ],
    }
    for rep in range(args.reps):
        for name, overrides in runs.items():
            wall, peak, _ = timed_cli(overrides, env)
            walls[name].append(wall)
            peaks[name].append(peak)
            if name in splits:
                splits[name].append(film_split(env["MLFLOW_TRACKING_URI"]))
            print(f"  rep {rep + 1} {name}: {wall:.2f} s, {peak:.0f} MB", flush=True)

    frames = splits["ref"][0][0]
    off1, ref = median(walls["off1"]), median(walls["ref"])
    per_frame = (ref - off1) / frames
    row("2. one epoch, film=off: wall (s)", f"{off1:.2f}", "full process, reference settings")
    row(f"2. one epoch, film=reference ({frames:.0f} frames): wall (s)", f"{ref:.2f}")
    row(
        "2. per frame, all in: (on - off) / frames (ms)",
        f"{1000 * per_frame:.1f}",
        f"goal <= 60; {ref_s / per_frame:.1f}x faster than the reference's callback (goal >= 8)",
    )
    cap, diag, rend, log = (median([s[i] for s in splits["ref"]]) for i in range(1, 5))
    row(
        "2. per frame split (ms): capture in the loop / diagnostics / render / log",
        f"{cap:.1f} / {diag:.1f} / {rend:.1f} / {log:.1f}",
        "the last three in the film's worker thread, overlapping training",
    )
    extra = median(peaks["ref"]) - median(peaks["off1"])
    row(
        "2. peak RSS film=reference vs film=off (MB)",
        f"{median(peaks['ref']):.0f} vs {median(peaks['off1']):.0f}",
        f"+{extra:.0f} MB (goal <= +200)",
    )
    off5, default = median(walls["off5"]), median(walls["default"])
    row(
        f"3. 5 epochs, default film ({splits['default'][0][0]:.0f} frames) vs film=off: wall (s)",
        f"{default:.2f} vs {off5:.2f}",
    )
    row(
        "3. ratio default film / film=off",
        f"{default / off5:.3f}",
        "goal <= 1.10; runs: "
        + ", ".join(f"{a / b:.3f}" for a, b in zip(walls["default"], walls["off5"], strict=True)),
    )
    row(
        "3. peak RSS default film vs film=off (MB)",
        f"{median(peaks['default']):.0f} vs {median(peaks['off5']):.0f}",
    )
    if not args.no_write:
        write_section("film", "python bench/film.py", args.reps, rows)


if __name__ == "__main__":
    main()
