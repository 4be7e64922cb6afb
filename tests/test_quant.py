"""Weight-only quantized serving (app/fast/quant.py, app/fast/kernels/int8_linear.py): error bounds, the Triton
kernel against its reference (under Triton's interpreter, and on CUDA), a quantized tiny GPT through generate and the
engine, the state dict round trip, and the refusals."""
from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from app.fast.kernels import backend, int8_linear
from app.fast.kernels.int8_linear import dequantize_weight, quantize_weight, weight_only_linear_reference
from app.fast.quant import STORAGE, QuantLinear, quantize
from app.model.gpt import GPT, ModelConfig
from app.serve.engine import Engine, SamplingParams
from app.serve.generate import generate
from bench import quant as bench_quant

V = 300
INTERPRETING = backend.INTERPRET
interpreted = pytest.mark.skipif(not INTERPRETING, reason="runs in test_kernel_under_triton_interpreter's child")
MODES = pytest.mark.parametrize("mode", ["int8", "fp8"])


def tiny(**kw) -> GPT:
    torch.manual_seed(0)
    m = GPT(ModelConfig.preset("tiny", vocab_size=V, **kw))
    m.init_weights()
    return m.eval()


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("group_size", [0, 16])
def test_int8_weight_error_is_at_most_half_a_step(group_size):
    w = torch.randn(48, 64) * torch.logspace(-2, 1, 48)[:, None]  # channels of very different ranges
    q, scale = quantize_weight(w, torch.int8, group_size)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32
    assert scale.shape == (48, 1 if group_size == 0 else 64 // group_size)
    step = scale.repeat_interleave(64 // scale.shape[1], dim=1)  # each weight's own scale
    assert ((w - dequantize_weight(q, scale)).abs() <= step / 2 * (1 + 1e-6)).all()
    assert q.abs().amax(1).eq(127).all()  # every channel's largest weight uses the whole range


def test_fp8_weight_error_is_within_e4m3_rounding():
    w = torch.randn(32, 64)
    q, scale = quantize_weight(w, torch.float8_e4m3fn)
    assert q.dtype == torch.float8_e4m3fn
    err = (w - dequantize_weight(q, scale)).abs()
    # 3 mantissa bits: half an ulp is 2^-4 of the value; below e4m3's smallest normal (2^-6) an absolute 2^-10
    assert (err <= w.abs() * 2 ** -4 + scale * 2 ** -10 + 1e-7).all()


@MODES
@pytest.mark.parametrize("group_size", [0, 16])
def test_quant_linear_matches_its_reference_and_bounds_the_fp32_error(mode, group_size):
    torch.manual_seed(0)
    linear = nn.Linear(64, 40, bias=False)
    x = torch.randn(3, 5, 64)
    ql = QuantLinear.of(linear, STORAGE[mode], group_size).eval()
    assert not list(ql.parameters())  # buffers only: nothing to train
    y = ql(x)
    assert torch.allclose(y, weight_only_linear_reference(x, ql.weight, ql.weight_scale), rtol=1e-5, atol=1e-5)
    exact = F.linear(x.double(), linear.weight.double())
    # by construction: |y - exact| <= sum_k |x_k| |w_nk - dequantized_nk|
    bound = x.double().abs() @ (linear.weight - dequantize_weight(ql.weight, ql.weight_scale)).double().abs().T
    assert ((y.double() - exact).abs() <= bound + 1e-4).all()
    assert _rel_err(y, exact) < (0.01 if mode == "int8" else 0.05)


@interpreted
@MODES
@pytest.mark.parametrize("group_size", [0, 32])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_weight_only_kernel_matches_reference(mode, group_size, dtype):
    torch.manual_seed(0)
    N, K = 72, 160  # neither a multiple of the tiles
    q, scale = quantize_weight(torch.randn(N, K), STORAGE[mode], group_size)
    for rows in (1, 5, 17, 33):  # one stream, a few, more than one 16-row tile, another tile size
        x = torch.randn(rows, K).to(dtype)
        y = int8_linear.weight_only_linear(x, q, scale)
        ref = weight_only_linear_reference(x, q, scale)
        assert y.dtype == dtype and y.shape == ref.shape
        assert _rel_err(y, ref) < (5e-5 if dtype == torch.float32 else 1e-2), f"{rows} rows"
    x = torch.randn(2, 3, 2 * K)[..., ::2].to(dtype)  # strided rows, batch dims
    assert _rel_err(int8_linear.weight_only_linear(x, q, scale), weight_only_linear_reference(x, q, scale)) < 1e-2


def test_kernel_under_triton_interpreter():
    pytest.importorskip("triton")
    if INTERPRETING:
        pytest.skip("this process is the interpreter's child")
    this = Path(__file__)
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           f"{this}::test_weight_only_kernel_matches_reference"],
                          cwd=this.parents[1], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, "under the interpreter:\n" + proc.stdout[-6000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout, proc.stdout[-2000:]


@pytest.mark.gpu
@MODES
@pytest.mark.parametrize("group_size", [0, 128])
def test_weight_only_kernel_on_cuda(mode, group_size):
    if mode == "fp8" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 needs compute capability 8.9+")
    torch.manual_seed(0)
    N, K = 1600, 4352  # gpt2-1.5b's MLP down projection
    q, scale = quantize_weight(torch.randn(N, K, device="cuda"), STORAGE[mode], group_size)
    for rows in (1, 8, 32, 64, 200):  # the kernel's sizes, then the dense path
        x = torch.randn(rows, K, device="cuda", dtype=torch.bfloat16)
        assert _rel_err(int8_linear.weight_only_linear(x, q, scale), weight_only_linear_reference(x, q, scale)) < 1e-2



@pytest.mark.parametrize("mode,head", [("int8", False), ("int8", True), ("fp8", False)])
def test_quantized_gpt_generates_close_to_the_plain_model(mode, head):
    plain = tiny(tie_embeddings=True)
    qm = quantize(copy.deepcopy(plain), mode, head=head)
    names = {n for n, m in qm.named_modules() if isinstance(m, QuantLinear)}
    assert len(names) == 2 * 7 + head and ("lm_head" in names) == head
    g = torch.Generator().manual_seed(3)
    idx = torch.randint(0, V, (2, 24), generator=g)
    with torch.no_grad():
        ref, out = plain(idx)[0], qm(idx)[0]
    assert 0 < _rel_err(out, ref) < (0.02 if mode == "int8" else 0.08)  # changed, but only by rounding
    prompt = idx[0, :8].tolist()
    tokens = list(generate(qm, prompt, 12, temperature=0.0))
    assert len(tokens) == 12 and all(0 <= t < V for t in tokens)
    engine = Engine(qm, eot_id=None, max_batch=2, max_queue=2).start()
    try:  # the engine's batched steps and generate's one-row steps give the same tokens
        seqs = engine.submit_many([(prompt, SamplingParams(max_tokens=12, temperature=0.0)),
                                   (idx[1, :5].tolist(), SamplingParams(max_tokens=6, temperature=0.0))])
        assert all(s.wait(60) for s in seqs)
        assert seqs[0].tokens == tokens
    finally:
        engine.close()


@pytest.mark.parametrize("head", [False, True])
def test_state_dict_round_trip(tmp_path, head):
    src = quantize(tiny(tie_embeddings=True), "int8", head=head, group_size=32)
    path = tmp_path / "quantized.pt"
    torch.save(src.state_dict(), path)
    state = torch.load(path, weights_only=True)
    assert state["model.layers.0.mlp.up_proj.weight"].dtype == torch.int8
    assert state["model.layers.0.mlp.up_proj.weight_scale"].shape == (src.cfg.ffn_hidden, 64 // 32)
    with torch.device("meta"):  # built without weights, quantized the same way, then given the stored tensors
        dst = quantize(GPT(src.cfg), "int8", head=head, group_size=32)
    dst.load_state_dict(state, assign=True)
    if not head:
        dst.tie_weights()
    idx = torch.randint(0, V, (2, 10))
    with torch.no_grad():
        assert torch.equal(dst(idx)[0], src(idx)[0])


def test_refusals():
    m = tiny()
    with pytest.raises(ValueError, match="not one of none, int8, fp8"):
        quantize(m, "int4")
    with pytest.raises(ValueError, match="does not divide"):
        quantize(tiny(), "int8", group_size=48)
    assert quantize(m, "none") is m and not any(isinstance(x, QuantLinear) for x in m.modules())
    quantize(m, "int8")
    with pytest.raises(ValueError, match="already quantized"):
        quantize(m, "int8")
    idx = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(RuntimeError, match="inference-only"):
        m.train()(idx)
    m.eval().to(torch.bfloat16)  # rounds the fp32 scales
    with pytest.raises(RuntimeError, match="quantize after"):
        m(idx)


def test_bench_smoke():
    result = bench_quant.main(["--smoke"])
    for mode in ("none", "int8", "fp8"):
        assert result["speed"][mode]["1"]["tokens_per_s"] > 0 and result["speed"][mode]["8"]["errors"] == 0
    assert result["speed"]["int8"]["weight_mb"] < result["speed"]["none"]["weight_mb"]  # the blocks: fp32 -> int8
    assert len(result["kernel"]) == 3 * 3  # three linear shapes x three row counts, each timed per mode
    assert all(entry[m]["us"] > 0 for entry in result["kernel"].values() for m in ("none", "int8", "fp8"))
    quality = result["quality"]
    assert quality["none"]["perplexity"] > 1 and quality["int8"]["relative_logit_error"] > 0
    assert abs(quality["int8"]["perplexity_change"]) < 0.05  # rounding costs a trained model little
