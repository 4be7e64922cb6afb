"""The GPT: shapes, loss, KV cache, meta-device build, presets, lmatch input, training, generation."""
import pytest
import torch
import torch.nn.functional as F

from app.config import ConfigError, parse_config
from app.serve.generate import generate
from app.model.gpt import GPT, KVCache, ModelConfig, use_kernels
from app.train.trainer import TrainConfig, model_config
from tests.conftest import cpu_rowwise_fp8

V = 300  # true vocabulary of the test models; padded to 384


def tiny(**kw) -> GPT:
    torch.manual_seed(0)
    m = GPT(ModelConfig.preset("tiny", vocab_size=V, **kw))
    m.init_weights()
    return m


def test_forward_shapes_and_loss_matches_reference():
    m = tiny()
    x, y = torch.randint(0, V, (2, 16)), torch.randint(0, V, (2, 16))
    y[0, :3] = -1
    logits, loss = m(x, y)
    assert logits.shape == (2, 16, 384)  # vocab padded to a multiple of 128
    ref = F.cross_entropy(logits.view(-1, 384), y.view(-1), ignore_index=-1)
    assert torch.allclose(loss, ref)
    logits_only, none = m(x)
    assert none is None and torch.equal(logits_only, logits)


def test_bad_inputs_are_clear_errors():
    m = tiny()
    x = torch.randint(0, V, (2, 8))
    with pytest.raises(ValueError, match="batch, tokens"):
        m(x[0])
    with pytest.raises(ValueError, match="targets shape"):
        m(x, x[:, :4])
    with pytest.raises(ValueError, match="exceeds max_seq_len=128"):
        m(torch.zeros(1, 129, dtype=torch.long))


@pytest.mark.parametrize("kw", [{}, {"n_kv_head": 2}, {"n_kv_head": 1, "tie_embeddings": True}])
def test_kv_cache_matches_full_forward(kw):
    m = tiny(**kw).eval()
    x = torch.randint(0, V, (2, 20))
    full, _ = m(x)
    cache = KVCache(m.cfg, 2, 20)
    a, _ = m(x[:, :12], kv_cache=cache)
    b, _ = m(x[:, 12:15], kv_cache=cache)  # a chunk after cached tokens
    steps = [m(x[:, i:i + 1], kv_cache=cache)[0] for i in range(15, 20)]
    assert cache.length == 20
    assert torch.allclose(torch.cat([a, b, *steps], dim=1), full, atol=1e-5)
    with pytest.raises(ValueError, match="KV cache full"):
        m(x[:, :1], kv_cache=cache)
    cache.reset()
    again, _ = m(x[:, :12], kv_cache=cache)
    assert torch.allclose(again, a, atol=1e-6)
    with pytest.raises(ValueError, match="batch 1 does not match the KV cache batch 2"):
        m(x[:1, :1], kv_cache=cache)


@pytest.mark.parametrize("tie", [False, True])
def test_meta_device_build_then_init(tie):
    with torch.device("meta"):
        m = GPT(ModelConfig.preset("tiny", vocab_size=V, n_layer=8, tie_embeddings=tie))
    assert m.lm_head.weight.is_meta
    m.to_empty(device="cpu")
    assert (m.lm_head.weight is m.model.embed_tokens.weight) == tie  # to_empty must not untie
    m.init_weights()
    assert all(torch.isfinite(p).all() for p in m.parameters())
    assert torch.all(m.model.norm.weight == 1) and torch.all(m.model.layers[3].input_layernorm.weight == 1)
    q_std = m.model.layers[0].self_attn.q_proj.weight.std().item()
    o_std = m.model.layers[0].self_attn.o_proj.weight.std().item()
    assert abs(q_std - 0.02) < 0.002 and abs(o_std - 0.02 / 4) < 0.0005  # 1/sqrt(2 * 8 layers)


def test_presets_have_their_sizes():
    def count(name):
        with torch.device("meta"):
            return GPT(ModelConfig.preset(name)).num_params()
    assert abs(count("gpt2-124m") - 124e6) < 12.4e6
    assert abs(count("llama3-8b") - 8.03e9) < 0.1e9
    assert 330e6 < count("gpt2-350m") < 390e6 and 1.45e9 < count("gpt2-1.5b") < 1.65e9
    cfg = ModelConfig.preset("llama3-8b")
    assert (cfg.n_kv_head, cfg.ffn_hidden, cfg.padded_vocab_size) == (8, 14336, 128256)


def test_derived_widths_follow_overrides():
    assert ModelConfig.preset("tiny").ffn_hidden == 256  # 8/3 * 64 rounded up to 256
    wider = ModelConfig.preset("tiny", d_model=128, n_head=8)
    assert wider.ffn_hidden == 512 and wider.n_kv_head == 8
    assert ModelConfig.preset("tiny", ffn_hidden=100).ffn_hidden == 100


@pytest.mark.parametrize("kw, match", [
    ({"n_head": 4, "n_kv_head": 3}, "multiple of n_kv_head"),
    ({"d_model": 66, "n_head": 4}, "heads of even size"),
    ({"d_model": 60, "n_head": 4}, "heads of even size"),  # head_dim 15: rotary needs pairs
    ({"vocab_size": 0}, "vocab_size=0 must be >= 1"),
    ({"norm_eps": 0.0}, "norm_eps=0.0 must be > 0"),
    ({"ffn_hidden": -1}, "ffn_hidden=-1"),
    ({"vocab_size": 300, "lmatch_vocab": 300}, "lmatch_vocab=300 must be >= vocab_size \\+ 1"),
    ({"mlp": "geglu"}, "mlp='geglu' must be one of swiglu, gelu, relu2"),
])
def test_config_validation(kw, match):
    with pytest.raises(ConfigError, match=match):
        ModelConfig(**kw)


def test_unknown_preset_or_field():
    with pytest.raises(ValueError, match="unknown model preset 'gpt5'; presets: tiny, gpt2-124m"):
        ModelConfig.preset("gpt5")
    with pytest.raises(ValueError, match="unknown ModelConfig field"):
        ModelConfig.preset("tiny", layers=3)


def test_param_and_flop_counts_see_through_tying():
    untied, tied = tiny(), tiny(tie_embeddings=True)
    assert untied.num_params() - tied.num_params() == 384 * 64
    assert untied.num_params(exclude_embedding=True) - tied.num_params(exclude_embedding=True) == 384 * 64
    assert untied.flops_per_token(128) == tied.flops_per_token(128)  # tying saves memory, not compute
    assert untied.flops_per_token(256) > untied.flops_per_token(128)


def test_lmatch_embedding_changes_output():
    m = tiny(lmatch_vocab=V + 1).eval()
    x = torch.randint(0, V, (1, 8))
    a, _ = m(x, lmatch=torch.full_like(x, V))  # "no match" everywhere
    b, _ = m(x, lmatch=x)
    assert not torch.allclose(a, b)
    one = torch.full_like(x, V)
    one[0, 5] = 7  # a match at position 5 changes that position and later ones only (causal)
    c, _ = m(x, lmatch=one)
    assert torch.allclose(c[:, :5], a[:, :5], atol=1e-6) and not torch.allclose(c[:, 5:], a[:, 5:])
    with pytest.raises(ValueError, match="pass lmatch="):
        m(x)
    with pytest.raises(ValueError, match="no lmatch embedding"):
        tiny()(x, lmatch=x)


@pytest.mark.parametrize("mlp", ["swiglu", "gelu", "relu2"])
def test_tiny_model_overfits_a_batch(mlp):
    m = tiny(mlp=mlp)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    x = torch.randint(0, V, (4, 33))
    losses = []
    for _ in range(50):
        _, loss = m(x[:, :-1], x[:, 1:])
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < losses[0] / 4


def _greedy_by_recompute(m: GPT, prompt: list[int], n: int) -> list[int]:
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(m(torch.tensor([seq]))[0][0, -1, :V].argmax()))
    return seq[len(prompt):]


@pytest.mark.parametrize("kw", [{}, {"n_kv_head": 2}])
def test_generate_greedy_matches_full_recompute(kw):
    m = tiny(**kw).eval()
    prompt = [1, 2, 3, 4]
    greedy = list(generate(m, prompt, 10, temperature=0))
    assert greedy == _greedy_by_recompute(m, prompt, 10)
    assert list(generate(m, prompt, 5, temperature=0, stop_ids=[greedy[2]])) == greedy[:2]


def test_generate_seed_repeats_and_limits():
    m = tiny().eval()
    prompt = [5, 6, 7]
    a = list(generate(m, prompt, 12, temperature=1.0, top_k=50, top_p=0.9, seed=5))
    b = list(generate(m, prompt, 12, temperature=1.0, top_k=50, top_p=0.9, seed=5))
    c = list(generate(m, prompt, 12, temperature=1.0, top_k=50, top_p=0.9, seed=6))
    assert a == b and a != c and len(a) == 12 and all(t < V for t in a)
    assert all(t < 10 for t in generate(m, prompt, 20, temperature=2.0, seed=0, vocab_limit=10))
    assert len(list(generate(m, list(range(120)), 50, temperature=0))) == 9  # context ends at 128
    assert len(list(generate(m, list(range(128)), 5, temperature=0))) == 1
    assert list(generate(m, prompt, 0)) == []


@pytest.mark.parametrize("kw, match", [
    ({"prompt_ids": list(range(129))}, "prompt has 129 tokens; this model reads at most 128"),
    ({"prompt_ids": []}, "prompt is empty"),
    ({"prompt_ids": [1, V]}, "outside the vocabulary"),
    ({"max_new_tokens": -1}, "max_new_tokens"),
    ({"temperature": -0.5}, "temperature"),
    ({"top_k": -1}, "top_k"),
    ({"top_p": 0.0}, "top_p"),
    ({"vocab_limit": 1000}, "vocab_limit"),
])
def test_generate_rejects_bad_arguments_at_the_call(kw, match):
    args = {"prompt_ids": [1, 2], "max_new_tokens": 4, **kw}
    with pytest.raises(ValueError, match=match):
        generate(tiny(), **args)  # raised before iteration starts


def test_generate_with_lmatch_feature():
    m = tiny(lmatch_vocab=V + 1).eval()

    def lmatch_fn(context):  # a stand-in for the retrieval index: a function of the context only
        return (sum(context) * 7) % (V + 1)

    prompt = [3, 1, 4, 1, 5]
    got = list(generate(m, prompt, 6, temperature=0, lmatch_fn=lmatch_fn))
    seq = list(prompt)
    for _ in range(6):
        lm = torch.tensor([[lmatch_fn(seq[:i + 1]) for i in range(len(seq))]])
        seq.append(int(m(torch.tensor([seq]), lmatch=lm)[0][0, -1, :V].argmax()))
    assert got == seq[len(prompt):]
    with pytest.raises(ValueError, match="lmatch_fn is required"):
        generate(m, prompt, 3)


def test_dropout_only_in_training():
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=64, dropout=0.5))
    model.init_weights()
    idx = torch.randint(0, 64, (2, 16))
    model.eval()
    a, b = model(idx)[0], model(idx)[0]
    assert torch.equal(a, b)
    model.train()
    assert not torch.allclose(model(idx)[0], a)
    with pytest.raises(ConfigError, match="dropout"):
        ModelConfig(dropout=1.0)


def test_concatenated_projections_compute_the_same_model():
    """kernels=proj (one matmul for q/k/v and one for gate/up) changes neither the loss nor any gradient."""
    idx = torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(0))
    results = []
    for spec in ("none", "proj"):
        use_kernels(spec)
        m = tiny(n_kv_head=2)  # grouped-query: unequal q and k/v widths
        _, loss = m(idx, idx)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in m.named_parameters()}))
    use_kernels("none")
    (loss, grads), (loss_proj, grads_proj) = results
    torch.testing.assert_close(loss_proj, loss)
    for name, g in grads.items():
        torch.testing.assert_close(grads_proj[name], g, msg=name)


@cpu_rowwise_fp8
def test_fp8_relu2_mlp_kernel_computes_the_same_model(monkeypatch):
    """kernels=mlp (the FP8 ReLU² feed-forward as one function) changes neither the loss nor any gradient of an
    FP8 model; FP8 forced on here, where CPU `torch._scaled_mm` runs it."""
    import app.fast.kernels
    monkeypatch.setattr(app.fast.kernels, "fp8_fits", lambda x, w: True)
    calls, mlp = [], app.fast.kernels.fp8_relu2_mlp
    monkeypatch.setattr(app.fast.kernels, "fp8_relu2_mlp", lambda *a: calls.append(1) or mlp(*a))
    idx = torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(0))
    results = []
    for spec in ("none", "mlp"):
        use_kernels(spec)
        m = tiny(fp8=True, mlp="relu2").to(torch.bfloat16)
        _, loss = m(idx, idx)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in m.named_parameters()}))
        assert len(calls) == (m.cfg.n_layer if spec == "mlp" else 0)
    use_kernels("none")
    (loss, grads), (loss_mlp, grads_mlp) = results
    assert torch.equal(loss_mlp, loss)
    for name, g in grads.items():
        assert torch.equal(grads_mlp[name], g), name


@pytest.mark.parametrize("option", ["fp8", "fp8_head"])
def test_fp8_option_is_plain_off_cuda(option):
    """ModelConfig.fp8 / fp8_head change nothing where FP8 cannot run (CPU): same logits as without it."""
    idx = torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(tiny(**{option: True})(idx)[0], tiny()(idx)[0])
    logits, loss = tiny(**{option: True})(idx, idx)
    loss.backward()  # gradients on: still the plain path off CUDA


@pytest.mark.parametrize("kind", ["gelu", "relu2"])
def test_ungated_mlps_compute_their_formula_at_swiglus_size(kind):
    """GELU / ReLU^2 MLPs: down(act(up(x))) with a 4 d_model hidden layer, no gate_proj; at GPT-2 124M's width
    they hold exactly SwiGLU's parameters (8/3 d is a multiple of 256 there), so they train like-for-like."""
    m = tiny(mlp=kind)
    assert m.cfg.ffn_hidden == 4 * 64 and m.cfg.mlp_inputs == 1
    mlp = m.model.layers[0].mlp
    assert not hasattr(mlp, "gate_proj") and mlp.up_proj.weight.shape == (256, 64)
    x = torch.randn(2, 5, 64)
    h = x @ mlp.up_proj.weight.T
    act = F.gelu(h, approximate="tanh") if kind == "gelu" else F.relu(h) ** 2
    assert torch.allclose(mlp(x), act @ mlp.down_proj.weight.T, atol=1e-6)
    train = parse_config(TrainConfig, ["--preset=gpt2-124m", f"--model.mlp={kind}"])
    assert model_config(train, 50257).ffn_hidden == 4 * 768  # the preset's SwiGLU width is re-derived
    sizes = {k: GPT(ModelConfig.preset("gpt2-124m", mlp=k)).num_params() for k in ("swiglu", kind)}
    assert sizes["swiglu"] == sizes[kind]
    swiglu = tiny()
    assert swiglu.model.layers[0].mlp.project_in(x)[0].shape == (2, 5, 256)  # gate(x), then up(x)
    assert len(swiglu.model.layers[0].mlp.project_in(x)) == 2
