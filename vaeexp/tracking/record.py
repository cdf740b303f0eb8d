"""What a run starts with: its whole config as params, and the tags that say where it came from."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import torch

from vaeexp.config import Config, plain
from vaeexp.data import Dataset
from vaeexp.paths import PROJECT_ROOT

GIT_COMMIT = "mlflow.source.git.commit"


def flatten(tree: Any, prefix: str = "") -> dict[str, str]:
    if isinstance(tree, dict):
        out: dict[str, str] = {}
        for k, v in tree.items():
            out |= flatten(v, f"{prefix}{k}.")
        return out
    return {prefix.rstrip("."): str(tree)}


def params(cfg: Config, data: Dataset, device: torch.device) -> dict[str, str]:
    """The resolved config, flattened, and what was resolved at run time."""
    return flatten(plain(cfg)) | {
        "data.resolved": data.resolved,
        "data.n_train": str(len(data.train_x)),
        "data.n_test": str(len(data.test_x)),
        "device.resolved": str(device),
        "threads.resolved": str(torch.get_num_threads()),
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
