"""Where a resumed run continues from: `auto`, a run folder, a checkpoint or an MLflow run id.

`auto` picks the newest checkpoint under the project's runs/ whose configuration is this one's,
ignoring settings that do not change what is trained (where it is logged, how many epochs are
asked for, progress bars...), so re-launching the same command continues where it stopped. A
sweep's job looks only in its own folder and in the sweeps its sweep continues (vaeexp.sweep):
its runs belong to that sweep's parent, and another sweep's run of the same settings does not.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from vaeexp import checkpoint
from vaeexp.config import RUN_ID, Config, job_identity, plain, resume_identity

Identity = Callable[[dict[str, Any]], dict[str, Any]]

log = logging.getLogger(__name__)


def resolve(
    spec: str,
    cfg: Config,
    runs_dir: Path,
    output_dir: Path | None = None,
    sweeps: list[Path] | None = None,
) -> Path | None:
    """The checkpoint file to resume from; None for `auto` with nothing to continue. `auto`
    looks first in this job's own folder (a re-launched `hydra.run.dir=X`, a requeued job), then
    in `sweeps` (the earlier folders of a resumed sweep) if this is a sweep's job, else under
    runs/."""
    if spec == "auto":
        same = resume_identity if sweeps is None else job_identity
        wanted = same(plain(cfg))
        own = output_dir / checkpoint.FILENAME if output_dir else None
        if own is not None and own.is_file() and _matches(own, wanted, same):
            return own
        if sweeps is not None:
            found = (p for folder in sweeps for p in folder.glob(f"*/{checkpoint.FILENAME}"))
            return _newest_match(found, wanted, same)
        return latest_matching(cfg, runs_dir)
    if RUN_ID.fullmatch(spec) and not Path(spec).exists():
        return _from_run_id(spec, cfg.tracking.uri)
    return checkpoint.locate(spec)


def latest_matching(cfg: Config, runs_dir: Path) -> Path | None:
    """The newest checkpoint under runs/ that trains what `cfg` trains. Each is compared through
    the small config file beside it; only a match is loaded (to check it is whole)."""
    return _newest_match(
        (
            p
            for sub in ("outputs", "multirun")
            for p in (runs_dir / sub).glob(f"**/{checkpoint.FILENAME}")
        ),
        resume_identity(plain(cfg)),
        resume_identity,
    )


def job_folders(cfg: Config, output_dir: Path, sweeps: list[Path]) -> list[Path]:
    """This job's own folder and the folders of the same job in the sweeps it continues, found
    by the config Hydra saved there: where a run stopped before its first checkpoint lived."""
    wanted = job_identity(plain(cfg))
    same = []
    for folder in sweeps:
        for saved in folder.glob("*/.hydra/config.yaml"):
            with contextlib.suppress(Exception):  # a folder of a job that never composed
                if job_identity(OmegaConf.to_container(OmegaConf.load(saved))) == wanted:
                    same.append(saved.parent.parent)
    return [output_dir, *same]


def _newest_match(paths: Iterable[Path], wanted: dict, same: Identity) -> Path | None:
    candidates = sorted(paths, key=lambda p: p.stat().st_mtime, reverse=True)
    return next((path for path in candidates if _matches(path, wanted, same)), None)


def _matches(path: Path, wanted: dict, same: Identity = resume_identity) -> bool:
    saved = checkpoint.saved_config(path)
    if saved is not None and same(saved) != wanted:
        return False
    try:
        state = checkpoint.load(path)
    except checkpoint.CheckpointError as e:
        log.warning("resume=auto: skipping %s", e)
        return False
    return same(state.get("config", {})) == wanted


def _from_run_id(run_id: str, uri: str) -> Path:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        run = MlflowClient(uri).get_run(run_id)
    except MlflowException as e:
        if e.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise checkpoint.CheckpointError(
                f"resume={run_id}: no such MLflow run in {uri}"
            ) from None
        reason = str(e).splitlines()[0][:200]
        raise checkpoint.CheckpointError(
            f"resume={run_id}: cannot ask {uri} for the run ({reason})"
        ) from None
    folder = run.data.tags.get("output_dir")
    if not folder:
        raise checkpoint.CheckpointError(f"resume={run_id}: the run has no output_dir tag")
    return checkpoint.locate(folder)
