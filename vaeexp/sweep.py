"""A sweep is one MLflow parent run with a child run per job.

The parent is created once, in the launching process, by a Hydra callback, which writes its id
into the sweep folder. Each job's `tracking.parent_run_id` resolves to that id through the
config, whatever launcher runs the job (in-process, joblib workers, submitit on a cluster sharing
the folder), so no environment variable has to reach the workers.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)

PARENT_FILE = "mlflow_parent_run_id"


def sweep_folder() -> Path | None:
    """The running job's sweep folder; None outside a multirun."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    return Path(hc.sweep.dir) if hc.mode == RunMode.MULTIRUN else None


def parent_run_id() -> str | None:
    """Resolver for `tracking.parent_run_id`: the id the sweep's callback left for its jobs."""
    folder = sweep_folder()
    path = folder / PARENT_FILE if folder else None
    return path.read_text().strip() if path and path.is_file() else None


class SweepRun(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if config.dry_run:
            return
        from mlflow.tracking import MlflowClient

        from vaeexp.tracking import artifact_location, check_reachable, ensure_experiment, run_name

        uri = config.tracking.uri
        check_reachable(uri)
        client = MlflowClient(uri)
        experiment = ensure_experiment(
            client, config.tracking.experiment, artifact_location(config.tracking)
        )
        folder = Path(config.hydra.sweep.dir)
        folder.mkdir(parents=True, exist_ok=True)
        overrides = list(config.hydra.overrides.task)
        run = client.create_run(
            experiment,
            run_name=f"sweep {run_name(overrides, ' ')}",
            tags={"sweep": str(folder), "hydra_overrides": " ".join(overrides)},
        )
        client.log_param(run.info.run_id, "sweep.overrides", " ".join(overrides))
        (folder / PARENT_FILE).write_text(run.info.run_id)
        log.info("sweep parent run %s in %s", run.info.run_id, uri)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from mlflow.tracking import MlflowClient

        path = Path(config.hydra.sweep.dir) / PARENT_FILE
        if not path.is_file():
            return
        parent = path.read_text().strip()
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
        if children:
            from vaeexp.compare import report

            try:  # Hydra would turn an exception here into a warning: say it plainly instead
                out = Path(config.hydra.sweep.dir) / "report"
                report(client, out, parent=parent)
                log.info(
                    "sweep report: %s (logged to the parent run's report/)", out / "report.html"
                )
            except Exception as e:
                log.error("the sweep's comparison report failed: %s: %s", type(e).__name__, e)
        client.set_terminated(parent, "FINISHED" if children and not failed else "FAILED")
