"""Deterministic loader: batches depend only on (seed, step), split evenly across ranks."""
import numpy as np
import pytest
import torch

from app.data import shards
from app.data.loader import BatchPlan, TokenStream, TrainLoader, eval_batches


@pytest.fixture
def manifest(tmp_path):
    """Two train shards of consecutive integers (so every window is checkable) and one val shard."""
    root = str(tmp_path)
    a, b = np.arange(0, 700, dtype=np.uint16), np.arange(700, 1000, dtype=np.uint16)
    infos = [dict(file=f"train_{i:06d}.bin", **shards.write_shard(f"{root}/train_{i:06d}.bin", t)) for i, t in enumerate([a, b])]
    val = dict(file="val_000000.bin", **shards.write_shard(f"{root}/val_000000.bin", np.arange(5000, 5300, dtype=np.uint16)))
    m = shards.Manifest(dtype="uint16", vocab_size=6000, eot_id=0, tokenizer_file="tokenizer.json",
                        tokenizer_sha256="-", shard_tokens=700, shards={"train": infos, "val": [val]},
                        docs={"train": 1, "val": 1}, rejected={}, inputs=1, config={})
    m.root = root
    m.save()
    return shards.load_manifest(root)


def test_stream_reads_across_shards(manifest):
    s = TokenStream(manifest, "train")
    assert s.n_tokens == 1000
    assert s.read(690, 20).tolist() == list(range(690, 710))


def test_windows_are_shifted_pairs_and_cover_an_epoch(manifest):
    loader = TrainLoader(TokenStream(manifest, "train"), 10, BatchPlan(33, 11, 1), rank=0, seed=1)
    starts = []
    for step in range(3):  # 3 steps x 33 = 99 windows = the whole epoch (999 // 10)
        for x, y, _ in loader.micro_batches(step):
            assert torch.equal(y[:, :-1], x[:, 1:])
            assert torch.all(x[:, 0] % 10 == 0)
            starts += x[:, 0].tolist()
    assert sorted(starts) == list(range(0, 990, 10))


def test_batches_independent_of_world_size_and_history(manifest):
    stream = TokenStream(manifest, "train")
    one = TrainLoader(stream, 16, BatchPlan(8, 2, 1), rank=0, seed=7)
    two = [TrainLoader(stream, 16, BatchPlan(8, 2, 2), rank=r, seed=7) for r in range(2)]
    fresh = TrainLoader(stream, 16, BatchPlan(8, 2, 1), rank=0, seed=7)
    for step in [0, 5, 70, 3]:  # crosses epochs (62 windows), and goes back
        whole = torch.cat([x for x, _, _ in one.micro_batches(step)])
        split = torch.cat([x for r in two for x, _, _ in r.micro_batches(step)])
        assert torch.equal(whole, split)
    assert torch.equal(torch.cat([x for x, _, _ in fresh.micro_batches(70)]),
                       torch.cat([x for x, _, _ in one.micro_batches(70)]))
    other_seed = TrainLoader(stream, 16, BatchPlan(8, 2, 1), rank=0, seed=8)
    assert not torch.equal(one.micro_batches(0)[0][0], other_seed.micro_batches(0)[0][0])


def test_uneven_plan_is_a_clear_error():
    with pytest.raises(ValueError, match="does not split"):
        BatchPlan(global_batch=10, micro_batch=4, world_size=2)


def test_eval_batches_partition_the_val_windows(manifest):
    stream = TokenStream(manifest, "val")
    parts = [eval_batches(stream, 10, 4, 10_000, r, 2) for r in range(2)]
    firsts = sorted(int(v) for p in parts for x, _, _ in p for v in x[:, 0])
    assert firsts == [5000 + 10 * i for i in range(29)]
