import gzip
import logging

import pytest
import torch
import torchvision
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from tests.conftest import IDX_FILES, TINY, make_cfg, run_cli, write_fake_idx_set
from vaeexp.data import DataBroken, DataUnavailable, fallback_config, load_data

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
    assert data.class_names == tuple("0123456789")
    again = load_data(make_cfg("data=mnist_bundled", "seed=7").data)
    assert torch.equal(again.test_x, data.test_x)  # the split does not move with the seed
    # train and test are disjoint images
    train_rows = {tuple(r) for r in (data.train_x * 255).round().to(torch.uint8).tolist()}
    assert not any(
        tuple(r) in train_rows for r in (data.test_x * 255).round().to(torch.uint8).tolist()
    )


def test_reads_torchvisions_cache(tmp_path):
    write_fake_idx_set(tmp_path / "MNIST" / "raw", n_train=30, n_test=10, gzipped=False)
    data = load_data(make_cfg(f"data.root={tmp_path}", "data.download=false").data)
    assert data.resolved == "mnist" and data.source == str(tmp_path / "MNIST" / "raw")
    assert data.train_x.shape == (30, 784) and data.test_y.shape == (10,)
    assert data.class_names == tuple("0123456789")  # torchvision's "0 - zero", shortened


def test_fashion_from_system_folder_seeds_the_cache(tmp_path):
    write_fake_idx_set(tmp_path / "system")
    cfg = make_cfg(
        "data=fashion_mnist",
        f"data.root={tmp_path / 'cache'}",
        f"data.system_dirs=[{tmp_path / 'system'}]",
        "data.download=false",
    )
    data = load_data(cfg.data)
    assert data.resolved == "fashion_mnist" and data.source == str(tmp_path / "system")
    assert data.class_names[0] == "T-shirt/top"  # torchvision's classes
    for f in IDX_FILES:
        (tmp_path / "system" / f).unlink()
    again = load_data(cfg.data)  # the cache is now enough
    assert again.source == str(tmp_path / "cache" / "FashionMNIST" / "raw")
    assert torch.equal(again.train_x, data.train_x)


def test_download_verified_into_cache_then_reuse(http_root, tmp_path, monkeypatch):
    """torchvision's own download and MD5 check, from a real HTTP server: a mirror that serves
    a wrong file is passed over for the next."""
    root, url = http_root
    md5s = write_fake_idx_set(root / "good")
    write_fake_idx_set(root / "bad", seed=1)  # valid files, other bytes: wrong MD5
    monkeypatch.setattr(  # our fake files stand in for KMNIST's
        torchvision.datasets.KMNIST, "resources", [(f, md5s[f]) for f in IDX_FILES]
    )
    cfg = make_cfg(
        "data=kmnist",
        f"data.root={tmp_path / 'cache'}",
        f"data.mirrors=[{url}/nothing-here/,{url}/bad/,{url}/good/]",
    )
    data = load_data(cfg.data, progress=False)
    assert data.resolved == "kmnist" and len(data.train_x) == 60
    assert data.class_names[:2] == ("o", "ki")
    for f in IDX_FILES:
        (root / "good" / f).unlink()  # the cache must now be enough
    assert torch.equal(load_data(cfg.data, progress=False).train_x, data.train_x)


def test_download_with_only_wrong_files_fails_in_one_line(http_root, tmp_path, monkeypatch):
    root, url = http_root
    write_fake_idx_set(root / "bad")
    monkeypatch.setattr(
        torchvision.datasets.KMNIST, "resources", [(f, "0" * 32) for f in IDX_FILES]
    )
    cfg = make_cfg("data=kmnist", f"data.root={tmp_path}", f"data.mirrors=[{url}/bad/]")
    with pytest.raises(DataUnavailable, match=r"data=kmnist: .*download failed") as e:
        load_data(cfg.data, progress=False)
    assert "\n" not in str(e.value)


def test_offline_mnist_falls_back_loudly(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        data = load_data(make_cfg(f"data.root={tmp_path}", OFFLINE).data, progress=False)
    assert data.resolved == "mnist_bundled" and len(data.train_x) == 4500
    assert "DATA=MNIST IS NOT AVAILABLE" in caplog.text
    assert "NOT comparable with data=mnist" in caplog.text
    assert "data.fallback=null" in caplog.text and "127.0.0.1:9" in caplog.text


def test_fallback_null_is_an_error(tmp_path):
    with pytest.raises(DataUnavailable) as e:
        load_data(
            make_cfg(f"data.root={tmp_path}", OFFLINE, "data.fallback=null").data, progress=False
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


def test_damaged_download_in_the_cache_is_named(tmp_path, monkeypatch):
    """A kept archive whose MD5 is not torchvision's: named, never trained on."""
    raw = tmp_path / "KMNIST" / "raw"
    md5s = write_fake_idx_set(raw)
    write_fake_idx_set(raw, gzipped=False)
    monkeypatch.setattr(torchvision.datasets.KMNIST, "resources", [(f, md5s[f]) for f in IDX_FILES])
    bad = raw / "train-labels-idx1-ubyte.gz"
    bad.write_bytes(bad.read_bytes()[:20])
    with pytest.raises(DataUnavailable, match=r"train-labels-idx1-ubyte\.gz: corrupt"):
        load_data(make_cfg("data=kmnist", f"data.root={tmp_path}").data)


@pytest.mark.parametrize("cut", [20, 3, 1000])
def test_truncated_file_in_the_cache_is_named(tmp_path, cut):
    raw = tmp_path / "MNIST" / "raw"
    write_fake_idx_set(raw, gzipped=False)
    bad = raw / "train-images-idx3-ubyte"
    bad.write_bytes(bad.read_bytes()[:cut])
    with pytest.raises(DataUnavailable, match=r"train-images-idx3-ubyte: not a readable") as e:
        load_data(make_cfg(f"data.root={tmp_path}", "data.fallback=null").data)
    assert "delete it" in str(e.value)


@pytest.mark.slow  # `python -m vaeexp`
def test_a_run_on_a_damaged_cache_ends_in_one_line(tmp_path, store):
    raw = tmp_path / "data" / "MNIST" / "raw"  # the store fixture's VAEEXP_DATA
    write_fake_idx_set(raw, gzipped=False)
    bad = raw / "t10k-labels-idx1-ubyte"
    bad.write_bytes(bad.read_bytes()[:-3])
    out = run_cli("data=mnist", *TINY[1:], "epochs=1", "film=off", env=store)
    assert out.returncode == 1, out.stderr
    [line] = [ln for ln in out.stderr.splitlines() if ln.startswith("vaeexp: error:")]
    assert "t10k-labels-idx1-ubyte: not a readable dataset file" in line
    assert "Traceback" not in out.stderr and "mnist_bundled" not in out.stderr  # no fallback
    db = tmp_path / "runs" / "mlflow.db"
    if db.exists():  # no run was created
        client = MlflowClient(f"sqlite:///{db}")
        assert not client.search_runs([e.experiment_id for e in client.search_experiments()])


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


def test_a_class_that_cannot_be_imported_is_named_and_never_falls_back(tmp_path):
    cfg = make_cfg(f"data.root={tmp_path}", "data._target_=torchvision.datasets.NoSuchMNIST")
    with pytest.raises(DataBroken, match=r"data._target_=torchvision.datasets.NoSuchMNIST cannot"):
        load_data(cfg.data)


def test_a_damaged_system_copy_is_named_and_not_kept_in_the_cache(tmp_path):
    system = tmp_path / "system"
    write_fake_idx_set(system)
    bad = system / "t10k-images-idx3-ubyte.gz"
    bad.write_bytes(gzip.compress(gzip.decompress(bad.read_bytes())[:-5]))  # unpacks, cut short
    cfg = make_cfg(
        "data=fashion_mnist",
        f"data.root={tmp_path / 'cache'}",
        f"data.system_dirs=[{system}]",
        "data.download=false",
    )
    with pytest.raises(DataBroken, match=r"t10k-images-idx3-ubyte\.gz: not a readable") as e:
        load_data(cfg.data)
    assert "data.system_dirs" in str(e.value)
    assert not list((tmp_path / "cache" / "FashionMNIST" / "raw").glob("*-ubyte"))


def test_iwae_of_a_run_that_fell_back_scores_the_data_it_trained_on(tmp_path):
    """The fallback keeps the run's subsets and binarisation: `python -m vaeexp.iwae` scores
    what the run trained on."""
    cfg = make_cfg(f"data.root={tmp_path}", "data.test_limit=30", "data.binarize=static").data
    fallback = fallback_config(OmegaConf.to_object(cfg))
    assert fallback.name == "mnist_bundled" and fallback.fallback is None
    assert (fallback.test_limit, fallback.binarize.value) == (30, "static")
