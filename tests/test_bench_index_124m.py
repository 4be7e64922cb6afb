"""bench.index_124m: the 64-token overlap filter (window hashes, validation file ranges), and a smoke run."""
import json

import numpy as np
import pytest

from bench import index_124m
from bench.index_124m import novel_files, val_file_ranges, window_hashes


def test_window_hashes_match_exactly_the_equal_windows():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 5, 3000).astype(np.uint16)  # a small alphabet: many near-equal windows
    w = 8
    h = window_hashes(tokens, w)
    assert len(h) == len(tokens) - w + 1
    windows = [tuple(tokens[i:i + w]) for i in range(len(h))]
    by_hash: dict[int, set] = {}
    for x, win in zip(h.tolist(), windows):
        by_hash.setdefault(x, set()).add(win)
    assert all(len(v) == 1 for v in by_hash.values())  # no collision
    assert len(by_hash) == len(set(windows))  # equal windows, equal hashes
    assert len(window_hashes(tokens[:5], w)) == 0
    with pytest.raises(ValueError, match="power of two"):
        window_hashes(tokens, 6)


def test_novel_files_are_those_sharing_no_window_with_train(tmp_path):
    rng = np.random.default_rng(1)
    train = rng.integers(0, 50000, 5000).astype(np.uint16)
    fresh = rng.integers(0, 50000, (3, 200)).astype(np.uint16)
    copied = train[1000:1064].copy()  # exactly one whole window of train
    almost = train[2000:2063].copy()  # one token short of a window
    files = {"a.py": fresh[0], "b.py": np.concatenate([fresh[1][:50], copied, fresh[1][50:]]),
             "c.py": np.concatenate([almost, fresh[2]]), "d.py": train[:10].copy()}
    rows = [{"path": "t.py", "train": 5000, "val": 0}] + [{"path": p, "train": 0, "val": len(t)} for p, t in files.items()]
    (tmp_path / "files.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ranges = val_file_ranges(str(tmp_path / "files.jsonl"))
    assert [(p, e - s) for p, s, e in ranges] == [(p, len(t)) for p, t in files.items()]
    val = np.concatenate(list(files.values()))
    assert [p for p, _, _ in novel_files(train, val, ranges, w=64)] == ["a.py", "c.py", "d.py"]  # d: shorter than w


@pytest.mark.slow
def test_smoke_run(ray_session, tmp_path):
    r = index_124m.main(["--smoke", f"--out={tmp_path}"])
    o = r["overlap"]
    assert 0 < o["novel_files"] <= o["val_files"] and o["novel_tokens"] <= o["val_tokens"]
    assert r["models"]["plain"]["steps"] == r["models"]["lmatch"]["steps"] == 12
    for row in ("plain", "plain + kNN", "LMatch", "LMatch + kNN"):
        for col in ("val", "novel_val"):
            assert r["table"][row][col]["ppl"] > 1 and r["table"][row][col]["tokens"] > 0
    assert r["table"]["plain + kNN"]["val"]["loss"] <= r["table"]["plain"]["val"]["loss"]  # lambda tuned on it
    assert json.loads((tmp_path / "index_124m.json").read_text())["table"] == r["table"]
