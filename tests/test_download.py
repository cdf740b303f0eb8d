import hashlib

import pytest

from vaeexp.data import DownloadError, fetch


def _publish(root, name, payload):
    (root / name).write_bytes(payload)
    return hashlib.md5(payload).hexdigest()


def test_good_file_is_fetched_and_verified(http_root, tmp_path):
    root, url = http_root
    md5 = _publish(root, "a.gz", b"x" * 100_000)
    path = fetch("a.gz", [url], md5, tmp_path / "cache", progress=False)
    assert path == tmp_path / "cache" / "a.gz"
    assert path.read_bytes() == b"x" * 100_000
    assert [p.name for p in path.parent.iterdir()] == ["a.gz"]  # no temp files left


def test_checksum_mismatch_leaves_nothing(http_root, tmp_path):
    root, url = http_root
    _publish(root, "a.gz", b"tampered")
    with pytest.raises(DownloadError, match="checksum mismatch") as e:
        fetch("a.gz", [url], "0" * 32, tmp_path / "cache", progress=False)
    assert "a.gz" in str(e.value) and url in str(e.value)
    assert list((tmp_path / "cache").iterdir()) == []


def test_first_mirror_404_falls_through_to_second(http_root, tmp_path):
    root, url = http_root
    (root / "good").mkdir()
    md5 = _publish(root / "good", "a.gz", b"payload")
    path = fetch("a.gz", [f"{url}/missing/", f"{url}/good/"], md5, tmp_path, progress=False)
    assert path.read_bytes() == b"payload"


def test_all_mirrors_fail_lists_each(http_root, tmp_path):
    _, url = http_root
    with pytest.raises(DownloadError) as e:
        fetch("a.gz", [f"{url}/x/", "http://127.0.0.1:9/"], "0" * 32, tmp_path, progress=False)
    msg = str(e.value)
    assert "HTTP 404" in msg and "127.0.0.1:9" in msg
    assert not (tmp_path / "a.gz").exists()
