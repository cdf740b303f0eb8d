"""`python -m vaeexp.compare`: see `vaeexp.compare`."""

from __future__ import annotations

import hashlib
from pathlib import Path

import mlflow

from vaeexp import cli
from vaeexp.compare import BANDS, FILM_BUDGET_MB, logs_to_parent, parent_of_sweep, report
from vaeexp.compare import __doc__ as DOC
from vaeexp.paths import runs_dir

PROG = "vaeexp.compare"


def main(argv: list[str] | None = None) -> None:
    parser = cli.parser(PROG, DOC)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--sweep", type=Path, help="a sweep folder (runs/multirun/<date>/<time>)")
    source.add_argument("--parent", help="a sweep's parent run id")
    source.add_argument("--experiment", help="every run of an MLflow experiment (default vaeexp)")
    parser.add_argument(
        "--filter",
        help="an MLflow search filter narrowing the runs, e.g. \"params.latent_dim = '8'\" "
        "or \"tags.sweep LIKE '%%2026-11-24%%'\" (nothing is logged to a parent run)",
    )
    grouping = parser.add_mutually_exclusive_group()
    grouping.add_argument(
        "--group-by",
        nargs="+",
        metavar="KEY",
        help="group runs by these settings (or tags.NAME, e.g. tags.mlflow.source.git.commit)",
    )
    grouping.add_argument("--no-group", action="store_true", help="each run on its own")
    parser.add_argument(
        "--band", choices=BANDS, default="std", help="curves' band: ± 1 std (default) or min-max"
    )
    parser.add_argument(
        "--film-budget-mb",
        type=float,
        default=FILM_BUDGET_MB,
        help=f"films embedded in report.html up to this size, the rest beside it "
        f"(default {FILM_BUDGET_MB:g})",
    )
    parser.add_argument("--out", type=Path, help="where to write (default: the sweep's report/)")
    parser.add_argument("--no-log", action="store_true", help="do not log to the parent run")
    args = parser.parse_args(argv)
    if not (args.sweep or args.parent or args.experiment or args.filter):
        parser.error("one of --sweep, --parent, --experiment or --filter is required")
    client = cli.open_store(args.uri)
    try:
        parent = parent_of_sweep(args.sweep) if args.sweep else args.parent
        out = args.out or _default_out(args.sweep, parent, args.experiment, args.filter)
        files = report(
            client,
            out,
            parent=parent,
            experiment=args.experiment,
            filter_string=args.filter,
            group_by=args.group_by,
            group=not args.no_group,
            band=args.band,
            film_budget_mb=args.film_budget_mb,
            log_to_parent=not args.no_log,
        )
    except (LookupError, mlflow.exceptions.MlflowException) as e:
        message = str(e).splitlines()[0]
        if args.filter and getattr(e, "error_code", "") == "INVALID_PARAMETER_VALUE":
            message = f"--filter {args.filter!r}: {message} (MLflow's search syntax)"
        cli.fail(PROG, message)
    print(f"vaeexp.compare: wrote {len(files)} files to {out}; open {out / 'report.html'}")
    if logs_to_parent(parent, args.filter, not args.no_log):
        print(f"  logged to parent run {parent}: report/, group metrics, children's group tags")
    else:
        why = "--no-log" if parent and args.no_log else "a filtered report" if parent else None
        print(f"  nothing logged to MLflow ({why or 'no parent run: --experiment or --filter'})")


def _default_out(sweep: Path | None, parent: str | None, experiment: str | None, where: str | None):
    if sweep and not where:
        return sweep / "report"
    name = parent or experiment or "vaeexp"
    if where:
        name += "-" + hashlib.sha1(where.encode()).hexdigest()[:8]
    return runs_dir() / "reports" / name


if __name__ == "__main__":
    main()
