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


def test_prompts_loading_cached_blocks_are_prefilled_in_one_group():
    """Blocks already in the prefix cache hold no prompt back: seven prompts that only load a cached prefix
    go in one prefill group (one forward), not the first alone and the rest after it."""
    m = tiny()
    ps = shared_prompts(8, 48, seed=2)
    greedy = [SamplingParams(max_tokens=3, temperature=0.0)] * len(ps)
    want = run(Engine(m, max_batch=8), ps, greedy)
    engine = Engine(m, max_batch=8, prefix_cache_tokens=512, prefix_block=16)
    assert run(engine, ps[:1], greedy[:1]) == want[:1]  # stores the prefix
    groups, prefill = [], engine._prefill
    engine._prefill = lambda seqs: (groups.append(len(seqs)), prefill(seqs))
    assert run(engine, ps[1:], greedy[1:]) == want[1:]
    assert groups == [7]
    assert engine.stats()["prefix_reused_tokens"] == 7 * 48


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
    pc.store_many(cache, [0], [a])
    assert pc.cached(pc.digests(a)) == 3 and pc.digests(a[:12]) == pc.digests(a)[:2]
    assert pc.load_many(cache, [1], [a[:12] + [99]]) == [12]
    assert torch.equal(cache.k[1][1][:, :12], cache.k[1][0][:, :12])
    pc.store_many(cache, [0], [[7] * 8])  # 2 more blocks into a pool of 4: the least recently used (a's 3rd) goes
    assert pc.cached(pc.digests(a)) == 2 and pc.load_many(cache, [1], [[5, 5]]) == [0]
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


def test_batched_store_and_load_match_block_by_block_copies():
    """store_many / load_many (one gather and one scatter per layer) keep the table, the LRU order and the pool
    of a copy per block and prompt, evictions inside one batch included (a reused pool block keeps the last)."""
    cfg = ModelConfig.preset("tiny", vocab_size=V)
    cache = KVCache(cfg, 4, 40)
    for layer in range(cfg.n_layer):
        cache.k[layer].normal_()
        cache.v[layer].normal_()
    prompts = [list(range(13)), list(range(8)) + [50] * 9, [7] * 8]  # 3 + 4 + 2 full blocks into a pool of 4

    def one_by_one(pc: PrefixCache, row: int, prompt: list[int]) -> None:
        for b, d in enumerate(pc.digests(prompt, full=True)):
            if d in pc.table:
                continue
            if not pc.free:
                pc.free.append(pc.table.popitem(last=False)[1])
            pc.table[d] = block = pc.free.pop()
            for layer in range(cfg.n_layer):
                pc.k[layer][block] = cache.k[layer][row, :, b * 4:(b + 1) * 4]
                pc.v[layer][block] = cache.v[layer][row, :, b * 4:(b + 1) * 4]

    want, got = PrefixCache(cfg, tokens=16, block=4), PrefixCache(cfg, tokens=16, block=4)
    for row, p in enumerate(prompts):
        one_by_one(want, row, p)
    got.store_many(cache, [0, 1, 2], prompts)
    assert list(got.table.items()) == list(want.table.items())
    assert all(torch.equal(got.k[i], want.k[i]) and torch.equal(got.v[i], want.v[i]) for i in range(cfg.n_layer))
    into = KVCache(cfg, 4, 40)
    assert got.load_many(into, [3, 1], [[7] * 8 + [1], prompts[1]]) == [8, 0]  # prompts[1]'s first block is gone
    for layer in range(cfg.n_layer):
        for b, d in enumerate(got.digests([7] * 9)):
            assert torch.equal(into.k[layer][3, :, b * 4:(b + 1) * 4], got.k[layer][got.table[d]])
    assert list(got.table)[-2:] == got.digests([7] * 9)[::-1]  # loaded: most recently used, the first block last


def test_engine_forwards_run_without_cudnn_attention():
    """cuDNN's attention builds a plan per thread and input shape on first sight (tens of ms on a GPU, inside a
    request: prefills come in new shapes, reused prefixes most of all): the engine's forwards go without it, and
    the process's setting is back once no engine steps."""
    from app.serve.engine import no_cudnn_attention

    m = tiny()
    seen = []
    m.model.layers[0].self_attn.register_forward_pre_hook(
        lambda mod, args: seen.append(torch.backends.cuda.cudnn_sdp_enabled()))
    before = torch.backends.cuda.cudnn_sdp_enabled()
    engine = Engine(m, max_batch=4, prefix_cache_tokens=256, prefix_block=8)
    run(engine, shared_prompts(4, 24), [SamplingParams(max_tokens=3, temperature=0.0)] * 4)
    assert seen and not any(seen)  # prefills (from a reused prefix too) and decode steps
    assert torch.backends.cuda.cudnn_sdp_enabled() == before
    with no_cudnn_attention():  # engines in several threads: the last one out restores the flag
        with no_cudnn_attention():
            pass
        assert not torch.backends.cuda.cudnn_sdp_enabled()
    assert torch.backends.cuda.cudnn_sdp_enabled() == before
