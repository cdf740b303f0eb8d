"""A sweep is one MLflow parent run with a child run per job.

The parent is created once, in the launching process, by a Hydra callback, which writes its id
into the sweep folder. Each job's `tracking.parent_run_id` resolves to that id through the
config, whatever launcher runs the job (in-process, joblib workers, submitit on a cluster sharing
the folder), so no environment variable has to reach the workers.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shlex
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from vaeexp.config import is_where_or_how
from vaeexp.paths import EARLIER_FILE, PARENT_FILE, earlier_sweeps, parent_run_id

log = logging.getLogger(__name__)


_CURRENT: dict[str, str] = {}  # this process's sweep: its store and parent run (interrupted())


def sweep_identity(overrides: list[str]) -> str:
    """What makes two sweep commands one sweep for `resume=auto`: their overrides, less those
    that change nothing trained (config.WHERE_OR_HOW: where it logs, `resume` itself...)."""
    kept = sorted(o for o in overrides if not is_where_or_how(o.lstrip("+~").split("=", 1)[0]))
    return hashlib.sha1(" ".join(kept).encode()).hexdigest()[:16]


def interrupted() -> bool:
    """After Ctrl-C or SIGTERM in a sweep's launching process: its parent run is KILLED, and one
    line says how to continue it. False outside a sweep."""
    parent, uri = _CURRENT.get("parent"), _CURRENT.get("uri")
    if not parent:
        return False
    from mlflow.tracking import MlflowClient

    with contextlib.suppress(Exception):  # a store that is down must not hide the next line
        MlflowClient(uri).set_terminated(parent, "KILLED")
    args = [*sys.argv[1:], *([] if "resume=auto" in sys.argv else ["resume=auto"])]
    again = f"python -m vaeexp {shlex.join(args)}"
    print(
        f"vaeexp: sweep interrupted; its parent run {parent} is KILLED. To continue it (finished "
        f"jobs are kept, stopped ones continue from their checkpoints): {again}",
        file=sys.stderr,
    )
    return True


def _earlier_parent(client: Any, experiment: str, identity: str) -> Any:
    found = client.search_runs(
        [experiment],
        f"tags.sweep_identity = '{identity}'",
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


def _best_group(client: Any, parent: str, summary: Path) -> str | None:
    """Over seeds, the setting to believe is the group with the best mean, not the luckiest run:
    say it (from the report's summary) and tag the parent with it. None if runs were not
    grouped."""
    try:
        data = json.loads(summary.read_text())
    except (OSError, ValueError):
        return None
    groups = {k: g for k, g in data.get("groups", {}).items() if g.get("test/loss", {}).get("n")}
    if not data.get("grouped_by") or not groups:
        return None
    label, group = min(groups.items(), key=lambda kv: kv[1]["test/loss"]["mean"])
    loss = group["test/loss"]
    client.set_tag(parent, "best_group", label)
    spread = f" ± {loss['std']:.2f}" if "std" in loss else ""
    return (
        f"best setting {label}: test loss {loss['mean']:.2f}{spread} nats per image, mean over "
        f"{int(loss['n'])} runs"
    )


def _check_launcher(config: DictConfig) -> None:
    """A SLURM request no node can hold stops here, before the parent run exists."""
    from omegaconf import OmegaConf

    from vaeexp.slurm import TARGET, check_request
    from vaeexp.validate import ConfigError

    if config.hydra.launcher.get("_target_") != TARGET:
        return
    try:
        check_request(OmegaConf.to_container(config.hydra.launcher, resolve=True))
    except ConfigError as e:
        print(f"vaeexp: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


class SweepRun(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if config.dry_run:
            return
        # Imported here: Hydra builds this callback for every run, and a single run or a config
        # error should not pay for MLflow before it needs it.
        from mlflow.tracking import MlflowClient

        from vaeexp.tracking.naming import run_name
        from vaeexp.tracking.store import TrackingUnavailable, check_reachable, experiment_for

        uri = config.tracking.uri
        try:
            check_reachable(uri, config.tracking.experiment)  # before the parent run exists
        except TrackingUnavailable as e:  # Hydra would turn it into a warning and launch anyway
            print(f"vaeexp: error: {e}", file=sys.stderr)
            raise SystemExit(1) from None
        _check_launcher(config)
        client = MlflowClient(uri)
        experiment = experiment_for(client, config.tracking)
        folder = Path(config.hydra.sweep.dir)
        folder.mkdir(parents=True, exist_ok=True)
        overrides = list(config.hydra.overrides.task)
        identity = sweep_identity(overrides)
        earlier = _earlier_parent(client, experiment, identity) if config.resume == "auto" else None
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
                    "sweep_identity": identity,
                },
            ).info.run_id
            client.log_param(parent, "sweep.overrides", " ".join(overrides))
            log.info("sweep parent run %s in %s", parent, uri)
        (folder / PARENT_FILE).write_text(parent)
        _CURRENT.update(uri=uri, parent=parent)
        self._resolve_data_once(config)

    @staticmethod
    def _resolve_data_once(config: DictConfig) -> None:
        """MNIST may fall back to the bundled digits: find out (and download) once here, so a
        sweep warns once, not once per job; its jobs then find the files in the cache."""
        if config.data.name.value != "mnist" or not config.data.fallback:
            return
        from omegaconf import OmegaConf

        from vaeexp.data import load_data

        load_data(OmegaConf.to_object(config.data), progress=False)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from mlflow.tracking import MlflowClient

        from vaeexp.compare import report
        from vaeexp.tracking.links import how_to_open

        parent = parent_run_id(Path(config.hydra.sweep.dir))
        if parent is None:
            return
        client = MlflowClient(config.tracking.uri)
        experiment = client.get_run(parent).info.experiment_id
        children = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent}'")
        finished = [
            r for r in children if r.info.status == "FINISHED" and "test/loss" in r.data.metrics
        ]
        if finished:
            best = min(finished, key=lambda r: r.data.metrics["test/loss"])
            client.set_tag(parent, "best_child_run_id", best.info.run_id)
            client.set_tag(parent, "best_child", best.info.run_name)
            client.log_metric(parent, "best_test_loss", best.data.metrics["test/loss"])
        failed = len(children) - len(finished)
        client.set_tag(parent, "children", f"{len(children)} ({failed} not finished)")
        out = Path(config.hydra.sweep.dir) / "report"
        if children:
            try:  # Hydra would turn an exception here into a warning: say it plainly instead
                report(client, out, parent=parent)
                log.info(
                    "sweep report: %s (logged to the parent run's report/)", out / "report.html"
                )
            except Exception as e:
                log.error("the sweep's comparison report failed: %s: %s", type(e).__name__, e)
        client.set_terminated(parent, "FINISHED" if children and not failed else "FAILED")
        best_line = (
            f"best {best.info.run_name} ({best.info.run_id}), test loss "
            f"{best.data.metrics['test/loss']:.2f} nats per image"
            if finished
            else "no run finished"
        )
        group_line = _best_group(client, parent, out / "summary.json")
        if group_line:
            best_line = f"{group_line}\n  {best_line}"
        print(
            f"vaeexp: sweep of {len(children)} runs ({failed} not finished), parent run {parent}\n"
            f"  {best_line}\n"
            f"  report: {out / 'report.html'}\n"
            f"  open:   {how_to_open(config.tracking.uri, experiment, parent)}"
        )
