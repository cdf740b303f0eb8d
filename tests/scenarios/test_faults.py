"""Fault injection with real processes and signals: each test asserts what the user sees and that
nothing was lost."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.entities import Metric

from tests.conftest import (
    env_for,
    free_port,
    image_steps,
    make_cfg,
    metric_steps,
    mlflow_server,
    only_run,
    run_cli,
)
from vaeexp import checkpoint

# Slow enough to interrupt mid-epoch (450 steps an epoch), small enough to finish in seconds.
ARGS = [
    "data=mnist_bundled",
    "data.test_limit=200",
    "batch_size=10",
    "intermediate_dim=64",
    "log_every_n_steps=7",
    "runtime.progress=false",
    "tracking.log_model=false",
    "tracking.log_images=false",
    "iwae.k=10",
    "iwae.images=20",
]
FILM_METRICS = ("film/knn_accuracy", "film/active_units")
COMPARED = (
    "train/loss_step",
    "train/recon_step",
    "train/kl_step",
    "train/loss",
    "test/loss",
    "test/recon",
    "test/kl",
    "test/neg_elbo",
    "test_nll_iwae_k10",
)


def _start(env: dict[str, str], *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "vaeexp", *ARGS, *args],
        env={**os.environ, **env, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _wait_for(proc: subprocess.Popen, text: str) -> None:
    for line in proc.stdout:
        if text in line:
            return
    raise AssertionError(f"process ended before printing {text!r}")


def _histories(env) -> dict[str, list[tuple[int, float]]]:
    client, _, run = only_run(env)
    return {
        k: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, k)]
        for k in COMPARED
    }


def test_interrupt_mid_epoch_then_resume_equals_an_uninterrupted_run(tmp_path):
    straight = env_for(tmp_path / "straight")
    assert run_cli(*ARGS, "epochs=2", env=straight).returncode == 0

    env = env_for(tmp_path / "interrupted")
    proc = _start(env, "epochs=2")
    _wait_for(proc, "steps, from step")
    time.sleep(0.3)
    started = time.monotonic()
    proc.send_signal(signal.SIGINT)
    output = proc.communicate(timeout=60)[0]
    assert proc.returncode == 130 and time.monotonic() - started < 10
    assert "stopping after this step" in output and "marked KILLED" in output
    _, _, run = only_run(env)
    assert run.info.status == "KILLED"
    state = checkpoint.load(run.data.tags["output_dir"])
    assert 0 < state["step"] < 900  # stopped before the end, at a step boundary

    resumed = run_cli(*ARGS, "epochs=2", "resume=auto", env=env)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    _, _, again = only_run(env)  # the same MLflow run, finished
    assert again.info.run_id == run.info.run_id and again.info.status == "FINISHED"
    assert _histories(env) == _histories(straight)  # no gap, no duplicate, same numbers


def test_sigkill_keeps_last_checkpoint_and_resume_by_run_id(tmp_path):
    env = env_for(tmp_path)
    proc = _start(env, "epochs=6")
    _wait_for(proc, "epoch 2/6")
    time.sleep(0.2)
    proc.kill()
    proc.wait(timeout=30)
    client, _, run = only_run(env)
    run_id = run.info.run_id
    assert run.info.status == "RUNNING"  # nobody could tell MLflow
    state = checkpoint.load(run.data.tags["output_dir"])  # intact: written atomically
    assert state["epoch"] >= 1  # epoch 2's may or may not be written yet: either way...
    # The film's frame at the end of the next epoch (one an epoch by then): in MLflow already,
    # or as if the kill had come a moment later. The resumed run films that step again.
    refilmed = 450 * (state["epoch"] + 1)
    if refilmed not in metric_steps(client, run_id, FILM_METRICS[0]):
        client.log_batch(run_id, metrics=[Metric(k, 0.5, 0, refilmed) for k in FILM_METRICS])
    if refilmed not in image_steps(client, run_id, "latent"):
        client.log_image(run_id, np.zeros((8, 8, 3), np.uint8), key="latent", step=refilmed)

    resumed = run_cli(*ARGS, "epochs=6", f"resume={run.info.run_id}", env=env)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    _, _, again = only_run(env)
    assert again.info.status == "FINISHED"
    epochs = [m.step for m in client.get_metric_history(run.info.run_id, "test/loss")]
    assert epochs == [1, 2, 3, 4, 5, 6]  # ...no epoch is missing
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss_step")]
    assert steps == sorted(set(steps))  # and nothing is logged twice, the film's points neither
    film = [metric_steps(client, run_id, k) for k in FILM_METRICS]
    for steps in [*film, image_steps(client, run_id, "latent")]:
        assert refilmed in steps and steps == sorted(set(steps)) and steps[-1] == 6 * 450


def test_truncated_or_foreign_checkpoint_is_one_clear_line(tmp_path):
    env = env_for(tmp_path)
    folder = tmp_path / "broken"
    folder.mkdir()
    checkpoint.save(folder / checkpoint.FILENAME, {"model": {"w": torch.zeros(10_000)}})
    path = folder / checkpoint.FILENAME
    path.write_bytes(path.read_bytes()[:3000])
    result = run_cli(*ARGS, "epochs=1", f"resume={folder}", env=env)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"vaeexp: error: {path}: not a readable checkpoint (RuntimeError); it may be truncated or "
        "not written by vaeexp"
    ]
    assert not (tmp_path / "runs" / "mlflow.db").exists()  # refused before any run was made


def test_divergence_keeps_the_last_good_checkpoint(tmp_path):
    env = env_for(tmp_path)
    assert run_cli(*ARGS, "epochs=1", env=env).returncode == 0
    _, _, run = only_run(env)
    folder = run.data.tags["output_dir"]
    good = checkpoint.load(folder)

    result = run_cli(*ARGS, "epochs=3", "lr=1e30", f"resume={folder}", env=env)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert re.match(r"vaeexp: error: training loss diverged at step 45[12]: ", last)
    assert last.split(": ")[-1] in ("recon is nan", "recon is inf", "kl is nan", "kl is inf")
    _, _, failed = only_run(env)
    assert failed.info.status == "FAILED" and "Diverged" in failed.data.tags["failure_reason"]
    kept = checkpoint.load(folder)
    assert kept["step"] == good["step"] == 450  # the new folder got none; the good one is intact
    assert all(torch.isfinite(t).all() for t in kept["model"].values())


def test_unreachable_tracking_server_fails_in_seconds(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens here
    started = time.monotonic()
    result = run_cli(
        *ARGS, "epochs=1", f"tracking.uri=http://127.0.0.1:{port}", env=env_for(tmp_path)
    )
    assert result.returncode == 1 and time.monotonic() - started < 20
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"vaeexp: error: tracking.uri=http://127.0.0.1:{port}: no MLflow server")
    assert "steps, from step" not in result.stdout


def test_data_cache_that_cannot_be_written(tmp_path):
    (tmp_path / "a-file").write_text("not a folder")
    result = run_cli(
        "epochs=1",
        "runtime.progress=false",
        f"data.root={tmp_path / 'a-file' / 'cache'}",
        env=env_for(tmp_path),
    )
    assert result.returncode == 1
    [line] = result.stderr.strip().splitlines()
    assert "cannot write the data cache" in line and "data.root=" in line


@pytest.fixture
def tmpfs(tmp_path):
    """mount(size) -> a tmpfs of `size` bytes (rounded up to pages), unmounted afterwards."""
    mounted: list[Path] = []

    def mount(size: int) -> Path:
        path = tmp_path / f"tmpfs{len(mounted)}"
        path.mkdir()
        command = ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)]
        if subprocess.run(command, capture_output=True).returncode != 0:
            pytest.skip("cannot mount a tmpfs here (needs root)")
        mounted.append(path)
        return path

    yield mount
    for path in mounted:
        subprocess.run(["umount", str(path)], check=False)


def _on_disk(size: int) -> int:
    """The bytes a file of `size` takes on a tmpfs: whole pages."""
    page = os.sysconf("SC_PAGE_SIZE")
    return -(-size // page) * page


def _checkpoint_size(folder: Path, *overrides: str) -> int:
    """The size of the checkpoint the trainer writes with these settings, on this machine:
    measured after one training step."""
    from vaeexp.checkpoint import Checkpoints
    from vaeexp.config import settings
    from vaeexp.data import load_data
    from vaeexp.trainer import train

    cfg = settings(make_cfg(*overrides, "epochs=1", "data.train_limit=10", "batch_size=10"))
    path = folder / checkpoint.FILENAME
    checkpoints = Checkpoints(path, None, {"mlflow_run_id": "0" * 32})  # as a run's
    train(
        [cfg], load_data(cfg.data, progress=False), torch.device("cpu"), checkpoints=[checkpoints]
    )
    return path.stat().st_size


def test_full_disk_for_checkpoints_fails_clearly_and_keeps_the_last(tmp_path, tmpfs):
    """The disk holds the run folder's small files and one checkpoint and a half, as measured
    here: the first checkpoint fits, the second, written beside it before it replaces it, does
    not. (No film: its files would take a share of the disk that depends on its worker's pace.)"""
    args = [*ARGS, "intermediate_dim=32", "film=off"]
    size = _checkpoint_size(tmp_path / "measured", *args)
    beside = 64 * 1024  # Hydra's three YAML files, the log, checkpoint.json: a few KiB each
    full_disk = tmpfs(beside + _on_disk(size) + size // 2)
    env = env_for(tmp_path)
    result = run_cli(*args, "epochs=3", f"hydra.run.dir={full_disk}", env=env)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"vaeexp: error: {full_disk / 'checkpoint.pt'}: could not write")
    assert last.endswith("the previous one, if any, is intact")
    assert checkpoint.load(full_disk)["epoch"] >= 1  # the last complete checkpoint survives
    assert [p.name for p in Path(full_disk).glob(".checkpoint*")] == []  # no temp file left
    _, _, run = only_run(env)
    assert run.info.status == "FAILED" and "CheckpointError" in run.data.tags["failure_reason"]


def test_tracking_server_going_away_does_not_stop_training(tmp_path):
    from mlflow.tracking import MlflowClient

    server_root = tmp_path / "server"
    server_root.mkdir()
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = mlflow_server(server_root, port)
    env = env_for(tmp_path)
    proc = _start(
        env,
        "epochs=4",
        f"tracking.uri={uri}",
        "tracking.log_images=true",
        "tracking.log_model=true",
    )
    try:
        _wait_for(proc, "epoch 1/4")
    finally:
        server.terminate()  # the server goes away in the middle of training
        server.wait(timeout=30)
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 1, output[-3000:]
    assert "training goes on" in output and "epoch 4/4" in output  # training finished anyway
    [manifest] = (tmp_path / "runs").glob("outputs/**/undelivered.json")
    folder = manifest.parent
    assert f"python -m vaeexp.sync {folder}" in output
    assert checkpoint.load(folder)["epoch"] == 4
    assert list((folder / "undelivered").glob("*.png"))  # images kept on disk

    server = mlflow_server(server_root, port)  # back, with the same store
    try:
        result = run_cli(str(folder), module="vaeexp.sync", env=env)
        assert result.returncode == 0, result.stderr[-3000:]
        client = MlflowClient(uri)
        [run] = client.search_runs([client.get_experiment_by_name("vaeexp").experiment_id])
        assert run.info.status == "FINISHED"
        epochs = [m.step for m in client.get_metric_history(run.info.run_id, "test/loss")]
        assert epochs == [1, 2, 3, 4]
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss_step")]
        assert steps == sorted(set(steps)) and steps[-1] == 4 * 450
        assert "test_nll_iwae_k10" in run.data.metrics
        images = [f.path for f in client.list_artifacts(run.info.run_id, "images")]
        assert any("reconstructions+step+4+" in p for p in images)
        assert not manifest.exists() and (folder / "undelivered.json.delivered").exists()
    finally:
        server.terminate()
        server.wait(timeout=30)
