"""What the small commands over a tracking store share (`python -m vaeexp.iwae`, `.film`,
`.compare`): their parser with `--uri`, one-line errors, and opening a logged run."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

import mlflow
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from vaeexp.paths import default_tracking_uri


def parser(prog: str, doc: str | None) -> argparse.ArgumentParser:
    """An argument parser for `python -m <prog>` with the tracking store's `--uri`."""
    p = argparse.ArgumentParser(prog=f"python -m {prog}", description=doc)
    p.add_argument(
        "--uri",
        default=default_tracking_uri(),
        help="tracking store (default: MLFLOW_TRACKING_URI or the project's runs/mlflow.db)",
    )
    return p


def fail(prog: str, message: str) -> NoReturn:
    sys.exit(f"{prog}: error: {message}")


def open_store(uri: str) -> MlflowClient:
    """A client for `uri`, without MLflow's download progress bars."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    return MlflowClient(uri)


def get_run(client: MlflowClient, run_id: str, prog: str) -> Run:
    """The run, or exit with one line naming it and the store."""
    try:
        return client.get_run(run_id)
    except mlflow.exceptions.MlflowException as e:
        fail(prog, f"no run {run_id} in {client.tracking_uri} ({e.error_code})")


@contextmanager
def downloaded(client: MlflowClient, run_id: str, path: str) -> Iterator[Path]:
    """One of the run's artifacts in a temporary folder, removed afterwards."""
    with tempfile.TemporaryDirectory() as tmp:
        yield Path(client.download_artifacts(run_id, path, tmp))
