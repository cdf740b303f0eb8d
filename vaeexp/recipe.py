"""Training jobs, as a recipe: `plan`, `run`, `finish`, the steps `python -m vaeexp` takes.

- `plan`: check each job's config (nothing is loaded and no MLflow run exists before it passes),
  pick the device, and say for each member which checkpoint it continues, which unfinished MLflow
  run it adopts, or that it has finished already.
- `run`: load the data, open each member's MLflow run and train the members as one stack (the
  trainer's), their callbacks logging metrics, epoch images and the films.
- `finish`: the final metrics (the IWAE bound), the checkpoint and models into each run, the end
  of the runs, and the summary.

A recipe trains a list of *members*, one job each: a run or a sweep's job is a stack of one; the
stacked launcher (vaeexp.stacked) hands it a group of jobs that train together. Each member is
recorded as its job alone would be. Leaving the `with` block ends every run the recipe opened
with a status (FINISHED, FAILED, KILLED), and records a sweep's job that failed before its run
existed, so that its sweep counts it.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
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
from vaeexp.trainer import Callback, Result, train
from vaeexp.validate import validate

log = logging.getLogger(__name__)

DIVERGED_PENALTY = 1e4  # nats: worse than any run that trained, an untrained one included


@dataclass
class Job:
    """One job as Hydra composed it: its config, the overrides that name its run, its folder."""

    cfg: DictConfig
    overrides: list[str]
    output_dir: Path
    name: str  # "run", or "job 3" in a sweep
    group: str | None = None  # the stacked launcher's group that trains it (vaeexp.stacked)

    @classmethod
    def from_hydra(cls, cfg: DictConfig) -> Job:
        """The job Hydra is running now (its HydraConfig)."""
        hc = HydraConfig.get()
        name = f"job {hc.job.num}" if multirun() else "run"
        return cls(cfg, list(hc.overrides.task), Path(hc.runtime.output_dir), name)


@dataclass
class Member:
    """One job a stack trains: its config, its folder, and where it continues from."""

    job: Job
    cfg: Config
    resume: dict[str, Any] | None = None  # the checkpoint it continues
    adopted_run_id: str | None = None  # its unfinished run, stopped before a first checkpoint
    finished: bool = False  # trained and finished already: nothing to train
    test_loss: float | None = None  # its final test loss, once known
    run: TrackedRun | None = None
    result: Result | None = None
    final_metrics: dict[str, float] | None = None  # what only the end measures

    @property
    def output_dir(self) -> Path:
        return self.job.output_dir

    @property
    def checkpoint_path(self) -> Path | None:
        return self.output_dir / checkpoint.FILENAME if self.cfg.checkpoint else None


def recipe_main(cfg: DictConfig) -> list[float | None]:
    """Train the job Hydra composed; its final test loss, which sweepers minimise."""
    return train_jobs([Job.from_hydra(cfg)])


def train_jobs(jobs: Sequence[Job]) -> list[float | None]:
    """Train `jobs` as one stack (one group of vaeexp.stacked: a single job is a stack of one);
    each one's final test loss, DIVERGED_PENALTY for a sweep's job that diverged."""
    with Recipe(jobs) as recipe:
        recipe.plan()
        recipe.run()
        return recipe.finish()


class Recipe:
    """The steps of a stack's jobs, in order: `plan`, `run`, `finish`; a context manager, so
    that whatever happens in between, every MLflow run it opened ends with a status."""

    def __init__(self, jobs: Sequence[Job]) -> None:
        self.jobs = list(jobs)
        self.multirun = multirun()
        self.members: list[Member] = []
        self.device = torch.device("cpu")
        self.data: Dataset | None = None
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
                # Only jobs with no run of their own: one that has a run (this time, or in the
                # sweep it continues) or has finished already is counted through that run.
                known = {id(m.job) for m in self.members if m.run or m.finished or m.resume}
                known |= {id(m.job) for m in self.members if m.adopted_run_id}
                for job in self.jobs:
                    if id(job) not in known:
                        _record_failure(job, error)

    def plan(self) -> None:
        for job in self.jobs:  # before any data is loaded or any MLflow run is created
            validate(job.cfg)
        if settings(self.jobs[0].cfg).dry_run:
            for job in self.jobs:
                overrides = " ".join(job.overrides) or "(defaults)"
                print(f"vaeexp: dry run: {job.name} is valid: {overrides}")
            return
        members = [Member(job, settings(job.cfg)) for job in self.jobs]
        runtime = members[0].cfg.runtime
        launcher = HydraConfig.get().launcher if self.multirun else None
        process.cpu_settings(runtime.flush_denormal, process.job_threads(runtime.threads, launcher))
        self.device = process.pick_device(runtime.device.value)
        tracking = members[0].cfg.tracking
        # Seconds, not minutes of retries, and before any work: credentials and write access too.
        check_reachable(tracking.uri, tracking.experiment)
        for member in members:
            if member.cfg.resume:
                _plan_resume(member)
        self.members = members

    def run(self) -> None:
        to_train = [m for m in self.members if not m.finished]
        if not to_train:
            return
        # The members share their data. In a sweep, the launching process has said once where
        # it comes from (vaeexp.sweep).
        first = to_train[0].cfg
        quiet = not self.multirun
        self.data = load_data(first.data, progress=first.runtime.progress, warn_fallback=quiet)
        # Members that stopped at different steps (a resumed stack some of whose runs had
        # finished, or came new) train as stacks of their own, one after another.
        by_step: dict[int, list[Member]] = {}
        for member in to_train:
            by_step.setdefault(member.resume["step"] if member.resume else 0, []).append(member)
        for stack in by_step.values():
            self._train(stack, self.data)

    def finish(self) -> list[float | None]:
        for member in self.members:
            if member.run is None or member.result is None:
                continue
            result = member.result
            if result.diverged:  # its run ends FAILED (_FailWhenDiverged)
                member.test_loss = DIVERGED_PENALTY
                if self.multirun:  # a sweeper gets a finite value: Optuna's plugin stops on NaN
                    log.error(
                        "vaeexp: %s: %s; it scores %.0f, the sweep goes on",
                        member.job.name,
                        result.diverged,
                        DIVERGED_PENALTY,
                    )
                continue
            cfg, test_x = member.cfg, self.data.test_x
            member.final_metrics = iwae_metrics(result.model, test_x, cfg.iwae.k, cfg.iwae.images)
            member.test_loss = float(result.metrics["test/loss"])
            member.run.finish(result, test_x, member.final_metrics, member.checkpoint_path)
        self._runs.close()  # each run ends with its status, its last metrics delivered
        diverged = [m.result.diverged for m in self.members if m.result and m.result.diverged]
        if not self.multirun:  # a sweep ends with one summary of its own (vaeexp.sweep)
            if diverged:
                raise Diverged(diverged[0])
            for member in self.members:
                if member.run is None or member.result is None:
                    continue
                run, folder = member.run, str(member.output_dir)
                metrics = member.result.metrics | (member.final_metrics or {})
                print(run_summary(run.name, run.run_id, "finished", metrics, folder, run.opener()))
        return [m.test_loss for m in self.members] or [float("nan")]  # a dry run has none

    def _train(self, members: list[Member], data: Dataset) -> None:
        cfgs, device = [m.cfg for m in members], self.device
        callbacks = []
        for index, member in enumerate(members):
            resume = member.resume
            continued = resume.get("mlflow_run_id") if resume else member.adopted_run_id
            member.run = self._runs.enter_context(
                tracked_run(
                    member.cfg, data, device, member.output_dir, member.job.overrides, continued
                )
            )
            if member.job.group:  # the one thing that tells a stacked member from a job alone
                member.run.tag("stacked.group", member.job.group)
            for callback in [*member.run.callbacks, _FailWhenDiverged(member.run)]:
                callback.member = index
                callbacks.append(callback)
        loggers = [m.run.logger for m in members]
        folders = [m.output_dir / "film" for m in members]
        with filming(cfgs, data, loggers, folders, device) as film:
            results = train(
                cfgs,
                data,
                device,
                callbacks=[*callbacks, *([film] if film else [])],
                checkpoints=[
                    checkpoint.Checkpoints(
                        m.checkpoint_path, m.resume, {"mlflow_run_id": m.run.run_id}
                    )
                    for m in members
                ],
                stop=process.STOP,
            )
        for member, result in zip(members, results, strict=True):
            member.result = result


class _FailWhenDiverged(Callback):
    """A member that diverges is failed in its run at once: it ends FAILED, tagged `diverged`,
    however the others end (a later Ctrl-C, another error)."""

    def __init__(self, run: TrackedRun) -> None:
        self.run = run

    def on_diverged(self, member: int, reason: str) -> None:
        if member == self.member:
            self.run.fail(Diverged(reason))


def _record_failure(job: Job, error: BaseException) -> None:
    """A sweep's job that failed before its MLflow run existed leaves a FAILED one (unless the
    store itself is what failed). Not in a dry run, which has no parent run."""
    try:
        tracking = settings(job.cfg).tracking
        if tracking.parent_run_id and not isinstance(error, TrackingUnavailable):
            failed_before_its_run(tracking, job.overrides, job.output_dir, error)
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
