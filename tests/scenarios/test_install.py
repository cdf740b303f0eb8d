"""`pip install -e .` keeps the user's torch: into an environment that already holds a supported
torch and torchvision (here the machine's, seen through --system-site-packages), it installs
vaeexp's own requirements only where missing, and never torch or torchvision again."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from vaeexp.paths import PROJECT_ROOT

SNAPSHOT = """
import hashlib, importlib.metadata as md, torch, torchvision
for name, module in (("torch", torch), ("torchvision", torchvision)):
    record = md.distribution(name).read_text("RECORD")
    print(name, md.version(name), module.__file__, hashlib.sha256(record.encode()).hexdigest())
"""


def test_install_keeps_a_supported_torch_and_torchvision(tmp_path: Path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    python = str(venv / "bin" / "python")

    def snapshot() -> str:
        return subprocess.run(
            [python, "-c", SNAPSHOT], capture_output=True, text=True, check=True
        ).stdout

    before = snapshot()
    out = subprocess.run(
        [python, "-m", "pip", "install", "-e", str(PROJECT_ROOT)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    [installed] = [ln for ln in out.stdout.splitlines() if ln.startswith("Successfully installed")]
    names = {package.rsplit("-", 1)[0] for package in installed.split()[2:]}
    assert "vaeexp" in names
    # A venv's own old setuptools may be upgraded for torch's requirement; no part of torch is.
    assert not {n for n in names if n.startswith(("torch", "nvidia", "cuda", "triton"))}, names
    assert snapshot() == before  # same versions, same files, imported from the same place
    assert not list((venv / "lib").glob("python*/site-packages/torch"))
