"""`python -m vaeexp.compare`: see `vaeexp.compare`."""

from __future__ import annotations

from pathlib import Path

import mlflow

from vaeexp import cli
from vaeexp.compare import __doc__ as DOC
from vaeexp.compare import parent_of_sweep, report
from vaeexp.paths import runs_dir

PROG = "vaeexp.compare"


def main(argv: list[str] | None = None) -> None:
    parser = cli.parser(PROG, DOC)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--sweep", type=Path, help="a sweep folder (runs/multirun/<date>/<time>)")
    source.add_argument("--parent", help="a sweep's parent run id")
    source.add_argument("--experiment", help="every run of an MLflow experiment")
    parser.add_argument("--out", type=Path, help="where to write (default: the sweep's report/)")
    parser.add_argument("--no-log", action="store_true", help="do not log to the parent run")
    args = parser.parse_args(argv)
    client = cli.open_store(args.uri)
    try:
        parent = parent_of_sweep(args.sweep) if args.sweep else args.parent
        out = args.out or (
            args.sweep / "report"
            if args.sweep
            else runs_dir() / "reports" / (parent or args.experiment)
        )
        files = report(
            client, out, parent=parent, experiment=args.experiment, log_to_parent=not args.no_log
        )
    except (LookupError, mlflow.exceptions.MlflowException) as e:
        cli.fail(PROG, str(e).splitlines()[0])
    print(f"vaeexp.compare: wrote {len(files)} files to {out}; open {out / 'report.html'}")


if __name__ == "__main__":
    main()
