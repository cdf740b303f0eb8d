"""The process a run trains in, set up once: the allocator, MLflow's environment, the CPU's
float mode and threads, the device, and the signals that stop training between two steps.

Light on purpose: the entry point calls `prepare` before Hydra composes anything, and torch is
imported only by the functions that need it.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

# The reason a cluster job stops with when it will come back (requeued after preemption or a
# signal before its time limit): its MLflow run waits as SCHEDULED, not KILLED.
REQUEUED = "requeued"


class StopFlag:
    """Set by a signal handler while the loop runs, so training stops between two steps and never
    in the middle of a checkpoint write or an MLflow call."""

    def __init__(self) -> None:
        self.active = False
        self.requested: str | None = None
        self.pending: str | None = None  # asked for before the loop started (defer=True)

    @contextmanager
    def armed(self) -> Iterator[None]:
        self.active, self.requested, self.pending = True, self.pending, None
        try:
            yield
        finally:
            self.active = False

    def request(self, reason: str, defer: bool = False) -> bool:
        """True if the loop will stop at the next step; False if the caller must stop itself.
        With `defer`, a request made before the loop starts stops it after its first step (a
        cluster job signalled while it imports or loads data still leaves a checkpoint)."""
        if not self.active or self.requested:
            if defer and not self.active:
                self.pending = reason
            return False
        self.requested = reason
        return True

    def check(self) -> None:
        if self.requested:
            raise KeyboardInterrupt(self.requested)


STOP = StopFlag()  # the process's one flag: armed by the training loop, set by signal handlers
_prepared = False


def prepare(signals: bool = False) -> None:
    """Everything a process does once before it trains; safe to call again (a launcher's worker
    runs the task without the entry point). `signals`: the main process's Ctrl-C and SIGTERM
    stop training after the current step, and a second one stops it at once."""
    global _prepared
    if signals:
        for sig in (signal.SIGINT, signal.SIGTERM):  # a scheduler's stop ends the run KILLED
            signal.signal(sig, _on_signal)
    if _prepared:
        return
    _prepared = True
    steady_memory()
    quiet_mlflow()


def _on_signal(signum: int, frame: Any) -> None:
    name = signal.Signals(signum).name
    if STOP.request(name):
        print(f"vaeexp: {name}: stopping after this step (again to stop now)", file=sys.stderr)
        return
    raise KeyboardInterrupt(name)


def steady_memory() -> None:
    """Pin glibc's mmap threshold at 4 MiB. By default glibc raises it after large blocks are
    freed, so later large tensors (the end-of-run IWAE pass) come from the heap and fragment it,
    by a different amount in every run. Pinned, tensors over 4 MiB live in their own mappings,
    returned to the OS on free; training-step tensors are far smaller. Pinning also freezes the
    trim threshold at 128 KiB, so every freed tensor of a few MiB would go back to the OS and
    fault its pages in again on the next step: keep up to 32 MiB of free heap instead."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to do
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-1, 32 << 20)  # -1: M_TRIM_THRESHOLD
        libc.mallopt(-3, 4 << 20)  # -3: M_MMAP_THRESHOLD


def quiet_mlflow() -> None:
    """No progress bars or chatter of MLflow's own between our log lines, and none of its "View
    run" lines against a server: their links open the UI's GenAI view, where our summaries' links
    open the model-training one (a user's setting wins)."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    # Its system-metrics monitor says at INFO that it starts, stops, and finds no GPU.
    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)


def cpu_settings(flush_denormal: bool, threads: int = 0) -> None:
    """Call before torch's first op: its OpenMP threads, and the film's worker, copy this
    thread's floating-point mode when they start. Subnormal floats (saturated pixels make them
    late in training) each cost the CPU a microcode assist."""
    import torch

    torch.set_flush_denormal(flush_denormal)  # returns False where unsupported: nothing to do
    if threads:
        torch.set_num_threads(threads)


def job_threads(threads: int, launcher: Any = None) -> int:
    """torch threads for this job: `runtime.threads` if set; else, under a launcher that runs
    jobs side by side (its Hydra config: `launcher`), this job's share of the cores, since
    oversubscribed OpenMP threads spin against each other; else 0, torch's default (one per
    core)."""
    if threads:
        return threads
    launcher = launcher or {}
    target = str(launcher.get("_target_", ""))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cores = cores or 1
    if target.endswith("JoblibLauncher"):
        import joblib

        parallel = joblib.effective_n_jobs(int(launcher.get("n_jobs") or -1))
        return max(1, cores // parallel)
    if "submitit" in target:  # each job's own allocation; submitit_local starts all at once
        return int(launcher.get("cpus_per_task") or 1)
    if target.endswith("StackedLauncher") and (launcher.get("parallel_groups") or 1) > 1:
        return max(1, cores // int(launcher.get("parallel_groups")))  # groups side by side
    return 0


def pick_device(name: str) -> torch.device:
    """`auto`: CUDA, else Apple's MPS, else the CPU."""
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(name)


def seconds_since_start() -> float:
    """Wall seconds since this process started (what a user waits before training begins)."""
    try:
        import psutil

        return time.time() - psutil.Process().create_time()
    except ImportError:  # a bare GPU node's environment: since this module was imported
        return time.time() - _IMPORTED


_IMPORTED = time.time()
