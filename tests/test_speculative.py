"""Speculative decoding: drafting (prompt lookup, an index's continuation), speculative sampling's output
distribution, and the engine's verify steps: greedy tokens identical to plain decoding, batch mixes,
lmatch models, per-request draft lengths, stats."""
import numpy as np
import pytest
import torch

from app.model.gpt import GPT
from app.serve.engine import Engine, SamplingParams
from app.serve.generate import generate
from app.serve.speculative import Drafter, target_probs, verify
from tests.conftest import tiny_gpt

V = 300


def tiny(**kw) -> GPT:
    return tiny_gpt(V, **kw)


class Oracle:
    """An index whose continuation is the reference text after the context (every `wrong`-th token off by one,
    so that rows reject drafts at various depths)."""

    def __init__(self, texts: list[list[int]], wrong: int = 3):
        self.texts, self.wrong = texts, wrong

    def continuation(self, ctx, k):
        for t in self.texts:
            if list(ctx) == t[:len(ctx)] and len(t) > len(ctx):
                nxt = t[len(ctx):len(ctx) + k]
                return [(x + 1) % V if (len(ctx) + i) % self.wrong == 0 else x for i, x in enumerate(nxt)], 32
        return [], 0


def prompts(n: int, seed: int = 7) -> list[list[int]]:
    """Prompts that repeat themselves (prompt lookup finds matches) with a random tail."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        base = torch.randint(0, V, (int(torch.randint(2, 9, (1,), generator=g)),), generator=g).tolist()
        out.append((base * 6)[:int(torch.randint(3, 40, (1,), generator=g))] +
                   torch.randint(0, V, (2,), generator=g).tolist())
    return out


def run(engine: Engine, ps, params) -> list[list[int]]:
    seqs = [engine.submit(p, q) for p, q in zip(ps, params)]
    while not all(s.done for s in seqs):
        engine.step()
    assert all(s.finish_reason in ("stop", "length") for s in seqs), [s.error for s in seqs]
    return [s.tokens for s in seqs]


def sampled_like(tokens: torch.Tensor, want: torch.Tensor, at_least: int = 1) -> None:
    """The tokens' frequencies are `want`'s distribution: total variation within 3 x its expected size for
    a correct sampler (about sum sqrt(p (1 - p) / n) / 2)."""
    assert len(tokens) >= at_least
    freq = torch.bincount(tokens, minlength=V).double() / len(tokens)
    tol = 3 * 0.5 * (want.double() * (1 - want.double()) / len(tokens)).sqrt().sum()
    assert 0.5 * (freq - want).abs().sum() <= tol + 1e-9


def test_prompt_lookup_drafts_the_text_after_the_last_earlier_ngram():
    d = Drafter(ngram=3)
    assert d.propose([1, 2, 3, 9, 8, 1, 2, 3], 2) == [9, 8]
    assert d.propose([5, 2, 3, 7, 1, 2, 3, 6, 4, 2, 3], 3) == [6, 4, 2]  # most recent "2 3" (no "4 2 3" earlier)
    assert d.propose([1, 2, 3, 4], 3) == []  # no earlier occurrence of any suffix
    assert d.propose([4, 4], 5) == [4]  # the continuation stops at the context's end
    assert Drafter(ngram=3, min_match=2).propose([7, 1, 5, 1], 2) == []  # a 1-token match is too short
    with pytest.raises(ValueError, match="needs an index or prompt_lookup"):
        Drafter(prompt_lookup=False)


def test_the_longer_match_drafts():
    index = type("I", (), {"continuation": lambda self, ctx, k: ([42] * k, 2)})()
    assert Drafter(index, ngram=3).propose([1, 2, 3, 9, 1, 2, 3], 2) == [9, 1]  # prompt match of 3 > 2
    assert Drafter(index, ngram=3).propose([5, 6, 7, 8], 2) == [42, 42]
    assert Drafter(index, prompt_lookup=False).propose([1], 3) == [42, 42, 42]


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 12, 1.0), (1.3, 0, 0.6)])
def test_speculative_sampling_gives_the_models_distribution(temperature, top_k, top_p):
    """A tiny model's logits for a prompt and two drafts; 200k rows verified with fresh uniforms: the first
    emitted token follows p_0 and, after an accepted first draft, the second follows p_1 (total variation)."""
    m = tiny()
    m.lm_head.weight.data.mul_(20)  # (tied: the embeddings too) a peaked model: drafts often accepted and rejected
    prompt, t, k, p = [5, 17, 99, 3], torch.tensor([temperature]), torch.tensor([top_k]), torch.tensor([top_p])
    probs_of = lambda logits: target_probs(logits, t.expand(3), k.expand(3), p.expand(3))  # noqa: E731
    with torch.no_grad():
        d1 = int(probs_of(m(torch.tensor([prompt + [0, 0]]))[0][0, -3:, :V])[0].argmax())  # a likely first draft
        d2 = int(probs_of(m(torch.tensor([prompt + [d1, 0]]))[0][0, -3:, :V])[1].argsort()[-2])  # a 2nd-best second
        logits = m(torch.tensor([prompt + [d1, d2]]))[0][0, -3:, :V]
    probs = probs_of(logits)
    assert 0.05 < probs[0, d1] < 0.95
    n = 20_000
    g = torch.Generator().manual_seed(2)
    acc, out = verify(logits[None].expand(n, -1, -1), torch.tensor([[d1, d2]]).expand(n, -1),
                      torch.full((n,), 2), t.expand(n), k.expand(n), p.expand(n),
                      torch.rand(n, 3, generator=g, dtype=torch.float64))
    assert ((acc >= 0) & (acc <= 2)).all()
    sampled_like(out[:, 0], probs[0])
    sampled_like(out[acc >= 1, 1], probs[1])  # after an accepted first draft the second token is p_1's
    assert torch.equal(acc >= 1, out[:, 0] == d1)  # an emitted d1 is always an accepted draft


def test_engine_samples_drafted_tokens_from_the_models_distribution():
    """1,000 seeded sequences of one prompt through the engine, drafts [d2, d3] after the most likely first
    token t1: the 2nd token given t1, and the 3rd given (t1, d2), follow the model's softmax."""
    m = tiny()
    m.lm_head.weight.data.mul_(20)
    prompt = [5, 17, 99, 3]
    with torch.no_grad():
        probs = lambda ctx: torch.softmax(m(torch.tensor([ctx]))[0][0, -1, :V], -1)  # noqa: E731
        t1 = int(probs(prompt).argmax())
        d2 = int(probs(prompt + [t1]).argmax())
        d3 = int(probs(prompt + [t1, d2]).argsort()[-2])
        p2, p3 = probs(prompt + [t1]), probs(prompt + [t1, d2])
    index = type("I", (), {"continuation": lambda self, ctx, k: (
        ([d2, d3][:k], 9) if list(ctx) == prompt + [t1] else ([], 0))})()
    engine = Engine(m, max_batch=64, max_queue=4096, drafter=Drafter(index, prompt_lookup=False), kv_bucket=16)
    seqs = [engine.submit(prompt, SamplingParams(max_tokens=3, seed=i)) for i in range(1000)]
    while not all(s.done for s in seqs):
        engine.step()
    assert engine.stats()["accepted_tokens"] > 0
    out = torch.tensor([s.tokens for s in seqs])
    sampled_like(out[out[:, 0] == t1, 1], p2, at_least=150)
    sampled_like(out[(out[:, 0] == t1) & (out[:, 1] == d2), 2], p3, at_least=150)


def test_greedy_verify_accepts_the_argmax_prefix():
    logits = torch.zeros(2, 4, 6)
    for i, best in enumerate([3, 1, 4, 2]):
        logits[:, i, best] = 1.0
    drafts = torch.tensor([[3, 1, 5], [3, 1, 4]])
    zero = torch.zeros(2)
    acc, out = verify(logits, drafts, torch.tensor([3, 2]), zero, zero.long(), zero + 1,
                      torch.rand(2, 4, dtype=torch.float64), (False, False))
    assert acc.tolist() == [2, 2]
    assert out[0, :3].tolist() == [3, 1, 4] and out[1, :3].tolist() == [3, 1, 4]  # the 3rd: a fix vs a bonus


@pytest.mark.parametrize("max_batch,draft", [(1, 4), (4, 8)])
def test_greedy_speculative_engine_equals_plain_decoding(max_batch, draft):
    m = tiny()
    ps = prompts(6)
    greedy = [SamplingParams(max_tokens=10 + i % 5, temperature=0.0) for i in range(len(ps))]
    plain = run(Engine(m, max_batch=max_batch, kv_bucket=0), ps, greedy)
    assert plain == [list(generate(m, p, q.max_tokens, 0.0)) for p, q in zip(ps, greedy)]
    oracle = Oracle([p + t for p, t in zip(ps, plain)])
    for drafter in (Drafter(ngram=3), Drafter(oracle, prompt_lookup=False)):
        engine = Engine(m, max_batch=max_batch, drafter=drafter, draft_tokens=draft, max_draft=8, kv_bucket=16)
        assert run(engine, ps, greedy) == plain
        st = engine.stats()
        assert st["speculative_steps"] > 0 and st["drafted_tokens"] > 0
    assert st["accepted_tokens"] > 0 and st["steps"] < sum(q.max_tokens for q in greedy) / max_batch


def test_mixed_batch_per_request_drafts_and_sampled_rows():
    """Greedy rows with and without drafts beside sampled rows: greedy tokens are plain decoding's, rows
    that draft nothing (draft_tokens=0) are plain decoding's whatever their sampling, seeds reproduce."""
    m = tiny()
    ps = prompts(8, seed=3)
    params = [SamplingParams(max_tokens=14, temperature=[0.0, 0.0, 1.0, 0.8][i % 4], top_k=[0, 0, 0, 20][i % 4],
                             seed=50 + i, draft_tokens=[2, 0, 4, 0, 3, 0][i % 6]) for i in range(len(ps))]
    plain = run(Engine(m, max_batch=5), ps, params)
    assert run(Engine(m, max_batch=5), ps, params) == plain  # draft_tokens without a drafter: ignored
    oracle = Oracle([p + t for p, t in zip(ps, plain)], wrong=4)
    make = lambda: Engine(m, max_batch=5, drafter=Drafter(oracle), kv_bucket=16)  # noqa: E731
    spec = run(make(), ps, params)
    for q, a, b in zip(params, plain, spec):
        if q.temperature == 0 or q.draft_tokens == 0:
            assert a == b
        assert len(b) == q.max_tokens
    assert run(make(), ps, params) == spec
    with pytest.raises(ValueError, match="draft_tokens=9 must be in"):
        make().submit([1, 2], SamplingParams(draft_tokens=9))
    plain_engine = Engine(m, max_batch=1, kv_bucket=16)  # no drafter: any count >= 0 is accepted and drafts nothing
    assert plain_engine.submit([1, 2], SamplingParams(draft_tokens=9)).draft == 0
    with pytest.raises(ValueError, match="draft_tokens=-1 must be in"):
        plain_engine.submit([1, 2], SamplingParams(draft_tokens=-1))


def test_lmatch_model_verifies_with_each_positions_lmatch_id():
    m = tiny(lmatch_vocab=V + 1)
    hook = type("Lookup", (), {"lookup": lambda self, ctx: ((sum(ctx) * 7) % (V + 1), 1)})()
    ps = prompts(6, seed=5)
    greedy = [SamplingParams(max_tokens=10, temperature=0.0) for _ in ps]
    want = [list(generate(m, p, 10, 0.0, lmatch_fn=lambda c: hook.lookup(c)[0])) for p in ps]
    oracle = Oracle([p + t for p, t in zip(ps, want)])
    engine = Engine(m, max_batch=4, lmatch=hook, drafter=Drafter(oracle), kv_bucket=16)
    assert run(engine, ps, greedy) == want
    assert engine.stats()["accepted_tokens"] > 0


def test_knn_and_a_drafter_are_refused_together():
    with pytest.raises(ValueError, match="does not combine with a kNN index"):
        Engine(tiny(), drafter=Drafter(), knn=lambda h: (np.zeros((len(h), 1)), np.zeros((len(h), 1))))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_graphed_verify_steps_equal_eager_ones():
    m = tiny().cuda()
    ps = prompts(12, seed=9)
    params = [SamplingParams(max_tokens=16, temperature=[0.0, 1.0, 0.8][i % 3], top_p=[1.0, 1.0, 0.7][i % 3],
                             seed=i, draft_tokens=[4, 2, 8][i % 3]) for i in range(len(ps))]
    make = lambda graphs: Engine(m, max_batch=8, drafter=Drafter(), kv_bucket=16, cuda_graphs=graphs)  # noqa: E731
    graphed = make(True)
    assert run(graphed, ps, params) == run(make(False), ps, params)
    assert graphed.stats()["speculative_steps"] > 0


def test_the_benchmark_smoke_run(shakespeare_shards, tmp_path):
    """bench.speculative --smoke on the tinyshakespeare shards: every variant's greedy completions equal
    plain decoding's, and drafting happened."""
    import shutil

    from bench.speculative import main

    data = str(shutil.copytree(shakespeare_shards, tmp_path / "shards"))  # never index the shared fixture
    out = main(["--smoke", "--data", data, "--threads", "1", "--streams", "1,3", "--prompts", "4",
                "--prompt_len", "24", "--max_tokens", "12"])
    assert out["all_identical"] and set(out["levels"]) == {"1", "3"}
    for level in out["levels"].values():
        assert level["plain"]["tokens"] == level["index"]["tokens"] > 0
        assert level["index+prompt"]["drafted"] > 0 and level["plain"]["drafted"] == 0
