"""Prefix reuse: prompts sharing leading blocks load their KV from the prefix cache instead of computing it,
with the tokens of an engine without one (greedy and seeded sampling, lmatch models, eviction)."""
import pytest
import torch

from app.model.gpt import GPT, ModelConfig
from app.serve.engine import Engine, SamplingParams
from app.serve.kvcache import KVCache, PrefixCache
from tests.conftest import tiny_gpt

V = 300


def tiny(**kw) -> GPT:
    return tiny_gpt(V, **kw)


def shared_prompts(n: int, prefix: int, seed: int = 0) -> list[list[int]]:
    """n prompts: one shared `prefix`-token start, then 1..12 own tokens (some exactly block-aligned)."""
    g = torch.Generator().manual_seed(seed)
    head = torch.randint(0, V, (prefix,), generator=g).tolist()
    return [head + torch.randint(0, V, (i % 13,), generator=g).tolist() for i in range(n)]


def run(engine: Engine, ps, params, one_by_one: bool = False) -> list[list[int]]:
    if one_by_one:  # each prompt prefilled after the previous one stored its blocks
        out = []
        for p, q in zip(ps, params):
            out += run(engine, [p], [q])
        return out
    seqs = [engine.submit(p, q) for p, q in zip(ps, params)]
    while not all(s.done for s in seqs):
        engine.step()
    assert all(s.finish_reason in ("stop", "length") for s in seqs), [s.error for s in seqs]
    return [s.tokens for s in seqs]


def params_of(n: int) -> list[SamplingParams]:
    return [SamplingParams(max_tokens=8, temperature=[0.0, 1.0, 0.8][i % 3], top_k=[0, 0, 30][i % 3], seed=i)
            for i in range(n)]


@pytest.mark.parametrize("one_by_one", [False, True])
def test_prefix_reuse_gives_the_tokens_of_no_reuse(one_by_one):
    m = tiny()
    ps = shared_prompts(10, 32)  # 32 = 4 blocks of 8: prompts of exactly 32 still prefill their last block
    params = params_of(len(ps))
    want = run(Engine(m, max_batch=4, max_prefill_tokens=96), ps, params)
    engine = Engine(m, max_batch=4, max_prefill_tokens=96, prefix_cache_tokens=256, prefix_block=8)
    assert run(engine, ps, params, one_by_one) == want
    st = engine.stats()
    assert st["prefix_reused_tokens"] >= 8 * 24 and st["prefix_cached_blocks"] > 4
    assert st["prefilled_tokens"] == sum(len(p) for p in ps) - st["prefix_reused_tokens"]


def test_one_admission_round_computes_a_shared_prefix_once():
    """Eight prompts admitted together: the first group stores the prefix, the later groups load it."""
    m = tiny()
    ps = shared_prompts(8, 48, seed=1)
    engine = Engine(m, max_batch=8, prefix_cache_tokens=512, prefix_block=16)
    run(engine, ps, [SamplingParams(max_tokens=2, temperature=0.0)] * len(ps))
    assert engine.stats()["prefix_reused_tokens"] == 7 * 48  # all but the first (which stores it)
    assert engine.stats()["prefilled_tokens"] == sum(len(p) for p in ps) - 7 * 48


def test_eviction_and_lmatch_models_keep_the_tokens():
    m = tiny(lmatch_vocab=V + 1)
    hook = type("Lookup", (), {"lookup": lambda self, ctx: ((sum(ctx) * 7) % (V + 1), 1)})()
    ps = shared_prompts(6, 24, seed=2) + shared_prompts(6, 24, seed=3)
    params = params_of(len(ps))
    want = run(Engine(m, max_batch=3, lmatch=hook), ps, params)
    small = Engine(m, max_batch=3, lmatch=hook, prefix_cache_tokens=24, prefix_block=8)  # 3 blocks: evictions
    assert run(small, ps, params, one_by_one=True) == want
    assert small.stats()["prefix_cached_blocks"] == 3 and small.stats()["prefix_reused_tokens"] > 0


def test_prefix_cache_lru_and_load():
    cfg = ModelConfig.preset("tiny", vocab_size=V)
    pc = PrefixCache(cfg, tokens=16, block=4)
    cache = KVCache(cfg, 2, 32)
    for layer in range(cfg.n_layer):
        cache.k[layer][0] = torch.randn_like(cache.k[layer][0])
    a = list(range(13))  # 3 full blocks; 3 loadable (one token left to prefill)
    pc.store(cache, 0, a)
    assert pc.cached(pc.digests(a)) == 3 and pc.digests(a[:12]) == pc.digests(a)[:2]
    assert pc.load(cache, 1, a[:12] + [99]) == 12
    assert torch.equal(cache.k[1][1][:, :12], cache.k[1][0][:, :12])
    pc.store(cache, 0, [7] * 8)  # 2 more blocks into a pool of 4: the least recently used (a's 3rd) goes
    assert pc.cached(pc.digests(a)) == 2 and pc.load(cache, 1, [5, 5]) == 0
    with pytest.raises(ValueError, match="tokens >= block"):
        PrefixCache(cfg, tokens=3, block=4)


def test_serve_load_bench_reports_prefix_reuse_and_step_time():
    from bench.serve_load import main

    out = main(["--quick", "--no_hf", "--threads", "1", "--concurrency", "2", "--requests", "4",
                "--prefix_tokens", "48", "--prefix_requests", "4"])
    assert out["errors"] == 0 and out["levels"]["2"]["engine"]["step_ms"] > 0
    pr = out["prefix_reuse"]
    assert pr["with"]["errors"] == pr["without"]["errors"] == 0
    assert pr["with"]["prefilled_tokens"] < pr["without"]["prefilled_tokens"]
