"""Checkpoints that are either complete or absent, and that load without running pickled code."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from vaeexp.model import VAE

FORMAT = "vaeexp.checkpoint"
VERSION = 1
FILENAME = "checkpoint.pt"
CONFIG_SUFFIX = ".json"  # checkpoint.json beside checkpoint.pt: its config, for resume=auto


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file."""


def save(path: str | Path, state: dict[str, Any]) -> None:
    """Write atomically: a temp file in the same folder, fsync, then rename over the target."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            torch.save({"format": FORMAT, "version": VERSION, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        if "config" in state:
            _write_atomically(path.with_suffix(CONFIG_SUFFIX), json.dumps(state["config"]))
    except (OSError, RuntimeError) as e:  # torch reports a full disk as a RuntimeError
        free = shutil.disk_usage(path.parent).free if path.parent.exists() else 0
        raise CheckpointError(
            f"{path}: could not write the checkpoint ({free // 1024} KiB free there: "
            f"{str(e).splitlines()[0]}); the previous one, if any, is intact"
        ) from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def _write_atomically(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def saved_config(path: str | Path) -> dict[str, Any] | None:
    """The config of the checkpoint at `path` from the small file beside it, without loading
    the checkpoint; None where there is none (a checkpoint written before it was kept)."""
    try:
        config = json.loads(Path(path).with_suffix(CONFIG_SUFFIX).read_text())
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def locate(path: str | Path) -> Path:
    """A checkpoint file, or the one inside a run folder."""
    path = Path(path)
    if path.is_dir():
        path = path / FILENAME
    if not path.is_file():
        raise CheckpointError(f"{path}: no checkpoint here (expected a {FILENAME} or a run folder)")
    return path


def load(path: str | Path) -> dict[str, Any]:
    path = locate(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds for truncated or foreign files
        raise CheckpointError(
            f"{path}: not a readable checkpoint ({type(e).__name__}); it may be truncated or "
            "not written by vaeexp"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a vaeexp checkpoint")
    if state.get("version") != VERSION:
        raise CheckpointError(
            f"{path}: checkpoint version {state.get('version')}, "
            f"this vaeexp reads version {VERSION}"
        )
    return state


def load_model(path: str | Path) -> tuple[VAE, dict[str, Any]]:
    """The trained model a checkpoint holds (eval mode, on the CPU) and the config it trained."""
    state = load(path)
    config = state.get("config", {})
    try:
        model = VAE(config["latent_dim"], config["intermediate_dim"])
        model.load_state_dict(state["model"])
    except (KeyError, RuntimeError) as e:
        raise CheckpointError(f"{path}: its model cannot be rebuilt ({e})") from None
    return model.eval(), config
