"""Parity with the Keras reference: `python bench/parity.py` writes RESULTS.md's parity table.

For each seed, one 50-epoch run of each side on the full Fashion-MNIST, read at epochs 2, 10 and
50 (the learning rate is constant, so a 50-epoch run passes through the 2- and 10-epoch ones):

- Keras: `bench/keras_reference.py`, the book's model and loss as written, in Keras 3 on JAX;
- vaeexp: `python -m vaeexp experiment=reference data=fashion_mnist seed=S`, read back through
  MlflowClient, and the same with `objective_scale=per_image` to show what the scale does.

Test loss is the negative ELBO in nats per image with one z sample (Keras's val_loss x 784).
Keras and JAX are not vaeexp dependencies: pass the Python that has them (see
keras_reference.py), e.g. `python bench/parity.py --keras-python /opt/keras/bin/python`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from common import bench_args, median, write_section
from mlflow.tracking import MlflowClient

EPOCHS = (2, 10, 50)
HERE = Path(__file__).parent


def keras_run(python: str, seed: int, tmp: Path) -> dict[int, float]:
    out = tmp / f"keras-{seed}.json"
    proc = subprocess.run(
        [
            python,
            str(HERE / "keras_reference.py"),
            "--epochs",
            str(max(EPOCHS)),
            "--seed",
            str(seed),
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    print("\n".join(line for line in proc.stdout.splitlines() if "one " in line), flush=True)
    test = json.loads(out.read_text())["test"]
    return {e: test[e - 1] for e in EPOCHS}


def vaeexp_run(seed: int, tmp: Path, *extra: str) -> dict[int, float]:
    runs = tmp / f"vaeexp-{seed}-{len(extra)}"
    store = f"sqlite:///{runs / 'mlflow.db'}"
    env = {**os.environ, "VAEEXP_RUNS": str(runs), "MLFLOW_TRACKING_URI": store}
    subprocess.run(
        [
            sys.executable,
            "-m",
            "vaeexp",
            "experiment=reference",
            "data=fashion_mnist",
            f"seed={seed}",
            "runtime.progress=false",
            *extra,
        ],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    client = MlflowClient(store)
    run = client.search_runs([client.get_experiment_by_name("vaeexp").experiment_id])[0]
    assert run.info.status == "FINISHED", run.info.status
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "test/loss")}
    return {e: history[e] for e in EPOCHS}


def run_all(keras_python: str, seeds: list[int]) -> dict[str, list[dict[int, float]]]:
    """Each seed's test losses at EPOCHS, per side; also written to parity.json."""
    tmp = Path(tempfile.mkdtemp(prefix="vaeexp-parity-"))
    results: dict[str, list[dict[int, float]]] = {"keras": [], "per_pixel": [], "per_image": []}
    for seed in seeds:  # interleaved, so a slow spell of the machine hits every side
        results["keras"].append(keras_run(keras_python, seed, tmp))
        results["per_pixel"].append(vaeexp_run(seed, tmp))
        results["per_image"].append(vaeexp_run(seed, tmp, "objective_scale=per_image"))
        print({k: v[-1] for k, v in results.items()}, flush=True)
    (tmp / "parity.json").write_text(json.dumps(results))
    print(f"wrote {tmp / 'parity.json'}")
    return results


def options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--keras-python", default=sys.executable, help="a Python with keras, jax")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--from-json", help="tabulate a parity.json an earlier run wrote")


def main() -> None:
    args = bench_args(__doc__, extra=options)
    if args.from_json:
        raw = json.loads(Path(args.from_json).read_text())
        results = {
            side: [{int(e): v for e, v in r.items()} for r in rs] for side, rs in raw.items()
        }
    else:
        results = run_all(args.keras_python, args.seeds)

    def stats(side: str, epoch: int) -> tuple[float, str]:
        values = [r[epoch] for r in results[side]]
        spread = ", ".join(f"{v:.2f}" for v in values)
        return median(values), f"seeds: {spread}; range {max(values) - min(values):.2f}"

    rows: list[tuple[str, str, str]] = []
    for epoch in EPOCHS:
        keras, keras_note = stats("keras", epoch)
        rows.append(
            (f"Keras reference, test loss after {epoch} epochs", f"{keras:.2f}", keras_note)
        )
        for side, label in (
            ("per_pixel", "vaeexp experiment=reference"),
            ("per_image", "vaeexp objective_scale=per_image"),
        ):
            value, note = stats(side, epoch)
            rows.append(
                (
                    f"{label}, after {epoch} epochs",
                    f"{value:.2f}",
                    f"{value - keras:+.2f} vs Keras; {note}",
                )
            )
    for row in rows:
        print(f"{row[0]:58s} {row[1]:>8s}  {row[2]}")
    if not args.no_write:
        n = len(results["keras"])
        command = "python bench/parity.py --keras-python <a Python with keras and jax>"
        write_section("parity", command, n, rows, of="seeds (one run each)")


if __name__ == "__main__":
    main()
