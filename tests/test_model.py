"""The GPT: shapes, loss, KV cache, meta-device build, presets, lmatch input, training, generation; the plain
model file; `accelerate` (the converters that apply the fast paths from outside)."""
import json
import re
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import app.fast.kernels
from app.config import ConfigError, from_dict, parse_config
from app.fast.accelerate import accelerate
from app.fast.config import PerfConfig
from app.fast.fp8 import Fp8Linear, Fp8Relu2MLP
from app.fast.loss_head import FastHead
from app.fast.windows import SlidingWindowAttention
from app.model import gpt as gpt_module
from app.model.export import _read_config
from app.model.gpt import GPT, Attention, LMHead, MLP, ModelConfig
from app.serve.generate import generate
from app.serve.kvcache import KVCache
from app.train.config import TrainConfig, model_config
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


def test_norm_and_rotary_match_hugging_face_llama():
    modeling = pytest.importorskip("transformers.models.llama.modeling_llama")
    x = torch.randn(2, 5, 32)
    hf_norm, norm = modeling.LlamaRMSNorm(32, eps=1e-6), gpt_module.RMSNorm(32, 1e-6)
    with torch.no_grad():
        hf_norm.weight.copy_(1 + 0.2 * torch.randn(32))
        norm.weight.copy_(hf_norm.weight)
        torch.testing.assert_close(norm(x), hf_norm(x))
    q, k = torch.randn(2, 4, 5, 16), torch.randn(2, 2, 5, 16)
    cos, sin = gpt_module.rotary_tables(torch.arange(5), 16, 10000.0)
    hf_q, hf_k = modeling.apply_rotary_pos_emb(q, k, cos[None], sin[None])  # HF's tables are [B, T, hd]
    torch.testing.assert_close(gpt_module.apply_rotary(q, cos, sin), hf_q)
    torch.testing.assert_close(gpt_module.apply_rotary(k, cos, sin), hf_k)


def test_the_plain_model_file_is_short_and_knows_no_fast_path():
    """app/model/gpt.py reads in one sitting: no kernels, FP8 or CUDA graphs (they are applied from outside)."""
    source = Path(gpt_module.__file__).read_text()
    assert len(source.splitlines()) <= 350
    hits = [line for line in source.splitlines() if re.search(r"kernel|fp8|graph|triton", line, re.IGNORECASE)]
    assert not hits, hits


def _app_globals() -> dict[str, dict[str, object]]:
    """Every loaded app module's globals, by identity."""
    return {name: {k: id(v) for k, v in vars(mod).items()} for name, mod in list(sys.modules.items())
            if name == "app" or name.startswith("app.")}


@pytest.mark.parametrize("kernels", ["auto", "none", "all", "loss", "loss,rows,window,mlp", "rows"])
@pytest.mark.parametrize("fp8", ["off", "head", "all"])
def test_parsing_a_perf_config_changes_no_global_state(kernels, fp8):
    """No process-wide kernel choice: parsing and validating a TrainConfig rebinds no module global of app, sets no
    Inductor choice, and a model built afterwards is the plain one."""
    from torch._inductor import config as inductor_config

    before = _app_globals()
    cfg = parse_config(TrainConfig, [f"--perf.kernels={kernels}", f"--perf.fp8={fp8}", "--perf.compile_mode=tuned"])
    cfg.validate()
    assert cfg.perf.kernels == kernels and cfg.perf.fp8 == fp8
    after = _app_globals()
    assert {name: after[name] for name in before} == before
    assert inductor_config.inductor_choices_class is None
    m = tiny(attn_windows=[1, 4, 0])
    assert {type(x) for x in m.modules()} <= {GPT, nn.ModuleDict, nn.ModuleList, nn.Embedding, nn.Linear, LMHead,
                                              gpt_module.Block, Attention, MLP, gpt_module.RMSNorm, nn.Dropout}


@pytest.mark.parametrize("kernels, message", [("proj", "unknown \\['proj'\\]"), ("loss,nope", "unknown \\['nope'\\]")])
def test_unknown_kernels_are_refused(kernels, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(TrainConfig, {"perf": {"kernels": kernels}})


def test_perf_config_resolves_auto_and_refuses_what_cannot_nest():
    assert PerfConfig().kernel_set() == {"loss", "window"}
    assert PerfConfig(fp8="head").kernel_set() == {"loss", "window"}
    assert PerfConfig(fp8="all").kernel_set() == {"loss", "rows", "window", "mlp"}
    assert PerfConfig(kernels="none", fp8="all").kernel_set() == frozenset()
    assert PerfConfig(kernels="all").kernel_set() == {"loss", "rows", "window", "mlp"}
    with pytest.raises(ConfigError, match="perf.fp8='yes' must be one of off, head, all"):
        PerfConfig(fp8="yes").validate()
    with pytest.raises(ConfigError, match="cuda_graph"):
        PerfConfig(cuda_graph="true", compile_mode="reduce-overhead").validate()


def _plain_and_fast(perf: PerfConfig, **kw) -> tuple[GPT, GPT]:
    """A plain tiny model and an accelerated copy with the same weights."""
    plain = tiny(**kw)
    fast = tiny(**kw)
    fast.load_state_dict(plain.state_dict())
    return plain, accelerate(fast, perf)


def test_accelerate_swaps_the_modules_it_says_and_keeps_the_state_dict():
    plain, fast = _plain_and_fast(PerfConfig(kernels="loss,window,mlp", fp8="all"), mlp="relu2", n_layer=3,
                                  attn_windows=[1, 4, 0])
    assert list(fast.state_dict()) == list(plain.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(fast.state_dict().values(), plain.state_dict().values()))
    one, window, full = (fast.model.layers[i] for i in range(3))
    assert type(fast.lm_head) is FastHead and fast.lm_head.fused and fast.lm_head.fp8
    assert type(one.self_attn.q_proj) is nn.Linear and type(one.self_attn.v_proj) is Fp8Linear  # q/k never run
    assert type(window.self_attn) is SlidingWindowAttention and window.self_attn.kernel
    assert type(full.self_attn) is Attention and type(full.self_attn.o_proj) is Fp8Linear
    assert all(type(b.mlp) is Fp8Relu2MLP and type(b.mlp.down_proj) is Fp8Linear for b in fast.model.layers)
    assert type(fast.model.layers[0].input_layernorm) is gpt_module.RMSNorm
    # nothing to swap: kernels=none, fp8=off leaves a model without windows plain
    untouched = accelerate(tiny(), PerfConfig(kernels="none"))
    assert {type(x) for x in untouched.modules()} == {type(x) for x in tiny().modules()}
    head = accelerate(tiny(), PerfConfig(kernels="none", fp8="head")).lm_head
    assert type(head) is FastHead and head.fp8 and not head.fused


@pytest.mark.parametrize("perf", [PerfConfig(kernels="none"), PerfConfig(kernels="all", fp8="all")])
def test_accelerated_model_off_cuda_computes_the_plain_model_bit_for_bit(perf):
    """Where no fast path can run (CPU), every converted module takes the plain computation: the same logits, loss
    and gradients, bit for bit; a tied head stays tied."""
    plain, fast = _plain_and_fast(perf, mlp="relu2", attn_windows=[1, 5, 0], n_layer=3, tie_embeddings=True)
    assert fast.lm_head.weight is fast.model.embed_tokens.weight
    idx = torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(0))
    outs = []
    for m in (plain, fast):
        logits, loss = m(idx, idx)
        loss.backward()
        outs.append((logits, loss, [p.grad for p in m.parameters()]))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    assert all(torch.equal(a, b) for a, b in zip(outs[0][2], outs[1][2]))


@cpu_rowwise_fp8
def test_fp8_relu2_mlp_kernel_computes_the_same_model(monkeypatch):
    """kernels=mlp (the FP8 ReLU² feed-forward as one function) changes neither the loss nor any gradient of an
    FP8 model; FP8 forced on here, where CPU `torch._scaled_mm` runs it."""
    monkeypatch.setattr(app.fast.kernels, "fp8_fits", lambda x, w: True)
    calls, mlp = [], app.fast.kernels.fp8_relu2_mlp
    monkeypatch.setattr(app.fast.kernels, "fp8_relu2_mlp", lambda *a: calls.append(1) or mlp(*a))
    idx = torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(0))
    results = []
    for kernels in ("none", "mlp"):
        m = accelerate(tiny(mlp="relu2").to(torch.bfloat16), PerfConfig(kernels=kernels, fp8="all"))
        _, loss = m(idx, idx)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in m.named_parameters()}))
        assert len(calls) == (m.cfg.n_layer if kernels == "mlp" else 0)
    (loss, grads), (loss_mlp, grads_mlp) = results
    assert torch.equal(loss_mlp, loss)
    for name, g in grads.items():
        assert torch.equal(grads_mlp[name], g), name


@cpu_rowwise_fp8
def test_compiled_fp8_model_gradients_are_its_eager_ones(monkeypatch):
    """The accelerated FP8 model (Fp8Linear, the ReLU² function) under torch.compile: every parameter gets its
    eager gradient (FP8 forced on here, where CPU `torch._scaled_mm` runs it)."""
    monkeypatch.setattr(app.fast.kernels, "fp8_fits", lambda x, w: True)
    m = accelerate(tiny(mlp="relu2").to(torch.bfloat16), PerfConfig(kernels="mlp", fp8="all"))
    idx = torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(0))
    grads = []
    torch._dynamo.reset()
    for fwd in (m, torch.compile(m)):
        m.zero_grad(set_to_none=True)
        fwd(idx, idx)[1].backward()
        grads.append({n: p.grad.double() for n, p in m.named_parameters()})
    torch._dynamo.reset()
    for name, e in grads[0].items():  # compiled and eager round around the e4m3 casts apart: a few % (lost: 1)
        err = ((grads[1][name] - e).norm() / e.norm()).item()
        assert e.norm() > 0 and err < 0.15, f"compiled {name} differs from eager by {err:.3f}"


@cpu_rowwise_fp8
def test_fp8_linears_run_fp8_only_with_gradients_on(monkeypatch):
    """An accelerated fp8=all model runs its training matmuls in FP8 (forced on here, where CPU `torch._scaled_mm`
    runs it: close to the plain model, not equal); without gradients (evaluation, generation) the plain ones."""
    monkeypatch.setattr(app.fast.kernels, "fp8_fits", lambda x, w: True)
    plain, fast = _plain_and_fast(PerfConfig(kernels="none", fp8="all"))
    idx = torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(fast(idx)[0], plain(idx)[0])
    (fast_logits, fast_loss), (logits, loss) = fast(idx, idx), plain(idx, idx)
    assert not torch.equal(fast_logits, logits)
    assert ((fast_logits - logits).norm() / logits.norm()).item() < 0.1 and abs(fast_loss.item() - loss.item()) < 0.05


def test_an_older_exports_fp8_keys_are_ignored(tmp_path):
    """Exports made when the FP8 options were part of ModelConfig still load (they never changed the weights)."""
    cfg = ModelConfig.preset("tiny", vocab_size=V)
    spotlm = {"format_version": 1, "model": {**vars(cfg), "fp8": True}, "meta": {"run": "old"}}
    (tmp_path / "config.json").write_text(json.dumps({"spotlm": spotlm}))
    assert _read_config(str(tmp_path / "config.json")) == (cfg, {"run": "old"})


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


def _loss_and_grads(m: GPT, idx: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    m.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        _, loss = m(idx, idx)
    loss.backward()
    return loss.detach().float(), [p.grad.float() for p in m.parameters()]


@pytest.mark.gpu
def test_gpu_accelerated_model_matches_the_plain_one():
    """On CUDA the accelerated model (kernels=auto, fp8=all: FP8 blocks and head, the fused loss, the window kernel,
    the ReLU² row kernels) gives the plain model's loss and gradients within FP8's precision; with everything off
    (kernels=none, fp8=off; no window layers, which take the block-sparse form) it is the plain model, bit for bit."""
    idx = torch.randint(0, 500, (4, 256), generator=torch.Generator().manual_seed(0)).cuda()
    for perf, windows in ((PerfConfig(kernels="auto", fp8="all"), [1, 64, 0]), (PerfConfig(kernels="none"), [])):
        torch.manual_seed(0)
        cfg = ModelConfig.preset("tiny", vocab_size=500, n_layer=3, d_model=128, max_seq_len=256, mlp="relu2",
                                 attn_windows=windows)
        plain = GPT(cfg)
        plain.init_weights()
        fast = GPT(cfg)
        fast.load_state_dict(plain.state_dict())
        plain, fast = plain.cuda(), accelerate(fast, perf).cuda()
        (loss, grads), (fast_loss, fast_grads) = _loss_and_grads(plain, idx), _loss_and_grads(fast, idx)
        if perf.kernels == "none":
            assert torch.equal(fast_loss, loss) and all(torch.equal(a, b) for a, b in zip(fast_grads, grads))
            continue
        assert abs(fast_loss.item() - loss.item()) < 0.01 * loss.item(), (fast_loss, loss)
        for (name, _), g, ref in zip(plain.named_parameters(), fast_grads, grads):
            if ref.norm() > 0:  # (a window-1 layer's q/k: zero by design)
                cos = F.cosine_similarity(g.flatten(), ref.flatten(), dim=0).item()
                assert cos > 0.99, f"{name}: cosine {cos:.4f} to the plain model's gradient"
