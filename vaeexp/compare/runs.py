"""The runs a report compares, read through MLflow's client: which, their swept settings, their
metrics, curves and films."""

from __future__ import annotations

import logging
import math
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from vaeexp.paths import PARENT_FILE, parent_run_id
from vaeexp.tracking.naming import trained_overrides

log = logging.getLogger(__name__)

METRICS = ("test/loss", "test/recon", "test/kl")


@dataclass
class Row:
    run_id: str
    name: str
    status: str  # FINISHED, FAILED, KILLED, RUNNING; DIVERGED for a FAILED run that diverged
    values: dict[str, str]
    metrics: dict[str, float]
    epochs: int
    wall_s: float | None
    curve: list[tuple[int, float]] = field(default_factory=list)
    frame: Path | None = None  # the final latent frame
    film: Path | None = None  # latent.gif


def runs_for(client: MlflowClient, *, parent: str | None = None, experiment: str | None = None):
    """(the parent run or None, the runs to compare) for a sweep's parent or a whole experiment."""
    if parent:
        top = client.get_run(parent)
        runs = client.search_runs(
            [top.info.experiment_id],
            f"tags.mlflow.parentRunId = '{parent}'",
            max_results=5000,
        )
        return top, runs
    exp = client.get_experiment_by_name(experiment or "vaeexp")
    if exp is None:
        raise LookupError(f"no experiment named {experiment!r}")
    runs = client.search_runs([exp.experiment_id], max_results=5000)
    parents = {r.data.tags.get("mlflow.parentRunId") for r in runs}
    return None, [r for r in runs if r.info.run_id not in parents]  # sweeps' parents: not runs


def overrides_of(run: Run) -> dict[str, str]:
    """The run's overrides that change what it trains."""
    return dict(trained_overrides(shlex.split(run.data.tags.get("hydra_overrides", ""))))


def swept_keys(runs: list[Run]) -> list[str]:
    """The settings that differ between the runs, in the order they were given."""
    keys: list[str] = []
    for run in runs:
        keys += [k for k in overrides_of(run) if k not in keys]
    values = [{**{k: None for k in keys}, **overrides_of(r)} for r in runs]
    return [k for k in keys if len({v[k] for v in values}) > 1] or keys


def collect(client: MlflowClient, runs: list[Run], keys: list[str], folder: Path) -> list[Row]:
    rows = []
    for run in runs:
        info, data = run.info, run.data
        status = info.status
        if status == "FAILED" and data.tags.get("diverged") == "true":
            status = "DIVERGED"
        end = info.end_time or None
        wall = (end - info.start_time) / 1000 if end and info.start_time else None
        values = {**{k: "" for k in keys}, **overrides_of(run)}
        row = Row(
            run_id=info.run_id,
            name=info.run_name or info.run_id[:8],
            status=status,
            values={k: values[k] for k in keys},
            metrics={
                k: v for k, v in data.metrics.items() if k in METRICS or k.startswith("test_nll")
            },
            epochs=int(data.metrics.get("epoch", 0)),
            wall_s=wall,
            curve=sorted(
                (m.step, m.value) for m in client.get_metric_history(info.run_id, "test/loss")
            ),
        )
        row.frame, row.film = _film_files(client, info.run_id, folder / info.run_id)
        rows.append(row)
    rows.sort(key=lambda r: (r.metrics.get("test/loss", math.inf), r.name))
    return rows


def _film_files(client: MlflowClient, run_id: str, into: Path) -> tuple[Path | None, Path | None]:
    """The run's last latent frame (from MLflow's image slider) and its GIF, if it has them."""
    into.mkdir(parents=True, exist_ok=True)
    frame = film = None
    try:
        images = [f.path for f in client.list_artifacts(run_id, "images")]
        latent = [p for p in images if p.startswith("images/latent+step+") and p.endswith(".png")]
        if latent:
            last = max(latent, key=lambda p: int(p.split("+")[2]))
            frame = Path(client.download_artifacts(run_id, last, str(into)))
        if any(f.path == "film/latent.gif" for f in client.list_artifacts(run_id, "film")):
            film = Path(client.download_artifacts(run_id, "film/latent.gif", str(into)))
    except (mlflow.exceptions.MlflowException, OSError) as e:
        log.warning("run %s: its film could not be read (%s)", run_id, e)
    return frame, film


def parent_of_sweep(folder: Path) -> str:
    parent = parent_run_id(folder)
    if parent is None:
        raise LookupError(
            f"{folder}: no {PARENT_FILE} here; is this a sweep folder (runs/multirun/...)?"
        )
    return parent
