"""The engine's static decode path: batch buckets, the device decode state, kinds-given sampling (CPU),
and CUDA-graph decode against eager decode and `generate` (GPU)."""
import pytest
import torch

from app.serve.engine import (DecodeState, Engine, SamplingParams, Sequence, batch_buckets, bucket_for,
                              length_buckets)
from app.serve.generate import generate, sample_tokens, sampling_kind, uniforms
from app.model.gpt import GPT, ModelConfig

V = 300


def tiny(device: str = "cpu", **kw) -> GPT:
    torch.manual_seed(0)
    m = GPT(ModelConfig.preset("tiny", vocab_size=V, **kw))
    m.init_weights()
    return m.to(device).eval()


def mixed(i: int, max_tokens: int = 12) -> SamplingParams:
    """Greedy, plain, top-k and top-p rows in turn."""
    return SamplingParams(max_tokens=max_tokens + i % 3, temperature=[0.0, 1.0, 0.8, 0.9][i % 4],
                          top_k=[0, 0, 40, 0][i % 4], top_p=[1.0, 1.0, 1.0, 0.8][i % 4], seed=100 + i)


def prompts(n: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(7)
    return [torch.randint(0, V, (int(k),), generator=g).tolist() for k in torch.randint(1, 30, (n,), generator=g)]


def test_batch_buckets():
    assert batch_buckets(1) == [1]
    assert batch_buckets(8) == [1, 2, 4, 8]
    assert batch_buckets(5) == [1, 2, 4, 5]
    assert batch_buckets(128) == [1, 2, 4, 8, 16, 32, 64, 128]
    assert [bucket_for(r, [1, 2, 4, 5]) for r in (1, 2, 3, 4, 5)] == [1, 2, 4, 4, 5]


def test_length_buckets():
    assert length_buckets(64, 1032) == [64, 128, 256, 512, 1024, 1032]
    assert length_buckets(16, 40) == [16, 32, 40]
    assert length_buckets(0, 100) == [100] and length_buckets(128, 64) == [64]


def test_reading_only_the_used_length_decodes_like_reading_all():
    """Attention over the used length's bucket (8, 16, 32, 64 keys) gives the tokens of whole-cache reads."""
    m = tiny()
    ps, params = prompts(8), [mixed(i, max_tokens=20) for i in range(8)]

    def run(kv_bucket: int) -> list[list[int]]:
        engine = Engine(m, eot_id=None, max_batch=4, max_len=64, kv_bucket=kv_bucket)
        seqs = [engine.submit(p, q) for p, q in zip(ps, params)]
        while not all(s.done for s in seqs):
            engine.step()
        return [s.tokens for s in seqs]

    assert run(8) == run(0)


def test_state_places_each_sequences_uniforms_from_its_prompt_end():
    st = DecodeState(3, 16, V, torch.device("cpu"))
    a = Sequence([1, 2, 3], SamplingParams(max_tokens=4, temperature=0.5, top_k=9, seed=3), None)
    b = Sequence([4], SamplingParams(max_tokens=2, seed=4), None)
    a.budget, b.budget = 4, 2
    st.admit(torch.tensor([2, 0]), [a, b], torch.device("cpu"))
    assert torch.equal(st.u[2, 3:7], uniforms(3, 4)) and not st.u[2, :3].any() and not st.u[2, 7:].any()
    assert torch.equal(st.u[0, 1:3], uniforms(4, 2))
    assert st.temperature[2] == 0.5 and st.top_k[2] == 9 and st.top_p[0] == 1.0


def test_sampling_with_known_kinds_equals_found_kinds():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 50, generator=g)
    params = [(0.0, 0, 1.0), (1.0, 0, 1.0), (0.7, 5, 1.0), (1.2, 0, 0.5)] * 2
    t = torch.tensor([p[0] for p in params])
    k = torch.tensor([p[1] for p in params])
    p = torch.tensor([p[2] for p in params])
    u = torch.rand(8, generator=g, dtype=torch.float64)
    kinds = [sampling_kind(*q, 50) for q in params]
    assert kinds[:4] == ["greedy", "plain", "cut", "cut"]
    found = sample_tokens(logits, t, k, p, u)
    assert torch.equal(sample_tokens(logits, t, k, p, u, (True, True)), found)
    for i in range(8):  # a row's token does not depend on the rest of the batch
        assert torch.equal(sample_tokens(logits[i:i + 1], t[i:i + 1], k[i:i + 1], p[i:i + 1], u[i:i + 1]), found[i:i + 1])


def test_fragmented_slots_decode_like_generate():
    """Active slots 0 and 4 of a 6-slot engine: rows 1-3 are free rows of the step's bucket."""
    m = tiny()
    engine = Engine(m, eot_id=None, max_batch=6)
    seqs = [engine.submit(p, mixed(i)) for i, p in enumerate(prompts(5))]
    engine.step()
    for s in seqs[1:4]:
        s.cancel()
    while not all(s.done for s in seqs):
        engine.step()
    for i in (0, 4):
        q = seqs[i].params
        assert seqs[i].tokens == list(generate(m, seqs[i].prompt, q.max_tokens, q.temperature, q.top_k, q.top_p,
                                               q.seed))


def test_cuda_graphs_need_cuda():
    with pytest.raises(ValueError, match="cuda_graphs needs a model on CUDA"):
        Engine(tiny(), cuda_graphs=True)


def _run(engine: Engine, ps: list[list[int]], params: list[SamplingParams]) -> list[list[int]]:
    engine.start()
    try:
        seqs = engine.submit_many(list(zip(ps, params)))
        assert all(s.wait(120) for s in seqs)
        assert all(s.finish_reason in ("stop", "length") for s in seqs), [s.error for s in seqs]
        return [s.tokens for s in seqs]
    finally:
        engine.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("lmatch", [False, True])
def test_graph_decode_equals_eager_decode_and_generate(lmatch):
    m = tiny("cuda", **({"lmatch_vocab": V + 1} if lmatch else {}))
    hook = type("Lookup", (), {"lookup": lambda self, ctx: ((sum(ctx) * 7) % (V + 1), 1)})() if lmatch else None
    ps, params = prompts(20), [mixed(i) for i in range(20)]
    graphs = Engine(m, eot_id=5, max_batch=8, lmatch=hook, cuda_graphs=True)
    eager = Engine(m, eot_id=5, max_batch=8, lmatch=hook, cuda_graphs=False)
    got = _run(graphs, ps, params)
    assert graphs.stats()["cuda_graphs"] > 0
    assert got == _run(eager, ps, params)
    fn = (lambda ctx: hook.lookup(ctx)[0]) if lmatch else None
    ref = [list(generate(m, p, q.max_tokens, q.temperature, q.top_k, q.top_p, q.seed, stop_ids=[5], lmatch_fn=fn))
           for p, q in zip(ps, params)]
    assert got == ref
