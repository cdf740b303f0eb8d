"""vaeexp on a GPU: a short end-to-end check and timing through vaeexp's own trainer, one run
and stacks of many (hydra/launcher=stacked's groups), eager and with the step captured as a CUDA
graph.

    python bench/gpu.py                      # CUDA: check, then time (writes RESULTS.md)
    python bench/gpu.py --device cpu --train 1000 --test 200 --epochs 1 --no-write   # the suite

A GPU machine may have no MLflow, no registry and no data, so this script tracks nothing,
generates its images, and imports no more than torch, torchvision, numpy and Hydra/OmegaConf; it
fails if vaeexp's modules pulled in anything else. Where Hydra is missing, its wheels
(hydra-core, omegaconf, antlr4-python3-runtime 4.9, PyYAML) travel with the command and install
with `pip install --no-index --no-deps`. RESULTS.md is written on that machine's copy of the
repository: copy bench/RESULTS.md to where the results come back from.

It checks the contract a run keeps on the CPU: the data on the device, no host syncs between
log points (counted with torch's sync debug mode) nor in the film's capture, the IWAE bound, a
checkpoint written on the device that loads in a process that sees no GPU, and checkpoints that
resume across devices (written on the device, resumed on the CPU, and back); that a captured
step (runtime.cuda_graph) computes what the eager one does; that each member of a stack of four
trains as its run alone. Every check runs and is reported, failed or not. Then it times epochs
on the device against the same machine's CPU (seconds per epoch, images per second, host syncs
per step), and stacks of M members (`--stacks`) eager and captured: seconds per epoch of the
whole stack and its images per second, against one run.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch
from omegaconf import OmegaConf

T = TypeVar("T")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a copy of the repository, without installing vaeexp

from vaeexp import checkpoint  # noqa: E402
from vaeexp.checkpoint import Checkpoints  # noqa: E402
from vaeexp.config import Config, FilmPrecision, register, settings  # noqa: E402
from vaeexp.data import Dataset  # noqa: E402
from vaeexp.film.capture import FilmedImages, to_host  # noqa: E402
from vaeexp.likelihood import iwae_metrics  # noqa: E402
from vaeexp.model import VAE  # noqa: E402
from vaeexp.process import cpu_settings, pick_device  # noqa: E402
from vaeexp.step import held_out_losses, setup  # noqa: E402
from vaeexp.trainer import Callback, train  # noqa: E402


def config(device: str, epochs: int, **overrides: object) -> Config:
    register()
    cfg = OmegaConf.merge(
        OmegaConf.structured(Config),
        {
            "epochs": epochs,
            "runtime": {"device": device, "progress": False},
            "data": {"name": "generated", "_target_": "none"},
        },
        overrides,  # merged: runtime={...} keeps the device
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


class Recorder(Callback):
    """Each epoch's metrics of its member (the only one: this script trains stacks of one)."""

    def __init__(self) -> None:
        self.epochs: list[dict[str, float]] = []

    def on_epoch_end(
        self, epoch: int, step: int, metrics: dict[int, dict[str, float]], model: VAE
    ) -> None:
        if self.member in metrics:
            self.epochs.append(metrics[self.member])


def counted_syncs(device: torch.device, fn: Callable[[], T]) -> tuple[T, int | None]:
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
EPOCH_END_SYNCS = 4  # reading the epoch's train and test losses back, and the test pass's
# Once a run: its per-member settings put on the device, and capturing the step.
SETUP_SYNCS = 24
STACK_TOLERANCE = 1e-3  # nats: a member against its run alone (reduction order differs)


class Checks:
    """What was checked: every check runs and is reported, so one run on a lent GPU tells all."""

    def __init__(self) -> None:
        self.failed: list[str] = []

    def __call__(self, ok: bool, what: str) -> None:
        print(f"  {'ok' if ok else 'FAILED'}: {what}", flush=True)
        if not ok:
            self.failed.append(what)


def check(args: argparse.Namespace, device: torch.device, data: Dataset) -> tuple[Checks, float]:
    """The contract, end to end; returns the checks and the host syncs per step."""
    checks = Checks()
    folder = Path(tempfile.mkdtemp(prefix="vaeexp-gpu-"))
    cfg = config(str(device), 1, log_every_n_steps=args.log_every)
    untrained, _ = setup([cfg], device)
    before = held_out_losses(untrained, data.test_x.to(device), 1.0, 1000)[0]["loss"]
    hook = Recorder()
    [result], syncs = counted_syncs(device, lambda: train([cfg], data, device, callbacks=[hook]))
    steps, loss = result.step, hook.epochs[-1]["test/loss"]
    on_device = next(result.model.parameters()).device.type == device.type
    checks(
        math.isfinite(loss) and loss < before and on_device,
        f"{steps} steps on {device}: test loss {before:.2f} -> {loss:.2f}",
    )
    per_step = 0.0
    if syncs is not None:
        # a read-back per log point and at the epoch's end, and the run's set-up
        budget = -(-steps // args.log_every) + EPOCH_END_SYNCS + SETUP_SYNCS
        per_step = syncs / steps
        checks(syncs <= budget, f"host syncs: {syncs} in {steps} steps (at most {budget})")
    # The film's capture: the copy off the device is queued; only the worker's call waits.
    every = torch.arange(len(data.test_x)).numpy()
    filmed = FilmedImages(data.test_x, every, FilmPrecision.fp32, device)
    pending, capture_syncs = counted_syncs(device, lambda: to_host(filmed.means(result.model)))
    if capture_syncs is not None:
        checks(capture_syncs == 0, f"film capture: {capture_syncs} host syncs")
    means = pending()
    on_cpu = FilmedImages(data.test_x, every, FilmPrecision.fp32, torch.device("cpu"))
    reference = on_cpu.means(result.model.cpu()).numpy()
    result.model.to(device)
    gap = float(abs(means - reference).max())
    checks(gap < 1e-3, f"film capture: means on {device} agree with the CPU's to {gap:.1e}")
    bound = iwae_metrics(result.model, data.test_x.to(device), k=50, images=200)
    value = next(iter(bound.values()))
    checks(math.isfinite(value), f"IWAE bound (k=50, 200 images) on {device}: {value:.2f}")
    # Checkpoints across devices: written on the device, resumed on the CPU, and back; the one
    # written on the device loads where no GPU is visible.
    first, on_cpu_ckpt = folder / "on-device.pt", folder / "on-cpu.pt"
    train([cfg], data, device, checkpoints=[Checkpoints(first)])
    cpu_only = subprocess.run(
        [sys.executable, "-c", LOAD_ON_CPU, str(first)],
        env={
            **os.environ,
            "CUDA_VISIBLE_DEVICES": "",
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        },
        capture_output=True,
        text=True,
    )
    why = "" if cpu_only.returncode == 0 else f": {cpu_only.stderr[-300:]}"
    checks(cpu_only.returncode == 0, f"a checkpoint written on {device} loads where no GPU is{why}")
    cpu = torch.device("cpu")
    [resumed] = train(
        [config("cpu", 2, log_every_n_steps=args.log_every)],
        data,
        cpu,
        checkpoints=[Checkpoints(on_cpu_ckpt, checkpoint.load(first))],
    )
    [back] = train(
        [config(str(device), 3, log_every_n_steps=args.log_every)],
        data,
        device,
        checkpoints=[Checkpoints(None, checkpoint.load(on_cpu_ckpt))],
    )
    checks(
        (resumed.epoch, back.epoch) == (2, 3)
        and resumed.step == 2 * steps
        and all(math.isfinite(r.metrics["test/loss"]) for r in (resumed, back)),
        f"checkpoint {device} -> cpu -> {device}: epochs 2 and 3 continued",
    )
    [again] = train([cfg], data, device)
    same = again.metrics["test/loss"] == loss
    print(f"  same seed twice on {device}: test loss {'identical' if same else 'differs'}")
    if device.type == "cuda":
        eager = config(
            str(device), 1, log_every_n_steps=args.log_every, runtime={"cuda_graph": False}
        )
        [plain] = train([eager], data, device)
        gap = abs(plain.metrics["test/loss"] - loss)
        checks(gap <= STACK_TOLERANCE, f"captured step vs eager: test loss {gap:.1e} apart")
    stack_check(args, device, data, checks)
    return checks, per_step


def stack_check(
    args: argparse.Namespace, device: torch.device, data: Dataset, checks: Checks
) -> None:
    """A stack of four members of other seeds, learning rates and noise scales: over 20 steps,
    each ends where its run alone does, to rounding (a shared draw or a leaked gradient is whole
    nats); over the whole epoch, how far rounding differences have grown is reported."""
    settings_of = [(0, 1e-3, 1.0), (1, 3e-3, 0.5), (2, 1e-3, 1.0), (3, 2e-3, 0.7)]
    short = Dataset(
        data.train_x[:2000], data.train_y[:2000], data.test_x, data.test_y, "generated", "-"
    )
    for what, subset in (("20 steps", short), ("one epoch", data)):
        cfgs = [
            config(str(device), 1, log_every_n_steps=args.log_every, seed=s, lr=lr, epsilon_std=e)
            for s, lr, e in settings_of
        ]
        stacked, syncs = counted_syncs(device, lambda: train(cfgs, subset, device))  # noqa: B023
        gaps = [
            abs(member.metrics["test/loss"] - train([cfg], subset, device)[0].metrics["test/loss"])
            for member, cfg in zip(stacked, cfgs, strict=True)
        ]
        said = f"a stack of 4 on {device}, {what}: each member's test loss {max(gaps):.1e} nats"
        if what == "20 steps":
            checks(max(gaps) <= STACK_TOLERANCE, f"{said} from its run alone")
        else:
            print(f"  {said} from its run alone (rounding, grown over {stacked[0].step} steps)")
        if syncs is not None:
            steps = stacked[0].step
            budget = -(-steps // args.log_every) + EPOCH_END_SYNCS + SETUP_SYNCS
            checks(
                syncs <= budget, f"a stack of 4: {syncs} host syncs in {steps} steps (<= {budget})"
            )


LOAD_ON_CPU = """
import sys, torch
from vaeexp import checkpoint
assert not torch.cuda.is_available()
model, config = checkpoint.load_model(sys.argv[1])
assert model.decode(torch.zeros(3, config["latent_dim"])).shape == (3, 784)
"""


def epoch_seconds(args: argparse.Namespace, device: torch.device, data: Dataset) -> float:
    """Median seconds per epoch after the first (warm-up)."""
    hook = Recorder()
    cfg = config(str(device), args.epochs, log_every_n_steps=args.log_every)
    train([cfg], data, device, callbacks=[hook])
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


def stacks(args: argparse.Namespace, device: torch.device, data: Dataset) -> list[Row]:
    """Seconds per epoch of stacks of M members (seeds 0..M-1), eager and captured, against
    one run: the speed of a stacked sweep. Images per second count every member's."""
    n = len(data.train_x)
    modes = {"eager": False, "graph": True} if device.type == "cuda" else {"eager": False}
    seconds: dict[tuple[str, int], float] = {}
    for members in args.stacks:
        for mode, graph in modes.items():
            for precision in ["fp32", *(["bf16"] if members in args.bf16 else [])]:
                hook = Recorder()
                cfgs = [
                    config(
                        str(device),
                        args.epochs,
                        log_every_n_steps=args.log_every,
                        seed=seed,
                        runtime={"cuda_graph": graph, "precision": precision},
                    )
                    for seed in range(members)
                ]
                train(cfgs, data, device, callbacks=[hook])
                timed = sorted(e["epoch_seconds"] for e in (hook.epochs[1:] or hook.epochs))
                key = (f"{mode}{'' if precision == 'fp32' else ' ' + precision}", members)
                seconds[key] = timed[len(timed) // 2]
                print(f"  M={members} {key[0]}: {seconds[key]:.3f} s per epoch", flush=True)
    rows = []
    for (mode, members), s in seconds.items():
        alone = seconds.get((mode.split()[0], 1))
        rows.append(
            (
                f"stack of {members}, {mode}: seconds per epoch",
                f"{s:.3f}",
                f"{members * n / s:,.0f} images/s"
                + (f"; {s / alone:.2f}x one run's {mode.split()[0]} epoch" if alone else ""),
            )
        )
    if ("graph", 1) in seconds:
        solo_eager, solo_graph = seconds[("eager", 1)], seconds[("graph", 1)]
        rows.append(
            (
                "one run, captured vs eager: speed-up",
                f"{solo_eager / solo_graph:.2f}x",
                "goal >= 3x",
            )
        )
    if ("graph", 64) in seconds:
        for mode in modes:
            rows.append(
                (
                    f"64 members (captured) vs one run ({mode}): wall per epoch",
                    f"{seconds[('graph', 64)] / seconds[(mode, 1)]:.2f}x",
                    "goal <= 1.5x against one run",
                )
            )
    return rows


def third_party_imports() -> list[str]:
    """Top-level packages vaeexp's modules imported beyond what torch, torchvision, numpy and
    Hydra import themselves (measured in a fresh interpreter)."""
    allowed = "import torch, torchvision, numpy, omegaconf, hydra.utils, sys; print(*sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", allowed], capture_output=True, text=True, check=True
    )
    baseline = {m.split(".")[0] for m in out.stdout.split()}
    loaded = (name for name, module in sys.modules.items() if module is not None)
    ours = {m.split(".")[0] for m in loaded} - set(sys.stdlib_module_names)
    return sorted(m for m in ours - baseline if not m.startswith("_") and m != "vaeexp")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), cpu, or auto")
    parser.add_argument("--epochs", type=int, default=5, help="timed epochs (default 5)")
    parser.add_argument("--train", type=int, default=60_000, help="generated training images")
    parser.add_argument("--test", type=int, default=10_000, help="generated test images")
    parser.add_argument("--log-every", type=int, default=50, help="log_every_n_steps")
    parser.add_argument("--no-write", action="store_true", help="print only; no RESULTS.md")
    parser.add_argument(
        "--stacks", help="members of each timed stack (default 1,8,32,64,128,512; CPU: 1,4)"
    )
    parser.add_argument("--bf16", default="64,512", help="stack sizes also timed in bf16")
    args = parser.parse_args()
    default = "1,8,32,64,128,512" if args.device != "cpu" else "1,4"
    args.stacks = [int(m) for m in (args.stacks or default).split(",")]
    args.bf16 = [int(m) for m in args.bf16.split(",") if m]
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench/gpu.py: --device cuda: no CUDA GPU here; try --device cpu")
    cpu_settings(flush_denormal=True)
    device = pick_device(args.device)
    data = generated(args.train, args.test)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"bench/gpu.py on {name}: torch {torch.__version__}, Python {sys.version.split()[0]}")
    extra = third_party_imports()
    print(f"imports beyond torch, torchvision, numpy, Hydra: {', '.join(extra) or 'none'}")
    checks, syncs_per_step = check(args, device, data)
    rows = timing(args, device, data) + stacks(args, device, data)
    if device.type == "cuda":
        rows.insert(0, ("GPU", torch.cuda.get_device_name(device), f"torch {torch.__version__}"))
        rows.append(("host syncs per step", f"{syncs_per_step:.3f}", "one read-back a log point"))
    for measurement, value, note in rows:
        print(f"  {measurement}: {value}" + (f" ({note})" if note else ""))
    if extra:
        checks.failed.append(f"vaeexp imported {', '.join(extra)}: a GPU machine may lack them")
    if checks.failed:
        sys.exit("bench/gpu.py: failed: " + "; ".join(checks.failed))
    if not args.no_write and device.type == "cuda":
        sys.path.insert(0, str(Path(__file__).parent))
        from common import write_section

        write_section("gpu", f"python bench/gpu.py --epochs {args.epochs}", 1, rows, of="runs")


if __name__ == "__main__":
    main()
