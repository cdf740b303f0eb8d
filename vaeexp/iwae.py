"""`python -m vaeexp.iwae <run id>`: the IWAE bound on the test NLL of a finished run.

Rebuilds the run's model from its logged checkpoint and its data from its logged config (the
data it actually used, fallback included), and logs `test_nll_iwae_k{k}` back to the run.
"""

from __future__ import annotations

import mlflow
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from vaeexp import checkpoint, cli
from vaeexp.config import Config, register
from vaeexp.data import DataUnavailable, fallback_config, load_data
from vaeexp.likelihood import iwae_nll
from vaeexp.process import cpu_settings

PROG = "vaeexp.iwae"


def iwae_of_run(client: MlflowClient, run_id: str, k: int, images: int | None) -> float:
    """The bound over the run's first `images` test images (None: all), with `k` samples."""
    run = client.get_run(run_id)
    with cli.downloaded(client, run_id, "hydra/config.yaml") as config_file:
        cfg = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.load(config_file))
    with cli.downloaded(client, run_id, checkpoint.FILENAME) as ckpt_file:
        model, _ = checkpoint.load_model(ckpt_file)
    data_cfg = OmegaConf.to_object(cfg.data)
    resolved = run.data.params.get("data.resolved")
    if resolved is None:
        raise DataUnavailable("the run has no data.resolved param: not a vaeexp training run")
    if resolved != data_cfg.name:  # it trained on its fallback
        data_cfg = fallback_config(data_cfg)
    data_cfg.download, data_cfg.fallback = False, None  # the data it trained on, or an error
    cpu_settings(cfg.runtime.flush_denormal)  # before the first parallel op
    data = load_data(data_cfg, progress=False)
    return iwae_nll(model, data.test_x[:images], k)


def main(argv: list[str] | None = None) -> None:
    register()
    parser = cli.parser(PROG, __doc__)
    parser.add_argument("run_id")
    parser.add_argument("--k", type=int, default=1000, help="importance samples (default 1000)")
    parser.add_argument(
        "--images", type=int, default=1000, help="first N test images (default 1000; 0: all)"
    )
    parser.add_argument("--no-log", action="store_true", help="print only; log nothing")
    args = parser.parse_args(argv)
    if args.k < 1 or args.images < 0:
        parser.error("--k must be >= 1 and --images >= 0")
    client = cli.open_store(args.uri)
    run = cli.get_run(client, args.run_id, PROG)
    try:
        value = iwae_of_run(client, args.run_id, args.k, args.images or None)
    except (
        checkpoint.CheckpointError,
        DataUnavailable,
        mlflow.exceptions.MlflowException,
        OmegaConfBaseException,  # a config this vaeexp's schema does not know
        OSError,
    ) as e:
        cli.fail(PROG, f"run {args.run_id}: {str(e).splitlines()[0]}")
    key = f"test_nll_iwae_k{args.k}"
    print(f"{key} = {value:.4f}")
    if not args.no_log:
        step = int(run.data.metrics.get("epoch", 0))
        client.log_metric(args.run_id, key, value, step=step)


if __name__ == "__main__":
    main()
