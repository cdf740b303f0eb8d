"""Stacked sweeps on the CPU: `python bench/stacked.py` runs the same 8-job seed sweep (2 epochs
of the full Fashion-MNIST, reference settings, everything a sweep records) with Hydra's basic
launcher, one job after another, and with `hydra/launcher=stacked`, the 8 jobs as one stacked
model, as whole `python -m vaeexp -m` processes, interleaved `--reps` times; it prints both wall
times and their ratio, and how far apart each seed's final test loss is the two ways.

On two busy cores stacking saves the jobs' start-ups and fixed costs, not their arithmetic: the
goal is only that the stacked sweep is no slower (ratio >= 1.0). Writes its section of
RESULTS.md.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from common import bench_args, median, timed_cli, write_section
from mlflow.tracking import MlflowClient

JOBS = 8
SWEEP = ["-m", f"seed={','.join(str(s) for s in range(JOBS))}", "experiment=reference"]
SWEEP += ["data=fashion_mnist", "epochs=2", "runtime.progress=false"]


def final_losses(store: str) -> dict[str, float]:
    """Each child run's final test loss, by its seed."""
    client = MlflowClient(store)
    experiment = client.get_experiment_by_name("vaeexp").experiment_id
    runs = client.search_runs([experiment], "tags.mlflow.parentRunId != ''")
    return {r.data.params["seed"]: r.data.metrics["test/loss"] for r in runs}


def main() -> None:
    args = bench_args(__doc__)
    walls: dict[str, list[float]] = {"basic": [], "stacked": []}
    losses: dict[str, dict[str, float]] = {}
    for rep in range(args.reps):
        for name, extra in (("basic", []), ("stacked", ["hydra/launcher=stacked"])):
            tmp = Path(tempfile.mkdtemp(prefix=f"vaeexp-bench-stacked-{name}-"))
            store = f"sqlite:///{tmp / 'mlflow.db'}"
            env = {"VAEEXP_RUNS": str(tmp), "MLFLOW_TRACKING_URI": store}
            wall, _, _ = timed_cli([*SWEEP, *extra], env)
            walls[name].append(wall)
            losses[name] = final_losses(store)
            print(f"  rep {rep + 1} {name}: {wall:.1f} s", flush=True)
    basic, stacked = median(walls["basic"]), median(walls["stacked"])
    runs = ", ".join(f"{a / b:.2f}x" for a, b in zip(walls["basic"], walls["stacked"], strict=True))
    gap = max(abs(losses["basic"][s] - losses["stacked"][s]) for s in losses["basic"])
    rows = [
        (f"{JOBS}-job seed sweep, basic launcher: wall (s)", f"{basic:.1f}", " ".join(SWEEP)),
        (f"{JOBS}-job seed sweep, hydra/launcher=stacked: wall (s)", f"{stacked:.1f}", "one group"),
        ("speed-up stacked vs basic", f"{basic / stacked:.2f}x", f"goal >= 1.0x; runs: {runs}"),
        ("largest final test-loss gap, same seed (nats)", f"{gap:.1e}", "stacked vs alone"),
    ]
    for row in rows:
        print(f"{row[0]:<52} {row[1]:>8}  {row[2]}")
    if not args.no_write:
        write_section("stacked", "python bench/stacked.py", args.reps, rows)


if __name__ == "__main__":
    main()
