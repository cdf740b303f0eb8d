"""A sweep is one MLflow parent run with a child run per job.

The parent is created once, in the launching process, by a Hydra callback, which writes its id
into the sweep folder. Each job's `tracking.parent_run_id` resolves to that id through the
config, whatever launcher runs the job (in-process, joblib workers, submitit on a cluster sharing
the folder), so no environment variable has to reach the workers.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from vaeexp.config import identity, run_name
from vaeexp.paths import EARLIER_FILE, PARENT_FILE, earlier_sweeps, parent_run_id
from vaeexp.validate import ConfigError

log = logging.getLogger(__name__)


# This process's sweep until it ends: its store, parent run and folder (interrupted(), stopped()).
_CURRENT: dict[str, str] = {}


def sweep_tag(overrides: list[str]) -> str:
    """A sweep command's identity (`config.identity` of its overrides, in any order) as a short
    tag that MLflow can search: two commands with the same tag are one sweep for `resume=auto`."""
    kept = sorted(o for o in overrides if "=" not in o or identity([o]))  # `~film` included
    return hashlib.sha1(" ".join(kept).encode()).hexdigest()[:16]


def interrupted() -> bool:
    """After Ctrl-C or SIGTERM in a sweep's launching process: its parent run is KILLED, and one
    line says how to continue it. False outside a sweep."""
    parent, uri = _CURRENT.get("parent"), _CURRENT.get("uri")
    _CURRENT.clear()
    if not parent:
        return False
    from mlflow.tracking import MlflowClient

    with contextlib.suppress(Exception):  # a store that is down must not hide the next line
        MlflowClient(uri).set_terminated(parent, "KILLED")
    print(
        f"vaeexp: sweep interrupted; its parent run {parent} is KILLED. To continue it (finished "
        f"jobs are kept, stopped ones continue from their checkpoints): {_again()}",
        file=sys.stderr,
    )
    return True


def stopped() -> None:
    """After a job's error ended a sweep before Hydra's end of the sweep (the basic launcher and
    joblib stop at a job that exits, a sweeper re-raises a job's error): end it here, in the
    launching process, as that would have. Nothing if the sweep ended, or was never started."""
    parent, uri, folder = (_CURRENT.get(k) for k in ("parent", "uri", "folder"))
    if not parent:
        return
    try:
        end_sweep(uri, parent, Path(folder), stopped=True)
    except Exception as e:  # the store, gone: the job's own line stays the last word
        log.error("could not end the sweep's parent run %s: %s: %s", parent, type(e).__name__, e)


def _again() -> str:
    """The command that continues this sweep."""
    args = [*sys.argv[1:], *([] if "resume=auto" in sys.argv else ["resume=auto"])]
    return f"python -m vaeexp {shlex.join(args)}"


def _earlier_parent(client: Any, experiment: str, tag: str) -> Any:
    found = client.search_runs(
        [experiment],
        f"tags.sweep_identity = '{tag}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return found[0] if found else None


def _continue(client: Any, run: Any, folder: Path) -> str:
    """Make `folder` continue the sweep of parent `run`: its jobs will look for their checkpoints
    in the earlier sweep folders, and their runs stay children of the same parent."""
    last = Path(run.data.tags.get("sweep", ""))
    earlier = [last, *earlier_sweeps(last)] if last.name else []
    (folder / EARLIER_FILE).write_text("".join(f"{p}\n" for p in earlier))
    client.set_tag(run.info.run_id, "sweep", str(folder))
    client.update_run(run.info.run_id, status="RUNNING")
    log.info(
        "resume=auto: continuing the sweep of parent run %s (%s)", run.info.run_id, last or "?"
    )
    return run.info.run_id


def _exit(error: BaseException, code: int) -> None:
    """Hydra would turn an exception in a callback into a warning, and go on: exit instead."""
    print(f"vaeexp: error: {error}", file=sys.stderr)
    raise SystemExit(code) from None


class SweepRun(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if config.dry_run:
            return
        from vaeexp import slurm, stacked
        from vaeexp.jobs import validate_sweep

        try:  # every job, before anything is created: no parent run, no sweep folder
            jobs = validate_sweep(config)
            stacked.check_launcher(config.hydra.launcher)
        except ConfigError as e:
            _exit(e, 2)
        # Imported here: Hydra builds this callback for every run, and a single run or a config
        # error should not pay for MLflow before it needs it.
        from mlflow.tracking import MlflowClient

        from vaeexp.tracking.store import TrackingUnavailable, check_reachable, experiment_for

        uri = config.tracking.uri
        try:
            check_reachable(uri, config.tracking.experiment)  # before the parent run exists
            slurm.check_launcher(config.hydra.launcher)  # a SLURM request no node can hold
        except TrackingUnavailable as e:
            _exit(e, 1)
        except ConfigError as e:
            _exit(e, 2)
        self._resolve_data_once(jobs)
        client = MlflowClient(uri)
        experiment = experiment_for(client, config.tracking)
        folder = Path(config.hydra.sweep.dir)
        folder.mkdir(parents=True, exist_ok=True)
        overrides = list(config.hydra.overrides.task)
        tag = sweep_tag(overrides)
        earlier = _earlier_parent(client, experiment, tag) if config.resume == "auto" else None
        if earlier is not None:
            parent = _continue(client, earlier, folder)
        else:
            if config.resume == "auto":
                log.info("resume=auto: no earlier sweep of these settings; starting afresh")
            parent = client.create_run(
                experiment,
                run_name=f"sweep {run_name(overrides, ' ')}",
                tags={
                    "sweep": str(folder),
                    "hydra_overrides": " ".join(overrides),
                    "sweep_identity": tag,
                },
            ).info.run_id
            client.log_param(parent, "sweep.overrides", " ".join(overrides))
            log.info("sweep parent run %s in %s", parent, uri)
        (folder / PARENT_FILE).write_text(parent)
        _CURRENT.update(uri=uri, parent=parent, folder=str(folder))

    @staticmethod
    def _resolve_data_once(jobs: list[DictConfig]) -> None:
        """Load (and download) each data config of the sweep once here, before any run exists:
        a fallback is said once, not once per job; parallel jobs find the files in the cache
        rather than download them side by side; and data that cannot be had ends the sweep in
        one line."""
        from omegaconf import OmegaConf

        from vaeexp.data import DataUnavailable, load_data

        distinct = {OmegaConf.to_yaml(j.data): j.data for j in jobs}
        try:
            for data in distinct.values():
                load_data(OmegaConf.to_object(data), progress=False)
        except DataUnavailable as e:
            _exit(e, 1)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        folder = Path(config.hydra.sweep.dir)
        parent = parent_run_id(folder)
        if parent is not None:
            end_sweep(config.tracking.uri, parent, folder)


@dataclass
class Jobs:
    """A sweep's child runs, however many, by how they ended."""

    experiment: str
    children: list[Any]
    finished: list[Any]  # FINISHED with a final test loss
    killed: int

    @property
    def failed(self) -> int:
        return len(self.children) - len(self.finished) - self.killed

    @property
    def best(self) -> Any:
        return min(self.finished, key=lambda r: r.data.metrics["test/loss"], default=None)

    def counts(self) -> dict[str, int]:
        return {"finished": len(self.finished), "failed": self.failed, "killed": self.killed}


def tally(client: Any, parent: str) -> Jobs:
    """The parent's children, every page of them. A child still RUNNING (or SCHEDULED) when its
    sweep ends was killed: its job is over, as the launcher returned or failed, and it never
    said so to MLflow (SIGKILL, out of memory, a joblib worker that died). It ends KILLED."""
    from vaeexp.tracking.store import search_all

    experiment = client.get_run(parent).info.experiment_id
    children = search_all(client, [experiment], f"tags.mlflow.parentRunId = '{parent}'")
    killed = 0
    for run in children:
        if run.info.status in ("RUNNING", "SCHEDULED"):
            client.set_terminated(run.info.run_id, "KILLED")
        killed += run.info.status in ("RUNNING", "SCHEDULED", "KILLED")
    finished = [
        r for r in children if r.info.status == "FINISHED" and "test/loss" in r.data.metrics
    ]
    return Jobs(experiment, children, finished, killed)


def end_sweep(uri: str, parent: str, folder: Path, stopped: bool = False) -> None:
    """The end of a sweep, also of one a job's error `stopped`: the parent run gets its best
    child, the counts of its jobs as tags (`jobs.finished`, `jobs.failed`, `jobs.killed`) and the
    report of the jobs that finished, and ends FINISHED when every job finished, else FAILED."""
    from mlflow.entities import RunTag
    from mlflow.tracking import MlflowClient

    from vaeexp.compare import best_group, report
    from vaeexp.tracking.links import how_to_open
    from vaeexp.tracking.store import log_changed

    _CURRENT.clear()
    client = MlflowClient(uri)
    status = "FAILED"
    try:
        jobs = tally(client, parent)
        if jobs.children and len(jobs.finished) == len(jobs.children) and not stopped:
            status = "FINISHED"
        tags = {f"jobs.{k}": str(v) for k, v in jobs.counts().items()}
        best = jobs.best
        if best is not None:
            tags |= {"best_child_run_id": best.info.run_id, "best_child": best.info.run_name}
        client.log_batch(parent, tags=[RunTag(k, v) for k, v in tags.items()])
        if best is not None:  # a new point only when the best changed (a sweep continued)
            log_changed(client, parent, {"best_test_loss": best.data.metrics["test/loss"]})
        out = folder / "report"
        if jobs.children:
            try:  # Hydra would turn an exception here into a warning: say it plainly instead
                report(client, out, parent=parent)
                log.info(
                    "sweep report: %s (logged to the parent run's report/)", out / "report.html"
                )
            except Exception as e:
                log.error("the sweep's comparison report failed: %s: %s", type(e).__name__, e)
        group_line = best_group(client, parent, out / "summary.json")
    finally:
        client.set_terminated(parent, status)
    best_line = (
        f"best {best.info.run_name} ({best.info.run_id}), test loss "
        f"{best.data.metrics['test/loss']:.2f} nats per image"
        if best is not None
        else "no run finished"
    )
    if group_line:
        best_line = f"{group_line}\n  {best_line}"
    counts = ", ".join(f"{n} {k}" for k, n in jobs.counts().items())
    print(
        f"vaeexp: sweep of {len(jobs.children)} runs ({counts}), parent run {parent} {status}\n"
        + (f"  stopped early by a job's error; once fixed, continue it: {_again()}\n" * stopped)
        + f"  {best_line}\n"
        f"  report: {out / 'report.html'}\n"
        f"  open:   {how_to_open(uri, jobs.experiment, parent)}"
    )
