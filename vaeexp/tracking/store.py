"""The tracking store: is it there, and the experiment a run goes into."""

from __future__ import annotations

import contextlib
import sqlite3
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from vaeexp.config import TrackingConfig
from vaeexp.tracking.outbox import fail_fast_over_http

EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}  # UI: not the GenAI view


class TrackingUnavailable(RuntimeError):
    """The tracking store cannot be reached or written; the message names the URI."""


# The schemes MLflow's tracking client takes (a plain path is a file store).
SCHEMES = ("http", "https", "sqlite", "postgresql", "mysql", "mssql", "file", "databricks", "uc")
ALLOWED = "sqlite:///<path>.db, http(s)://<server>, postgresql://..., mysql://..., file:<folder>"


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail in seconds, with one line naming the URI, when MLflow could not use the store: an
    unknown scheme, a SQLite file that is not an MLflow store, a server that does not answer
    (MLflow's own client would retry for minutes). Makes sure a local store's folder exists."""
    scheme = urllib.parse.urlsplit(uri).scheme
    family = scheme.split("+")[0].split("-")[0]  # postgresql+psycopg, databricks-uc
    if scheme and family not in SCHEMES and not Path(uri).is_absolute():
        raise TrackingUnavailable(
            f"tracking.uri={uri}: MLflow does not know the scheme '{scheme}'; allowed: {ALLOWED}"
        )
    if uri.startswith(("http://", "https://")):
        fail_fast_over_http()
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout):
                return
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise TrackingUnavailable(
                f"tracking.uri={uri}: no MLflow server answers ({reason}); start one with "
                "`mlflow server --host 127.0.0.1 --port 5000`, or use the local store "
                "(tracking=local)"
            ) from None
    if uri.startswith("sqlite:///"):
        folder = Path(uri.removeprefix("sqlite:///")).parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise TrackingUnavailable(f"tracking.uri={uri}: cannot create {folder} ({e})") from None
        _check_sqlite_store(uri, Path(uri.removeprefix("sqlite:///")))


def _check_sqlite_store(uri: str, path: Path) -> None:
    """An existing, non-empty SQLite file must be an MLflow store: MLflow would otherwise fail
    deep inside SQLAlchemy, or add its tables to someone else's database."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    try:
        with contextlib.closing(sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)) as db:
            tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
    except sqlite3.DatabaseError:
        raise TrackingUnavailable(
            f"tracking.uri={uri}: {path} is not a SQLite database; point tracking.uri at an "
            "MLflow store or a new file (sqlite:///<path>.db)"
        ) from None
    if tables and not {"experiments", "runs", "alembic_version"} <= tables:
        raise TrackingUnavailable(
            f"tracking.uri={uri}: {path} is a SQLite database but not an MLflow store; point "
            "tracking.uri at an MLflow store or a new file (sqlite:///<path>.db)"
        )


def ensure_experiment(client: MlflowClient, name: str, artifact_location: str | None) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(
            name, artifact_location=artifact_location, tags=EXPERIMENT_KIND
        )
    except mlflow.exceptions.MlflowException:  # created meanwhile by a concurrent job
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def experiment_for(client: MlflowClient, tracking: TrackingConfig) -> str:
    """The configured experiment's id, created on first use."""
    return ensure_experiment(client, tracking.experiment, artifact_location(tracking))


def artifact_location(tracking: TrackingConfig) -> str | None:
    """A local store gets an absolute artifact folder: MLflow's default is relative to the cwd."""
    if tracking.artifact_location is None or not tracking.uri.startswith(("sqlite:", "file:", "/")):
        return None
    return Path(tracking.artifact_location).resolve().as_uri()


def run_exists(client: MlflowClient, run_id: str) -> bool:
    try:
        client.get_run(run_id)
        return True
    except mlflow.exceptions.MlflowException:
        return False


def unfinished_run_in(tracking: TrackingConfig, folders: list[Path]) -> str | None:
    """The unfinished run that trained in one of `folders` (its `output_dir` tag) and left no
    checkpoint: a job stopped before its first one continues that run, not a second one."""
    client = MlflowClient(tracking.uri)
    experiment = experiment_for(client, tracking)
    for folder in folders:
        found = client.search_runs(
            [experiment],
            f"tags.output_dir = '{folder}'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        if found and found[0].info.status != "FINISHED":
            return found[0].info.run_id
    return None


def finished_run(uri: str, state: dict, epochs: int) -> str | None:
    """The name of the run a checkpoint belongs to if that run is FINISHED and trained `epochs`
    already: resuming it would train nothing and log its last results twice."""
    run_id = state.get("mlflow_run_id")
    if not run_id or state.get("epoch", 0) < epochs:
        return None
    try:
        run = MlflowClient(uri).get_run(run_id)
    except mlflow.exceptions.MlflowException:
        return None
    return run.info.run_name if run.info.status == "FINISHED" else None


def last_step(client: MlflowClient, run_id: str, key: str) -> int:
    """The last step at which the run has `key`; 0 if never."""
    return max((m.step for m in client.get_metric_history(run_id, key)), default=0)
