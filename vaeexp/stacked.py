"""`hydra/launcher=stacked`: a sweep's jobs that can share one model train together, as one
stacked model (vaeexp.model), in the launching process.

On a GPU a single run of this small MLP leaves the device waiting on kernel launches; a stack
of M members makes each kernel do the work of M models, so a group of many settings trains in
a small multiple of one run's time (HFTA, Wang et al., MLSys 2021, fuses jobs the same way). On
a CPU it saves the jobs' start-ups, not their work.

Jobs form *groups*: those equal in every setting but the ones a member may have of its own
(`PER_MEMBER`: the seed, the optimizer's and the objective's scalars) and the ones only its run
reads (`PER_JOB`) train as one stack, `hydra.launcher.max_members` at most; groups train one
after another. Jobs of different shapes (`latent_dim`, `intermediate_dim`) form groups of their
own rather than being padded to the largest and masked: a padded member costs the largest
member's arithmetic, and the members' own random draws (noise of their own width) and Glorot
limits would have to be re-derived inside a wider tensor. Jobs that differ in batch size, data,
epochs, device or precision also go to different groups, since a stack steps all its members at
once over the same data.

Each member is recorded as its job alone would be (vaeexp.recipe): its folder, with Hydra's
saved config and the group's log, its MLflow run under the sweep's parent, with the tag
`stacked.group` saying which group trained it. With the Optuna sweeper, each batch of `n_jobs`
trials it asks for is one launch, so it trains as one group.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.singleton import Singleton
from hydra.core.utils import (
    JobReturn,
    JobRuntime,
    JobStatus,
    _save_config,
    configure_log,
    setup_globals,
)
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from vaeexp.config import plain, settings, without
from vaeexp.jobs import task_config

log = logging.getLogger(__name__)

TARGET = "hydra_plugins.vaeexp_launcher.StackedLauncher"  # Hydra takes plugins only from there
# What each member of a stack may have of its own: everything its step, objective and optimizer
# read as a number, and its seed (initial weights, batch order, noise).
PER_MEMBER = (
    "seed",
    "lr",
    "rho",
    "eps",
    "epsilon_std",
    "objective_scale",
    "grad_clip",
    "init",
    "kl_weight",
    "kl_warmup_epochs",
)
# What only a member's own run reads: where it continues from, what it records at its end.
PER_JOB = (
    "resume",
    "checkpoint",
    "iwae",
    "tracking.run_name",
    "tracking.log_model",
    "tracking.log_images",
    "tracking.system_metrics",
)


def check_launcher(launcher: Any) -> None:
    """A sweep's `hydra.launcher` config: if it is this launcher, its settings are checked in
    the launching process, before the sweep's parent run exists."""
    if launcher.get("_target_") != TARGET:
        return
    from vaeexp.validate import ConfigError

    for key, may_be_null in (("max_members", False), ("parallel_groups", True)):
        value = launcher.get(key)
        if value is None and may_be_null:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            allowed = "null (one per visible GPU) or " if may_be_null else ""
            raise ConfigError(
                f"hydra.launcher.{key}={value} is not allowed: must be {allowed}an integer >= 1"
            )


def group_key(task_cfg: DictConfig) -> str:
    """What the jobs of one group share: the whole config but `PER_MEMBER` and `PER_JOB`."""
    tree = plain(settings(task_cfg))
    kept = without(tree, (*PER_MEMBER, *PER_JOB))
    return OmegaConf.to_yaml(OmegaConf.create(kept))


def groups(task_cfgs: Sequence[DictConfig], max_members: int) -> list[list[int]]:
    """The jobs (by index) of each group, in the order the jobs came, `max_members` at most."""
    by_key: dict[str, list[int]] = {}
    for index, cfg in enumerate(task_cfgs):
        by_key.setdefault(group_key(cfg), []).append(index)
    out = []
    for members in by_key.values():
        out += [members[i : i + max_members] for i in range(0, len(members), max_members)]
    return out


@dataclass
class _Prepared:
    """A job set up as Hydra's `run_job` sets one up, before its group trains."""

    config: DictConfig  # the job's whole config, Hydra's node included
    ret: JobReturn
    job: Any  # vaeexp.recipe.Job


class StackedLauncher(Launcher):
    """Hydra's launcher interface; `launch` trains each group of the jobs it is given."""

    def __init__(self, max_members: int, parallel_groups: int | None) -> None:
        super().__init__()
        # Both checked before the sweep starts (check_launcher).
        self.max_members, self.parallel_groups = max_members, parallel_groups
        self.config: DictConfig | None = None
        self.task_function: TaskFunction | None = None
        self.hydra_context: HydraContext | None = None

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def launch(
        self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
    ) -> Sequence[JobReturn]:
        setup_globals()
        assert self.config is not None and self.hydra_context is not None
        check_launcher(self.config.hydra.launcher)  # a dry run's too
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        configs = []
        for offset, overrides in enumerate(job_overrides):
            config = self.hydra_context.config_loader.load_sweep_config(
                self.config, list(overrides)
            )
            with open_dict(config):
                config.hydra.job.id = config.hydra.job.num = initial_job_idx + offset
            configs.append(config)
        task_cfgs = [task_config(c) for c in configs]
        planned = groups(task_cfgs, self.max_members)
        if self.config.dry_run:
            return self._dry_run(configs, planned, initial_job_idx)
        lanes = min(parallel_groups(self.parallel_groups, task_cfgs[0]), len(planned))
        log.info(
            "stacked: %d jobs in %d groups (%s members)%s",
            len(configs),
            len(planned),
            ", ".join(str(len(g)) for g in planned),
            f", {lanes} at a time" if lanes > 1 else "",
        )
        work = [
            (
                [configs[i] for i in members],
                f"jobs {', '.join(str(initial_job_idx + i) for i in members)}",
                number,
            )
            for number, members in enumerate(planned, start=1)
        ]
        if lanes > 1:  # one process a lane (a GPU), each training its share of the groups in turn
            from joblib import Parallel, delayed

            state = Singleton.get_state()
            done = Parallel(n_jobs=lanes, backend="loky")(
                delayed(_train_lane)(self, work[lane::lanes], len(planned), lane, lanes, state)
                for lane in range(lanes)
            )
            trained = {w[2]: rets for lane in done for w, rets in lane}
        else:
            trained = {}
            for group in work:
                trained[group[2]] = self._train_group(*group, len(planned))
                configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
                _raise_if_failed(trained[group[2]])  # a group's error stops the sweep
        for rets in trained.values():
            _raise_if_failed(rets)
        returns: list[JobReturn | None] = [None] * len(configs)
        for number, members in enumerate(planned, start=1):
            for index, ret in zip(members, trained[number], strict=True):
                returns[index] = ret
        return returns  # type: ignore[return-value]

    def _dry_run(
        self, configs: list[DictConfig], planned: list[list[int]], first: int
    ) -> list[JobReturn]:
        from vaeexp.validate import validate

        for config in configs:
            validate(task_config(config))
        print(
            f"vaeexp: dry run: {len(configs)} jobs in {len(planned)} stacked groups "
            f"(hydra.launcher.max_members={self.max_members})"
        )
        for number, members in enumerate(planned, start=1):
            print(f"  group {number}: {len(members)} members")
            for i in members:
                overrides = " ".join(configs[i].hydra.overrides.task) or "(defaults)"
                print(f"    job {first + i}: {overrides}")
        returns = []
        for config in configs:
            ret = JobReturn(overrides=list(config.hydra.overrides.task), status=JobStatus.COMPLETED)
            ret.return_value = float("nan")
            returns.append(ret)
        return returns

    def _train_group(
        self, configs: list[DictConfig], label: str, number: int, total: int
    ) -> list[JobReturn]:
        """Set each job up as Hydra's run_job would (its folder, its saved config, the
        callbacks' on_job_start), train the group as one stack, and return each job's result."""
        assert self.hydra_context is not None
        callbacks = self.hydra_context.callbacks
        original = HydraConfig.instance().cfg
        prepared = [self._prepare(config, label) for config in configs]
        handlers: list[logging.Handler] = []
        try:
            HydraConfig.instance().set_config(prepared[0].config)
            configure_log(prepared[0].config.hydra.job_logging, prepared[0].config.hydra.verbose)
            handlers = _log_to_every_folder(prepared)
            log.info(
                "stacked group %d of %d: %d jobs (%s)",
                number,
                total,
                len(prepared),
                ", ".join(p.job.name for p in prepared),
            )
            for p in prepared:
                callbacks.on_job_start(config=p.config, task_function=self.task_function)
            from vaeexp.recipe import train_jobs  # torch and MLflow: only once a group trains

            try:
                values: list[Any] = list(train_jobs([p.job for p in prepared]))
                status = JobStatus.COMPLETED
            except Exception as e:  # as Hydra's run_job records a job's error; the launch then
                values, status = [e] * len(prepared), JobStatus.FAILED  # stops the sweep with it
            for p, value in zip(prepared, values, strict=True):
                p.ret.return_value, p.ret.status = value, status
                p.ret.task_name = JobRuntime.instance().get("name")
                callbacks.on_job_end(config=p.config, job_return=p.ret)
        finally:
            for handler in handlers:
                logging.root.removeHandler(handler)
                handler.close()
            HydraConfig.instance().cfg = original
        return [p.ret for p in prepared]

    def _prepare(self, config: DictConfig, label: str) -> _Prepared:
        HydraConfig.instance().set_config(config)
        output_dir = os.path.abspath(
            os.path.join(str(config.hydra.sweep.dir), str(config.hydra.sweep.subdir))
        )
        with read_write(config.hydra.runtime), open_dict(config.hydra.runtime):
            config.hydra.runtime.output_dir = output_dir
        HydraConfig.instance().set_config(config)
        task_cfg = task_config(config)
        ret = JobReturn()
        ret.cfg, ret.hydra_cfg = task_cfg, copy.deepcopy(HydraConfig.instance().cfg)
        ret.overrides = list(config.hydra.overrides.task)
        ret.working_dir = os.getcwd()
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        if config.hydra.output_subdir is not None:
            saved = Path(output_dir) / str(config.hydra.output_subdir)
            _save_config(task_config(config), "config.yaml", saved)
            _save_config(ret.hydra_cfg, "hydra.yaml", saved)
            _save_config(config.hydra.overrides.task, "overrides.yaml", saved)
        from vaeexp.recipe import Job

        name = f"job {config.hydra.job.num}"
        job = Job(task_cfg, ret.overrides, Path(output_dir), name, group=label)
        return _Prepared(config, ret, job)


def parallel_groups(chosen: int | None, task_cfg: DictConfig) -> int:
    """Groups trained at once, each in a process of its own: `hydra.launcher.parallel_groups`
    (`chosen`), or (null) one per visible GPU where the groups train on CUDA, else one."""
    if chosen is not None:
        return int(chosen)
    device = settings(task_cfg).runtime.device.value
    if device not in ("auto", "cuda"):
        return 1
    import torch

    return max(1, torch.cuda.device_count())


def _train_lane(
    launcher: StackedLauncher,
    work: list[tuple[list[DictConfig], str, int]],
    total: int,
    lane: int,
    lanes: int,
    singleton_state: dict[Any, Any],
) -> list[tuple[tuple[list[DictConfig], str, int], list[JobReturn]]]:
    """In a worker process (joblib's, as Hydra's joblib launcher runs its jobs): Hydra's state
    and vaeexp's resolvers as in the launching process, this lane's GPU (or its share of the
    CPU's cores), then its groups one after another."""
    setup_globals()
    Singleton.set_state(singleton_state)
    from vaeexp import process
    from vaeexp.config import register

    register()
    process.prepare()
    import torch

    device = settings(task_config(work[0][0][0])).runtime.device.value
    if device in ("auto", "cuda") and torch.cuda.is_available():
        torch.cuda.set_device(lane % torch.cuda.device_count())  # "cuda" is this one
    done = []
    for group in work:
        done.append((group, launcher._train_group(*group, total)))
        if any(r.status == JobStatus.FAILED for r in done[-1][1]):
            break  # the lane stops at a group's error, which stops the sweep
    return done


def _raise_if_failed(returns: list[JobReturn]) -> None:
    for ret in returns:
        if ret.status == JobStatus.FAILED:
            _ = ret.return_value  # Hydra's JobReturn raises the job's error


def _log_to_every_folder(prepared: list[_Prepared]) -> list[logging.Handler]:
    """Hydra's job logging writes the first job's log file; the group's log goes to every
    member's folder too, as each job alone would have its own."""
    first = [h for h in logging.root.handlers if isinstance(h, logging.FileHandler)]
    if not first:
        return []
    name = Path(first[0].baseFilename).name
    handlers: list[logging.Handler] = []
    for p in prepared[1:]:
        handler = logging.FileHandler(p.job.output_dir / name)
        handler.setFormatter(first[0].formatter)
        handler.setLevel(first[0].level)
        logging.root.addHandler(handler)
        handlers.append(handler)
    return handlers
