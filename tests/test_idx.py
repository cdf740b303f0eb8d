import gzip

import numpy as np
import pytest

from vaeexp.data import IdxError, read_idx, write_idx


@pytest.mark.parametrize("name", ["images.idx", "images.idx.gz"])
def test_round_trip_raw_and_gzip(tmp_path, name):
    images = np.random.default_rng(0).integers(0, 256, (7, 28, 28), dtype=np.uint8)
    write_idx(tmp_path / name, images)
    out = read_idx(tmp_path / name)
    assert out.dtype == np.uint8 and out.shape == (7, 28, 28)
    np.testing.assert_array_equal(out, images)


def test_big_endian_int_labels(tmp_path):
    labels = np.arange(-5, 5, dtype=np.int32)
    write_idx(tmp_path / "l.idx", labels)
    np.testing.assert_array_equal(read_idx(tmp_path / "l.idx"), labels)


def test_truncated_payload_names_file_and_fix(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte"
    write_idx(path, np.zeros((10, 28, 28), np.uint8))
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(IdxError) as e:
        read_idx(path)
    msg = str(e.value)
    assert str(path) in msg and "truncated" in msg and "(10, 28, 28)" in msg
    assert "downloaded again" in msg


def test_truncated_gzip(tmp_path):
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    write_idx(path, np.zeros((10, 28, 28), np.uint8))
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(IdxError, match="corrupt or truncated gzip"):
        read_idx(path)


def test_wrong_magic(tmp_path):
    path = tmp_path / "labels.gz"
    path.write_bytes(gzip.compress(b"<html>404 Not Found</html>"))
    with pytest.raises(IdxError, match=r"not an IDX file \(bad magic number 3c68746d\)"):
        read_idx(path)


def test_trailing_bytes_rejected(tmp_path):
    path = tmp_path / "x.idx"
    write_idx(path, np.zeros(4, np.uint8))
    path.write_bytes(path.read_bytes() + b"junk")
    with pytest.raises(IdxError, match="trailing bytes"):
        read_idx(path)


def test_missing_file(tmp_path):
    with pytest.raises(IdxError, match="no such file"):
        read_idx(tmp_path / "nope.gz")
