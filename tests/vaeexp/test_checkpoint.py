import pickle

import pytest
import torch

from vaeexp import checkpoint
from vaeexp.checkpoint import CheckpointError


def test_round_trip_and_folder_lookup(tmp_path):
    state = {"epoch": 3, "step": 30, "model": {"w": torch.ones(2)}, "rng": torch.get_rng_state()}
    checkpoint.save(tmp_path / checkpoint.FILENAME, state)
    loaded = checkpoint.load(tmp_path)  # a run folder finds its checkpoint
    assert loaded["epoch"] == 3 and torch.equal(loaded["model"]["w"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == [checkpoint.FILENAME]  # no temp file left


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
