"""vaeexp benchmarks: `python bench/run.py` prints a table and writes bench/RESULTS.md.

Every timing is taken next to its reference in the same script, interleaved over several
repetitions, and reported as medians and ratios: these machines are noisy, absolute seconds are
not comparable between runs. Needs the full Fashion-MNIST from the Debian package
`dataset-fashion-mnist` (`apt-get install dataset-fashion-mnist`).

    python bench/run.py            # everything
    python bench/run.py --quick    # epoch timings and start-up only
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from common import bench_args, machine, median, write_section
from hydra import compose, initialize_config_dir
from mlflow.tracking import MlflowClient
from torch import nn

from vaeexp.checkpoint import Checkpoints
from vaeexp.config import register, settings
from vaeexp.data import load_data
from vaeexp.paths import CONF_DIR
from vaeexp.process import cpu_settings, steady_memory
from vaeexp.tracking.run import tracked_run
from vaeexp.trainer import train


def cfg_for(*overrides: str):
    register()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(
            "config",
            overrides=[
                "experiment=reference",
                "data=fashion_mnist",
                "runtime.progress=false",
                *overrides,
            ],
        )


# ---- the references, written as a PyTorch user would ----------------------------------------


class PlainVAE(nn.Module):
    """The same architecture and initialisation, in the usual pytorch/examples style."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc21, self.fc22 = nn.Linear(784, 256), nn.Linear(256, 2), nn.Linear(256, 2)
        self.fc3, self.fc4 = nn.Linear(2, 256), nn.Linear(256, 784)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        h = F.relu(self.fc1(x))
        mu, logvar = self.fc21(h), self.fc22(h)
        z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
        return torch.sigmoid(self.fc4(F.relu(self.fc3(z)))), mu, logvar


def plain_loss(recon, x, mu, logvar):
    bce = F.binary_cross_entropy(recon, x, reduction="sum")
    kld = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
    return (bce + kld) / len(x)


def plain_epoch(batches) -> float:
    """One epoch of the plain model over `batches` (images as rows of 784): the references'
    shared training step, timed from the first batch drawn to the last step taken."""
    torch.manual_seed(0)
    model = PlainVAE()
    opt = torch.optim.RMSprop(model.parameters(), lr=1e-3, alpha=0.9, eps=1e-7)
    start = time.perf_counter()
    for x in batches:
        recon, mu, logvar = model(x)
        loss = plain_loss(recon, x, mu, logvar)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return time.perf_counter() - start


def bare_epoch(train_x: torch.Tensor) -> float:
    """An in-memory loop: shuffled index slices of one tensor."""
    return plain_epoch(train_x[idx] for idx in torch.randperm(len(train_x)).split(100))


def torchvision_dataset(root: str) -> torch.utils.data.Dataset:
    """What a torchvision user writes: `FashionMNIST(transform=ToTensor())`, whose __getitem__
    makes a PIL image per item that ToTensor converts back (the files are in vaeexp's cache)."""
    from torchvision.datasets import FashionMNIST
    from torchvision.transforms import ToTensor

    return FashionMNIST(root, train=True, transform=ToTensor(), download=False)


class LeanItemDataset(torch.utils.data.Dataset):
    """A per-item Dataset without PIL: the best case for the DataLoader recipe."""

    def __init__(self, images: torch.Tensor):
        self.data = (images * 255).round().to(torch.uint8).view(-1, 28, 28)

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        return self.data[i].float().div(255), 0


def dataloader_epoch(dataset: torch.utils.data.Dataset) -> float:
    loader = torch.utils.data.DataLoader(dataset, batch_size=100, shuffle=True)
    return plain_epoch(x.view(-1, 784) for x, _ in loader)


# ---- vaeexp itself ---------------------------------------------------------------------------


def vaeexp_train(data, store: str, *overrides: str) -> tuple[float, dict]:
    """Wall time of the trainer (MLflow on, as a user runs it) and its last-epoch metrics."""
    cfg = settings(
        cfg_for(f"tracking.uri={store}", "tracking.log_model=false", "iwae.images=0", *overrides)
    )
    out = Path(tempfile.mkdtemp(prefix="vaeexp-bench-"))
    with tracked_run(cfg, data, torch.device("cpu"), out, list(overrides)) as run:
        start = time.perf_counter()
        [result] = train(
            [cfg],
            data,
            torch.device("cpu"),
            callbacks=run.callbacks,
            checkpoints=[Checkpoints(out / "checkpoint.pt")],
        )
        seconds = time.perf_counter() - start
    return seconds, result.metrics


def startup(runs: Path) -> tuple[float, float]:
    """(seconds from process start to the first training step, wall seconds) of a 1-epoch run
    on the bundled digits."""
    env = {
        **os.environ,
        "VAEEXP_RUNS": str(runs),
        "MLFLOW_TRACKING_URI": f"sqlite:///{runs / 'mlflow.db'}",
    }
    start = time.time()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "vaeexp",
            "epochs=1",
            "data=mnist_bundled",
            "runtime.progress=false",
        ],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    wall = time.time() - start
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("vaeexp").experiment_id
    run = client.search_runs([experiment], order_by=["attributes.start_time DESC"])[0]
    first = run.data.metrics["startup_seconds"]  # from the process's start, as a user waits
    return first, wall


def late_epoch_seconds(runs: Path, flush_denormal: bool) -> float:
    """Median time of epochs 8-10 of a 10-epoch reference run (a whole process, as a user runs
    it), when subnormal floats have appeared."""
    store = f"sqlite:///{runs / 'mlflow.db'}"
    env = {**os.environ, "VAEEXP_RUNS": str(runs), "MLFLOW_TRACKING_URI": store}
    overrides = ["experiment=reference", "data=fashion_mnist", "epochs=10", "film=off"]
    overrides += ["iwae.images=0", "tracking.log_model=false", "runtime.progress=false"]
    overrides += [f"runtime.flush_denormal={str(flush_denormal).lower()}"]
    subprocess.run(
        [sys.executable, "-m", "vaeexp", *overrides], env=env, check=True, capture_output=True
    )
    client = MlflowClient(store)
    experiment = client.get_experiment_by_name("vaeexp").experiment_id
    run = client.search_runs([experiment], order_by=["attributes.start_time DESC"])[0]
    history = client.get_metric_history(run.info.run_id, "epoch_seconds")
    return median(m.value for m in history if m.step >= 8)


def reference_run(runs: Path) -> float:
    """Peak RSS (MB) of a full 50-epoch reference run (its losses: bench/parity.py)."""
    store = f"sqlite:///{runs / 'mlflow.db'}"
    env = {**os.environ, "VAEEXP_RUNS": str(runs), "MLFLOW_TRACKING_URI": store}
    probe = (
        "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            probe,
            sys.executable,
            "-m",
            "vaeexp",
            "experiment=reference",
            "data=fashion_mnist",
            "runtime.progress=false",
        ],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return int(out.strip().splitlines()[-1]) / 1024


# ---- the table -------------------------------------------------------------------------------


def main() -> None:
    args = bench_args(__doc__, quick=True)
    steady_memory()  # what `python -m vaeexp` does, before torch's first op
    cpu_settings(flush_denormal=True)
    tmp = Path(tempfile.mkdtemp(prefix="vaeexp-bench-"))
    store = f"sqlite:///{tmp / 'mlflow.db'}"
    data = load_data(cfg_for().data)
    rows: list[tuple[str, str, str]] = []

    def row(what: str, value: str, note: str = "") -> None:
        rows.append((what, value, note))
        print(f"{what:58s} {value:>18s}  {note}", flush=True)

    print(machine())
    vaeexp_train(data, store, "epochs=1")  # warm-up: imports, allocator, MLflow schema
    times: dict[str, list[float]] = {"bare": [], "vaeexp": [], "dataloader": [], "lean": []}
    for _ in range(args.reps):  # interleaved, so drift hits every variant alike
        times["bare"].append(bare_epoch(data.train_x))
        times["vaeexp"].append(vaeexp_train(data, store, "epochs=1")[0])
        times["dataloader"].append(dataloader_epoch(torchvision_dataset(cfg_for().data.root)))
        times["lean"].append(dataloader_epoch(LeanItemDataset(data.train_x)))
    bare, ours, loader, lean = (median(times[k]) for k in ("bare", "vaeexp", "dataloader", "lean"))
    row("1. bare in-memory loop, epoch (s)", f"{bare:.2f}", f"{60000 / bare:,.0f} images/s")
    row(
        "1. vaeexp trainer, epoch incl. test eval + MLflow (s)",
        f"{ours:.2f}",
        f"{60000 / ours:,.0f} images/s",
    )
    row("1. ratio vaeexp / bare (goal <= 1.10)", f"{ours / bare:.3f}")
    row("2. torchvision FashionMNIST (PIL + ToTensor) + DataLoader, epoch (s)", f"{loader:.2f}")
    row("2. speed-up vaeexp vs that recipe (goal >= 2)", f"{loader / ours:.2f}x")
    row(
        "2. lean per-item Dataset (no PIL) + DataLoader, epoch (s)",
        f"{lean:.2f}",
        f"vaeexp {lean / ours:.2f}x faster",
    )

    switch_times: dict[str, list[float]] = {
        "fp32": [],
        "bf16": [],
        "compile": [],
        "runtime.threads=1": [],
    }
    first_compile = vaeexp_train(data, store, "epochs=1", "runtime.compile=true")[0]
    for _ in range(args.reps):
        for name, extra in (
            ("fp32", []),
            ("bf16", ["runtime.precision=bf16"]),
            ("compile", ["runtime.compile=true"]),
            ("runtime.threads=1", ["runtime.threads=1"]),
        ):
            threads = torch.get_num_threads()
            if "runtime.threads=1" in extra:
                torch.set_num_threads(1)  # what `python -m vaeexp runtime.threads=1` does
            switch_times[name].append(
                vaeexp_train(data, store, "epochs=2", *extra)[1]["epoch_seconds"]
            )
            torch.set_num_threads(threads)
    fp32 = median(switch_times["fp32"])
    for name in ("bf16", "compile", "runtime.threads=1"):
        row(
            f"5. {name}: steady epoch vs fp32 eager",
            f"{median(switch_times[name]) / fp32:.3f}",
            f"first compiled epoch took {first_compile - ours:+.0f} s more"
            if name == "compile"
            else "",
        )

    starts = [startup(tmp / "startup") for _ in range(args.reps)]
    row(
        "3. start-up: `python -m vaeexp` to first step (s)",
        f"{median(s[0] for s in starts):.2f}",
        "goal < 5 s",
    )
    row("3. 1-epoch run on the bundled digits, wall (s)", f"{median(s[1] for s in starts):.2f}")

    if not args.quick:
        losses = {
            name: vaeexp_train(data, store, "epochs=10", *extra)[1]["test/loss"]
            for name, extra in (
                ("fp32", []),
                ("bf16", ["runtime.precision=bf16"]),
                ("compile", ["runtime.compile=true"]),
                ("seed 1", ["seed=1"]),
            )
        }
        for name in ("bf16", "compile", "seed 1"):
            note = "the noise floor: fp32, another seed" if name == "seed 1" else "goal within 0.5"
            row(
                f"5. {name}: test loss after 10 epochs minus fp32 (nats)",
                f"{losses[name] - losses['fp32']:+.2f}",
                note,
            )
        late = {True: [], False: []}
        for _ in range(args.reps):
            for flush in (True, False):
                late[flush].append(late_epoch_seconds(tmp / "late", flush))
        row(
            "5. runtime.flush_denormal=false: epochs 8-10 vs default",
            f"{median(late[False]) / median(late[True]):.3f}",
            f"{median(late[False]):.2f} s vs {median(late[True]):.2f} s per epoch",
        )
        peak = reference_run(tmp / "reference")
        row("4. peak RSS, full 50-epoch reference run (MB)", f"{peak:.0f}", "goal < 1024")

    if not args.no_write:
        command = f"python bench/run.py{' --quick' if args.quick else ''}"
        write_section("bench", command, args.reps, rows)


if __name__ == "__main__":
    main()
