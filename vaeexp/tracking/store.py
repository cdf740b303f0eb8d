"""The tracking store: is it there, the experiment a run goes into, and reading runs back (every
page of a search, a run's latest points) to log only what is new."""

from __future__ import annotations

import contextlib
import math
import re
import sqlite3
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

import mlflow
from mlflow.entities import Metric, Run
from mlflow.environment_variables import MLFLOW_HTTP_REQUEST_TIMEOUT
from mlflow.store.tracking import SEARCH_MAX_RESULTS_DEFAULT
from mlflow.tracking import MlflowClient
from mlflow.utils import get_results_from_paginated_fn

from vaeexp.config import TrackingConfig
from vaeexp.tracking.outbox import fail_fast_over_http

_BATCH = 1000  # MLflow's limit of metrics per log_batch
# images/<key>+step+<step>+timestamp+...: the key's "/" as "~" ("#" before); "%" before "+"
_IMAGE = re.compile(r"images/(?P<key>[^/]+?)[+%]step[+%](?P<step>\d+)[+%]timestamp[+%]")

if TYPE_CHECKING:
    import requests

EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}  # UI: not the GenAI view
# MLflow's basic-auth permissions that may create runs in an experiment (READ and USE may not);
# named here because importing mlflow.server.auth.permissions loads the whole server app.
WRITE = ("EDIT", "MANAGE")


class TrackingUnavailable(RuntimeError):
    """The tracking store cannot be reached or written; the message names the URI."""


# The schemes MLflow's tracking client takes (a plain path is a file store).
SCHEMES = ("http", "https", "sqlite", "postgresql", "mysql", "mssql", "file", "databricks", "uc")
ALLOWED = "sqlite:///<path>.db, http(s)://<server>, postgresql://..., mysql://..., file:<folder>"


def check_reachable(uri: str, experiment: str | None = None) -> None:
    """Fail in seconds, with one line naming the URI, when MLflow could not use the store: an
    unknown scheme, a SQLite file that is not an MLflow store, a server that is down (MLflow's
    own client would retry for minutes; a busy server is waited for) or, given the `experiment`
    a run will write, one that refuses our credentials or lets us only read it
    (`check_access`). Makes sure a local store's folder exists."""
    scheme = urllib.parse.urlsplit(uri).scheme
    family = scheme.split("+")[0].split("-")[0]  # postgresql+psycopg, databricks-uc
    if scheme and family not in SCHEMES and not Path(uri).is_absolute():
        raise TrackingUnavailable(
            f"tracking.uri={uri}: MLflow does not know the scheme '{scheme}'; allowed: {ALLOWED}"
        )
    if uri.startswith(("http://", "https://")):
        fail_fast_over_http()
        wait = MLFLOW_HTTP_REQUEST_TIMEOUT.get()  # a down server refuses at once; a busy one waits
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=wait):
                pass
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise TrackingUnavailable(
                f"tracking.uri={uri}: no MLflow server answers ({reason}); start one with "
                "`mlflow server --host 127.0.0.1 --port 5000`, or use the local store "
                "(tracking=local)"
            ) from None
        if experiment is not None:
            check_access(uri, experiment)
    if uri.startswith("sqlite:///"):
        folder = Path(uri.removeprefix("sqlite:///")).parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise TrackingUnavailable(f"tracking.uri={uri}: cannot create {folder} ({e})") from None
        _check_sqlite_store(uri, Path(uri.removeprefix("sqlite:///")))


def check_access(uri: str, experiment: str) -> None:
    """A server that checks who writes (`mlflow server --app-name basic-auth`) would refuse our
    credentials (401) or our first write (403) only once the data is loaded, and with a
    traceback: ask it first. Credentials are MLflow's own
    (MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD, or a token), sent as its client sends
    them. Whether the user may write comes from the auth app's per-user permission query, which
    resolves a permission the way its own checks do; a server without the auth app has no such
    routes, and an experiment that does not exist yet is the user's to create."""
    found = _ask(uri, "/api/2.0/mlflow/experiments/get-by-name", experiment_name=experiment)
    who = _who(uri)
    if found.status_code == 401:
        fix = (
            "check MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
            if who
            else "none were given: set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
        )
        raise TrackingUnavailable(
            f"tracking.uri={uri}: the server refused the credentials{f' of {who}' if who else ''}"
            f" (401); {fix}"
        )
    ask_admin = (
        "ask the server's admin for EDIT on it, or log to another with tracking.experiment=<name>"
    )
    if found.status_code == 403:
        raise TrackingUnavailable(
            f"tracking.uri={uri}: {who or 'this user'} may not read the experiment "
            f"'{experiment}' there (403); {ask_admin}"
        )
    experiment_id = _json(found).get("experiment", {}).get("experiment_id")
    if not experiment_id:
        return  # not there yet: created on first use
    user = _json(_ask(uri, "/api/2.0/mlflow/users/current")).get("user", {})
    if not user.get("username") or user.get("is_admin"):
        return  # no auth app, or the admin: nothing more to ask
    granted = _ask(
        uri,
        "/api/3.0/mlflow/users/permissions/get",
        username=user["username"],
        resource_type="experiment",
        resource_id=experiment_id,
    )
    permission = _json(granted).get("permission")
    if permission is not None and permission not in WRITE:
        raise TrackingUnavailable(
            f"tracking.uri={uri}: user '{user.get('username')}' may read but not write the "
            f"experiment '{experiment}' there (permission {permission}: its runs would be "
            f"refused with 403); {ask_admin}"
        )


def _ask(uri: str, endpoint: str, **params: str) -> requests.Response:
    """GET `endpoint` with MLflow's credentials, once; the response whatever its status."""
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    try:
        return http_request(
            get_default_host_creds(uri),
            endpoint,
            "GET",
            max_retries=0,
            raise_on_status=False,
            params=params,
        )
    except mlflow.exceptions.MlflowException as e:
        raise TrackingUnavailable(
            f"tracking.uri={uri}: the server stopped answering ({str(e).splitlines()[0][:200]})"
        ) from None


def _json(response: requests.Response) -> dict:
    """A successful answer's JSON; {} for any other (a refusal, a route this server lacks)."""
    try:
        body = response.json() if response.status_code == 200 else {}
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def _who(uri: str) -> str | None:
    """The credentials MLflow sends, in words, never the secret."""
    from mlflow.utils.credentials import get_default_host_creds

    creds = get_default_host_creds(uri)
    if creds.username and creds.password:  # MLflow sends neither without the other
        return f"user '{creds.username}'"
    return "the token in MLFLOW_TRACKING_TOKEN" if creds.token else None


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


def search_all(
    client: MlflowClient, experiment_ids: list[str], filter_string: str = ""
) -> list[Run]:
    """Every run that matches: one MLflow search returns one page (at most 1,000 runs)."""
    return get_results_from_paginated_fn(
        lambda n, token: client.search_runs(
            experiment_ids, filter_string, max_results=n, page_token=token
        ),
        SEARCH_MAX_RESULTS_DEFAULT,
    )


def latest_metrics(client: MlflowClient, run_id: str) -> dict[str, Metric]:
    """The run's latest point of each metric (the one at its highest step), in one call."""
    return {
        m.key: Metric(m.key, m.value, m.timestamp, m.step)
        for m in client.get_run(run_id).data.to_proto().metrics
    }


def image_steps(client: MlflowClient, run_id: str) -> dict[str, int]:
    """The highest step of each key of the run's step-wise images (`log_image(key=, step=)`),
    read from the file names MLflow gives them, as its UI does (either separator it has used)."""
    steps: dict[str, int] = {}
    for f in client.list_artifacts(run_id, "images"):
        if m := _IMAGE.match(f.path):
            key = m["key"].replace("~", "/").replace("#", "/")  # MLflow allows neither in a key
            steps[key] = max(steps.get(key, -1), int(m["step"]))
    return steps


def log_changed(
    client: MlflowClient, run_id: str, metrics: dict[str, float], supersede: str | None = None
) -> int:
    """Log each of `metrics` that differs from the run's latest value, at the step after that
    one: a report made again, or a sweep continued, adds no second point at a step. The run's
    other metrics whose names start with `supersede` get NaN as their latest value: no longer
    current. MLflow has no call that deletes a metric. Returns the number of points logged."""
    latest = latest_metrics(client, run_id)
    now = int(time.time() * 1000)
    points = [
        Metric(key, value, now, latest[key].step + 1 if key in latest else 0)
        for key, value in metrics.items()
        if key not in latest or not _same(latest[key].value, value)
    ]
    if supersede:
        points += [
            Metric(key, math.nan, now, last.step + 1)
            for key, last in latest.items()
            if key.startswith(supersede) and key not in metrics and not math.isnan(last.value)
        ]
    for start in range(0, len(points), _BATCH):
        client.log_batch(run_id, metrics=points[start : start + _BATCH])
    return len(points)


def _same(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))
