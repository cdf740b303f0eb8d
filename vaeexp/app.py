"""`python -m vaeexp`: compose the config with Hydra, train, track in MLflow.

Config and data errors end with one line naming the setting and what is allowed, and a non-zero
exit; anything else is a bug and keeps its full traceback.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from vaeexp import process
from vaeexp.config import register, settings
from vaeexp.paths import CONF_DIR, earlier_sweeps, sweep_folder
from vaeexp.validate import ConfigError, explain, validate


def register_launcher() -> None:
    """Hydra finds launchers by listing the `hydra_plugins` namespace, which an editable
    install's import hook does not list: register vaeexp's (`hydra/launcher=slurm`) by hand."""
    from hydra.core.plugins import Plugins

    from hydra_plugins.vaeexp_launcher import SlurmLauncher

    Plugins.instance().register(SlurmLauncher)


register()
register_launcher()
log = logging.getLogger(__name__)

DIVERGED_PENALTY = 1e4  # nats: worse than any run that trained, an untrained one included


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def task(cfg: DictConfig) -> float:
    """Train one configuration; returns the final test loss, which sweepers minimise."""
    from vaeexp.step import Diverged

    process.prepare()  # a launcher's worker runs this task without main()
    try:
        return _train(cfg)
    except Diverged as e:
        if not _multirun(HydraConfig.get()):
            _exit_with(e)
        # A sweep goes on: this job's run is FAILED and tagged `diverged`; a sweeper gets a finite
        # value (the Optuna plugin we can install crashes the whole study on NaN).
        log.error("vaeexp: %s; this job scores %.0f, the sweep goes on", e, DIVERGED_PENALTY)
        return DIVERGED_PENALTY
    except Exception as e:
        if _multirun(HydraConfig.get()):
            _record_failure(cfg, e)
        if not isinstance(e, _user_errors()) or os.environ.get("VAEEXP_TRACEBACK") == "1":
            raise
        # SystemExit passes through Hydra, which would print a banner above any Exception.
        _exit_with(e)


def _record_failure(cfg: DictConfig, error: BaseException) -> None:
    """A sweep's job that failed before its MLflow run existed leaves a FAILED one (unless the
    store itself is what failed), so that its sweep counts every job. Not in a dry run."""
    hc = HydraConfig.get()
    try:
        tracking = settings(cfg).tracking
        if not tracking.parent_run_id:
            return
        from vaeexp.tracking.run import failed_before_its_run
        from vaeexp.tracking.store import TrackingUnavailable

        if not isinstance(error, TrackingUnavailable):
            overrides = list(hc.overrides.task)
            failed_before_its_run(tracking, overrides, Path(hc.runtime.output_dir), error)
    except Exception as e:  # the job's own error is the one to tell
        log.warning("this job's failure is not in MLflow (%s: %s)", type(e).__name__, e)


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
    from vaeexp.likelihood import iwae_metrics
    from vaeexp.resumable import Checkpoints
    from vaeexp.resume import job_folders
    from vaeexp.resume import resolve as resolve_resume
    from vaeexp.tracking.links import run_summary
    from vaeexp.tracking.run import tracked_run
    from vaeexp.tracking.store import check_reachable, finished_run, unfinished_run_in
    from vaeexp.trainer import train

    typed = settings(cfg)
    hc = HydraConfig.get()
    launcher = hc.launcher if _multirun(hc) else None
    process.cpu_settings(typed.flush_denormal, process.job_threads(typed.threads, launcher))
    device = process.pick_device(typed.device.value)
    # Seconds, not minutes of retries, and before any work: credentials and write access too.
    check_reachable(typed.tracking.uri, typed.tracking.experiment)
    output_dir = Path(hc.runtime.output_dir)
    resume, adopted = None, None
    if typed.resume:
        sweep = sweep_folder()  # a sweep's job continues only its own sweep's runs
        earlier = earlier_sweeps(sweep) if sweep else None
        path = resolve_resume(typed.resume, typed, Path(typed.paths.runs), output_dir, earlier)
        if path is None:
            folders = job_folders(typed, output_dir, earlier or [])
            adopted = unfinished_run_in(typed.tracking, folders) if typed.resume == "auto" else None
            log.info(
                "resume=auto: no checkpoint of this configuration yet; starting afresh%s",
                f" in its unfinished run {adopted}" if adopted else "",
            )
        else:
            log.info("resuming from %s", path)
            resume = checkpoint.load(path)
            done = finished_run(typed.tracking.uri, resume, typed.epochs)
            if done:
                print(
                    f"vaeexp: {done} ({resume['mlflow_run_id']}) already trained its "
                    f"{resume['epoch']} epochs and finished: nothing to train"
                )
                return float(resume["metrics"]["test/loss"])
    # In a sweep, the launching process has said it once (vaeexp.sweep).
    data = load_data(typed.data, progress=typed.progress, warn_fallback=not _multirun(hc))
    ckpt_path = output_dir / checkpoint.FILENAME if typed.checkpoint else None
    with tracked_run(
        typed,
        data,
        device,
        output_dir,
        list(hc.overrides.task),
        resume_run_id=resume.get("mlflow_run_id") if resume else adopted,
    ) as run:
        with filming(typed, data, run.logger, output_dir / "film", device) as film:
            result = train(
                typed,
                data,
                device,
                callbacks=[*run.callbacks, *([film] if film else [])],
                checkpoints=Checkpoints(ckpt_path, resume, {"mlflow_run_id": run.run_id}),
                stop=process.STOP,
            )
        final = iwae_metrics(result.model, data.test_x, typed.iwae.k, typed.iwae.images)
        run.finish(result, data.test_x, final, ckpt_path)
    if not _multirun(hc):  # a sweep ends with one summary of its own (vaeexp.sweep)
        metrics = result.metrics | final
        print(run_summary(run.name, run.run_id, "finished", metrics, str(output_dir), run.opener()))
    return float(result.metrics["test/loss"])


def _multirun(hc: Any) -> bool:
    return getattr(hc.mode, "name", None) == "MULTIRUN"


def _user_errors() -> tuple[type[BaseException], ...]:
    from vaeexp.checkpoint import CheckpointError
    from vaeexp.data import DataUnavailable
    from vaeexp.slurm import JobExited
    from vaeexp.step import Diverged
    from vaeexp.tracking.outbox import DeliveryIncomplete
    from vaeexp.tracking.store import TrackingUnavailable

    return (
        ConfigError,
        TrackingUnavailable,
        DeliveryIncomplete,
        HydraException,
        OmegaConfBaseException,
        DataUnavailable,
        CheckpointError,
        Diverged,
        JobExited,
    )


def _exit_with(e: BaseException) -> None:
    config_error = isinstance(e, ConfigError | HydraException | OmegaConfBaseException)
    print(f"vaeexp: error: {explain(e) if config_error else e}", file=sys.stderr)
    sys.exit(2 if config_error else 1)


def main() -> None:
    """Console entry point. HYDRA_FULL_ERROR=1 or VAEEXP_TRACEBACK=1 show full tracebacks."""
    process.prepare(signals=True)
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        os.environ["VAEEXP_TRACEBACK"] = "1"
    os.environ["HYDRA_FULL_ERROR"] = "1"  # composition errors reach us, not Hydra's printer
    try:
        task()
    except KeyboardInterrupt:
        from vaeexp.sweep import interrupted

        if not interrupted():
            print(
                "vaeexp: interrupted; an MLflow run it had started is marked KILLED",
                file=sys.stderr,
            )
        sys.exit(130)
    except SystemExit:  # its line is said; and no need to import all that _user_errors() names
        raise
    except _user_errors() as e:
        if os.environ.get("VAEEXP_TRACEBACK") == "1":
            raise
        _exit_with(e)
    finally:
        from vaeexp.sweep import stopped

        stopped()  # a job's error ended the sweep before its end: its parent ends FAILED
