"""vaeexp on a GPU: a short end-to-end check and timing through vaeexp's own trainer.

    python bench/gpu.py                      # CUDA: check, then time (writes RESULTS.md)
    python bench/gpu.py --device cpu --train 1000 --test 200 --epochs 1 --no-write   # the suite

A GPU machine may have no MLflow, no registry and no data, so this script tracks nothing,
generates its images, and imports no more than torch, torchvision, numpy and Hydra/OmegaConf
(their wheels can travel with the command); it says if vaeexp's modules pulled in anything else.

It checks the contract a run keeps on the CPU: data on the device, no host syncs between log
points (counted with torch's sync debug mode), the film's capture, the IWAE bound, a model that
loads on a CPU-only machine, and checkpoints that resume across devices (written on the device,
resumed on the CPU, and back). Then it times epochs: seconds per epoch and images per second.
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a copy of the repository, without installing vaeexp

from vaeexp import checkpoint  # noqa: E402
from vaeexp.config import Config, FilmPrecision, register, settings  # noqa: E402
from vaeexp.data import Dataset  # noqa: E402
from vaeexp.film.capture import FilmedImages, to_host  # noqa: E402
from vaeexp.likelihood import iwae_metrics  # noqa: E402
from vaeexp.model import VAE  # noqa: E402
from vaeexp.resumable import Checkpoints  # noqa: E402
from vaeexp.trainer import cpu_settings, pick_device, train  # noqa: E402


def config(device: str, epochs: int, **overrides: object) -> Config:
    register()
    cfg = OmegaConf.merge(
        OmegaConf.structured(Config),
        {
            "epochs": epochs,
            "device": device,
            "progress": False,
            "data": {"name": "generated", "_target_": "none"},
            **overrides,
        },
    )
    return settings(cfg)


def generated(n_train: int, n_test: int) -> Dataset:
    """Digit-sized images with structure to learn (a few smooth prototypes plus noise): the
    timing does not depend on the pixels, the check that the loss falls does."""
    g = torch.Generator().manual_seed(0)
    prototypes = torch.rand(10, 1, 7, 7, generator=g)
    prototypes = torch.nn.functional.interpolate(prototypes, size=28, mode="bilinear").flatten(1)

    def split(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.randint(0, 10, (n,), generator=g)
        x = (prototypes[y] + 0.1 * torch.randn(n, 784, generator=g)).clamp(0, 1)
        return x, y

    return Dataset(*split(n_train), *split(n_test), resolved="generated", source="bench/gpu.py")


class Recorder:
    """The trainer's hook: each epoch's metrics."""

    def __init__(self) -> None:
        self.epochs: list[dict[str, float]] = []

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def on_epoch_end(self, epoch: int, step: int, metrics: dict[str, float], model: VAE) -> None:
        self.epochs.append(metrics)


def counted_syncs(device: torch.device, fn):
    """(fn's result, host syncs while it ran): torch's sync debug mode warns at every one."""
    if device.type != "cuda":
        return fn(), None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            result = fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return result, sum("synchroniz" in str(w.message) for w in caught)


Row = tuple[str, str, str]  # measurement, value, note


def check(args: argparse.Namespace, device: torch.device, data: Dataset) -> list[str]:
    """The contract, end to end; returns what was checked, raises on what failed."""
    done = []
    folder = Path(tempfile.mkdtemp(prefix="vaeexp-gpu-"))
    cfg = config(str(device), 1, log_every_n_steps=args.log_every)
    hook = Recorder()
    first_ckpt = folder / "on-device.pt"
    result, syncs = counted_syncs(
        device,
        lambda: train(cfg, data, device, hooks=[hook], checkpoints=Checkpoints(first_ckpt)),
    )
    steps = result.step
    loss = hook.epochs[-1]["test/loss"]
    assert math.isfinite(loss), f"test loss {loss}"
    assert next(result.model.parameters()).device.type == device.type
    done.append(f"trained {steps} steps on {device}: test loss {loss:.2f}")
    if syncs is not None:
        log_points = -(-steps // args.log_every) + 1
        done.append(
            f"host syncs: {syncs} in {steps} steps ({syncs / steps:.3f} a step; "
            f"{log_points} log points and one epoch end)"
        )
    # The film's capture: its copy off the device is queued, the worker's call waits for it.
    every = torch.arange(len(data.test_x)).numpy()
    filmed = FilmedImages(data.test_x, every, FilmPrecision.fp32, device)
    means = to_host(filmed.means(result.model))()
    on_cpu = FilmedImages(data.test_x, every, FilmPrecision.fp32, torch.device("cpu"))
    reference = on_cpu.means(result.model.cpu()).numpy()
    result.model.to(device)
    gap = float(abs(means - reference).max())
    assert gap < 1e-3, f"film means on {device} and cpu differ by {gap}"
    done.append(f"film capture: means agree with the CPU's to {gap:.1e}")
    bound = iwae_metrics(result.model, data.test_x.to(device), k=50, images=200)
    assert all(math.isfinite(v) for v in bound.values()), bound
    done.append(f"IWAE bound (k=50, 200 images) on {device}: {next(iter(bound.values())):.2f}")
    # A model exported as the tracker does (on the CPU) loads where there is no GPU.
    exported = folder / "model.pt"
    torch.save(result.model.cpu().state_dict(), exported)
    loaded = VAE(cfg.latent_dim, cfg.intermediate_dim)
    loaded.load_state_dict(torch.load(exported, map_location="cpu", weights_only=True))
    done.append("exported model loads on the CPU")
    # Checkpoints across devices: written on the device, resumed on the CPU, and back.
    cpu = torch.device("cpu")
    cpu_ckpt = folder / "on-cpu.pt"
    resumed = train(
        config("cpu", 2, log_every_n_steps=args.log_every),
        data,
        cpu,
        checkpoints=Checkpoints(cpu_ckpt, checkpoint.load(first_ckpt)),
    )
    assert resumed.epoch == 2 and math.isfinite(resumed.metrics["test/loss"])
    back = train(
        config(str(device), 3, log_every_n_steps=args.log_every),
        data,
        device,
        checkpoints=Checkpoints(None, checkpoint.load(cpu_ckpt)),
    )
    assert back.epoch == 3 and math.isfinite(back.metrics["test/loss"])
    done.append(f"checkpoint {device} -> cpu -> {device}: epochs 1, 2, 3 resumed")
    # Same seed, same device: the same numbers?
    again = train(cfg, data, device)
    same = again.metrics["test/loss"] == loss
    done.append(f"same seed twice on {device}: test loss {'identical' if same else 'differs'}")
    return done


def epoch_seconds(args: argparse.Namespace, device: torch.device, data: Dataset) -> float:
    """Median seconds per epoch after the first (warm-up)."""
    hook = Recorder()
    cfg = config(str(device), args.epochs, log_every_n_steps=args.log_every)
    train(cfg, data, device, hooks=[hook])
    timed = sorted(e["epoch_seconds"] for e in (hook.epochs[1:] or hook.epochs))
    return timed[len(timed) // 2]


def timing(args: argparse.Namespace, device: torch.device, data: Dataset) -> list[Row]:
    """Seconds per epoch and images per second on the device, against the CPU of the same
    machine in the same script."""
    n = len(data.train_x)
    seconds = epoch_seconds(args, device, data)
    rows = [
        (f"seconds per epoch on {device}", f"{seconds:.3f}", f"{n} images, batch 100"),
        (f"images per second on {device}", f"{n / seconds:,.0f}", ""),
    ]
    if device.type != "cpu":
        cpu = epoch_seconds(args, torch.device("cpu"), data)
        threads = torch.get_num_threads()
        rows += [
            ("seconds per epoch on cpu", f"{cpu:.3f}", f"the same machine, {threads} threads"),
            (f"{device} / cpu, per epoch", f"{seconds / cpu:.2f}x", "below 1: the GPU is faster"),
        ]
    return rows


def third_party_imports() -> list[str]:
    """Top-level packages vaeexp's modules imported beyond what torch, torchvision, numpy and
    Hydra import themselves (measured in a fresh interpreter)."""
    allowed = "import torch, torchvision, numpy, omegaconf, hydra.utils, sys; print(*sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", allowed], capture_output=True, text=True, check=True
    )
    baseline = {m.split(".")[0] for m in out.stdout.split()}
    ours = {m.split(".")[0] for m in sys.modules} - set(sys.stdlib_module_names)
    return sorted(m for m in ours - baseline if not m.startswith("_") and m != "vaeexp")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), cpu, or auto")
    parser.add_argument("--epochs", type=int, default=5, help="timed epochs (default 5)")
    parser.add_argument("--train", type=int, default=60_000, help="generated training images")
    parser.add_argument("--test", type=int, default=10_000, help="generated test images")
    parser.add_argument("--log-every", type=int, default=50, help="log_every_n_steps")
    parser.add_argument("--no-write", action="store_true", help="print only; no RESULTS.md")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench/gpu.py: --device cuda: no CUDA GPU here; try --device cpu")
    cpu_settings(flush_denormal=True)
    device = pick_device(args.device)
    data = generated(args.train, args.test)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"bench/gpu.py on {name}: torch {torch.__version__}, Python {sys.version.split()[0]}")
    extra = third_party_imports()
    print(f"imports beyond torch, torchvision, numpy, Hydra: {', '.join(extra) or 'none'}")
    for line in check(args, device, data):
        print(f"  ok: {line}")
    rows = timing(args, device, data)
    for measurement, value, note in rows:
        print(f"  {measurement}: {value}" + (f" ({note})" if note else ""))
    if extra:
        sys.exit(f"bench/gpu.py: vaeexp imported {', '.join(extra)}: a GPU machine may lack them")
    if not args.no_write and device.type == "cuda":
        sys.path.insert(0, str(Path(__file__).parent))
        from common import write_section

        write_section("gpu", f"python bench/gpu.py --epochs {args.epochs}", 1, rows, of="runs")


if __name__ == "__main__":
    main()
