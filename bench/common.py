"""What the benchmark scripts share: the machine's description, medians, child processes with
their peak memory, and the RESULTS.md section each script rewrites between its markers."""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import torch

RESULTS = Path(__file__).with_name("RESULTS.md")
FASHION = Path("/usr/share/datasets/fashion-mnist")


def bench_args(
    doc: str, *, quick: bool = False, extra: Callable[[argparse.ArgumentParser], None] | None = None
) -> argparse.Namespace:
    """The options every benchmark takes, plus those `extra` adds; exits at once if the data it
    trains on is missing."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    if extra:
        extra(parser)
    if quick:
        parser.add_argument("--quick", action="store_true", help="skip the 50- and 10-epoch runs")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    if not (FASHION / "train-images-idx3-ubyte.gz").exists():
        sys.exit("bench: needs Fashion-MNIST: apt-get install dataset-fashion-mnist")
    return args


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def machine() -> str:
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    return (
        f"{model}, {os.cpu_count()} cores, torch {torch.__version__} with "
        f"{torch.get_num_threads()} threads, Python {platform.python_version()}"
    )


def timed_cli(args: list[str], env: dict[str, str]) -> tuple[float, float, str]:
    """(wall seconds, peak RSS in MB, output) of `python -m vaeexp <args>` in a fresh process."""
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "vaeexp", *args],
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak RSS, not all children's
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"`python -m vaeexp {' '.join(args)}` failed:\n{output[-3000:]}")
    return wall, usage.ru_maxrss / 1024, output


def write_section(
    name: str,
    command: str,
    reps: int,
    rows: list[tuple[str, str, str]],
    of: str = "interleaved repetitions",
) -> None:
    """Rewrite the `<!-- name:start -->...<!-- name:end -->` block of RESULTS.md."""
    table = "\n".join(
        [
            "| measurement | value | note |",
            "| --- | --- | --- |",
            *(f"| {a} | {b} | {c} |" for a, b, c in rows),
        ]
    )
    block = (
        f"<!-- {name}:start -->\nLast run: {datetime.now():%Y-%m-%d %H:%M}, `{command}`, on "
        f"{machine()}; medians of {reps} {of}.\n\n{table}\n<!-- {name}:end -->"
    )
    text = RESULTS.read_text() if RESULTS.exists() else ""
    pattern = rf"<!-- {name}:start -->.*<!-- {name}:end -->"
    if re.search(pattern, text, flags=re.S):
        text = re.sub(pattern, lambda _: block, text, flags=re.S)
    else:
        text += "\n" + block + "\n"
    RESULTS.write_text(text)
    print(f"wrote {RESULTS}")
