"""`python -m vaeexp.ui`: the MLflow UI over the project's store, bound to 127.0.0.1 by default."""

from __future__ import annotations

import argparse
import os
import sys

from vaeexp import cli
from vaeexp.tracking.links import ui_link


def main(argv: list[str] | None = None) -> None:
    parser = cli.parser("vaeexp.ui", __doc__)
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="interface to bind; 0.0.0.0 exposes the UI to the network",
    )
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("--experiment", default="vaeexp", help="experiment to link to")
    args = parser.parse_args(argv)
    print(f"MLflow UI for {args.uri}\n  open {page_url(args)}", flush=True)
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "ui",
        "--backend-store-uri",
        args.uri,
        "--host",
        args.host,
        "--port",
        str(args.port),
    ]
    os.execv(sys.executable, command)  # the UI replaces us: Ctrl-C and signals reach it directly


def page_url(args: argparse.Namespace) -> str:
    """The experiment's runs, in the UI's model-training view."""
    try:
        from mlflow.tracking import MlflowClient

        experiment = MlflowClient(args.uri).get_experiment_by_name(args.experiment)
    except Exception:  # no store yet, or a server not up: the list page still works
        experiment = None
    base = f"http://{args.host}:{args.port}"
    if experiment is None:
        return f"{base}/#/experiments?workflowType=machine_learning"
    return ui_link("", experiment.experiment_id, base=base)


if __name__ == "__main__":
    main()
