"""One MLflow run per training job: experiment, params, tags, batched metrics, images, models.

Every MLflow call costs milliseconds against a SQLite store, more than a training step, so step
metrics are buffered and sent with `log_batch` at the end of each epoch (or every
`FLUSH_SECONDS` inside a long one), and an epoch logs only what it produced.
"""

from __future__ import annotations

import contextlib
import logging
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
from mlflow.entities import Metric, RunStatus
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from vaeexp import images
from vaeexp.config import PROJECT_ROOT
from vaeexp.data import Dataset
from vaeexp.delivery import DeliveryIncomplete, Outbox, fail_fast_over_http
from vaeexp.model import VAE
from vaeexp.trainer import Diverged, Result

log = logging.getLogger(__name__)

EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}  # UI: not the GenAI view
FLUSH_SECONDS = 15.0
# Overrides that say where or how a job runs, not what it trains: left out of run names.
NOT_IN_NAME = (
    "hydra.",
    "tracking.",
    "eval.",
    "paths.",
    "progress",
    "resume",
    "data.root",
    "threads",
    "device",
)


class TrackingUnavailable(RuntimeError):
    """The tracking store cannot be reached or written; the message names the URI."""


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail in seconds when a tracking server does not answer (MLflow's own client would retry
    for minutes), and make sure a local store's folder exists."""
    if uri.startswith(("http://", "https://")):
        fail_fast_over_http()
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout):
                return
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise TrackingUnavailable(
                f"tracking.uri={uri}: no MLflow server answers ({reason}); start one with "
                "`mlflow server --host 127.0.0.1 --port 5000`, or use the local store "
                "(tracking=local)"
            ) from None
    if uri.startswith("sqlite:///"):
        folder = Path(uri.removeprefix("sqlite:///")).parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise TrackingUnavailable(f"tracking.uri={uri}: cannot create {folder} ({e})") from None


def ensure_experiment(client: MlflowClient, name: str, artifact_location: str | None) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(
            name, artifact_location=artifact_location, tags=EXPERIMENT_KIND
        )
    except mlflow.exceptions.MlflowException:  # created meanwhile by a concurrent job
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def run_name(overrides: list[str], sep: str = ",") -> str:
    kept = [o.lstrip("+~") for o in overrides if not o.lstrip("+~").startswith(NOT_IN_NAME)]
    return sep.join(kept) or "defaults"


def flatten(tree: Any, prefix: str = "") -> dict[str, str]:
    if isinstance(tree, dict):
        out: dict[str, str] = {}
        for k, v in tree.items():
            out |= flatten(v, f"{prefix}{k}.")
        return out
    return {prefix.rstrip("."): str(tree)}


def git_state() -> dict[str, str]:
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()

    try:
        return {
            "mlflow.source.git.commit": git("rev-parse", "HEAD"),
            "git_dirty": str(bool(git("status", "--porcelain", "--untracked-files=no"))),
        }
    except (OSError, subprocess.SubprocessError):
        return {}


class MlflowHooks:
    """The trainer's hooks: buffers metrics, logs each epoch's images; one run, by id."""

    def __init__(
        self,
        outbox: Outbox,
        cfg: DictConfig,
        data: Dataset,
        device: torch.device,
    ):
        self.outbox, self.cfg = outbox, cfg
        self.pending: list[Metric] = []
        self.lock = threading.Lock()  # the film logs from its own thread
        # After a hard kill, a resumed run retrains steps it may already have logged:
        # points at or before these were delivered and are not sent twice.
        self.logged_step, self.logged_epoch = 0, 0
        self.last_flush = time.monotonic()
        self.fixed_x = data.test_x[:50].to(device)  # the same digits every epoch
        g = torch.Generator().manual_seed(0)
        self.fixed_z = torch.randn(100, cfg.latent_dim, generator=g).to(device)

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        if step <= self.logged_step:
            return
        self._add({f"train/{k}_step": v for k, v in metrics.items()}, step)
        if time.monotonic() - self.last_flush > FLUSH_SECONDS:
            self.flush()

    def on_epoch_end(self, epoch: int, step: int, metrics: dict[str, float], model: VAE) -> None:
        if epoch <= self.logged_epoch:
            return
        self._add(metrics | {"epoch": epoch, "step": step}, epoch)
        self.flush()
        if self.cfg.tracking.log_images:
            model.eval()
            self.log_image(images.reconstructions(model, self.fixed_x), "reconstructions", epoch)
            self.log_image(images.samples(model, self.fixed_z), "samples", epoch)
            if self.cfg.latent_dim == 2:
                grid = images.manifold(model, device=self.fixed_x.device)
                self.log_image(grid, "manifold", epoch)
            model.train()

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._add(metrics, step)
        self.flush()

    def log_image(self, image: np.ndarray | Image.Image, key: str, step: int) -> None:
        self.outbox.image_out(image, key, step)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self.outbox.artifact_out(path, artifact_path)

    def flush(self) -> None:
        with self.lock:
            pending, self.pending = self.pending, []
            self.last_flush = time.monotonic()
        self.outbox.metrics_out(pending)

    def _add(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        with self.lock:
            self.pending += [Metric(k, float(v), now, step) for k, v in metrics.items()]


class TrackedRun:
    def __init__(self, run_id: str, hooks: MlflowHooks):
        self.run_id, self.hooks, self.outbox = run_id, hooks, hooks.outbox

    def finish(
        self,
        result: Result,
        example: torch.Tensor,
        final_metrics: dict[str, float],
        checkpoint_path: Path | None,
    ) -> None:
        """Log what only a finished run has: final metrics, checkpoint, models for mlflow.pyfunc."""
        self.hooks.log_metrics(final_metrics, result.epoch)
        for key, value in final_metrics.items():
            log.info("%s = %.2f", key, value)
        if checkpoint_path is not None and checkpoint_path.is_file():
            self.outbox.artifact_out(checkpoint_path)  # what `python -m vaeexp.evaluate` reads
        if self.hooks.cfg.tracking.log_model:
            model = result.model.cpu().eval()
            if not self.outbox.call("logging the models", log_models, model, example[:5].cpu()):
                self.outbox.models = True


def log_models(model: VAE, example: torch.Tensor) -> None:
    """The two exported models: images -> reconstructions, latent codes -> images."""
    _log_model(model, example, "model")
    _log_model(_Decoder(model), torch.zeros(len(example), model.latent_dim), "decoder")


class _Decoder(torch.nn.Module):
    def __init__(self, vae: VAE):
        super().__init__()
        self.vae = vae

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(z)


def _log_model(module: torch.nn.Module, example: torch.Tensor, name: str) -> None:
    from mlflow.models import infer_signature

    with torch.no_grad():
        output = module(example)
    mlflow.pytorch.log_model(
        module,
        name=name,
        input_example=example.numpy(),
        signature=infer_signature(example.numpy(), output.numpy()),
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
    )


@contextmanager
def tracked_run(
    cfg: DictConfig,
    data: Dataset,
    device: torch.device,
    output_dir: Path,
    overrides: list[str],
    resume_run_id: str | None = None,
) -> Iterator[TrackedRun]:
    """An MLflow run that ends FINISHED, FAILED (reason in the `failure_reason` tag) or KILLED."""
    mlflow.set_tracking_uri(cfg.tracking.uri)
    client = MlflowClient(cfg.tracking.uri)
    experiment_id = ensure_experiment(
        client, cfg.tracking.experiment, artifact_location(cfg.tracking)
    )
    tags = {
        "hydra_overrides": " ".join(overrides) or "(none)",
        "output_dir": str(output_dir),
        "data.resolved": data.resolved,
        "data.binarize": cfg.data.binarize.value,  # likelihoods compare only within one choice
        **git_state(),
    }
    if cfg.tracking.parent_run_id:
        from vaeexp.sweep import sweep_folder

        tags["mlflow.parentRunId"] = cfg.tracking.parent_run_id
        tags["sweep"] = str(sweep_folder() or "")
    params = flatten(
        {
            k: v
            for k, v in OmegaConf.to_container(cfg, resolve=True, enum_to_str=True).items()
            if k != "hydra"
        }
    )
    params |= {
        "data.resolved": data.resolved,
        "data.n_train": str(len(data.train_x)),
        "data.n_test": str(len(data.test_x)),
        "device.resolved": str(device),
        "threads.resolved": str(torch.get_num_threads()),
    }

    resumed = bool(resume_run_id) and _exists(client, resume_run_id)
    if resumed:
        run = mlflow.start_run(run_id=resume_run_id)
        logged = client.get_run(resume_run_id).data.params
        params = {k: v for k, v in params.items() if k not in logged}
        tags["resumed_from"] = str(cfg.resume)
    else:
        name = cfg.tracking.run_name or run_name(overrides)
        run = mlflow.start_run(experiment_id=experiment_id, run_name=name)
    run_id = run.info.run_id
    outbox = Outbox(client, run_id, cfg.tracking.uri, output_dir)
    hooks = None
    status, failure = RunStatus.FINISHED, None
    try:
        mlflow.set_tags(tags)
        mlflow.log_params(params)
        hydra_dir = output_dir / ".hydra"
        if hydra_dir.is_dir():
            mlflow.log_artifacts(str(hydra_dir), "hydra")
        log.info("MLflow run %s (%s) in %s", run_id, run.info.run_name, cfg.tracking.uri)
        hooks = MlflowHooks(outbox, cfg, data, device)
        if resumed:
            hooks.logged_step = _last_step(client, run_id, "train/loss_step")
            hooks.logged_epoch = _last_step(client, run_id, "test/loss")
        yield TrackedRun(run_id, hooks)
        for logfile in output_dir.glob("*.log"):
            outbox.artifact_out(logfile)
    except KeyboardInterrupt:
        status = RunStatus.KILLED
        raise
    except BaseException as e:
        status, failure = RunStatus.FAILED, f"{type(e).__name__}: {e}"[:5000]
        raise
    finally:
        if hooks is not None:
            hooks.flush()  # keep what was measured before a failure
        if failure:
            outbox.call("tagging the failure", client.set_tag, run_id, "failure_reason", failure)
            if failure.startswith(Diverged.__name__):
                outbox.call("tagging the divergence", client.set_tag, run_id, "diverged", "true")
        name = RunStatus.to_string(status)
        if not outbox.call("ending the run", mlflow.end_run, name):
            outbox.status = name
            if mlflow.active_run() is not None:  # still ours locally: a next job must start clean
                with contextlib.suppress(Exception):  # end_run forgets it before calling out
                    mlflow.end_run(name)
        undelivered = outbox.pending()
        if undelivered:
            manifest = outbox.write_manifest()
            message = (
                f"the run {'trained' if status == RunStatus.FINISHED else 'stopped'}, "
                f"but {undelivered} could not be delivered to {cfg.tracking.uri}; they are "
                f"kept in {manifest}: run `python -m vaeexp.sync {output_dir}` when it is "
                "back"
            )
            if status == RunStatus.FINISHED:
                raise DeliveryIncomplete(message)
            log.error(message)


def artifact_location(tracking: DictConfig) -> str | None:
    """A local store gets an absolute artifact folder: MLflow's default is relative to the cwd."""
    if tracking.artifact_location is None or not tracking.uri.startswith(("sqlite:", "file:", "/")):
        return None
    return Path(tracking.artifact_location).resolve().as_uri()


def _last_step(client: MlflowClient, run_id: str, key: str) -> int:
    return max((m.step for m in client.get_metric_history(run_id, key)), default=0)


def _exists(client: MlflowClient, run_id: str) -> bool:
    try:
        client.get_run(run_id)
        return True
    except mlflow.exceptions.MlflowException:
        return False
