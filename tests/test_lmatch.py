"""The LMatch exact-match index: brute force vs library, chunking, val, serving, resume, errors."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from app.indexing.lmatch_build import IndexConfig, build_index
from app.data.shards import Manifest, ShardFormatError, load_manifest, write_shard
from index import lmatch
from index.lmatch import LMatchIndex, lmatch_against, lmatch_stream, read_lmatch

EOT, V = 0, 6


def _key(arr, p, max_len=32):
    if arr[p] == EOT:
        return ()
    k, q = [], p
    while q >= 0 and len(k) < max_len and (q == p or arr[q] != EOT):
        k.append(int(arr[q]))
        q -= 1
    return tuple(k)


def _lcp(a, b):
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def brute(query, train=None):
    """Pure-Python reference: (length, set of the j reaching it) per position."""
    own = train is None
    T = list(query) if own else list(train)
    tk = [_key(T, p) for p in range(len(T))]
    out = []
    for i in range(len(query)):
        qk = _key(query, i)
        cands = range(i) if own else range(len(T) - 1)
        ls = [(_lcp(qk, tk[j]), j) for j in cands]
        best = max([l for l, _ in ls], default=0)
        out.append((best, {j for l, j in ls if l == best and best > 0}))
    return out


def _stream(rng, n, vocab=V, eot_p=0.08):
    t = rng.integers(1, vocab, n)
    t[rng.random(n) < eot_p] = EOT
    t[-1] = EOT
    return t


def _check(res, ref, tokens_for_j, vocab=V):
    nxt, ln, j = res
    for i, (L, js) in enumerate(ref):
        assert ln[i] == L, (i, ln[i], L)
        if L == 0:
            assert nxt[i] == vocab and j[i] == -1
        else:
            assert j[i] == min(js)  # the tie rule: earliest j
            assert nxt[i] == tokens_for_j[j[i] + 1]


@pytest.mark.parametrize("seed", range(6))
def test_library_matches_brute_force_on_random_streams(seed):
    rng = np.random.default_rng(seed)
    t = _stream(rng, int(rng.integers(50, 500)))
    _check(lmatch_stream(t, EOT, V), brute(t), t)
    q = _stream(rng, int(rng.integers(20, 200)))
    _check(lmatch_against(t, q, EOT, V), brute(q, train=t), t)


def test_long_repeats_are_capped_at_32():
    rng = np.random.default_rng(7)
    doc = list(rng.integers(1, 50, 80))
    t = np.array(doc + [EOT] + doc + [EOT])
    nxt, ln, j = lmatch_stream(t, EOT, 50)
    assert ln.max() == 32 and ln[81 + 40] == 32 and nxt[81 + 40] == doc[41]
    _check((nxt, ln, j), brute(t), t, vocab=50)


def _write_dataset(root: Path, train, val, shard_tokens, vocab=V, eot=EOT):
    root.mkdir(parents=True, exist_ok=True)
    shards = {}
    for split, toks in (("train", train), ("val", val)):
        shards[split] = []
        for s in range(0, len(toks), shard_tokens):
            name = f"{split}_{s // shard_tokens:06d}.bin"
            info = write_shard(str(root / name), np.asarray(toks[s:s + shard_tokens], dtype=np.uint16))
            shards[split].append({"file": name, **info})
    m = Manifest(dtype="uint16", vocab_size=vocab, eot_id=eot, shard_tokens=shard_tokens, shards=shards)
    m.root = str(root)
    m.save()
    return m


def _arrays(root, split):
    m = load_manifest(str(root))
    parts = [read_lmatch(p) for p in lmatch.lmatch_paths(m, split)]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def test_chunked_build_equals_one_pass_and_val_matches_train_only(tmp_path):
    rng = np.random.default_rng(3)
    train, val = _stream(rng, 1500), _stream(rng, 400)
    one_n, one_l, _ = lmatch_stream(train, EOT, V)
    val_n, val_l, _ = lmatch_against(train, val, EOT, V)
    for shard_tokens, chunk in ((10_000, 10_000), (256, 100), (300, 37)):
        root = tmp_path / f"ds{shard_tokens}_{chunk}"
        _write_dataset(root, train, val, shard_tokens)
        build_index(IndexConfig(data=str(root), task_tokens=chunk), use_ray=False)
        n, l = _arrays(root, "train")
        assert np.array_equal(n, one_n) and np.array_equal(l, one_l) and n.dtype == np.uint16
        n, l = _arrays(root, "val")
        assert np.array_equal(n, val_n) and np.array_equal(l, val_l)
    _check(lmatch_against(train, val, EOT, V), brute(val, train=train), train)


def test_real_text_and_ray_build_and_serving(ray_session, shakespeare_shards, tmp_path):
    import shutil

    shakespeare_shards = str(shutil.copytree(shakespeare_shards, tmp_path / "shards"))  # never index the shared fixture
    m = load_manifest(shakespeare_shards)
    s = build_index(IndexConfig(data=shakespeare_shards, task_tokens=20_000, workers=2))
    assert s["pieces_built"] > 0 and s["bytes_per_train_token"] <= 8
    tr = np.concatenate([np.asarray(x) for x in (lmatch.SplitStream(m, "train").read(0, 10**9),)])
    n, l = _arrays(shakespeare_shards, "train")
    one = lmatch_stream(tr, m.eot_id, m.vocab_size)
    assert np.array_equal(n, one[0]) and np.array_equal(l, one[1])
    assert 0.5 < (l > 0).mean() and l.max() >= 8
    sub = tr[:1200]  # brute force on a slice of real text
    _check(lmatch_stream(sub, m.eot_id, m.vocab_size), brute_eot(sub, m.eot_id), sub, vocab=m.vocab_size)
    # serving: new contexts vs brute force over the train split
    idx = LMatchIndex.open(shakespeare_shards)
    rng = np.random.default_rng(0)
    ctxs = []
    for _ in range(40):
        a = int(rng.integers(0, len(tr) - 40))
        c = list(tr[a:a + int(rng.integers(1, 40))])
        if rng.random() < 0.5:
            c[-1] = int(rng.integers(0, m.vocab_size))  # new text
        ctxs.append([int(x) for x in c])
    got_n, got_l = idx.lookup_batch(ctxs)
    for c, gn, gl in zip(ctxs, got_n, got_l):
        res = lmatch_against(tr, np.array(c + [0])[:-1], m.eot_id, m.vocab_size)
        assert (gn, gl) == (res[0][-1], res[1][-1])
        assert idx.lookup(c) == (int(res[0][-1]), int(res[1][-1]))
    again = build_index(IndexConfig(data=shakespeare_shards, task_tokens=20_000, workers=2))
    assert again["pieces_built"] == 0
    for f in Path(shakespeare_shards).glob("*.lm*"):  # one range: the task computes and writes itself
        f.unlink()
    one = build_index(IndexConfig(data=shakespeare_shards, task_tokens=1 << 30, workers=1))
    assert one["pieces_built"] == s["pieces_built"]
    n1, l1 = _arrays(shakespeare_shards, "train")
    assert np.array_equal(n1, n) and np.array_equal(l1, l)


def brute_eot(t, eot):
    global EOT
    old, EOT = EOT, eot
    try:
        return brute(t)
    finally:
        EOT = old


def test_resume_rebuilds_only_the_missing_piece(tmp_path):
    rng = np.random.default_rng(5)
    root = tmp_path / "ds"
    _write_dataset(root, _stream(rng, 900), _stream(rng, 300), 200)
    build_index(IndexConfig(data=str(root), task_tokens=150), use_ray=False)
    before = _arrays(root, "train")
    files = sorted(p for p in root.iterdir() if ".lm" in p.name)
    stamps = {p.name: p.stat().st_mtime_ns for p in files}
    os.remove(root / "train_000002.bin.lmatch")
    s = build_index(IndexConfig(data=str(root), task_tokens=150), use_ray=False)
    assert s["built"] == ["train:2"]
    changed = {p.name for p in root.iterdir() if ".lm" in p.name and p.stat().st_mtime_ns != stamps.get(p.name)}
    assert changed == {"train_000002.bin.lmatch", "train_000002.bin.lmsa", "train_000002.bin.lmatch.done.json"}
    after = _arrays(root, "train")
    assert all(np.array_equal(a, b) for a, b in zip(before, after))
    manifest_mtime = (root / "manifest.json").stat().st_mtime_ns
    assert build_index(IndexConfig(data=str(root), task_tokens=150), use_ray=False)["pieces_built"] == 0
    assert (root / "manifest.json").stat().st_mtime_ns == manifest_mtime  # a finished build is a no-op


def test_bad_inputs_give_clear_errors(tmp_path):
    rng = np.random.default_rng(6)
    root = tmp_path / "ds"
    _write_dataset(root, _stream(rng, 400), _stream(rng, 100), 200)
    with pytest.raises(ShardFormatError, match="no manifest"):
        build_index(IndexConfig(data=str(tmp_path / "nothing")), use_ray=False)
    p = root / "train_000001.bin"
    data = p.read_bytes()
    p.write_bytes(data[:-10])
    with pytest.raises(ShardFormatError, match="train_000001.bin.*truncated"):
        build_index(IndexConfig(data=str(root)), use_ray=False)
    p.write_bytes(data[:-2] + b"\x01\x00")
    with pytest.raises(ShardFormatError, match="train_000001.bin.*checksum"):
        build_index(IndexConfig(data=str(root)), use_ray=False)
    os.remove(p)
    with pytest.raises(ShardFormatError, match="train_000001.bin.*missing"):
        build_index(IndexConfig(data=str(root)), use_ray=False)
    r = subprocess.run([sys.executable, "-m", "jobs.build_index", f"--data={root}"], capture_output=True, text=True,
                       cwd=Path(__file__).parents[1], timeout=120)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and "missing" in r.stderr


def test_index_lookup_across_many_shards_equals_brute_force(tmp_path, monkeypatch):
    """LMatchIndex over 8 train shards, tiny sample intervals (windows of 2..4 keys, so ranges of
    equal keys often spill out of the window): (next, L, j) of new contexts equal brute force."""
    rng = np.random.default_rng(11)
    train, val = _stream(rng, 800, eot_p=0.03), _stream(rng, 50)
    root = tmp_path / "ds"
    _write_dataset(root, train, val, shard_tokens=100)
    build_index(IndexConfig(data=str(root)), use_ray=False)
    paths = {"matched": 0, "bounds": 0}
    real_range = LMatchIndex._range

    def counted(self, *a):
        paths["bounds"] += 1
        return real_range(self, *a)

    monkeypatch.setattr(LMatchIndex, "_range", counted)
    ctxs = [list(rng.integers(0, V, int(rng.integers(1, 40)))) for _ in range(60)]
    ctxs += [list(train[a:a + int(rng.integers(1, 40))]) for a in rng.integers(0, len(train) - 40, 60)]
    ctxs += [[], [EOT], [3, EOT], [2, 3, V + 5], [V + 5, 1], [-1, 2]]  # empty, EOT, out-of-vocab ids
    keys = [_key(train, p) for p in range(len(train) - 1)]  # the final position has no follower
    want = []
    for c in ctxs:
        q = [int(t) if 0 <= t < V else V for t in c]  # out-of-vocab ids match nothing
        ls = [_lcp(_key(q, len(q) - 1), k) for k in keys] if q else [0]
        L = max(ls)
        j = ls.index(L) if L else -1  # the earliest j reaching L
        want.append((int(train[j + 1]) if L else V, L, j))
    for every in (1, 2, 3, 64):
        idx = LMatchIndex.open(str(root), sample_every=every)
        assert len(idx.sas) == 8
        for c, w in zip(ctxs, want):
            c = [int(x) for x in c]
            assert idx.lookup_key(idx.query_key(c)) == w, (every, c)
            assert idx.lookup(c) == w[:2]
            paths["matched"] += 2 * (w[1] > 0)
    assert 0 < paths["bounds"] < paths["matched"]  # both the in-window and the sample-bounds path ran


def test_index_refuses_a_missing_damaged_or_stale_sorted_file(tmp_path):
    rng = np.random.default_rng(12)
    root = tmp_path / "ds"
    _write_dataset(root, _stream(rng, 400), _stream(rng, 100), 200)
    with pytest.raises(ShardFormatError, match="no lmatch index"):
        LMatchIndex.open(str(root))
    build_index(IndexConfig(data=str(root)), use_ray=False)
    p = root / "train_000001.bin.lmsa"
    data = p.read_bytes()
    p.write_bytes(data[:-4])
    with pytest.raises(ShardFormatError, match="train_000001.bin.lmsa.*truncated"):
        LMatchIndex.open(str(root))
    os.remove(p)
    with pytest.raises(ShardFormatError, match="train_000001.bin.lmsa.*missing"):
        LMatchIndex.open(str(root))
    p.write_bytes(data)
    LMatchIndex.open(str(root))
    m = load_manifest(str(root))  # the train shards change after the build: the index is stale
    m.shards["train"][0]["sha256"] = "0" * 64
    m.save()
    with pytest.raises(ShardFormatError, match="train_000000.bin.lmsa.*stale"):
        LMatchIndex.open(str(root))


def test_token_ranges_cover_every_id_once_and_balance():
    rng = np.random.default_rng(13)
    for n_ids, n_ranges in ((1, 1), (5, 8), (100, 3), (1000, 7), (50_257, 64)):
        counts = rng.integers(0, 100, n_ids) * (rng.random(n_ids) < 0.7)
        counts[rng.integers(0, n_ids)] += 5000  # one frequent id
        ranges = lmatch.token_ranges(counts, n_ranges)
        assert ranges[0][0] == 0 and ranges[-1][1] == n_ids and len(ranges) <= max(1, n_ranges)
        assert all(lo < hi for lo, hi in ranges) and all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        share = counts.sum() / max(1, n_ranges)
        assert all(counts[lo:hi].sum() <= share + counts.max() for lo, hi in ranges)
    flat = lmatch.token_ranges(np.ones(1000, np.int64), 4)
    assert [hi - lo for lo, hi in flat] == [250, 250, 250, 250]


def test_lexsort_fallback_equals_the_packed_sort(monkeypatch):
    """_sort_level packs (group, lane, entry) into one uint64 when they fit, else lexsorts."""
    rng = np.random.default_rng(14)
    gid, lane, e = rng.integers(0, 50, 3000), rng.integers(0, 7, 3000), rng.permutation(3000)
    packed = lmatch._sort_level(gid, lane, e, lane_bits=3, e_bits=12)
    lex = lmatch._sort_level(gid, lane, e, lane_bits=50, e_bits=12)  # 74 bits: the lexsort
    assert all(np.array_equal(a, b) for a, b in zip(packed, lex))
    # end to end: a vocabulary of 2^31 ids (32 lane bits) and > 2^16 entries take the lexsort
    t = _stream(rng, 70_000, vocab=40, eot_p=0.02)
    small = lmatch_stream(t, EOT, 40)
    big = lmatch_stream(t * (1 << 24), EOT, 1 << 31)  # an order-preserving renaming of the ids
    assert np.array_equal(small[1], big[1]) and np.array_equal(small[2], big[2]) and big[0].dtype == np.uint32
    assert np.array_equal(np.where(small[1] > 0, small[0].astype(np.int64) << 24, 1 << 31), big[0])
    calls = []
    real = lmatch._sort_level
    monkeypatch.setattr(lmatch, "_sort_level", lambda g, ln, ee, lb, eb: calls.append(2 * eb + lb) or real(g, ln, ee, lb, eb))
    lmatch_stream(t * (1 << 24), EOT, 1 << 31)
    assert calls and min(calls) > 64


def test_continuation_is_the_text_after_the_longest_earliest_match(tmp_path):
    """The draft of a context: up to k train tokens after its match j (lookup's j), cut after their EOT."""
    rng = np.random.default_rng(13)
    train, val = _stream(rng, 600, eot_p=0.05), _stream(rng, 50)
    root = tmp_path / "ds"
    _write_dataset(root, train, val, shard_tokens=150)
    build_index(IndexConfig(data=str(root)), use_ray=False)
    idx = LMatchIndex.open(str(root))
    ctxs = [list(train[a:a + int(rng.integers(1, 20))]) for a in rng.integers(0, len(train) - 20, 40)]
    ctxs += [list(rng.integers(1, V, 6)) for _ in range(10)] + [[EOT]]
    for c in ctxs:
        c = [int(x) for x in c]
        _, L, j = idx.lookup_key(idx.query_key(c))
        for k in (1, 4, 9):
            got, got_len = idx.continuation(c, k)
            assert got_len == L
            if not L:
                assert got == []
                continue
            want = [int(t) for t in train[j + 1:j + 1 + k]]
            assert got == (want[:want.index(EOT) + 1] if EOT in want else want), (c, k)
            assert got[0] == idx.lookup(c)[0]
