"""The benchmarks that must not rot: bench/gpu.py runs for a few steps on the CPU, where the
packages a GPU machine may lack cannot be imported."""

import subprocess
import sys

from vaeexp.paths import PROJECT_ROOT

# As on a GPU machine with only torch, torchvision, numpy and Hydra: these imports fail.
ABSENT = ("mlflow", "tqdm", "matplotlib", "imageio", "scipy", "pandas", "jinja2")
RUN_WITHOUT = (
    "import runpy, sys\n"
    f"sys.modules.update(dict.fromkeys({ABSENT!r}))\n"
    "sys.argv = sys.argv[1:]\n"
    "runpy.run_path(sys.argv[0], run_name='__main__')\n"
)


def test_gpu_bench_runs_on_the_cpu_without_what_a_gpu_machine_lacks():
    script = PROJECT_ROOT / "bench" / "gpu.py"
    args = ["--device", "cpu", "--train", "400", "--test", "100", "--epochs", "1", "--no-write"]
    out = subprocess.run(
        [sys.executable, "-c", RUN_WITHOUT, str(script), *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert "imports beyond torch, torchvision, numpy, Hydra: none" in out.stdout
    assert "FAILED" not in out.stdout
    checked = ("film capture", "IWAE bound", "a checkpoint written on cpu loads", "checkpoint cpu")
    for check in checked:
        assert f"ok: {check}" in out.stdout, out.stdout
    assert "seconds per epoch on cpu" in out.stdout and "images per second on cpu" in out.stdout
