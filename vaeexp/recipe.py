"""One training job, as a recipe: `plan`, `run`, `finish`, the steps `python -m vaeexp` takes.

- `plan`: check the config (nothing is loaded and no MLflow run exists before it passes), pick
  the device, and say for each member which checkpoint it continues, which unfinished MLflow run
  it adopts, or that it has finished already.
- `run`: load the data, open each member's MLflow run and train it, its callbacks logging
  metrics, epoch images and the film.
- `finish`: the final metrics (the IWAE bound), the checkpoint and models into the run, the end
  of the run, and its summary.

A job trains a list of *members*, one setting each; every launcher gives a job one today. Leaving
the `with` block ends every run the recipe opened with a status (FINISHED, FAILED, KILLED), and
records a sweep's job that failed before its run existed, so that its sweep counts it.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from vaeexp import checkpoint, process
from vaeexp.config import Config, settings
from vaeexp.data import Dataset, load_data
from vaeexp.film import filming
from vaeexp.likelihood import iwae_metrics
from vaeexp.paths import earlier_sweeps, multirun, sweep_folder
from vaeexp.step import Diverged
from vaeexp.tracking.links import run_summary
from vaeexp.tracking.run import TrackedRun, failed_before_its_run, tracked_run
from vaeexp.tracking.store import (
    TrackingUnavailable,
    check_reachable,
    finished_run,
    unfinished_run_in,
)
from vaeexp.trainer import Result, train
from vaeexp.validate import validate

log = logging.getLogger(__name__)


@dataclass
class Member:
    """One setting a job trains: its config, its folder, and where it continues from."""

    cfg: Config
    overrides: list[str]  # the command line's, which name its run
    output_dir: Path
    resume: dict[str, Any] | None = None  # the checkpoint it continues
    adopted_run_id: str | None = None  # its unfinished run, stopped before a first checkpoint
    finished: bool = False  # trained and finished already: nothing to train
    test_loss: float | None = None  # its final test loss, once known

    @property
    def checkpoint_path(self) -> Path | None:
        return self.output_dir / checkpoint.FILENAME if self.cfg.checkpoint else None


@dataclass
class Trained:
    member: Member
    run: TrackedRun
    result: Result
    final_metrics: dict[str, float] = field(default_factory=dict)  # what only the end measures


def recipe_main(cfg: DictConfig) -> list[float | None]:
    """Train the job Hydra composed; the final test loss of each member, which sweepers minimise."""
    with Recipe(cfg) as recipe:
        recipe.plan()
        recipe.run()
        return recipe.finish()


class Recipe:
    """The steps of one job, in order: `plan`, `run`, `finish`; a context manager, so that
    whatever happens in between, every MLflow run it opened ends with a status."""

    def __init__(self, cfg: DictConfig) -> None:
        hc = HydraConfig.get()
        self.cfg = cfg
        self.multirun = multirun()
        self.job = f"job {hc.job.num}" if self.multirun else "run"
        self.overrides = list(hc.overrides.task)
        self.output_dir = Path(hc.runtime.output_dir)
        self.members: list[Member] = []
        self.device = torch.device("cpu")
        self.data: Dataset | None = None
        self.trained: list[Trained] = []
        self._runs = contextlib.ExitStack()  # each member's open MLflow run

    def __enter__(self) -> Recipe:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        try:
            return self._runs.__exit__(kind, error, tb)
        finally:
            failed = isinstance(error, Exception) and not isinstance(error, Diverged)
            if failed and self.multirun:
                self._record_failure(error)

    def plan(self) -> None:
        validate(self.cfg)  # before any data is loaded or any MLflow run is created
        if self.cfg.dry_run:
            overrides = " ".join(self.overrides) or "(defaults)"
            print(f"vaeexp: dry run: {self.job} is valid: {overrides}")
            return
        member = Member(settings(self.cfg), self.overrides, self.output_dir)
        typed = member.cfg
        launcher = HydraConfig.get().launcher if self.multirun else None
        runtime = typed.runtime
        process.cpu_settings(runtime.flush_denormal, process.job_threads(runtime.threads, launcher))
        self.device = process.pick_device(runtime.device.value)
        # Seconds, not minutes of retries, and before any work: credentials and write access too.
        check_reachable(typed.tracking.uri, typed.tracking.experiment)
        if typed.resume:
            _plan_resume(member)
        self.members = [member]

    def run(self) -> None:
        to_train = [m for m in self.members if not m.finished]
        if not to_train:
            return
        # The members of a job share their data. In a sweep, the launching process has said
        # once where it comes from (vaeexp.sweep).
        first = to_train[0].cfg
        quiet = not self.multirun
        self.data = load_data(first.data, progress=first.runtime.progress, warn_fallback=quiet)
        for member in to_train:
            self.trained.append(self._train(member, self.data))

    def finish(self) -> list[float | None]:
        for trained in self.trained:
            cfg, result, test_x = trained.member.cfg, trained.result, self.data.test_x
            final = iwae_metrics(result.model, test_x, cfg.iwae.k, cfg.iwae.images)
            trained.final_metrics = final
            trained.member.test_loss = float(result.metrics["test/loss"])
            trained.run.finish(result, test_x, final, trained.member.checkpoint_path)
        self._runs.close()  # each run ends FINISHED, its last metrics delivered
        if not self.multirun:  # a sweep ends with one summary of its own (vaeexp.sweep)
            for trained in self.trained:
                run, folder = trained.run, str(trained.member.output_dir)
                metrics = trained.result.metrics | trained.final_metrics
                print(run_summary(run.name, run.run_id, "finished", metrics, folder, run.opener()))
        return [m.test_loss for m in self.members] or [float("nan")]  # a dry run has none

    def _train(self, member: Member, data: Dataset) -> Trained:
        cfg, device = member.cfg, self.device
        continued = member.resume.get("mlflow_run_id") if member.resume else member.adopted_run_id
        run = self._runs.enter_context(
            tracked_run(cfg, data, device, member.output_dir, member.overrides, continued)
        )
        with filming(cfg, data, run.logger, member.output_dir / "film", device) as film:
            result = train(
                cfg,
                data,
                device,
                callbacks=[*run.callbacks, *([film] if film else [])],
                checkpoints=checkpoint.Checkpoints(
                    member.checkpoint_path, member.resume, {"mlflow_run_id": run.run_id}
                ),
                stop=process.STOP,
            )
        return Trained(member, run, result)

    def _record_failure(self, error: BaseException) -> None:
        """A sweep's job that failed before its MLflow run existed leaves a FAILED one (unless
        the store itself is what failed). Not in a dry run, which has no parent run."""
        try:
            tracking = settings(self.cfg).tracking
            if tracking.parent_run_id and not isinstance(error, TrackingUnavailable):
                failed_before_its_run(tracking, self.overrides, self.output_dir, error)
        except Exception as e:  # the job's own error is the one to tell
            log.warning("this job's failure is not in MLflow (%s: %s)", type(e).__name__, e)


def _plan_resume(member: Member) -> None:
    """Which checkpoint `member` continues, or which unfinished run it adopts; whether it has
    finished already. A sweep's job continues only its own sweep's runs."""
    cfg = member.cfg
    sweep = sweep_folder()
    earlier = earlier_sweeps(sweep) if sweep else None
    runs = Path(cfg.paths.runs)
    path = checkpoint.resolve(cfg.resume, cfg, runs, member.output_dir, earlier)
    if path is None:
        folders = checkpoint.job_folders(cfg, member.output_dir, earlier or [])
        if cfg.resume == "auto":
            member.adopted_run_id = unfinished_run_in(cfg.tracking, folders)
        log.info(
            "resume=auto: no checkpoint of this configuration yet; starting afresh%s",
            f" in its unfinished run {member.adopted_run_id}" if member.adopted_run_id else "",
        )
        return
    log.info("resuming from %s", path)
    member.resume = checkpoint.load(path)
    done = finished_run(cfg.tracking.uri, member.resume, cfg.epochs)
    if done:
        print(
            f"vaeexp: {done} ({member.resume['mlflow_run_id']}) already trained its "
            f"{member.resume['epoch']} epochs and finished: nothing to train"
        )
        member.finished = True
        member.test_loss = float(member.resume["metrics"]["test/loss"])
