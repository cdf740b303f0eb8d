"""`python -m vaeexp.film <run id>`: re-render a run's latent film without retraining.

Reads the run's logged `film/frames.npz` (every frame's latent means, step, epoch and losses) and
draws the film again with other settings; logs it to the run next to the original, or writes it
to `--out`.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import mlflow

from vaeexp import cli
from vaeexp.film.frames import Frames, title
from vaeexp.film.render import draw_film, writer
from vaeexp.validate import limits_ok

PROG = "vaeexp.film"


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
    parser = cli.parser(PROG, __doc__)
    parser.add_argument("run_id")
    parser.add_argument("--fps", type=int, default=10, help="frames per second (default 10)")
    parser.add_argument("--stride", type=int, default=1, help="keep every Nth frame (default 1)")
    parser.add_argument("--limits", help="auto, or L for axes -L..L (default: the run's)")
    parser.add_argument("--format", choices=("gif", "mp4"), help="default: --out's, or gif")
    parser.add_argument("--out", type=Path, help="write here instead of logging to the run")
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
    client = cli.open_store(args.uri)
    cli.get_run(client, args.run_id, PROG)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            npz = client.download_artifacts(args.run_id, "film/frames.npz", tmp)
        except (mlflow.exceptions.MlflowException, OSError):
            cli.fail(
                PROG,
                f"run {args.run_id} has no film/frames.npz (was it trained with film=off, or "
                "is it still running?)",
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
