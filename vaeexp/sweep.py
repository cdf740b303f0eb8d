"""A sweep is one MLflow parent run with a child run per job.

The parent is created once, in the launching process, by a Hydra callback, which writes its id
into the sweep folder. Each job's `tracking.parent_run_id` resolves to that id through the
config, whatever launcher runs the job (in-process, joblib workers, submitit on a cluster sharing
the folder), so no environment variable has to reach the workers.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from vaeexp.paths import PARENT_FILE, parent_run_id

log = logging.getLogger(__name__)


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
            check_reachable(uri)
        except TrackingUnavailable as e:  # Hydra would turn it into a warning and launch anyway
            print(f"vaeexp: error: {e}", file=sys.stderr)
            raise SystemExit(1) from None
        client = MlflowClient(uri)
        experiment = experiment_for(client, config.tracking)
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
        print(
            f"vaeexp: sweep of {len(children)} runs ({failed} not finished), parent run {parent}\n"
            f"  {best_line}\n"
            f"  report: {out / 'report.html'}\n"
            f"  open:   {how_to_open(config.tracking.uri, experiment, parent)}"
        )
