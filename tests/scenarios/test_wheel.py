"""A built wheel, installed into a fresh virtual environment, trains, sweeps and opens the UI from
an unrelated empty folder: the configs ship in the package and outputs land in that folder.

The environment is created with --system-site-packages, so that torch, MLflow and Hydra come from
the machine and only vaeexp comes from the wheel (the test checks which vaeexp it imported).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from vaeexp.paths import PROJECT_ROOT

TINY = [
    "data=mnist_bundled",
    "data.train_limit=200",
    "data.test_limit=50",
    "runtime.progress=false",
    "epochs=1",
    "intermediate_dim=32",
    "iwae.images=0",
    "tracking.log_model=false",
]


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(root / "dist"),
            str(PROJECT_ROOT),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = (root / "dist").glob("vaeexp-*.whl")
    subprocess.run(
        [sys.executable, "-m", "venv", "--system-site-packages", str(root / "venv")], check=True
    )
    python = root / "venv" / "bin" / "python"
    subprocess.run(
        [python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
        check=True,
        capture_output=True,
    )
    return python


def _run(python: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("VAEEXP_RUNS", "MLFLOW_TRACKING_URI", "HYDRA_FULL_ERROR", "PYTHONPATH")
    }
    env["VAEEXP_DATA"] = str(cwd.parent / "data")  # not the user's cache
    return subprocess.run(
        [str(python), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


def test_the_installed_package_is_the_wheel(venv: Path, tmp_path: Path):
    where = _run(venv, tmp_path, "-c", "import vaeexp.paths as p; print(p.CONF_DIR, p.IN_CLONE)")
    conf, in_clone = where.stdout.split()
    assert Path(conf).is_relative_to(venv.parent.parent) and in_clone == "False", where.stdout


def test_a_run_and_a_sweep_from_an_empty_folder(venv: Path, tmp_path: Path):
    work = tmp_path / "elsewhere"
    work.mkdir()
    run = _run(venv, work, "-m", "vaeexp", *TINY)
    assert run.returncode == 0, run.stderr[-3000:]
    store = work / "runs" / "mlflow.db"
    assert store.is_file() and (work / "runs" / "outputs").is_dir()
    sweep = _run(venv, work, "-m", "vaeexp", "-m", "latent_dim=2,3", *TINY)
    assert sweep.returncode == 0, sweep.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{store}")
    runs = client.search_runs([client.get_experiment_by_name("vaeexp").experiment_id])
    assert sorted(r.info.status for r in runs) == ["FINISHED"] * 4  # a run, a parent, 2 children
    site = Path(_run(venv, work, "-c", "import vaeexp; print(vaeexp.__file__)").stdout.strip())
    assert not (site.parent / "runs").exists() and not (site.parent.parent / "runs").exists()


def test_the_ui_command_is_there(venv: Path, tmp_path: Path):
    ui = _run(venv, tmp_path, "-m", "vaeexp.ui", "--help")
    assert ui.returncode == 0 and "--uri" in ui.stdout


def test_users_add_configs_with_config_dir(venv: Path, tmp_path: Path):
    mine = tmp_path / "mine" / "experiment"
    mine.mkdir(parents=True)
    (mine / "small.yaml").write_text("# @package _global_\nlatent_dim: 7\nepochs: 3\n")
    composed = _run(
        venv, tmp_path, "-m", "vaeexp", "--config-dir", "mine", "experiment=small", "--cfg", "job"
    )
    assert composed.returncode == 0, composed.stderr[-2000:]
    assert "latent_dim: 7" in composed.stdout and "epochs: 3" in composed.stdout
