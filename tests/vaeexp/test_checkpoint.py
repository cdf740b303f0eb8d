"""Checkpoints (vaeexp.checkpoint): written atomically, read back or refused with a clear error,
and where a resumed run continues from: checkpoints written in-process under a runs/ folder of
the test's own, and run ids in a real SQLite MLflow store."""

from __future__ import annotations

import json
import logging
import os
import pickle
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from tests.conftest import TINY, make_cfg
from vaeexp import checkpoint
from vaeexp.checkpoint import (
    CheckpointError,
    Position,
    latest_matching,
    resolve,
    restore_state,
    training_state,
)
from vaeexp.config import Config, plain, settings
from vaeexp.model import loss_terms
from vaeexp.step import setup


def test_round_trip_and_folder_lookup(tmp_path):
    state = {
        "epoch": 3,
        "step": 30,
        "model": {"w": torch.ones(1, 2, 3)},
        "optimizer": {"square_avg": [torch.full((1, 2, 3), 0.5)], "steps": 30},
    }
    checkpoint.save(tmp_path / checkpoint.FILENAME, state)
    loaded = checkpoint.load(tmp_path)  # a run folder finds its checkpoint
    assert loaded["epoch"] == 3 and torch.equal(loaded["model"]["w"], torch.ones(1, 2, 3))
    assert torch.equal(loaded["optimizer"]["square_avg"][0], torch.full((1, 2, 3), 0.5))
    assert loaded["version"] == checkpoint.VERSION == 2
    assert [p.name for p in tmp_path.iterdir()] == [checkpoint.FILENAME]  # no temp file left


def test_another_version_is_refused_by_name(tmp_path):
    """A version-1 checkpoint (one model's torch.optim state and generator states) cannot
    continue a run of this version: it says so rather than failing on a missing key."""
    path = tmp_path / "c.pt"
    torch.save({"format": checkpoint.FORMAT, "version": 1, "rng": torch.get_rng_state()}, path)
    with pytest.raises(CheckpointError, match="checkpoint version 1, this vaeexp reads version 2"):
        checkpoint.load(path)


def test_a_members_state_continues_it_alone(tmp_path):
    """Member 1 of a stack of three writes the checkpoint its job alone would: restored into a
    one-member model and optimizer, it holds that member's weights, statistics and sums, and
    `load_model` rebuilds it as a plain VAE."""
    cfgs = [cfg(f"seed={s}", f"lr={lr}") for s, lr in ((0, 1e-3), (1, 3e-3), (2, 1e-3))]
    cpu = torch.device("cpu")
    model, optimizer = setup(cfgs, cpu)
    x = torch.rand(3, 8, 784)
    recon, kl = loss_terms(model, x)
    optimizer.step(torch.autograd.grad((recon + kl).sum(), optimizer.params))
    pos = Position.start(3, cpu)
    pos.epoch, pos.batch, pos.step, pos.window_images = 1, 2, 7, 16
    pos.epoch_sums.copy_(torch.arange(6.0).view(3, 2))
    pos.window.copy_(-torch.arange(6.0).view(3, 2))
    path = tmp_path / checkpoint.FILENAME
    checkpoint.save(path, training_state(cfgs[1], model, optimizer, 1, pos, {"test/loss": 1.0}))

    state = checkpoint.load(path)
    alone, alone_optimizer = setup([cfgs[1]], cpu)
    alone_pos = Position.start(1, cpu)
    metrics = restore_state(state, cfgs[1], alone, alone_optimizer, 0, alone_pos)
    assert metrics == {"test/loss": 1.0}
    for name, value in model.member(1).state_dict().items():
        assert torch.equal(alone.state_dict()[name], value), name
    assert alone_optimizer.steps == 1
    for stacked, restored in zip(
        optimizer.state["square_avg"], alone_optimizer.state["square_avg"], strict=True
    ):
        assert stacked[1].abs().sum() > 0 and torch.equal(stacked[1:2], restored)
    where = (alone_pos.epoch, alone_pos.batch, alone_pos.step, alone_pos.window_images)
    assert where == (1, 2, 7, 16)
    assert alone_pos.epoch_sums.tolist() == [[2.0, 3.0]]
    assert alone_pos.window.tolist() == [[-2.0, -3.0]]
    rebuilt, config = checkpoint.load_model(path)
    assert config["seed"] == 1 and config["lr"] == 3e-3
    torch.testing.assert_close(rebuilt(x[1]), model.member(1).eval()(x[1]))


def test_overwrite_is_atomic(tmp_path):
    path = tmp_path / "c.pt"
    checkpoint.save(path, {"epoch": 1})

    class Boom:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(Exception, match="disk full"):
        checkpoint.save(path, {"epoch": 2, "bad": Boom()})
    assert checkpoint.load(path)["epoch"] == 1  # the old checkpoint survives a failed write
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "c.pt"
    checkpoint.save(path, {"model": {"w": torch.zeros(1000)}})
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(CheckpointError, match="truncated"):
        checkpoint.load(path)


def test_foreign_files_refused(tmp_path):
    torch.save({"w": torch.ones(1)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a vaeexp checkpoint"):
        checkpoint.load(tmp_path / "other.pt")
    (tmp_path / "evil.pt").write_bytes(pickle.dumps(print))  # code, not weights
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        checkpoint.load(tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="no checkpoint here"):
        checkpoint.load(tmp_path / "missing")


def cfg(*overrides: str) -> Config:
    return settings(make_cfg(*TINY, "intermediate_dim=16", *overrides))


def saved(runs: Path, folder: str, config: Config, mtime: float) -> Path:
    """A checkpoint of `config` in runs/<folder>/, last written at `mtime`."""
    path = runs / folder / checkpoint.FILENAME
    checkpoint.save(path, {"epoch": 1, "config": plain(config)})
    os.utime(path, (mtime, mtime))
    return path


@pytest.fixture
def runs(tmp_path: Path, store) -> Path:
    return Path(store["VAEEXP_RUNS"])


def test_auto_picks_the_newest_checkpoint_of_the_same_training(runs):
    this = cfg()
    older = saved(runs, "outputs/2024-01-01/10-00-00", cfg(), 1000)
    # where and how it ran, and for how long, differ: the same training
    newer = saved(
        runs,
        "multirun/2024-01-02/11-00-00/3",
        cfg(
            "epochs=7",
            "runtime.threads=3",
            "runtime.progress=true",
            "runtime.device=cpu",
            "tracking.experiment=elsewhere",
            "tracking.uri=http://127.0.0.1:5000",
            "data.root=/somewhere/else",
            "iwae.images=0",
        ),
        2000,
    )
    saved(runs, "outputs/2024-01-03/09-00-00", cfg("latent_dim=8"), 3000)  # other trainings,
    saved(runs, "outputs/2024-01-03/10-00-00", cfg("lr=0.01"), 4000)  # written later
    saved(runs, "outputs/2024-01-03/11-00-00", cfg("data.binarize=static"), 5000)
    assert resolve("auto", this, runs) == newer
    os.utime(older, (6000, 6000))
    assert latest_matching(this, runs) == older


def test_auto_finds_nothing_to_continue(runs):
    assert resolve("auto", cfg(), runs) is None  # no runs/ at all
    saved(runs, "outputs/2024-01-03/09-00-00", cfg("latent_dim=8"), 3000)
    saved(runs, "multirun/2024-01-03/10-00-00/0", cfg("lr=0.01"), 4000)
    saved(runs, "elsewhere/2024-01-03/10-00-00", cfg(), 5000)  # not a run folder of ours
    assert resolve("auto", cfg(), runs) is None
    assert resolve("auto", cfg("latent_dim=8"), runs) is not None


def test_auto_skips_a_corrupt_checkpoint_with_a_warning(runs, caplog):
    good = saved(runs, "outputs/2024-01-01/10-00-00", cfg(), 1000)
    corrupt = saved(runs, "outputs/2024-01-02/10-00-00", cfg(), 2000)
    corrupt.write_bytes(corrupt.read_bytes()[:100])  # truncated
    os.utime(corrupt, (2000, 2000))
    with caplog.at_level(logging.WARNING, logger="vaeexp.checkpoint"):
        assert resolve("auto", cfg(), runs) == good
    [warning] = [r for r in caplog.records if r.name == "vaeexp.checkpoint"]
    assert warning.levelno == logging.WARNING
    assert warning.getMessage().startswith(f"resume=auto: skipping {corrupt}: not a readable")


def test_a_run_folder_or_a_checkpoint_resolves_to_the_file(runs, tmp_path):
    path = saved(runs, "outputs/2024-01-01/10-00-00", cfg(), 1000)
    assert resolve(str(path.parent), cfg(), runs) == path
    assert resolve(str(path), cfg("latent_dim=8"), runs) == path  # named: taken as it is
    with pytest.raises(checkpoint.CheckpointError, match="no checkpoint here"):
        resolve(str(tmp_path), cfg(), runs)


@pytest.fixture
def tracked(runs: Path, mlflow_store: tuple[MlflowClient, str], tmp_path: Path):
    """(client, uri, experiment id) of a store of this test's own."""
    client, uri = mlflow_store
    return client, uri, client.create_experiment("vaeexp", str(tmp_path / "mlartifacts"))


def test_a_run_id_resolves_through_its_output_dir_tag(runs, tracked):
    client, uri, experiment = tracked
    path = saved(runs, "outputs/2024-01-01/10-00-00", cfg(), 1000)
    run_id = client.create_run(experiment, tags={"output_dir": str(path.parent)}).info.run_id
    this = cfg()
    this.tracking.uri = uri
    assert resolve(run_id, this, runs) == path


def test_a_run_id_that_cannot_be_resumed_says_why(runs, tracked):
    client, uri, experiment = tracked
    this = cfg()
    this.tracking.uri = uri
    unknown = "0123456789abcdef" * 2
    with pytest.raises(checkpoint.CheckpointError) as error:
        resolve(unknown, this, runs)
    assert str(error.value) == f"resume={unknown}: no such MLflow run in {uri}"
    untagged = client.create_run(experiment).info.run_id
    with pytest.raises(checkpoint.CheckpointError) as error:
        resolve(untagged, this, runs)
    assert str(error.value) == f"resume={untagged}: the run has no output_dir tag"


def test_auto_among_a_thousand_run_folders_reads_only_their_configs(tmp_path, caplog):
    """Candidates are compared through the small config file beside each checkpoint; only the
    match is loaded. The other checkpoints here are not even readable: loading one would warn."""
    runs = tmp_path / "runs"
    cfg = settings(make_cfg(*TINY))
    other = plain(settings(make_cfg(*TINY, "latent_dim=3")))
    for i in range(1000):
        folder = runs / "outputs" / "2026-01-01" / f"{i:04d}"
        folder.mkdir(parents=True)
        (folder / checkpoint.FILENAME).write_bytes(b"not a checkpoint" * 1000)
        (folder / f"checkpoint{checkpoint.CONFIG_SUFFIX}").write_text(json.dumps(other))
    match = runs / "multirun" / "2026-01-01" / "00" / "0" / checkpoint.FILENAME
    checkpoint.save(match, {"config": plain(cfg), "model": {}})
    start = time.perf_counter()
    with caplog.at_level("WARNING"):
        assert latest_matching(cfg, runs) == match
    assert time.perf_counter() - start < 1.0
    assert not caplog.records
