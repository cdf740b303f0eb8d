"""`python -m vaeexp`: compose the config with Hydra, train, track in MLflow.

Config and data errors end with one line naming the setting and what is allowed, and a non-zero
exit; anything else is a bug and keeps its full traceback.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from vaeexp.config import PROJECT_ROOT, ConfigError, explain, register, validate

register()
log = logging.getLogger(__name__)

DIVERGED_PENALTY = 1e4  # nats: worse than any real run (an untrained model scores ~550)


@hydra.main(version_base="1.3", config_path=str(PROJECT_ROOT / "conf"), config_name="config")
def task(cfg: DictConfig) -> float:
    """Train one configuration; returns the final test loss, which sweepers minimise."""
    from vaeexp.trainer import Diverged

    steady_memory()  # again here: joblib's and submitit's workers never run main()
    try:
        return _train(cfg)
    except Diverged as e:
        if not _multirun(HydraConfig.get()):
            _exit_with(e)
        # A sweep goes on: this job's run is FAILED and tagged `diverged`; a sweeper gets a finite
        # value (the Optuna plugin we can install crashes the whole study on NaN).
        log.error("vaeexp: %s; this job scores %.0f, the sweep goes on", e, DIVERGED_PENALTY)
        return DIVERGED_PENALTY
    except _user_errors() as e:
        if os.environ.get("VAEEXP_TRACEBACK") == "1":
            raise
        # SystemExit passes through Hydra, which would print a banner above any Exception.
        _exit_with(e)


def _train(cfg: DictConfig) -> float:
    validate(cfg)  # before any data is loaded or any MLflow run is created
    if cfg.dry_run:
        hc = HydraConfig.get()
        job = f"job {hc.job.num}" if hc.mode.name == "MULTIRUN" else "run"
        print(f"vaeexp: dry run: {job} is valid: {' '.join(hc.overrides.task) or '(defaults)'}")
        return float("nan")

    from vaeexp import checkpoint
    from vaeexp.data import load_data
    from vaeexp.film import filming
    from vaeexp.resume import resolve as resolve_resume
    from vaeexp.tracking import check_reachable, tracked_run
    from vaeexp.trainer import cpu_settings, pick_device, train

    cpu_settings(cfg.flush_denormal, job_threads(cfg.threads, HydraConfig.get()))
    device = pick_device(cfg.device.value)
    check_reachable(cfg.tracking.uri)  # seconds, not minutes of retries, before any work
    resume = None
    if cfg.resume:
        path = resolve_resume(cfg.resume, cfg, Path(cfg.paths.runs))
        if path is None:
            log.info("resume=auto: no checkpoint of this configuration yet; starting afresh")
        else:
            log.info("resuming from %s", path)
            resume = checkpoint.load(path)
    data = load_data(cfg.data, progress=cfg.progress)
    hc = HydraConfig.get()
    output_dir = Path(hc.runtime.output_dir)
    ckpt_path = output_dir / checkpoint.FILENAME if cfg.checkpoint else None
    with tracked_run(
        cfg,
        data,
        device,
        output_dir,
        list(hc.overrides.task),
        resume_run_id=resume and resume.get("mlflow_run_id"),
    ) as run:
        with filming(cfg, data, run.hooks, output_dir / "film", device) as film:
            result = train(
                cfg,
                data,
                device=device,
                hooks=run.hooks,
                film=film,
                checkpoint_path=ckpt_path,
                resume=resume,
                extra_state={"mlflow_run_id": run.run_id},
            )
        run.finish(result, data.test_x, final_metrics(cfg, result.model, data), ckpt_path)
    return float(result.metrics["test/loss"])


def job_threads(threads: int, hc: Any) -> int:
    """torch threads for this job: `threads` if set; else, under a launcher that runs jobs side by
    side, this job's share of the cores (threads x parallel jobs <= cores: two 2-thread jobs on 2
    cores run 20x slower, not 2x); else 0, torch's default (one per core)."""
    if threads:
        return threads
    launcher = hc.launcher if _multirun(hc) else {}
    target = str(launcher.get("_target_", ""))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cores = cores or 1
    if target.endswith("JoblibLauncher"):
        n_jobs = int(launcher.get("n_jobs") or -1)
        parallel = n_jobs if n_jobs > 0 else max(1, cores + 1 + n_jobs)  # joblib's rule
        return max(1, cores // parallel)
    if "submitit" in target:  # each job's own allocation; submitit_local starts all at once
        return int(launcher.get("cpus_per_task") or 1)
    return 0


def _multirun(hc: Any) -> bool:
    return getattr(hc.mode, "name", None) == "MULTIRUN"


def final_metrics(cfg: DictConfig, model: Any, data: Any) -> dict[str, float]:
    """What only a finished model gets: the importance-weighted bound on the test NLL."""
    from vaeexp.likelihood import iwae_nll

    n, k = cfg.eval.iwae_images, cfg.eval.iwae_k
    if n == 0:
        return {}
    x = data.test_x[:n].to(next(model.parameters()).device)
    return {f"test_nll_iwae_k{k}": iwae_nll(model, x, k)}


def _user_errors() -> tuple[type[BaseException], ...]:
    from vaeexp.checkpoint import CheckpointError
    from vaeexp.data import DataUnavailable, IdxError
    from vaeexp.delivery import DeliveryIncomplete
    from vaeexp.tracking import TrackingUnavailable
    from vaeexp.trainer import Diverged

    return (
        ConfigError,
        TrackingUnavailable,
        DeliveryIncomplete,
        HydraException,
        OmegaConfBaseException,
        DataUnavailable,
        IdxError,
        CheckpointError,
        Diverged,
    )


def _on_signal(signum: int, frame: Any) -> None:
    """First Ctrl-C/SIGTERM: finish the current step, then stop. A second one: stop now."""
    from vaeexp.trainer import STOP

    name = signal.Signals(signum).name
    if STOP.request(name):
        print(f"vaeexp: {name}: stopping after this step (again to stop now)", file=sys.stderr)
        return
    raise KeyboardInterrupt(name)


def _exit_with(e: BaseException) -> None:
    config_error = isinstance(e, ConfigError | HydraException | OmegaConfBaseException)
    print(f"vaeexp: error: {explain(e) if config_error else e}", file=sys.stderr)
    sys.exit(2 if config_error else 1)


def steady_memory() -> None:
    """Pin glibc's mmap threshold at 4 MiB. By default glibc raises it after large blocks are
    freed, so later large tensors (the end-of-run IWAE pass) come from the heap and fragment it:
    measured +0.2 to +1.4 GB peak RSS, varying from run to run. Pinned, tensors over 4 MiB live
    in their own mappings, returned to the OS on free; training-step tensors are far smaller.
    Pinning also freezes the trim threshold at 128 KiB, so every freed tensor of a few MiB would
    go back to the OS and fault its pages in again on the next step (the IWAE pass ran 1.45x
    slower): keep up to 32 MiB of free heap instead."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to do
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-1, 32 << 20)  # -1: M_TRIM_THRESHOLD
        libc.mallopt(-3, 4 << 20)  # -3: M_MMAP_THRESHOLD


def main() -> None:
    """Console entry point. HYDRA_FULL_ERROR=1 or VAEEXP_TRACEBACK=1 show full tracebacks."""
    steady_memory()
    for sig in (signal.SIGINT, signal.SIGTERM):  # a scheduler's stop ends the run KILLED
        signal.signal(sig, _on_signal)
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        os.environ["VAEEXP_TRACEBACK"] = "1"
    os.environ["HYDRA_FULL_ERROR"] = "1"  # composition errors reach us, not Hydra's printer
    try:
        task()
    except KeyboardInterrupt:
        print("vaeexp: interrupted; an MLflow run it had started is marked KILLED", file=sys.stderr)
        sys.exit(130)
    except _user_errors() as e:
        if os.environ.get("VAEEXP_TRACEBACK") == "1":
            raise
        _exit_with(e)
