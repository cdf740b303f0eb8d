"""`python -m vaeexp.sync <run folder>`: deliver what a run could not send to its tracking server.

Reads the run folder's undelivered.json (written when the server went away during training),
sends the kept metrics, images, artifacts and models, sets the run's final status, and marks the
file as delivered. Safe to repeat: what arrives is removed from the file as it goes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import mlflow
import torch

from vaeexp import checkpoint
from vaeexp.config import register
from vaeexp.model import IMAGE_DIM
from vaeexp.tracking.outbox import MANIFEST, Outbox
from vaeexp.tracking.run import log_models


def sync(folder: Path, uri: str | None = None) -> Outbox:
    box = Outbox.from_manifest(folder, uri)
    if box.retry() and box.models:
        model, _ = checkpoint.load_model(folder)  # the trained weights: models rebuilt from them
        example = torch.rand(5, IMAGE_DIM, generator=torch.Generator().manual_seed(0))
        mlflow.set_tracking_uri(box.uri)
        with mlflow.start_run(run_id=box.run_id):
            box.models_out(lambda: log_models(model, example))
    if box.status and not box.models and box.retry():
        box.status_out(box.status, lambda status: box.client.set_terminated(box.run_id, status))
    if box.pending():
        box.write_manifest()
    else:
        (folder / MANIFEST).rename(folder / f"{MANIFEST}.delivered")
    return box


def main(argv: list[str] | None = None) -> None:
    register()
    parser = argparse.ArgumentParser(prog="python -m vaeexp.sync", description=__doc__)
    parser.add_argument("folder", type=Path, help="the run folder named by the failed run")
    parser.add_argument("--uri", help="send to this tracking URI instead of the recorded one")
    args = parser.parse_args(argv)
    if not (args.folder / MANIFEST).is_file():
        sys.exit(f"vaeexp.sync: error: {args.folder / MANIFEST} not found: nothing to deliver")
    try:
        box = sync(args.folder, args.uri)
    except checkpoint.CheckpointError as e:  # the models are rebuilt from the run's checkpoint
        sys.exit(f"vaeexp.sync: error: {e}")
    if box.pending():
        sys.exit(
            f"vaeexp.sync: error: {box.uri} still does not take {box.pending()}; "
            "kept for the next try"
        )
    print(f"vaeexp.sync: run {box.run_id} is complete in {box.uri}")


if __name__ == "__main__":
    main()
