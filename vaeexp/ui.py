"""`python -m vaeexp.ui`: the MLflow UI over the project's store, bound to 127.0.0.1 by default."""

from __future__ import annotations

import argparse
import os
import sys

from vaeexp.config import default_tracking_uri


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m vaeexp.ui", description=__doc__)
    parser.add_argument(
        "--uri",
        default=default_tracking_uri(),
        help="tracking store (default: MLFLOW_TRACKING_URI or the project's runs/mlflow.db)",
    )
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="interface to bind; 0.0.0.0 exposes the UI to the network",
    )
    parser.add_argument("--port", type=int, default=5000)
    args = parser.parse_args(argv)
    print(f"MLflow UI for {args.uri} at http://{args.host}:{args.port}", flush=True)
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


if __name__ == "__main__":
    main()
