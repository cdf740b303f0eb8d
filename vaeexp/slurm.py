"""Sweeps on SLURM that behave like the cluster: `hydra/launcher=slurm` is Hydra's submitit
launcher with what it lacks.

- Before anything is submitted, the request is compared with what the partition's nodes have
  (`sinfo`): a job no node can run would sit in PENDING forever, so it stops with one line.
- Waiting for the jobs, Ctrl-C or SIGTERM cancels them (`scancel`) and says which.
- In a job, SIGTERM (a requeue, `scancel --signal=TERM`, preemption) or submitit's USR2 (the time
  limit is near) stops training after the step, which writes the checkpoint. A job SLURM is not
  already requeuing or cancelling is requeued by submitit's own checkpoint/requeue handler, and
  a restarted job resumes from its own folder, into the same MLflow run.

The signals and `scontrol`/`squeue` calls are SLURM's and submitit's; only the decision of what
a signal means for the run (come back, or stop for good) is ours.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra_plugins.hydra_submitit_launcher import submitit_launcher

from vaeexp.process import REQUEUED, STOP
from vaeexp.validate import ConfigError

log = logging.getLogger(__name__)
TARGET = "hydra_plugins.vaeexp_launcher.SlurmLauncher"  # Hydra takes plugins only from there


@dataclass(frozen=True)
class Node:
    name: str
    cpus: int
    mem_mb: int
    gpus: int


def partition_nodes(partition: str | None) -> list[Node]:
    """The nodes of `partition` (the default one if None), as `sinfo` reports them."""
    try:
        out = subprocess.run(
            ["sinfo", "-h", "-N", "-o", "%N|%c|%m|%G|%P"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise ConfigError(
            f"hydra/launcher=slurm: cannot ask SLURM what its nodes have (sinfo: {e}); "
            "is this a SLURM login node?"
        ) from None
    nodes = []
    for line in out.splitlines():
        name, cpus, mem, gres, part = line.split("|")
        if part.rstrip("*") == partition if partition else part.endswith("*"):
            nodes.append(Node(name, int(cpus), int(mem.rstrip("+")), _gpus(gres)))
    return nodes


def _gpus(gres: str) -> int:
    """GPUs in a `%G` field such as `gpu:a100:4(S:0-1)`; 0 for `(null)`."""
    total = 0
    for item in gres.split(","):
        parts = item.split("(")[0].split(":")
        if parts[0] == "gpu" and parts[-1].isdigit():
            total += int(parts[-1])
    return total


def check_request(params: dict[str, Any]) -> None:
    """Stop with one line if no node of the partition could ever run one job of the sweep."""
    partition = params.get("partition")
    nodes = partition_nodes(partition)
    where = f"partition {partition}" if partition else "the default partition"
    if not nodes:
        raise ConfigError(
            f"hydra.launcher.partition={partition}: SLURM has no such partition, or it has no "
            "nodes (see `sinfo`)"
        )
    want = {
        "cpus_per_task": (params.get("cpus_per_task") or 1) * (params.get("tasks_per_node") or 1),
        "mem_gb": (params.get("mem_gb") or 0) * 1024,
        "gpus_per_node": params.get("gpus_per_node") or 0,
    }
    has = {
        "cpus_per_task": lambda n: n.cpus,
        "mem_gb": lambda n: n.mem_mb,
        "gpus_per_node": lambda n: n.gpus,
    }
    fit = [n for n in nodes if all(has[k](n) >= v for k, v in want.items())]
    if len(fit) >= (params.get("nodes") or 1):
        return
    over = [k for k, v in want.items() if v > max(has[k](n) for n in nodes)] or list(want)
    asked = " and ".join(f"hydra.launcher.{k}={params.get(k)}" for k in over)
    offer = ", ".join(
        f"{n.name}: {n.cpus} CPUs, {n.mem_mb // 1024} GB" + (f", {n.gpus} GPUs" if n.gpus else "")
        for n in sorted(nodes, key=lambda n: (-n.cpus, -n.mem_mb))[:3]
    )
    raise ConfigError(
        f"{asked}: no node of {where} can ever run such a job ({offer}); ask for at most that"
    )


def check_launcher(launcher: Any) -> None:
    """A sweep's `hydra.launcher` config: if it is this launcher, its request is checked (above)
    in the launching process, before the sweep's parent run exists."""
    from omegaconf import OmegaConf

    if launcher.get("_target_") == TARGET:
        check_request(OmegaConf.to_container(launcher, resolve=True))


class SlurmLauncher(submitit_launcher.SlurmLauncher):
    """Hydra's submitit SLURM launcher, with the checks, cancelling and requeueing above."""

    def launch(self, job_overrides: Any, initial_job_idx: int) -> Any:
        check_request(self.params)
        logging.getLogger("submitit").addFilter(_SacctOnce())
        try:
            return super().launch(job_overrides, initial_job_idx)
        except KeyboardInterrupt:
            cancel_jobs(Path(self.params["submitit_folder"]).parent)
            raise

    def __call__(self, sweep_overrides: list[str], *args: Any) -> Any:
        """Run in the job: a restarted job resumes from its checkpoint; a signalled one stops
        after the step, and is requeued through submitit unless SLURM is already at it."""
        preemption = Preemption()
        overrides = list(sweep_overrides)
        if restarts() and not any(o.lstrip("+~").startswith("resume=") for o in overrides):
            overrides.append("resume=auto")  # its own folder's checkpoint comes first
        try:
            return super().__call__(overrides, *args)
        except KeyboardInterrupt:
            if preemption.requeue_self:
                try:
                    preemption.requeue()  # exits the process
                except Exception as e:  # submitit refused (timed out too often), scontrol failed
                    log.error("could not requeue the job (%s): resume it with resume=auto", e)
            elif preemption.comes_back:
                raise  # SLURM requeues it: no result yet, the launcher waits for its next start
            return stopped(overrides)
        except SystemExit as e:  # vaeexp's one-line errors (a bad value): no result otherwise
            if not e.code:
                raise
            ret = JobReturn(overrides=overrides, status=JobStatus.FAILED)
            ret.return_value = JobExited(f"{' '.join(overrides)}: {_last_error()}")
            return ret


class JobExited(RuntimeError):
    """A sweep's SLURM job stopped with one of vaeexp's errors; the sweep ends with it."""


def _last_error() -> str:
    """The job's own error line, from its stderr (submitit's log file)."""
    import submitit

    path = submitit.JobEnvironment().paths.stderr
    with contextlib.suppress(OSError):
        said = [x for x in path.read_text().splitlines() if x.startswith("vaeexp: error: ")]
        if said:
            return said[-1].removeprefix("vaeexp: error: ")
    return f"the job stopped; its log says why: {path}"


def stopped(overrides: list[str]) -> JobReturn:
    """The result of a job stopped for good (cancelled; its run ends KILLED): submitit writes it,
    so the launcher does not wait forever for a job that will never finish. NaN, as Hydra's
    jobs that return nothing to a sweeper."""
    ret = JobReturn(overrides=overrides, status=JobStatus.COMPLETED)
    ret.return_value = float("nan")
    return ret


class _SacctOnce(logging.Filter):
    """Without SLURM accounting, submitit warns at every poll that `sacct` failed: say it once."""

    said = False

    def filter(self, record: logging.LogRecord) -> bool:
        if "sacct" not in record.getMessage():
            return True
        if self.said:
            return False
        self.said = True
        record.msg, record.args = (
            "SLURM keeps no accounting here (sacct fails): submitit follows the jobs through "
            "their result files",
            (),
        )
        return True


def restarts() -> int:
    """How many times SLURM has started this job before (after a requeue)."""
    return int(os.environ.get("SLURM_RESTART_COUNT") or 0)


class Preemption:
    """The job's SIGTERM and USR2 handler (in place of submitit's, whose requeue it calls)."""

    def __init__(self) -> None:
        self.submitit = signal.getsignal(signal.SIGUSR2)  # checkpoint_and_try_requeue
        self.signalled: str | None = None
        self.requeue_self = False  # only signalled: nobody else will requeue it
        self.comes_back = False  # SLURM itself is requeuing it
        for sig in (signal.SIGTERM, signal.SIGUSR2):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.signalled:  # our own requeue's TERM, or SLURM repeating itself
            return
        self.signalled = signal.Signals(signum).name
        state, self.comes_back = job_fate()
        # USR2 is submitit's "time limit near": requeue, as submitit would, if SLURM won't say
        self.requeue_self = state == "RUNNING" or (state == "UNKNOWN" and signum != signal.SIGTERM)
        reason = REQUEUED if self.requeue_self or self.comes_back else self.signalled
        then = "requeued" if reason == REQUEUED else "stopped"
        log.warning(
            "%s (job %s): checkpointing after this step; the job is %s", self.signalled, state, then
        )
        # Never an exception from here: one raised mid-import leaves modules half-initialised.
        # Before training, the loop stops after its first step; after it, the job ends anyway.
        STOP.request(reason, defer=True)

    def requeue(self) -> None:
        """submitit's handler: pickles the job again (the launcher's `checkpoint`), runs
        `scontrol requeue` and exits."""
        if callable(self.submitit):
            log.warning("requeueing through submitit; the job resumes from its checkpoint")
            self.submitit(signal.SIGUSR2, None)


def job_fate() -> tuple[str, bool]:
    """This job's state as SLURM has it (RUNNING when it was only signalled; COMPLETING when it is
    being requeued or cancelled), and whether it will come back (SLURM is requeuing it)."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    # An array's first task shares the array's id, which `scontrol` would answer with every task.
    job = f"{array}_{task}" if array and task else os.environ.get("SLURM_JOB_ID", "")
    try:
        line = subprocess.run(
            ["scontrol", "show", "job", "-o", job], capture_output=True, text=True, timeout=10
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return "UNKNOWN", False
    fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
    state = fields.get("JobState", "UNKNOWN")
    return state, int(fields.get("Restarts", 0) or 0) > restarts()


def cancel_jobs(submitit_folder: Path) -> None:
    """Cancel the sweep's jobs (the ids submitit named its folders after), saying which."""
    ids = (
        sorted(
            {p.name.split("_")[0] for p in submitit_folder.glob("*") if p.name[:1].isdigit()},
            key=int,
        )
        if submitit_folder.is_dir()
        else []
    )
    if not ids:
        log.error("interrupted before any SLURM job was submitted (check with `squeue --me`)")
        return
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        subprocess.run(["scancel", *ids], capture_output=True, timeout=30)
    log.error(
        "interrupted: cancelled the sweep's SLURM jobs (scancel %s); they checkpoint as they stop",
        " ".join(ids),
    )
