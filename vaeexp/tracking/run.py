"""`tracked_run`: one MLflow run per training job, which always ends with a status: FINISHED,
FAILED (its reason in the `failure_reason` tag) or KILLED. What the run starts with: its whole
config as params, and the tags that say where it came from; what a finished run exports: the two
models, for `mlflow.pyfunc.load_model(...).predict` (images -> reconstructions, and latent codes
-> images).

Every call names its run by id (MlflowClient's calls, MLflow's system-metrics monitor, model
logging with `run_id`), never MLflow's fluent "active run": that is one per thread, and a job
that trains several members keeps one run open for each at the same time."""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import torch
from mlflow.entities import Param, Run, RunStatus, RunTag
from mlflow.models import Model, infer_signature
from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
from mlflow.tracking import MlflowClient
from mlflow.tracking.context.registry import resolve_tags

from vaeexp.config import Config, TrackingConfig, plain, run_name
from vaeexp.data import Dataset
from vaeexp.model import VAE
from vaeexp.paths import PROJECT_ROOT, sweep_folder
from vaeexp.process import REQUEUED
from vaeexp.step import Diverged
from vaeexp.tracking.links import how_to_open
from vaeexp.tracking.logger import EpochImages, MlflowLogger
from vaeexp.tracking.outbox import DeliveryIncomplete, Outbox
from vaeexp.tracking.store import experiment_for, image_steps, latest_metrics, run_exists
from vaeexp.trainer import Callback, Result

log = logging.getLogger(__name__)
FAILURE_TAGS = {"failure_reason", "diverged"}  # a failed run's, until it is resumed
GIT_COMMIT = "mlflow.source.git.commit"


def flatten(tree: Any, prefix: str = "") -> dict[str, str]:
    if isinstance(tree, dict):
        out: dict[str, str] = {}
        for k, v in tree.items():
            out |= flatten(v, f"{prefix}{k}.")
        return out
    return {prefix.rstrip("."): str(tree)}


def run_params(cfg: Config, data: Dataset, device: torch.device) -> dict[str, str]:
    """The resolved config, flattened, and what was resolved at run time."""
    return flatten(plain(cfg)) | {
        "data.resolved": data.resolved,
        "data.n_train": str(len(data.train_x)),
        "data.n_test": str(len(data.test_x)),
        "runtime.device.resolved": str(device),
        "runtime.threads.resolved": str(torch.get_num_threads()),
    }


def git_tags(run_tags: dict[str, str]) -> dict[str, str]:
    """What MLflow does not record: whether the checkout had uncommitted changes, and the commit
    where MLflow could not find it (a launcher's worker, whose entry point is not in the repo)."""
    try:
        tags = {"git_dirty": str(bool(_git("status", "--porcelain", "--untracked-files=no")))}
        if GIT_COMMIT not in run_tags:
            tags[GIT_COMMIT] = _git("rev-parse", "HEAD")
        return tags
    except (OSError, subprocess.SubprocessError):
        return {}


def _git(*args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=5, check=True
    ).stdout.strip()


def output_tags(
    overrides: list[str], output_dir: Path, data: Dataset, binarize: str
) -> dict[str, str]:
    """Where the run's files are and what it trained on."""
    return {
        "hydra_overrides": " ".join(overrides) or "(none)",
        "output_dir": str(output_dir),
        "data.resolved": data.resolved,
        "data.binarize": binarize,  # likelihoods compare only within one choice
    }


def log_models(model: VAE, example: torch.Tensor, run_id: str | None = None) -> None:
    """Log both models to the run `run_id` (without one, to the fluent active run, which
    `python -m vaeexp.sync` opens), through the process's tracking URI (`mlflow.set_tracking_uri`);
    `example` is a few images (n, 784)."""
    run = mlflow.get_run(run_id or mlflow.active_run().info.run_id)
    _log_model(model, example, "model", run)
    _log_model(_Decoder(model), torch.zeros(len(example), model.latent_dim), "decoder", run)


class _Decoder(torch.nn.Module):
    def __init__(self, vae: VAE):
        super().__init__()
        self.vae = vae

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(z)


def _log_model(module: torch.nn.Module, example: torch.Tensor, name: str, run: Run) -> None:
    with torch.no_grad():
        output = module(example)
    # Created in its run's experiment first: a model logged by run id, with no active run, would
    # go to MLflow's active (by default, its Default) experiment. Its params are the run's, as
    # when MLflow creates it.
    logged = mlflow.initialize_logged_model(
        name,
        source_run_id=run.info.run_id,
        params=run.data.params,
        experiment_id=run.info.experiment_id,
    )
    Model.log(  # what mlflow.pytorch.log_model calls, with the run named by id
        None,
        mlflow.pytorch,
        name=name,
        run_id=run.info.run_id,
        model_id=logged.model_id,
        pytorch_model=module,
        input_example=example.numpy(),
        signature=infer_signature(example.numpy(), output.numpy()),
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
    )


@dataclass
class TrackedRun:
    run_id: str
    name: str
    experiment_id: str
    logger: MlflowLogger  # what the film logs to
    outbox: Outbox
    log_model: bool
    callbacks: list[Callback] = field(default_factory=list)  # the logger, the epoch images
    failed: BaseException | None = None  # set by `fail`: why the run ends FAILED

    def fail(self, error: BaseException) -> None:
        """End this run FAILED, with `error` as its reason, when its `tracked_run` exits, without
        the error raised through it: one member of a job that diverges fails, the others train
        on and finish. However the context exits then, this run's own failure is its reason."""
        self.failed = error

    def tag(self, key: str, value: str) -> None:
        """Set one more tag on the run (through the outbox: a server that is down only warns)."""
        self.outbox.call(f"tagging {key}", self.outbox.client.set_tag, self.run_id, key, value)

    def opener(self) -> str:
        """How to open this run in the MLflow UI."""
        return how_to_open(self.outbox.uri, self.experiment_id, self.run_id)

    def finish(
        self,
        result: Result,
        example: torch.Tensor,
        final_metrics: dict[str, float],
        checkpoint_path: Path | None,
    ) -> None:
        """Log what only a finished run has: final metrics, checkpoint, models for mlflow.pyfunc."""
        self.logger.log_metrics(final_metrics, result.epoch)
        for key, value in final_metrics.items():
            log.info("%s = %.2f", key, value)
        if checkpoint_path is not None and checkpoint_path.is_file():
            self.outbox.artifact_out(checkpoint_path)  # what `python -m vaeexp.iwae` reads
        if self.log_model:
            model, example = result.model.cpu().eval(), example[:5].cpu()
            self.outbox.models_out(lambda: self._log_models(model, example))

    def _log_models(self, model: VAE, example: torch.Tensor) -> None:
        # Model logging writes through the process's tracking URI, not a client's.
        mlflow.set_tracking_uri(self.outbox.uri)
        log_models(model, example, self.run_id)


@contextmanager
def tracked_run(
    cfg: Config,
    data: Dataset,
    device: torch.device,
    output_dir: Path,
    overrides: list[str],
    resume_run_id: str | None = None,
) -> Iterator[TrackedRun]:
    """Start (or, resuming, reopen) the job's run, yield it, and end it whatever happens."""
    tracking = cfg.tracking
    client = MlflowClient(tracking.uri)
    experiment_id = experiment_for(client, tracking)
    tags = output_tags(overrides, output_dir, data, cfg.data.binarize.value)
    if tracking.parent_run_id:
        tags["mlflow.parentRunId"] = tracking.parent_run_id
        tags["sweep"] = str(sweep_folder() or "")
    params = run_params(cfg, data, device)

    resumed = bool(resume_run_id) and run_exists(client, resume_run_id)
    if resumed:
        client.update_run(resume_run_id, status=RunStatus.to_string(RunStatus.RUNNING))
        run = client.get_run(resume_run_id)
        params = {k: v for k, v in params.items() if k not in run.data.params}
        tags["resumed_from"] = str(cfg.resume)
        for stale in FAILURE_TAGS & run.data.tags.keys():  # why it stopped before: said again if so
            client.delete_tag(resume_run_id, stale)
    else:
        name = tracking.run_name or run_name(overrides)
        # The tags from the start: a job killed at once still shows under its sweep's parent.
        # MLflow's own context tags (user, source, git commit) as its fluent start_run adds them.
        run = client.create_run(experiment_id, run_name=name, tags=resolve_tags(tags))
    run_id = run.info.run_id
    monitor = _system_metrics(run_id, tracking.uri, resumed) if tracking.system_metrics else None
    outbox = Outbox(client, run_id, tracking.uri, output_dir)
    logger, tracked = None, None
    status, failure = RunStatus.FINISHED, None
    try:
        client.log_batch(
            run_id,
            params=[Param(k, v) for k, v in params.items()],
            tags=[RunTag(k, v) for k, v in (tags | git_tags(run.data.tags)).items()],
        )
        hydra_dir = output_dir / ".hydra"
        if hydra_dir.is_dir():
            client.log_artifacts(run_id, str(hydra_dir), "hydra")
        log.info("MLflow run %s (%s) in %s", run_id, run.info.run_name, tracking.uri)
        # Resumed after a hard kill: what MLflow already has of each metric and image key.
        delivered = (
            {k: m.step for k, m in latest_metrics(client, run_id).items()} if resumed else {}
        )
        images = image_steps(client, run_id) if resumed else {}
        logger = MlflowLogger(outbox, delivered, images)
        tracked = TrackedRun(
            run_id,
            run.info.run_name,
            run.info.experiment_id,
            logger,
            outbox,
            tracking.log_model,
            [logger],
        )
        if tracking.log_images:
            tracked.callbacks.append(
                EpochImages(logger.log_image, data.test_x, cfg.latent_dim, device)
            )
        yield tracked
        for logfile in output_dir.glob("*.log"):
            outbox.artifact_out(logfile)
    except KeyboardInterrupt as e:  # SCHEDULED: a cluster job that comes back to finish it
        status = RunStatus.SCHEDULED if str(e) == REQUEUED else RunStatus.KILLED
        raise
    except BaseException as e:
        status, failure = RunStatus.FAILED, e
        raise
    finally:
        if tracked is not None and tracked.failed is not None:  # its own failure comes first
            status, failure = RunStatus.FAILED, tracked.failed
        if logger is not None:
            logger.flush()  # keep what was measured before a failure
        if monitor is not None:
            monitor.finish()  # its last samples, logged while the run is still RUNNING
        _end(client, outbox, RunStatus.to_string(status), failure, output_dir)


def _system_metrics(run_id: str, uri: str, resumed: bool) -> SystemMetricsMonitor | None:
    """MLflow's system-metrics monitor for this run, as its fluent start_run starts one; a resumed
    run's continue after its last step. None, and training goes on, if it cannot start."""
    try:
        monitor = SystemMetricsMonitor(run_id, resume_logging=resumed, tracking_uri=uri)
        monitor.start()
        return monitor
    except Exception as e:
        log.error("no system metrics for this run: %s: %s", type(e).__name__, e)
        return None


def _end(
    client: MlflowClient,
    outbox: Outbox,
    status: str,
    failure: BaseException | None,
    folder: Path,
) -> None:
    """Tag a failure, set the final status, and say where what could not be delivered is kept."""
    run_id = outbox.run_id
    if failure is not None:
        reason = f"{type(failure).__name__}: {failure}"[:5000]
        outbox.call("tagging the failure", client.set_tag, run_id, "failure_reason", reason)
        if isinstance(failure, Diverged):
            outbox.call("tagging the divergence", client.set_tag, run_id, "diverged", "true")
    outbox.status_out(status, lambda status: client.set_terminated(run_id, status))
    undelivered = outbox.pending()
    if undelivered:
        manifest = outbox.write_manifest()
        message = (
            f"the run {'trained' if status == 'FINISHED' else 'stopped'}, but {undelivered} "
            f"could not be delivered to {outbox.uri}; they are kept in {manifest}: run "
            f"`python -m vaeexp.sync {folder}` when it is back"
        )
        if status == "FINISHED":
            raise DeliveryIncomplete(message)
        log.error(message)


def failed_before_its_run(
    tracking: TrackingConfig, overrides: list[str], output_dir: Path, error: BaseException
) -> None:
    """A sweep's job that failed before its run started (its data, its checkpoint to resume)
    still gets one, FAILED with its reason: its sweep's parent counts it, the report lists it,
    and `resume=auto` continues it. Nothing if the job has a run already."""
    client = MlflowClient(tracking.uri)
    experiment_id = experiment_for(client, tracking)
    if client.search_runs([experiment_id], f"tags.output_dir = '{output_dir}'", max_results=1):
        return
    tags = {
        "mlflow.parentRunId": tracking.parent_run_id,
        "sweep": str(sweep_folder() or ""),
        "hydra_overrides": " ".join(overrides) or "(none)",
        "output_dir": str(output_dir),
        "failure_reason": f"{type(error).__name__}: {error}"[:5000],
    }
    name = tracking.run_name or run_name(overrides)
    run_id = client.create_run(experiment_id, run_name=name, tags=tags).info.run_id
    client.set_terminated(run_id, RunStatus.to_string(RunStatus.FAILED))
