import logging

import pytest
import torch

from tests.conftest import make_cfg, write_fake_idx_set
from vaeexp.data import DataUnavailable, IdxError, load_data
from vaeexp.data import datasets as ds
from vaeexp.data.download import md5sum

OFFLINE = "data.mirrors=[http://127.0.0.1:9/]"  # nothing listens on port 9: fails at once


def test_bundled_digits_stratified_fixed_split():
    data = load_data(make_cfg("data=mnist_bundled").data)
    assert data.resolved == "mnist_bundled"
    assert data.train_x.shape == (4500, 784) and data.test_x.shape == (500, 784)
    assert (
        data.train_x.dtype == torch.float32 and data.train_x.min() >= 0 and data.train_x.max() <= 1
    )
    assert data.train_y.bincount().tolist() == [450] * 10
    assert data.test_y.bincount().tolist() == [50] * 10
    again = load_data(make_cfg("data=mnist_bundled", "seed=7").data)
    assert torch.equal(again.test_x, data.test_x)  # the split does not move with the seed
    # train and test are disjoint images
    train_rows = {tuple(r) for r in (data.train_x * 255).round().to(torch.uint8).tolist()}
    assert not any(
        tuple(r) in train_rows for r in (data.test_x * 255).round().to(torch.uint8).tolist()
    )


def test_reads_cached_idx_files(tmp_path):
    write_fake_idx_set(tmp_path / "mnist", n_train=30, n_test=10)
    data = load_data(make_cfg(f"data.root={tmp_path}", "data.download=false").data)
    assert data.resolved == "mnist" and data.source == str(tmp_path / "mnist")
    assert data.train_x.shape == (30, 784) and data.test_y.shape == (10,)


def test_fashion_from_system_folder(tmp_path):
    write_fake_idx_set(tmp_path / "system")
    cfg = make_cfg(
        "data=fashion_mnist",
        f"data.root={tmp_path / 'cache'}",
        f"data.system_dirs=[{tmp_path / 'system'}]",
        "data.download=false",
    )
    data = load_data(cfg.data)
    assert data.resolved == "fashion_mnist" and data.source == str(tmp_path / "system")


def test_download_into_cache_then_reuse(http_root, tmp_path, monkeypatch):
    root, url = http_root
    write_fake_idx_set(root / "kmnist-files")
    md5s = tuple(md5sum(root / "kmnist-files" / f) for f in ds.FILES.values())
    monkeypatch.setitem(ds.MD5, "kmnist", md5s)  # our fake files stand in for KMNIST's
    cfg = make_cfg(
        "data=kmnist",
        f"data.root={tmp_path / 'cache'}",
        f"data.mirrors=[{url}/nothing-here/,{url}/kmnist-files/]",
    )
    data = load_data(cfg.data, progress=False)
    assert data.resolved == "kmnist" and len(data.train_x) == 60
    assert sorted(p.name for p in (tmp_path / "cache" / "kmnist").iterdir()) == sorted(
        ds.FILES.values()
    )
    for f in ds.FILES.values():
        (root / "kmnist-files" / f).unlink()  # the cache must now be enough
    assert torch.equal(load_data(cfg.data, progress=False).train_x, data.train_x)


def test_offline_mnist_falls_back_loudly(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        data = load_data(make_cfg(f"data.root={tmp_path}", OFFLINE).data, progress=False)
    assert data.resolved == "mnist_bundled" and len(data.train_x) == 4500
    assert "FULL MNIST IS NOT AVAILABLE" in caplog.text and "data.fallback=false" in caplog.text


def test_fallback_false_is_an_error(tmp_path):
    with pytest.raises(DataUnavailable) as e:
        load_data(
            make_cfg(f"data.root={tmp_path}", OFFLINE, "data.fallback=false").data, progress=False
        )
    assert "data=mnist" in str(e.value) and "127.0.0.1:9" in str(e.value)


def test_no_fallback_for_other_datasets(tmp_path):
    with pytest.raises(DataUnavailable, match="data=fashion_mnist"):
        load_data(
            make_cfg(
                "data=fashion_mnist", f"data.root={tmp_path}", "data.system_dirs=[]", OFFLINE
            ).data,
            progress=False,
        )


def test_corrupt_cached_file_names_it(tmp_path):
    write_fake_idx_set(tmp_path / "mnist")
    bad = tmp_path / "mnist" / "train-labels-idx1-ubyte.gz"
    bad.write_bytes(bad.read_bytes()[:20])
    with pytest.raises(IdxError, match=r"train-labels-idx1-ubyte\.gz"):
        load_data(make_cfg(f"data.root={tmp_path}").data)


def test_limits_and_binarization():
    cfg = make_cfg(
        "data=mnist_bundled", "data.train_limit=100", "data.test_limit=50", "data.binarize=static"
    )
    data = load_data(cfg.data)
    assert len(data.train_x) == 100 and len(data.test_x) == 50
    assert set(data.train_x.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(load_data(cfg.data).train_x, data.train_x)  # static: the same draw
    dynamic = load_data(make_cfg("data=mnist_bundled", "data.binarize=dynamic").data)
    assert len(dynamic.train_x.unique()) > 2  # redrawn per batch by the trainer
    assert set(dynamic.test_x.unique().tolist()) == {0.0, 1.0}
