"""Sweep speed: `python bench/sweep.py` runs the same 4-job sweep serially (Hydra's basic
launcher, each job on torch's default threads) and with `hydra/launcher=joblib` (jobs side by
side, threads split automatically), interleaved `--reps` times, and prints both wall times and
the ratio. Goal: joblib at least 1.6x faster on 2 cores. Writes its section of RESULTS.md.

A third, serial sweep with one thread per job gives the ceiling of any launcher on this machine:
jobs side by side run on one thread each, so at best they finish in half that sweep's time
(no process start-up, no first-job warm-up, nothing shared), which is 2 x serial / serial-1.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from common import bench_args, median, timed_cli, write_section

# 4 short configs: reference model, 2 epochs on a 20,000-image slice of Fashion-MNIST
SWEEP = ["-m", "latent_dim=2,4,8,16", "data=fashion_mnist", "data.train_limit=20000"]
SWEEP += ["epochs=2", "runtime.progress=false"]


def main() -> None:
    args = bench_args(__doc__)
    walls: dict[str, list[float]] = {"serial": [], "joblib": [], "serial-1": []}
    variants = (
        ("serial", []),
        ("joblib", ["hydra/launcher=joblib"]),
        ("serial-1", ["runtime.threads=1"]),
    )
    for rep in range(args.reps):
        for name, extra in variants:
            tmp = Path(tempfile.mkdtemp(prefix=f"vaeexp-bench-sweep-{name}-"))
            env = {"VAEEXP_RUNS": str(tmp), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}"}
            wall, _, _ = timed_cli([*SWEEP, *extra], env)
            walls[name].append(wall)
            print(f"  rep {rep + 1} {name}: {wall:.1f} s", flush=True)
    serial, joblib, serial1 = (median(walls[k]) for k in ("serial", "joblib", "serial-1"))
    runs = ", ".join(f"{a / b:.2f}x" for a, b in zip(walls["serial"], walls["joblib"], strict=True))
    rows = [
        ("4-job sweep, serial (basic launcher): wall (s)", f"{serial:.1f}", " ".join(SWEEP)),
        (
            "4-job sweep, hydra/launcher=joblib: wall (s)",
            f"{joblib:.1f}",
            "threads split automatically",
        ),
        ("speed-up joblib vs serial", f"{serial / joblib:.2f}x", f"goal >= 1.6x; runs: {runs}"),
        (
            "4-job sweep, serial, runtime.threads=1: wall (s)",
            f"{serial1:.1f}",
            "one thread per job",
        ),
        (
            "ceiling of side-by-side jobs: 2 x serial / serial-1",
            f"{2 * serial / serial1:.2f}x",
            "no start-up, no warm-up, nothing shared",
        ),
    ]
    for row in rows:
        print(f"{row[0]:<52} {row[1]:>8}  {row[2]}")
    if not args.no_write:
        write_section("sweep", "python bench/sweep.py", args.reps, rows)


if __name__ == "__main__":
    main()
