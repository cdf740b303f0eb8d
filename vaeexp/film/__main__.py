"""`python -m vaeexp.film <run id>`: re-render a run's latent film without retraining.

Reads the run's logged `film/frames.npz` (every frame's latent means, step, epoch and losses) and
draws the film again with other settings; logs it to the run next to the original, or writes it
to `--out`.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from vaeexp.config import default_tracking_uri, limits_ok
from vaeexp.film.frames import Frames, title
from vaeexp.film.gif import writer
from vaeexp.film.render import draw_film


def rerender(frames: Frames, out: Path, fps: int, stride: int, limits: str | None = None) -> int:
    """Write the film to `out` (.gif or .mp4); returns its number of frames."""
    epochs = int(frames.meta["epochs"])
    titles = [title(s, e, epochs, ls) for s, e, ls, _ in frames]
    keep = sorted({*range(0, len(frames), stride), len(frames) - 1})  # always end on the last
    canvas, drawn = draw_film(
        frames.means[keep],
        frames.labels,
        [titles[i] for i in keep],
        frames.meta["class_names"],
        limits or frames.meta["limits"],
    )
    h, w = canvas.template.shape
    film = writer(out, (w, h), canvas.palette, fps)
    try:
        for image in drawn:
            film.add(image)
    finally:
        film.close()
    return len(keep)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m vaeexp.film", description=__doc__)
    parser.add_argument("run_id")
    parser.add_argument("--fps", type=int, default=10, help="frames per second (default 10)")
    parser.add_argument("--stride", type=int, default=1, help="keep every Nth frame (default 1)")
    parser.add_argument("--limits", help="auto, or L for axes -L..L (default: the run's)")
    parser.add_argument("--format", choices=("gif", "mp4"), help="default: --out's, or gif")
    parser.add_argument("--out", type=Path, help="write here instead of logging to the run")
    parser.add_argument("--uri", default=default_tracking_uri(), help="tracking store")
    args = parser.parse_args(argv)
    if not 1 <= args.fps <= 100 or args.stride < 1:
        parser.error("--fps must be from 1 to 100 and --stride >= 1")
    if args.limits is not None and not limits_ok(args.limits):
        parser.error(f"--limits={args.limits}: must be auto or a number L > 0")
    if args.out is not None and args.out.suffix not in (".gif", ".mp4"):
        parser.error(f"--out={args.out}: must end in .gif or .mp4")
    args.format = args.format or (args.out.suffix[1:] if args.out else "gif")
    if args.out is not None and args.out.suffix != f".{args.format}":
        parser.error(f"--out={args.out} does not end in .{args.format}")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    client = MlflowClient(args.uri)
    try:
        client.get_run(args.run_id)
    except mlflow.exceptions.MlflowException as e:
        sys.exit(f"vaeexp.film: error: no run {args.run_id} in {args.uri} ({e.error_code})")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            npz = mlflow.artifacts.download_artifacts(
                run_id=args.run_id,
                artifact_path="film/frames.npz",
                dst_path=tmp,
                tracking_uri=args.uri,
            )
        except (mlflow.exceptions.MlflowException, OSError):
            sys.exit(
                f"vaeexp.film: error: run {args.run_id} has no film/frames.npz (was it trained "
                "with film=off, or is it still running?)"
            )
        frames = Frames.load(Path(npz))
        limits = args.limits or frames.meta["limits"]
        name = f"latent_fps{args.fps}_stride{args.stride}_limits-{limits}.{args.format}"
        out = args.out or Path(tmp) / name
        n = rerender(frames, out, args.fps, args.stride, limits)
        if args.out is None:
            client.log_artifact(args.run_id, str(out), "film")
            print(f"vaeexp.film: logged film/{name} ({n} frames) to run {args.run_id}")
        else:
            print(f"vaeexp.film: wrote {out} ({n} frames)")


if __name__ == "__main__":
    main()
