"""`python -m vaeexp.evaluate <run id>`: the IWAE bound on the test NLL of a finished run.

Rebuilds the run's model from its logged checkpoint and its data from its logged config (the
data it actually used, fallback included), and logs `test_nll_iwae_k{k}` back to the run.
"""

from __future__ import annotations

import argparse
import sys
import tempfile

import mlflow
import torch
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from vaeexp.config import Config, default_tracking_uri, register
from vaeexp.data import load_data
from vaeexp.likelihood import iwae_nll
from vaeexp.model import VAE
from vaeexp.trainer import cpu_settings


def evaluate_run(client: MlflowClient, run_id: str, k: int, images: int | None) -> float:
    run = client.get_run(run_id)
    with tempfile.TemporaryDirectory() as tmp:
        config_file = mlflow.artifacts.download_artifacts(
            run_id=run_id,
            artifact_path="hydra/config.yaml",
            dst_path=tmp,
            tracking_uri=client._tracking_client.tracking_uri,
        )
        ckpt_file = mlflow.artifacts.download_artifacts(
            run_id=run_id,
            artifact_path="checkpoint.pt",
            dst_path=tmp,
            tracking_uri=client._tracking_client.tracking_uri,
        )
        cfg = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.load(config_file))
        state = torch.load(ckpt_file, map_location="cpu", weights_only=True)
    cfg.data.name = run.data.params.get("data.resolved", cfg.data.name)  # e.g. the fallback
    cfg.data.download = False
    cpu_settings(cfg.flush_denormal)  # before the first parallel op
    data = load_data(cfg.data, progress=False)
    model = VAE(cfg.latent_dim, cfg.intermediate_dim)
    model.load_state_dict(state["model"])
    return iwae_nll(model, data.test_x[:images], k)


def main(argv: list[str] | None = None) -> None:
    register()
    parser = argparse.ArgumentParser(prog="python -m vaeexp.evaluate", description=__doc__)
    parser.add_argument("run_id")
    parser.add_argument("--k", type=int, default=1000, help="importance samples (default 1000)")
    parser.add_argument(
        "--images", type=int, default=1000, help="first N test images (default 1000; 0: all)"
    )
    parser.add_argument("--uri", default=default_tracking_uri(), help="tracking store")
    parser.add_argument("--no-log", action="store_true", help="print only; log nothing")
    args = parser.parse_args(argv)
    if args.k < 1 or args.images < 0:
        parser.error("--k must be >= 1 and --images >= 0")
    client = MlflowClient(args.uri)
    try:
        run = client.get_run(args.run_id)
    except mlflow.exceptions.MlflowException as e:
        sys.exit(f"vaeexp.evaluate: error: no run {args.run_id} in {args.uri} ({e.error_code})")
    value = evaluate_run(client, args.run_id, args.k, args.images or None)
    key = f"test_nll_iwae_k{args.k}"
    print(f"{key} = {value:.4f}")
    if not args.no_log:
        step = int(run.data.metrics.get("epoch", 0))
        client.log_metric(args.run_id, key, value, step=step)


if __name__ == "__main__":
    main()
