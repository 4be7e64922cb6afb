"""Shard format: round trip, and clear errors for files that are not whole shards."""
import numpy as np
import pytest

from app.data.shards import HEADER_BYTES, ShardFormatError, load_manifest, read_shard, write_shard


@pytest.mark.parametrize("dtype", [np.uint16, np.uint32])
def test_round_trip(tmp_path, dtype):
    tokens = np.random.default_rng(0).integers(0, np.iinfo(dtype).max, 1000).astype(dtype)
    info = write_shard(str(tmp_path / "s.bin"), tokens)
    back = read_shard(str(tmp_path / "s.bin"), verify_sha256=info["sha256"])
    assert info["n_tokens"] == 1000 and back.dtype == dtype and np.array_equal(back, tokens)


def test_bad_files_are_clear_errors(tmp_path):
    path = tmp_path / "s.bin"
    info = write_shard(str(path), np.arange(100, dtype=np.uint16))
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    with pytest.raises(ShardFormatError, match="truncated"):
        read_shard(str(path))
    path.write_bytes(b"\0" * HEADER_BYTES)
    with pytest.raises(ShardFormatError, match="magic"):
        read_shard(str(path))
    path.write_bytes(data[:-2] + b"\1\1")
    with pytest.raises(ShardFormatError, match="checksum"):
        read_shard(str(path), verify_sha256=info["sha256"])
    with pytest.raises(ShardFormatError, match="missing"):
        read_shard(str(tmp_path / "nope.bin"))
    with pytest.raises(ShardFormatError, match="no manifest"):
        load_manifest(str(tmp_path))
    (tmp_path / "manifest.json").write_text('{"format": "other"}')
    with pytest.raises(ShardFormatError, match="not a spotlm"):
        load_manifest(str(tmp_path))
