"""The kNN-LM index: FAISS results against brute force, on-disk merge of parts equal to one index,
the interpolation maths, and a build that resumes where it stopped."""
import math
import os
import shutil

import faiss
import numpy as np
import pytest
import torch

from index import knn

D = 32


@pytest.fixture(autouse=True, scope="module")
def one_faiss_thread():
    """OpenMP's spinning threads slow FAISS down 10x on a busy 2-core machine; one thread is steady."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


def _clustered(n: int, seed: int, centers: np.ndarray) -> np.ndarray:
    """Points around shared centres (hidden states cluster; uniform noise would be a worst case for PQ)."""
    rng = np.random.default_rng(seed)
    return (centers[rng.integers(0, len(centers), n)] + rng.normal(size=(n, D))).astype(np.float32)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """40k keys in 4 shards, their values, 300 queries, and the brute-force 10 nearest ids."""
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(200, D)).astype(np.float32) * 3
    keys = _clustered(40000, 1, centers)
    values = rng.integers(0, 500, len(keys)).astype(np.int32)
    shard_dir = str(tmp_path_factory.mktemp("knn") / "keys")
    for i, s in enumerate(range(0, len(keys), 10000)):
        knn.write_key_shard(shard_dir, i, keys[s:s + 10000], values[s:s + 10000])
    queries = _clustered(300, 2, centers)
    d2 = (queries ** 2).sum(1)[:, None] - 2 * queries @ keys.T + (keys ** 2).sum(1)[None]
    true = np.argsort(d2, axis=1)[:, :10]
    return {"keys": keys, "values": values, "shard_dir": shard_dir, "queries": queries, "true": true,
            "true_d2": np.take_along_axis(d2, true, 1)}


def _ids(index: knn.KnnIndex, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    return index.index.search(np.ascontiguousarray(q), k)


def test_choose_params_defaults_and_flat_fallback():
    p = knn.choose_params(1_000_000, 768)
    assert p.kind == "ivfpq" and p.nlist == 2048 and p.m == 64 and 768 % p.m == 0
    assert knn.choose_params(100_000, 64).m == 32
    assert knn.choose_params(5000, 64).kind == "flat"  # tiny datastores are searched exactly
    assert knn.choose_params(5000, 64, kind="ivfpq").nlist <= 5000 // 39
    with pytest.raises(ValueError, match="divide"):
        knn.choose_params(100_000, 64, m=7)


def test_ivfpq_recall_against_brute_force(data, tmp_path):
    out = str(tmp_path / "ivf")
    meta = knn.build_index(data["shard_dir"], 4, out, kind="ivfpq", nlist=64, m=32, nbits=6, n_parts=3,
                           train_sample=3000)
    assert meta["kind"] == "ivfpq" and meta["n"] == 40000 and meta["nlist"] == 64 and meta["m"] == 32
    assert sorted(os.listdir(out)) == sorted([knn.META, knn.INDEX, knn.IVFDATA, knn.VALUES, knn.TRAINED])
    index = knn.KnnIndex.open(out, nprobe=16)
    _, ids = _ids(index, data["queries"], 10)
    true = data["true"]
    recall1 = np.mean([true[i, 0] in ids[i] for i in range(len(ids))])  # true nearest among the 10 found
    recall10 = np.mean([len(set(true[i]) & set(ids[i])) / 10 for i in range(len(ids))])
    assert recall1 >= 0.95 and recall10 >= 0.75, (recall1, recall10)
    dist, next_ids = index.search(data["queries"], 10)  # values are the stored next tokens of the found ids
    assert np.array_equal(next_ids, data["values"][ids]) and dist.shape == (300, 10)
    assert np.all(np.diff(dist, axis=1) >= 0)


def test_flat_fallback_is_exact(data, tmp_path):
    shard_dir = str(tmp_path / "keys")
    for i in range(2):  # 3000 keys: below exact_below, so an exact index
        knn.write_key_shard(shard_dir, i, data["keys"][i * 1500:(i + 1) * 1500], data["values"][i * 1500:(i + 1) * 1500])
    meta = knn.build_index(shard_dir, 2, str(tmp_path / "flat"), n_parts=2)
    assert meta["kind"] == "flat" and meta["exact"] and meta["n"] == 3000
    index = knn.KnnIndex.open(str(tmp_path / "flat"))
    keys, q = data["keys"][:3000], data["queries"]
    d2 = ((q[:, None, :] - keys[None]) ** 2).sum(-1)
    true = np.argsort(d2, axis=1)[:, :5]
    dist, next_ids = index.search(torch.from_numpy(q), 5)
    _, ids = _ids(index, q, 5)
    assert np.array_equal(np.sort(ids, 1), np.sort(true, 1))
    np.testing.assert_allclose(dist, np.take_along_axis(d2, true, 1), rtol=1e-4, atol=1e-3)
    assert np.array_equal(next_ids, data["values"][ids])


def test_ondisk_merge_of_parts_equals_one_index(data, tmp_path):
    one, many = str(tmp_path / "one"), str(tmp_path / "many")
    knn.build_index(data["shard_dir"], 4, one, kind="ivfpq", nlist=32, m=8, nbits=6, n_parts=1, train_sample=3000)
    os.makedirs(many)
    shutil.copy(os.path.join(one, knn.TRAINED), os.path.join(many, knn.TRAINED))  # the same trained quantizer
    knn.build_index(data["shard_dir"], 4, many, kind="ivfpq", nlist=32, m=8, nbits=6, n_parts=4, train_sample=3000)
    # and a plain in-memory index: the trained one plus every key
    mem = faiss.read_index(os.path.join(one, knn.TRAINED))
    mem.add(data["keys"])
    a, b = knn.KnnIndex.open(one, nprobe=8), knn.KnnIndex.open(many, nprobe=8)
    faiss.extract_index_ivf(mem).nprobe = 8
    da, ia = _ids(a, data["queries"], 8)
    db, ib = _ids(b, data["queries"], 8)
    dm, im = mem.search(data["queries"], 8)
    assert np.array_equal(ia, ib) and np.array_equal(ia, im)
    assert np.array_equal(da, db) and np.allclose(da, dm)


def test_build_resumes_after_a_failed_part(data, tmp_path):
    out = str(tmp_path / "idx")
    calls = []

    def failing_map(fn, *iterables):
        for j, args in enumerate(zip(*iterables)):
            if j == 2:
                raise RuntimeError("worker lost")
            calls.append(j)
            fn(*args)
        return []

    with pytest.raises(RuntimeError, match="worker lost"):
        knn.build_index(data["shard_dir"], 4, out, kind="ivfpq", nlist=32, m=8, nbits=6, n_parts=4, train_sample=3000,
                        map_fn=failing_map)
    assert not os.path.exists(os.path.join(out, knn.META))  # unfinished: no meta, so not openable
    with pytest.raises(knn.KnnFormatError, match="did not finish"):
        knn.KnnIndex.open(out)
    parts = os.path.join(out, knn.PARTS)
    done = {f: os.path.getmtime(os.path.join(parts, f)) for f in os.listdir(parts)}
    trained = os.path.getmtime(os.path.join(out, knn.TRAINED))
    assert sorted(done) == ["part_00000.faiss", "part_00001.faiss"]
    added = []

    def counting_map(fn, *iterables):
        for args in zip(*iterables):
            if not os.path.exists(args[-1]):
                added.append(args[-1])
            fn(*args)
        return []

    meta = knn.build_index(data["shard_dir"], 4, out, kind="ivfpq", nlist=32, m=8, nbits=6, n_parts=4, train_sample=3000,
                           map_fn=counting_map)
    assert [os.path.basename(p) for p in added] == ["part_00002.faiss", "part_00003.faiss"]  # only the missing ones
    assert os.path.getmtime(os.path.join(out, knn.TRAINED)) == trained
    assert meta["n"] == 40000 and not os.path.exists(parts)
    mem = faiss.read_index(os.path.join(out, knn.TRAINED))  # the same as adding everything in one go
    mem.add(data["keys"])
    faiss.extract_index_ivf(mem).nprobe = 8
    assert np.array_equal(_ids(knn.KnnIndex.open(out, nprobe=8), data["queries"], 5)[1], mem.search(data["queries"], 5)[1])
    assert knn.build_index(data["shard_dir"], 4, out) == meta  # finished: nothing to do


def test_unfinished_key_shards_are_refused(tmp_path):
    knn.write_key_shard(str(tmp_path), 0, np.zeros((10, 4), np.float32), np.zeros(10, np.int32))
    with pytest.raises(ValueError, match="not written yet"):
        knn.build_index(str(tmp_path), 2, str(tmp_path / "out"))


def test_interpolate_and_knn_distribution_maths():
    torch.manual_seed(0)
    V, B, k = 50, 6, 8
    lm = torch.log_softmax(torch.randn(B, V) * 3, dim=-1)
    dist = torch.rand(B, k) * 20
    next_ids = torch.randint(0, V, (B, k))
    next_ids[0] = 7  # every neighbour agrees: p_knn is one-hot
    kn = knn.knn_logprobs(dist, next_ids, V, temperature=2.0)
    assert torch.allclose(kn.exp().sum(-1), torch.ones(B), atol=1e-5)
    assert kn[0, 7] == pytest.approx(0.0, abs=1e-6) and torch.isneginf(kn[0, :7]).all()
    w = torch.softmax(-dist[1] / 2.0, dim=0)  # by hand: weights summed per token
    assert kn[1].exp()[next_ids[1, 0]] == pytest.approx(w[next_ids[1] == next_ids[1, 0]].sum().item(), rel=1e-5)
    assert torch.equal(knn.interpolate(lm, kn, 0.0), lm)
    assert torch.equal(knn.interpolate(lm, kn, 1.0), kn)
    for lam in (0.1, 0.25, 0.9):
        mix = knn.interpolate(lm, kn, lam)
        assert torch.allclose(mix.exp().sum(-1), torch.ones(B), atol=1e-5)
        assert torch.allclose(mix.exp(), lam * kn.exp() + (1 - lam) * lm.exp(), atol=1e-6)
        assert torch.isfinite(mix).all()  # the LM is never -inf, so neither is the mix
    # stable far in the tails: log-probabilities of -1000 do not underflow to -inf
    tiny = torch.full((1, 3), -1000.0)
    assert torch.allclose(knn.interpolate(tiny, tiny, 0.3), tiny, atol=1e-4)
    # the per-target shortcut equals the full distribution gathered at the target
    targets = torch.randint(0, V, (B,))
    targets[0] = 7
    got = knn.knn_target_logprob(dist, next_ids, targets, temperature=2.0)
    assert torch.allclose(got, kn.gather(1, targets[:, None]).squeeze(1), atol=1e-5)


def test_missing_neighbours_keep_the_lm():
    V = 10
    lm = torch.log_softmax(torch.randn(2, V), dim=-1)
    dist = torch.tensor([[0.5, math.inf], [math.inf, math.inf]])
    next_ids = torch.tensor([[3, -1], [-1, -1]])
    kn = knn.knn_logprobs(dist, next_ids, V)
    assert kn[0, 3] == pytest.approx(0.0, abs=1e-6) and torch.isneginf(kn[1]).all()
    mix = knn.interpolate(lm, kn, 0.5)
    assert torch.equal(mix[1], lm[1]) and torch.allclose(mix.exp().sum(-1), torch.ones(2), atol=1e-5)
    with pytest.raises(ValueError, match="lambda"):
        knn.interpolate(lm, kn, 1.5)
