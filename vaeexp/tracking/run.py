"""`tracked_run`: one MLflow run per training job, which always ends with a status: FINISHED,
FAILED (its reason in the `failure_reason` tag) or KILLED. What the run starts with: its whole
config as params, and the tags that say where it came from; what a finished run exports: the two
models, for `mlflow.pyfunc.load_model(...).predict` (images -> reconstructions, and latent codes
-> images)."""

from __future__ import annotations

import contextlib
import logging
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import torch
from mlflow.entities import RunStatus
from mlflow.models import infer_signature
from mlflow.tracking import MlflowClient

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


def log_models(model: VAE, example: torch.Tensor) -> None:
    """Log both models to the active run; `example` is a few images (n, 784)."""
    _log_model(model, example, "model")
    _log_model(_Decoder(model), torch.zeros(len(example), model.latent_dim), "decoder")


class _Decoder(torch.nn.Module):
    def __init__(self, vae: VAE):
        super().__init__()
        self.vae = vae

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(z)


def _log_model(module: torch.nn.Module, example: torch.Tensor, name: str) -> None:
    with torch.no_grad():
        output = module(example)
    mlflow.pytorch.log_model(
        module,
        name=name,
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
            self.outbox.models_out(lambda: log_models(model, example))


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
    mlflow.set_tracking_uri(tracking.uri)
    client = MlflowClient(tracking.uri)
    experiment_id = experiment_for(client, tracking)
    tags = output_tags(overrides, output_dir, data, cfg.data.binarize.value)
    if tracking.parent_run_id:
        tags["mlflow.parentRunId"] = tracking.parent_run_id
        tags["sweep"] = str(sweep_folder() or "")
    params = run_params(cfg, data, device)

    resumed = bool(resume_run_id) and run_exists(client, resume_run_id)
    if resumed:
        run = mlflow.start_run(run_id=resume_run_id, log_system_metrics=tracking.system_metrics)
        earlier = client.get_run(resume_run_id).data
        params = {k: v for k, v in params.items() if k not in earlier.params}
        tags["resumed_from"] = str(cfg.resume)
        for stale in FAILURE_TAGS & earlier.tags.keys():  # why it stopped before: said again if so
            client.delete_tag(resume_run_id, stale)
    else:
        name = tracking.run_name or run_name(overrides)
        # The tags from the start: a job killed at once still shows under its sweep's parent.
        run = mlflow.start_run(
            experiment_id=experiment_id,
            run_name=name,
            tags=tags,
            log_system_metrics=tracking.system_metrics,
        )
    run_id = run.info.run_id
    outbox = Outbox(client, run_id, tracking.uri, output_dir)
    logger = None
    status, failure = RunStatus.FINISHED, None
    try:
        mlflow.set_tags(tags | git_tags(run.data.tags))
        mlflow.log_params(params)
        hydra_dir = output_dir / ".hydra"
        if hydra_dir.is_dir():
            mlflow.log_artifacts(str(hydra_dir), "hydra")
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
        status, failure = RunStatus.FAILED, f"{type(e).__name__}: {e}"[:5000]
        raise
    finally:
        if logger is not None:
            logger.flush()  # keep what was measured before a failure
        _end(client, outbox, RunStatus.to_string(status), failure, output_dir)


def _end(client: MlflowClient, outbox: Outbox, status: str, failure: str | None, folder: Path):
    """Tag a failure, set the final status, and say where what could not be delivered is kept."""
    run_id = outbox.run_id
    if failure:
        outbox.call("tagging the failure", client.set_tag, run_id, "failure_reason", failure)
        if failure.startswith(Diverged.__name__):
            outbox.call("tagging the divergence", client.set_tag, run_id, "diverged", "true")
    if not outbox.status_out(status, mlflow.end_run) and mlflow.active_run() is not None:
        # Still ours locally, and a next job must start clean: end_run forgets it before
        # calling out, so this second call only clears the local state.
        with contextlib.suppress(Exception):
            mlflow.end_run(status)
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
