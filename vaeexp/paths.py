"""Where things live: the project, its configs and runs, the tracking store, the data cache, and a
sweep's folder with its parent-run file. A leaf: it imports nothing of vaeexp's, so every other
module can ask it without tying the import graph in a knot."""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
PROJECT_ROOT = PACKAGE_DIR.parent  # a clone's root; site-packages for an installed wheel
# Run from a clone (`pip install -e .` included), configs are the clone's conf/ and outputs go
# to its runs/. Installed from a wheel, configs ship inside the package (built from conf/, one
# copy) and outputs go to the working folder's runs/: never inside the installed package.
IN_CLONE = (PROJECT_ROOT / "pyproject.toml").is_file() and (PROJECT_ROOT / "conf").is_dir()
CONF_DIR = PROJECT_ROOT / "conf" if IN_CLONE else PACKAGE_DIR / "conf"
PARENT_FILE = "mlflow_parent_run_id"  # in a sweep's folder: the id of its MLflow parent run
EARLIER_FILE = "earlier_sweeps"  # in a resumed sweep's folder: those it continues, a line each


def runs_dir() -> Path:
    """All outputs land here: VAEEXP_RUNS, else a clone's runs/ (whatever the working folder),
    else runs/ in the working folder."""
    default = PROJECT_ROOT / "runs" if IN_CLONE else Path.cwd() / "runs"
    return Path(os.environ.get("VAEEXP_RUNS") or default).resolve()


def default_tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{runs_dir() / 'mlflow.db'}"


def default_data_root() -> str:
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return os.environ.get("VAEEXP_DATA") or str(Path(cache) / "vaeexp" / "data")


def multirun() -> bool:
    """Whether the running job is one of a multirun (`-m`: a sweep): the one test of it."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def sweep_folder() -> Path | None:
    """The running job's sweep folder; None outside a multirun."""
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().sweep.dir) if multirun() else None


def parent_run_id(folder: Path | None) -> str | None:
    """The parent run id a sweep's callback left in `folder`; None if there is none."""
    path = folder / PARENT_FILE if folder else None
    return path.read_text().strip() if path and path.is_file() else None


def earlier_sweeps(folder: Path | None) -> list[Path]:
    """The folders of the sweeps that `folder` continues (`resume=auto`), newest first."""
    path = folder / EARLIER_FILE if folder else None
    if not path or not path.is_file():
        return []
    return [Path(line) for line in path.read_text().splitlines() if line.strip()]


def data_configs() -> list[str]:
    """The data group's options: a file of `conf/data` each."""
    return sorted(p.stem for p in (CONF_DIR / "data").glob("*.yaml"))


def data_config_file(name: str) -> Path | None:
    """The file that defines data config `name`; None if there is none."""
    path = CONF_DIR / "data" / f"{name}.yaml"
    return path if path.is_file() else None
