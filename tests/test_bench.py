"""The benchmarks that must not rot: bench/gpu.py runs for a few steps on the CPU."""

import subprocess
import sys

from vaeexp.paths import PROJECT_ROOT


def test_gpu_bench_runs_on_the_cpu_and_imports_nothing_more():
    script = PROJECT_ROOT / "bench" / "gpu.py"
    args = ["--device", "cpu", "--train", "400", "--test", "100", "--epochs", "1", "--no-write"]
    out = subprocess.run(
        [sys.executable, str(script), *args], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "imports beyond torch, torchvision, numpy, Hydra: none" in out.stdout
    for check in ("film capture", "IWAE bound", "exported model loads", "checkpoint cpu -> cpu"):
        assert f"ok: {check}" in out.stdout, out.stdout
    assert "seconds per epoch on cpu" in out.stdout and "images per second on cpu" in out.stdout
