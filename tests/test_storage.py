"""Storage layer: local and S3 (a real SeaweedFS server on loopback) behave the same."""
import os

import pytest

from app import storage


@pytest.fixture(params=["local", "s3"])
def base(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "store")
    return request.getfixturevalue("s3_prefix")


def test_round_trip_list_glob_remove(base):
    storage.write_bytes(storage.join(base, "a", "x.bin"), b"\x00\x01")
    storage.write_json(storage.join(base, "a", "m.json"), {"k": [1, 2]})
    storage.write_text(storage.join(base, "b.txt"), "héllo")
    assert storage.read_bytes(storage.join(base, "a", "x.bin")) == b"\x00\x01"
    assert storage.read_json(storage.join(base, "a", "m.json")) == {"k": [1, 2]}
    assert storage.read_text(storage.join(base, "b.txt")) == "héllo"
    assert storage.size(storage.join(base, "a", "x.bin")) == 2
    files = storage.list_files(base)
    assert [f.rsplit("/", 1)[-1] for f in files] == ["m.json", "x.bin", "b.txt"] or len(files) == 3
    assert sorted(os.path.basename(f) for f in storage.glob(storage.join(base, "a", "*.json"))) == ["m.json"]
    assert len(storage.glob(storage.join(base, "**", "*.bin"))) == 1
    storage.remove(storage.join(base, "b.txt"))
    assert not storage.exists(storage.join(base, "b.txt"))
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(storage.join(base, "missing"))


def test_dir_upload_download_and_cache(base, tmp_path, monkeypatch):
    monkeypatch.setenv("SPOTLM_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "w.bin").write_bytes(os.urandom(3000))
    (src / "sub" / "c.json").write_text("{}")
    storage.upload_dir(str(src), storage.join(base, "model"))
    local = storage.local_dir(storage.join(base, "model"))
    assert (src / "w.bin").read_bytes() == open(os.path.join(local, "w.bin"), "rb").read()
    assert open(os.path.join(local, "sub", "c.json")).read() == "{}"
    cached = storage.local_path(storage.join(base, "model", "w.bin"))
    assert open(cached, "rb").read() == (src / "w.bin").read_bytes()


def test_local_write_is_atomic(tmp_path, monkeypatch):
    path = str(tmp_path / "f.bin")
    storage.write_bytes(path, b"old")

    def boom(*a, **k):
        raise OSError("disk died")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError):
        storage.write_bytes(path, b"new-but-broken")
    assert open(path, "rb").read() == b"old"
    assert os.listdir(tmp_path) == ["f.bin"]  # no temporary file left behind
