"""The runs a report compares, read through MLflow's client: which, their settings, their final
metrics, test-loss curves and films."""

from __future__ import annotations

import logging
import math
import shlex
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
from mlflow.entities import Run
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
from mlflow.tracking import MlflowClient

from vaeexp.config import identity
from vaeexp.film.render import FILM_ARTIFACT, FILM_FOLDER, FINAL_FRAME_ARTIFACT
from vaeexp.paths import PARENT_FILE, parent_run_id
from vaeexp.tracking.store import search_all

log = logging.getLogger(__name__)

METRICS = ("test/loss", "test/recon", "test/kl", "test/neg_elbo")
IWAE_PREFIX = "test_nll_iwae_k"  # the end-of-run IWAE bound, test_nll_iwae_k{k}
SEED = "seed"
TAG = "tags."  # a grouping key naming a run's tag rather than a setting


@dataclass
class Row:
    run_id: str
    name: str
    status: str  # FINISHED, FAILED, KILLED, RUNNING; DIVERGED for a FAILED run that diverged
    values: dict[str, str]
    metrics: dict[str, float]
    epochs: int
    wall_s: float | None
    tags: dict[str, str] = field(default_factory=dict)
    artifact_uri: str = ""
    curve: list[tuple[int, float]] = field(default_factory=list)
    frame: Path | None = None  # the final latent frame
    film: Path | None = None  # latent.gif

    @property
    def ok(self) -> bool:
        """Finished with a final test loss: the runs that statistics are taken over."""
        return self.status == "FINISHED" and "test/loss" in self.metrics


def runs_for(
    client: MlflowClient,
    *,
    parent: str | None = None,
    experiment: str | None = None,
    filter_string: str | None = None,
) -> tuple[Run | None, list[Run]]:
    """(the parent run or None, the runs to compare): a sweep's children, or an experiment's
    runs that are not sweep parents; either narrowed by an MLflow search filter."""
    where = [filter_string] if filter_string else []
    if parent:
        top = client.get_run(parent)
        where.insert(0, f"tags.mlflow.parentRunId = '{parent}'")
        return top, search_all(client, [top.info.experiment_id], " AND ".join(where))
    exp = client.get_experiment_by_name(experiment or "vaeexp")
    if exp is None:
        raise LookupError(f"no experiment named {experiment!r}")
    runs = search_all(client, [exp.experiment_id], " AND ".join(where))
    parents = {r.data.tags.get("mlflow.parentRunId") for r in runs}
    return None, [  # sweeps' parents are not runs to compare
        r for r in runs if r.info.run_id not in parents and "sweep.overrides" not in r.data.params
    ]


def overrides_of(run: Run) -> dict[str, str]:
    """The run's overrides that change what it trains."""
    return dict(identity(shlex.split(run.data.tags.get("hydra_overrides", ""))))


def has_setting(run: Run, key: str) -> bool:
    """Whether the run logged the setting, as a param, an override or a tag (see value_of)."""
    if key.startswith(TAG):
        return key.removeprefix(TAG) in run.data.tags
    params = run.data.params
    return key in params or f"{key}.name" in params or key in overrides_of(run)


def value_of(run: Run, key: str) -> str:
    """A setting's value: the logged param (the resolved config, spelled the same whichever
    sweep or command set it), else the override (a config group: `data` is `data.name`), else
    empty (a run that logged no such param, as a job that failed before its run started).
    `tags.NAME` is a tag's value, such as `tags.mlflow.source.git.commit` to tell runs before and
    after a change apart."""
    if key.startswith(TAG):
        return run.data.tags.get(key.removeprefix(TAG), "")
    params = run.data.params
    for name in (key, f"{key}.name"):
        if name in params:
            return params[name]
    return overrides_of(run).get(key, "")


def swept_keys(runs: list[Run]) -> list[str]:
    """The settings overridden in some run (where/how settings such as `runtime.threads` left
    out) whose values differ between the runs, in the order they were given; all of them when
    none differ."""
    keys: list[str] = []
    for run in runs:
        keys += [k for k in overrides_of(run) if k not in keys]
    differ = [k for k in keys if len({value_of(r, k) for r in runs}) > 1]
    return differ or keys


def iwae_key(runs: list[Run]) -> str | None:
    """The IWAE bound most runs have (bounds of different k do not compare)."""
    counts: dict[str, int] = {}
    for run in runs:
        for k in run.data.metrics:
            if k.startswith(IWAE_PREFIX):
                counts[k] = counts.get(k, 0) + 1
    return max(counts, key=lambda k: (counts[k], k)) if counts else None


def collect(
    client: MlflowClient, runs: list[Run], keys: list[str], folder: Path, workers: int = 8
) -> list[Row]:
    """A Row per run, best first; curves and films fetched side by side (each is a round trip
    to the store, which a tracking server answers in parallel)."""
    iwae = iwae_key(runs)
    rows = [_row(run, keys, iwae) for run in runs]
    with ThreadPoolExecutor(max(1, workers)) as pool:
        list(pool.map(lambda r: _fetch(client, r, folder / r.run_id), rows))
    rows.sort(key=lambda r: (r.metrics.get("test/loss", math.inf), r.name))
    return rows


def _row(run: Run, keys: list[str], iwae: str | None) -> Row:
    info, data = run.info, run.data
    status = info.status
    if status == "FAILED" and data.tags.get("diverged") == "true":
        status = "DIVERGED"
    end = info.end_time or None
    wall = (end - info.start_time) / 1000 if end and info.start_time else None
    wanted = (*METRICS, iwae) if iwae else METRICS
    metrics = {k: data.metrics[k] for k in wanted if k in data.metrics}
    if iwae in metrics:
        metrics["iwae"] = metrics.pop(iwae)
    return Row(
        run_id=info.run_id,
        name=info.run_name or info.run_id[:8],
        status=status,
        values={k: value_of(run, k) for k in keys},
        metrics=metrics,
        epochs=int(data.metrics.get("epoch", 0)),
        wall_s=wall,
        tags=dict(data.tags),
        artifact_uri=info.artifact_uri,
    )


def _fetch(client: MlflowClient, row: Row, into: Path) -> None:
    """The run's test-loss curve, final latent frame and film. Artifacts are read from the
    run's artifact store directly: the client would look the run up again for every file."""
    try:
        history = client.get_metric_history(row.run_id, "test/loss")
        row.curve = sorted((m.step, m.value) for m in history)
    except mlflow.exceptions.MlflowException as e:
        log.warning("run %s: its test-loss curve could not be read (%s)", row.run_id, e)
    into.mkdir(parents=True, exist_ok=True)
    try:
        repo = get_artifact_repository(row.artifact_uri, tracking_uri=client.tracking_uri)
        films = {f.path for f in repo.list_artifacts(FILM_FOLDER)}
        if FINAL_FRAME_ARTIFACT in films:
            row.frame = Path(repo.download_artifacts(FINAL_FRAME_ARTIFACT, str(into)))
        if FILM_ARTIFACT in films:
            row.film = Path(repo.download_artifacts(FILM_ARTIFACT, str(into)))
    except (mlflow.exceptions.MlflowException, OSError) as e:
        log.warning("run %s: its film could not be read (%s)", row.run_id, e)


def parent_of_sweep(folder: Path) -> str:
    parent = parent_run_id(folder)
    if parent is None:
        raise LookupError(
            f"{folder}: no {PARENT_FILE} here; is this a sweep folder (runs/multirun/...)?"
        )
    return parent
