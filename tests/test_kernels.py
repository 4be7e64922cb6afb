"""Triton kernels vs their PyTorch references: on CPU under Triton's interpreter, and on CUDA (`gpu` marker)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import app.fast.kernels
from app.fast.kernels import backend, fused_linear_ce, sliding_attention
from tests.conftest import cpu_rowwise_fp8

# relative error ||a - b|| / ||b||: fp32 sums in another order than the reference (chunks, blocks) drift by
# ~1e-5 on some CPUs' BLAS; a wrong kernel is off by > 1e-2
_TOL = {torch.float32: 5e-5, torch.bfloat16: 1e-2}
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])

# Triton's interpreter must be on before `import triton` (its own library functions are jitted at import),
# and other test modules import Triton first: so the CPU kernel tests run in a child process started with
# TRITON_INTERPRET=1 (test_kernels_under_triton_interpreter), or in this one when it was started so.
INTERPRETING = backend.INTERPRET
interpreted = pytest.mark.skipif(not INTERPRETING, reason="runs in test_kernels_under_triton_interpreter's child")
no_interpreter = pytest.mark.skipif(INTERPRETING, reason="not under Triton's interpreter")


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    actual, expected = actual.double(), expected.double()
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    err = ((actual - expected).norm() / expected.norm().clamp(min=1e-12)).item()
    assert err < _TOL[dtype], f"{what}: relative error {err:.2e} >= {_TOL[dtype]:.0e}"


def _rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected||, in double."""
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_()


def _run(fn, inputs: list[torch.Tensor]):
    """Outputs of fn(*inputs) and the inputs' gradients for fixed random output gradients."""
    leaves = [_leaf(t) for t in inputs]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(o.shape, generator=gen).to(o.device, o.dtype) for o in outs]
    torch.autograd.backward(outs, grads)
    return [o.detach() for o in outs], [t.grad for t in leaves]


# ---- Fused linear + cross-entropy ----------------------------------------------------------------

def _ce_inputs(N: int, D: int, V: int, dtype: torch.dtype, device="cpu", seed: int = 0):
    gen = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(N, D, generator=gen, device=device).to(dtype)
    weight = (torch.randn(V, D, generator=gen, device=device) / D ** 0.5).to(dtype)
    targets = torch.randint(0, V, (N,), generator=gen, device=device)
    targets[::5] = -1  # ignored rows, including the first of every chunk
    return hidden, weight, targets


@interpreted
@DTYPES
@pytest.mark.parametrize("softcap", [None, 3.0], ids=["plain", "softcap"])
def test_fused_linear_ce_matches_reference(monkeypatch, dtype, softcap):
    # several vocab blocks per row: online softmax
    monkeypatch.setattr(fused_linear_ce, "_row_launch", lambda V, write_grad: (128, 4))
    hidden, weight, targets = _ce_inputs(N=45, D=32, V=300, dtype=dtype)  # 45 = 2 chunks of 16 + 13

    def scaled_loss(fn, **kw):
        return lambda h, w: fn(h, w, targets, ignore_index=-1, softcap=softcap, **kw) * 2.5  # grad_output != 1

    (loss, ), (dh, dw) = _run(scaled_loss(fused_linear_ce.fused_linear_cross_entropy, chunk_size=16), [hidden, weight])
    (ref, ), (dh_ref, dw_ref) = _run(scaled_loss(fused_linear_ce.linear_cross_entropy_reference), [hidden, weight])
    assert loss.dim() == 0 and loss.dtype == torch.float32
    assert dh.dtype == dtype and dw.dtype == dtype
    for name, a, b in (("loss", loss, ref), ("dhidden", dh, dh_ref), ("dweight", dw, dw_ref)):
        _assert_close(a, b, dtype, f"fused CE {name}")


@interpreted
@pytest.mark.parametrize("softcap", [None, 3.0], ids=["plain", "softcap"])
def test_fused_linear_ce_fp8_matches_reference_within_fp8_precision(softcap):
    hidden, weight, targets = _ce_inputs(N=45, D=32, V=304, dtype=torch.float32)  # D, V: multiples of 16

    def loss_fn(**kw):
        return lambda h, w: fused_linear_ce.fused_linear_cross_entropy(h, w, targets, softcap=softcap, **kw) * 2.5

    fp8 = _run(loss_fn(chunk_size=16, fp8=True), [hidden, weight])
    exact = _run(loss_fn(chunk_size=16), [hidden, weight])
    ref = _run(lambda h, w: fused_linear_ce.linear_cross_entropy_reference(h, w, targets, softcap=softcap) * 2.5,
               [hidden, weight])
    # Logits from e4m3 operands (the gradients follow them): under a percent on the mean loss. The gradient
    # products take e5m2 d loss / d logits (2 mantissa bits): a few percent at these small sizes (K = 32, 304).
    for name, a, b, exact_a, tol in (("loss", fp8[0][0], ref[0][0], exact[0][0], 3e-3),
                                     ("dhidden", fp8[1][0], ref[1][0], exact[1][0], 0.06),
                                     ("dweight", fp8[1][1], ref[1][1], exact[1][1], 0.06)):
        err = _rel_err(a, b)
        exact_err = _rel_err(exact_a, b)
        assert a.dtype == b.dtype and err < tol, f"fp8 fused CE {name}: relative error {err:.3f} >= {tol}"
        assert err > 10 * exact_err, f"fp8 fused CE {name}: as exact as the bf16 path: FP8 did not run"


@interpreted
def test_fused_linear_ce_fp8_weight_gradient_sums_groups_of_tokens(monkeypatch):
    hidden, weight, targets = _ce_inputs(N=45, D=32, V=304, dtype=torch.float32)

    def run():
        return _run(lambda h, w: fused_linear_ce.fused_linear_cross_entropy(h, w, targets, chunk_size=16, fp8=True),
                    [hidden, weight])

    (loss, ), (dh, dw) = run()  # one weight-gradient product over all 45 tokens
    monkeypatch.setattr(fused_linear_ce, "_FP8_WGRAD_TOKENS", 32)  # two: 32 tokens (two chunks), then 13
    (loss_g, ), (dh_g, dw_g) = run()
    assert torch.equal(loss, loss_g) and torch.equal(dh, dh_g)
    assert 0 < _rel_err(dw_g, dw) < 1e-5  # the same products, summed in another order


@interpreted
@pytest.mark.parametrize("softcap", [None, 3.0], ids=["plain", "softcap"])
def test_fp8_loss_gradients_are_e5m2_rounded_in_both_layouts(softcap):
    rows, V = 37, 300  # partial tiles both ways
    gen = torch.Generator().manual_seed(3)
    z = torch.randn(rows, V, generator=gen) * 4
    targets = torch.randint(0, V, (rows,), generator=gen)
    targets[5] = -1  # ignored: a zero row
    loss_rows, lse = torch.empty(rows), torch.empty(rows)
    fused_linear_ce._ce_rows(z, targets, loss_rows, -1, softcap, lse=lse)
    g = torch.empty(rows, V, dtype=torch.uint8)
    gt = torch.full((V, rows + 8), 7, dtype=torch.uint8)  # a wider buffer: the kernel writes columns [0, rows)
    fused_linear_ce._ce_grad_e5m2(z, targets, lse, g, gt[:, :rows], -1, softcap)
    zc = z if softcap is None else softcap * torch.tanh(z / softcap)
    assert torch.allclose(lse, torch.logsumexp(zc, dim=-1), atol=1e-5)
    ref = torch.softmax(zc, dim=-1) - torch.nn.functional.one_hot(targets.clamp(min=0), V)
    if softcap is not None:
        ref = ref * (1 - (zc / softcap) ** 2)
    ref[5] = 0
    want = (ref * fused_linear_ce._GRAD_SCALE).half().to(torch.float8_e5m2).view(torch.uint8)
    assert (g == want).float().mean() > 0.999  # rounding ties aside, torch's own e5m2 rounding
    assert (g.view(torch.float8_e5m2).float() - want.view(torch.float8_e5m2).float()).abs().max() <= \
        want.view(torch.float8_e5m2).float().abs().max() * 0.125
    assert torch.equal(gt[:, :rows], g.t()) and (gt[:, rows:] == 7).all()
    assert not g[5].view(torch.float8_e5m2).float().any()


@interpreted
def test_fused_linear_ce_fp8_needs_multiples_of_16():
    hidden, weight, targets = _ce_inputs(N=20, D=24, V=100, dtype=torch.float32)  # D = 24: cuBLASLt can't
    assert not fused_linear_ce.fp8_loss_fits(hidden, weight)
    (fp8, ), grads_fp8 = _run(lambda h, w: fused_linear_ce.fused_linear_cross_entropy(h, w, targets, fp8=True),
                              [hidden, weight])
    (plain, ), grads = _run(lambda h, w: fused_linear_ce.fused_linear_cross_entropy(h, w, targets), [hidden, weight])
    assert torch.equal(fp8, plain) and all(torch.equal(a, b) for a, b in zip(grads_fp8, grads))


@interpreted
def test_fused_linear_ce_all_ignored_is_zero():
    hidden, weight, _ = _ce_inputs(N=6, D=8, V=40, dtype=torch.float32)
    targets = torch.full((6,), -100)
    (loss, ), (dh, dw) = _run(lambda h, w: fused_linear_ce.fused_linear_cross_entropy(h, w, targets, -100, 4), [hidden, weight])
    assert loss.item() == 0.0 and not dh.any() and not dw.any()


@interpreted
def test_fused_linear_ce_bad_target_gives_nan():
    hidden, weight, targets = _ce_inputs(N=6, D=8, V=40, dtype=torch.float32)
    targets[2] = 40  # one past the vocabulary
    assert fused_linear_ce.fused_linear_cross_entropy(hidden, weight, targets).isnan()


@interpreted
def test_fused_linear_ce_follows_autocast():
    hidden, weight, targets = _ce_inputs(N=20, D=16, V=100, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (loss, ), (dh, dw) = _run(lambda h, w: fused_linear_ce.fused_linear_cross_entropy(h, w, targets), [hidden, weight])
    (ref, ), (dh_ref, dw_ref) = _run(lambda h, w: fused_linear_ce.linear_cross_entropy_reference(
        h.bfloat16(), w.bfloat16(), targets), [hidden, weight])
    assert dh.dtype == torch.float32 and dw.dtype == torch.float32  # the fp32 leaves get fp32 gradients
    for name, a, b in (("loss", loss, ref), ("dhidden", dh, dh_ref), ("dweight", dw, dw_ref)):
        _assert_close(a, b, torch.bfloat16, name)


class _ShapeRecorder(TorchDispatchMode):
    """Records the shape of every tensor any aten op returns."""

    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
        return out


def _recorded_shapes(fn, hidden, weight, targets) -> list[tuple[int, ...]]:
    hidden, weight = _leaf(hidden), _leaf(weight)
    with _ShapeRecorder() as recorder:
        fn(hidden, weight, targets).backward()
    return recorder.shapes


@interpreted
def test_fused_linear_ce_never_materialises_all_logits():
    N, D, V = 64, 16, 300
    hidden, weight, targets = _ce_inputs(N, D, V, torch.float32)
    fused = _recorded_shapes(lambda h, w, t: fused_linear_ce.fused_linear_cross_entropy(h, w, t, chunk_size=8),
                             hidden, weight, targets)
    assert (8, V) in fused  # the logits of one chunk
    assert max(torch.Size(s).numel() for s in fused) < N * V
    # The recorder does see whole logits where they exist: the reference makes [N, V].
    assert (N, V) in _recorded_shapes(fused_linear_ce.linear_cross_entropy_reference, hidden, weight, targets)


def test_default_chunk_is_thousands_of_tokens_within_the_logits_budget():
    budget = fused_linear_ce._CHUNK_LOGITS
    assert fused_linear_ce.default_chunk_size(16384, 50304) == 8192  # GPT-2: 2 chunks of a 16k-token micro-batch
    assert fused_linear_ce.default_chunk_size(64, 500) == 64  # small inputs: one chunk
    for N, V in ((8192, 50304), (32768, 128256)):
        chunk = fused_linear_ce.default_chunk_size(N, V)
        assert chunk & (chunk - 1) == 0 and budget / 2 < chunk * V <= budget


# ---- FP8 matmuls (torch._scaled_mm, which has a CPU kernel too) -------------------------------------

@no_interpreter
@cpu_rowwise_fp8
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fp8_linear_matches_reference_forward_and_backward(x_dtype):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 8, 64, generator=gen).to(x_dtype)
    w = 0.1 * torch.randn(48, 64, generator=gen)
    (y, ), (dx, dw) = _run(app.fast.kernels.fp8_linear, [x, w])
    (y_ref, ), (dx_ref, dw_ref) = _run(lambda a, b: app.fast.kernels.fp8_linear_reference(a.float(), b), [x, w])
    assert (y.dtype, dx.dtype, dw.dtype) == (x_dtype, x_dtype, torch.float32)
    # e4m3 keeps 3 mantissa bits: ~4% relative error in the FP8 products (more than 1% shows they ran in FP8,
    # bf16 would give ~0.3%); the weight gradient is a bf16 product.
    for name, a, b, low, tol in (("y", y, y_ref, 0.01, 0.05), ("dx", dx, dx_ref, 0.01, 0.05),
                                 ("dweight", dw, dw_ref, 0.0, 0.01)):
        err = _rel_err(a, b)
        assert low <= err < tol, f"fp8_linear {name}: relative error {err:.3f} not in [{low}, {tol})"


@no_interpreter
@cpu_rowwise_fp8
def test_fp8_linear_scales_each_row_so_an_outlier_token_costs_only_its_own_precision():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(32, 64, generator=gen)
    x[0] *= 1e5  # with one scale for the whole tensor the other rows would fall into e4m3's subnormals
    w = 0.1 * torch.randn(48, 64, generator=gen)
    (y, ), (dx, _) = _run(app.fast.kernels.fp8_linear, [x, w])
    (y_ref, ), (dx_ref, _) = _run(app.fast.kernels.fp8_linear_reference, [x, w])
    for name, a, b in (("y", y, y_ref), ("dx", dx, dx_ref)):
        err = ((a[1:] - b[1:]).norm(dim=-1) / b[1:].norm(dim=-1)).max().item()
        assert err < 0.1, f"fp8_linear {name}: a row next to an outlier has relative error {err:.3f}"


@no_interpreter
@cpu_rowwise_fp8
def test_fp8_linear_given_its_weight_copies_equals_casting_them_itself():
    gen = torch.Generator().manual_seed(2)
    x, w = torch.randn(32, 64, generator=gen), 0.1 * torch.randn(48, 64, generator=gen)
    (cast, ) = app.fast.kernels.fp8_weights([w])
    assert cast[0].dtype == cast[2].dtype == torch.float8_e4m3fn and cast[2].shape == (64, 48)
    itself = _run(app.fast.kernels.fp8_linear, [x, w])
    given = _run(lambda a, b: app.fast.kernels.fp8_linear(a, b, cast), [x, w])
    assert all(torch.equal(a, b) for a, b in zip([*itself[0], *itself[1]], [*given[0], *given[1]]))


@no_interpreter
@cpu_rowwise_fp8
def test_fp8_linear_follows_autocast_and_needs_cuda_fp8():
    x, w = torch.randn(16, 32), torch.randn(16, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert app.fast.kernels.fp8_linear(x, w).dtype == torch.bfloat16
    assert not app.fast.kernels.fp8_fits(x, w)  # CPU tensors: the model keeps its plain matmuls


@no_interpreter
@cpu_rowwise_fp8
def test_fp8_linear_compiled_gradients_are_its_eager_ones():
    """Under torch.compile (one graph) the input and the weight get their gradients: a no-op `.to()` returned from
    an autograd.Function's forward once compiled into zero gradients (torch 2.11)."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 16, 64, generator=gen).bfloat16()
    w, w2 = ((0.1 * torch.randn(*shape, generator=gen)).bfloat16() for shape in ((48, 64), (64, 48)))

    def mlp(x, w, w2):
        return app.fast.kernels.fp8_linear(torch.nn.functional.relu(app.fast.kernels.fp8_linear(x, w)), w2)

    torch._dynamo.reset()
    (_, ), eager = _run(mlp, [x, w, w2])
    (_, ), compiled = _run(torch.compile(mlp, fullgraph=True), [x, w, w2])
    for name, c, e in zip(("dx", "dw", "dw2"), compiled, eager):
        assert e.norm() > 0 and _rel_err(c, e) < 0.03, f"compiled {name} differs from eager by {_rel_err(c, e):.3f}"
    torch._dynamo.reset()


# ---- The FP8 ReLU² feed-forward --------------------------------------------------------------------

def _relu2_inputs(M: int, N: int, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """h, da [M, N] (bf16): negatives, a zero row, a row with one large value (its others fall into e4m3's
    subnormals once scaled) and values whose squares underflow bf16."""
    gen = torch.Generator(device=device).manual_seed(7)
    h = (3 * torch.randn(M, N, generator=gen, device=device)).bfloat16()
    da = torch.randn(M, N, generator=gen, device=device).bfloat16()
    h[1], h[2, 0], h[3, :9] = 0.0, 300.0, 1e-25
    da[4, 5] = 4e4
    return h, da


@interpreted
@pytest.mark.parametrize("N", [96, 3072])
def test_relu2_rows_match_reference_bit_for_bit(N):
    """The activation's passes (forward: relu(h)² cast to e4m3 rows; backward: dh, its e4m3 rows and the
    recomputed activation) give the PyTorch references' bits, rows narrower than their power-of-two block."""
    from app.fast.kernels import fp8_relu2
    h, da = _relu2_inputs(9, N)
    got, want = fp8_relu2.relu2_rows(h), fp8_relu2.relu2_rows_reference(h)
    assert got[0].dtype == torch.float8_e4m3fn and (got[0].float().abs() < 2 ** -6).any()
    assert all(torch.equal(a.float(), b.float()) for a, b in zip(got, want))
    got, want = fp8_relu2.relu2_rows_backward(da, h), fp8_relu2.relu2_rows_backward_reference(da, h)
    for name, a, b in zip(("dh", "dh8", "dh_inv", "a"), got, want):
        assert a.dtype == b.dtype and torch.equal(a.float(), b.float()), f"{name}: {(a.float() != b.float()).sum()} differ"


def _relu2_mlp_unfused(x: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    h = app.fast.kernels.fp8_linear(x, up)
    return app.fast.kernels.fp8_linear(torch.nn.functional.relu(h).square(), down)


@no_interpreter
@cpu_rowwise_fp8
def test_fp8_relu2_mlp_is_two_fp8_linears_around_relu2():
    """The one-function FP8 ReLU² MLP has the bits of fp8_linear -> relu² -> fp8_linear: output and the
    gradients of x and both weights; given the weights' e4m3 copies, the same as casting them itself."""
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(2, 16, 64, generator=gen).bfloat16()
    up, down = (0.1 * torch.randn(*shape, generator=gen).bfloat16() for shape in ((192, 64), (64, 192)))
    fused = _run(app.fast.kernels.fp8_relu2_mlp, [x, up, down])
    unfused = _run(_relu2_mlp_unfused, [x, up, down])
    for name, a, b in zip(("y", "dx", "dup", "ddown"), [*fused[0], *fused[1]], [*unfused[0], *unfused[1]]):
        assert a.dtype == b.dtype and torch.equal(a, b), f"{name}: relative error {_rel_err(a, b):.2e}"
    casts = app.fast.kernels.fp8_weights([up, down])
    given = _run(lambda *t: app.fast.kernels.fp8_relu2_mlp(*t, *casts), [x, up, down])
    assert all(torch.equal(a, b) for a, b in zip([*fused[0], *fused[1]], [*given[0], *given[1]]))


@pytest.mark.gpu
@no_interpreter
def test_gpu_fp8_relu2_mlp_is_exact_and_compiles():
    """On CUDA, at GPT-2 124M's widths: the row kernels give the references' bits, the MLP those of the unfused
    FP8 path, and its compiled gradients are its eager ones."""
    from app.fast.kernels import fp8_relu2
    h, da = _relu2_inputs(4096, 3072, device="cuda")
    for got, want in ((fp8_relu2.relu2_rows(h), fp8_relu2.relu2_rows_reference(h)),
                      (fp8_relu2.relu2_rows_backward(da, h), fp8_relu2.relu2_rows_backward_reference(da, h))):
        assert all(torch.equal(a.float(), b.float()) for a, b in zip(got, want))
    torch.manual_seed(0)
    x = torch.randn(8, 512, 768, device="cuda", dtype=torch.bfloat16)
    up, down = (0.02 * torch.randn(*s, device="cuda", dtype=torch.bfloat16) for s in ((3072, 768), (768, 3072)))
    eager = _run(app.fast.kernels.fp8_relu2_mlp, [x, up, down])
    unfused = _run(_relu2_mlp_unfused, [x, up, down])
    assert all(torch.equal(a, b) for a, b in zip([*eager[0], *eager[1]], [*unfused[0], *unfused[1]]))
    torch._dynamo.reset()
    compiled = _run(torch.compile(app.fast.kernels.fp8_relu2_mlp), [x, up, down])
    for name, c, e in zip(("y", "dx", "dup", "ddown"), [*compiled[0], *compiled[1]], [*eager[0], *eager[1]]):
        assert e.norm() > 0 and _rel_err(c, e) < 0.03, f"compiled {name} differs from eager by {_rel_err(c, e):.3f}"


# ---- Sliding-window attention ----------------------------------------------------------------------

def _qkv(B: int, H: int, H_kv: int, T: int, D: int, dtype: torch.dtype, device="cpu") -> list[torch.Tensor]:
    """q [B, H, T, D], k, v [B, H_kv, T, D], laid out as the model's projections leave them ([B, T, H, D])."""
    gen = torch.Generator(device=device).manual_seed(0)
    return [torch.randn(B, T, h, D, generator=gen, device=device).to(dtype).transpose(1, 2) for h in (H, H_kv, H_kv)]


@interpreted
@pytest.mark.parametrize("window", [1, 5, 64, 100, 300])
@pytest.mark.parametrize("H_kv", [4, 2], ids=["mha", "gqa"])
def test_window_attention_matches_reference(window, H_kv):
    # T = 150 is not a multiple of the 64-position blocks; window 300 > T is plain causal attention.
    inputs = _qkv(2, 4, H_kv, 150, 16, torch.float32)
    outs, grads = _run(lambda q, k, v: sliding_attention.window_attention(q, k, v, window), inputs)
    ref_outs, ref_grads = _run(lambda q, k, v: sliding_attention.window_attention_reference(q, k, v, window), inputs)
    for name, a, b in zip(("out", "dq", "dk", "dv"), outs + grads, ref_outs + ref_grads):
        if window == 1 and name in ("dq", "dk"):  # one key: the softmax is constant, dq and dk are ~0
            assert a.abs().max() < 1e-5 and b.abs().max() < 1e-5
            continue
        _assert_close(a, b, torch.float32, f"window {window} {name}")


@interpreted
@pytest.mark.parametrize("window", [5, 100])
def test_window_attention_takes_views_of_one_packed_projection(window):
    # q, k, v as strided views of one [B, T, 3, H, D] buffer (not dense): each gradient must land in its own view.
    gen = torch.Generator().manual_seed(0)
    qkv = torch.randn(2, 130, 3, 2, 16, generator=gen)

    def attend(fn):
        return lambda packed: fn(*(packed[:, :, i].transpose(1, 2) for i in range(3)), window)
    (out,), (grad,) = _run(attend(sliding_attention.window_attention), [qkv])
    (ref_out,), (ref_grad,) = _run(attend(sliding_attention.window_attention_reference), [qkv])
    _assert_close(out, ref_out, torch.float32, f"window {window} out")
    _assert_close(grad, ref_grad, torch.float32, f"window {window} d qkv")


@interpreted
@pytest.mark.parametrize("window", [3, 64])
def test_window_backward_one_pass_matches_two_kernels(window):
    # The one-kernel walk (the default for windows <= BLOCK) against the two-kernel backward on the same forward.
    q, k, v = [t.contiguous() for t in _qkv(2, 4, 2, 200, 32, torch.float32)]
    do = torch.randn_like(q)
    o, lse = sliding_attention.window_forward(q, k, v, window)
    one = sliding_attention.window_backward(q, k, v, o, lse, do, window, one_pass=True)
    two = sliding_attention.window_backward(q, k, v, o, lse, do, window, one_pass=False)
    for name, a, b in zip(("dq", "dk", "dv"), one, two):
        _assert_close(a, b, torch.float32, f"window {window} {name}")
    with pytest.raises(ValueError, match="one-pass"):
        sliding_attention.window_backward(q, k, v, o, lse, do, sliding_attention.BLOCK + 1, one_pass=True)


@interpreted
def test_window_attention_ignores_keys_outside_the_window():
    # (fp32: Triton 3.x's interpreter computes tl.dot of bf16 operands wrongly; bf16 is checked on the GPU)
    q, k, v = _qkv(1, 2, 2, 130, 32, torch.float32)
    v2 = v.clone()
    v2[:, :, 10] += 100.0
    a = sliding_attention.window_attention(q, k, v, 64)
    b = sliding_attention.window_attention(q, k, v2, 64)
    assert torch.equal(a[:, :, 74:], b[:, :, 74:]) and torch.equal(a[:, :, :10], b[:, :, :10])
    assert (a[:, :, 10:74] - b[:, :, 10:74]).abs().amin(dim=-1).gt(0).all()  # every query that sees it moves


# ---- Dispatch and input checks -------------------------------------------------------------------

def test_without_triton_the_reference_runs(monkeypatch):
    monkeypatch.setattr(backend, "triton", None)  # a CPU-only install
    hidden, weight, targets = _ce_inputs(N=9, D=8, V=30, dtype=torch.float32)
    assert torch.equal(app.fast.kernels.fused_linear_cross_entropy(hidden, weight, targets.int(), chunk_size=2),
                       fused_linear_ce.linear_cross_entropy_reference(hidden, weight, targets))


@pytest.mark.parametrize("call, message", [
    (lambda: app.fast.kernels.fused_linear_cross_entropy(torch.randn(4, 8), torch.randn(10, 6), torch.zeros(4, dtype=torch.long)),
     "must be \\[N, D\\] and \\[V, D\\]"),
    (lambda: app.fast.kernels.fused_linear_cross_entropy(torch.randn(4, 8), torch.randn(10, 8), torch.zeros(3, dtype=torch.long)),
     "targets \\(3,\\) must be \\[N\\]"),
    (lambda: app.fast.kernels.fused_linear_cross_entropy(torch.randn(4, 8), torch.randn(10, 8), torch.zeros(4)),
     "targets must be integers"),
    (lambda: app.fast.kernels.fused_linear_cross_entropy(torch.randn(4, 8), torch.randn(10, 8).double(), torch.zeros(4, dtype=torch.long)),
     "hidden is torch.float32 but weight is torch.float64"),
    (lambda: app.fast.kernels.fused_linear_cross_entropy(torch.randn(4, 8), torch.randn(10, 8), torch.zeros(4, dtype=torch.long), chunk_size=0),
     "chunk_size must be >= 1"),
    (lambda: app.fast.kernels.fused_linear_cross_entropy(torch.randn(4, 8), torch.randn(10, 8), torch.zeros(4, dtype=torch.long), softcap=-1.0),
     "softcap must be > 0"),
    (lambda: app.fast.kernels.fused_linear_cross_entropy(torch.randn(2, 4, 8), torch.randn(10, 8), torch.zeros(8, dtype=torch.long)),
     "must be hidden \\(2, 4, 8\\) without its last dim"),
])
def test_bad_inputs_raise_clear_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()


@interpreted
def test_fused_linear_ce_accepts_batched_hidden():
    hidden, weight, targets = _ce_inputs(N=12, D=8, V=50, dtype=torch.float32)
    flat = fused_linear_ce.fused_linear_cross_entropy(hidden, weight, targets, chunk_size=5)
    batched = fused_linear_ce.fused_linear_cross_entropy(hidden.view(3, 4, 8), weight, targets.view(3, 4).int(),
                                                         chunk_size=5)  # int32 targets work too
    torch.testing.assert_close(batched, flat)


# ---- CUDA at realistic sizes ---------------------------------------------------------------------

@pytest.mark.gpu
@no_interpreter
# N a few times the default chunk (8192 tokens at V = 50304, 4096 at 128256): the loss never holds all the logits
@pytest.mark.parametrize("N, D, V, fp8", [(32768, 768, 50304, False), (32768, 4096, 128256, False),
                                          (32768, 768, 50304, True)])
def test_gpu_fused_linear_ce(N, D, V, fp8):
    hidden, weight, targets = _ce_inputs(N, D, V, torch.bfloat16, device="cuda")
    h, w = _leaf(hidden), _leaf(weight)
    # Leave NaN bytes (0xFF in every float format) in the allocator's cache: a gradient element the kernels
    # never write reads as NaN below, not as a fresh allocation's zero.
    torch.full((4 * N * V,), 255, dtype=torch.uint8, device="cuda")  # freed at once, kept cached
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    loss = app.fast.kernels.fused_linear_cross_entropy(h, w, targets, fp8=fp8)
    loss.backward()
    peak = torch.cuda.max_memory_allocated() - base
    # Less than the bf16 logits alone (the fp32 weight gradient, V x D, is the largest buffer); fp8 adds e4m3
    # copies of hidden and weight and the transposed e5m2 gradient of all N tokens (half the bf16 logits).
    limit = N * V * (5 if fp8 else 4) // 2
    assert peak < limit, f"fused CE peaked at {peak / 2**20:.0f} MiB, over {limit / 2**20:.0f} MiB"
    # Oracle: the same bf16 matmul, fp32 softmax.
    h_ref, w_ref = _leaf(hidden), _leaf(weight)
    ref = app.fast.kernels.linear_cross_entropy_reference(h_ref, w_ref, targets)
    ref.backward()
    for name, a, b in (("loss", loss, ref), ("dhidden", h.grad, h_ref.grad), ("dweight", w.grad, w_ref.grad)):
        if not fp8:
            _assert_close(a.detach(), b.detach(), torch.bfloat16, name)
            continue
        err = _rel_err(a, b)
        assert err < (2e-3 if name == "loss" else 0.05), f"fp8 fused CE {name}: relative error {err:.3f}"


@pytest.mark.gpu
@no_interpreter
@pytest.mark.parametrize("H_kv", [12, 4], ids=["mha", "gqa"])
def test_gpu_window_attention(H_kv):
    """bf16 at the 124M model's shape against an fp32 reference, eager and under torch.compile."""
    inputs = _qkv(2, 12, H_kv, 1024, 64, torch.bfloat16, device="cuda")
    ref_outs, ref_grads = _run(lambda q, k, v: sliding_attention.window_attention_reference(q, k, v, 64),
                               [t.float() for t in inputs])
    for fn in (sliding_attention.window_attention, torch.compile(sliding_attention.window_attention)):
        outs, grads = _run(lambda q, k, v: fn(q, k, v, 64), inputs)
        for name, a, b in zip(("out", "dq", "dk", "dv"), outs + grads, ref_outs + ref_grads):
            _assert_close(a.float(), b, torch.bfloat16, f"window attention {name}")


# ---- The interpreter child -----------------------------------------------------------------------

@no_interpreter
def test_kernels_under_triton_interpreter():
    pytest.importorskip("triton")
    this = Path(__file__)
    tests = [f"{this}::{name}" for name, fn in globals().items()
             if name.startswith("test_") and interpreted.mark in getattr(fn, "pytestmark", [])]
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests],
                          cwd=this.parents[1], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"kernel tests under the interpreter failed:\n{proc.stdout[-6000:]}{proc.stderr[-2000:]}"
    assert " passed" in proc.stdout and "skipped" not in proc.stdout, proc.stdout[-2000:]


@pytest.mark.gpu
@no_interpreter
def test_gpu_fp8_linear_compiled_gradients_match_eager():
    """Under torch.compile on CUDA the FP8 linear's gradients are its eager gradients (an earlier form of its
    autograd.Function compiled into a backward that returned zeros on an H100 and timed at 1.5x the baseline)."""
    torch.manual_seed(0)
    M, K, N = 4096, 768, 2048
    x, w, nw = torch.randn(M, K, device="cuda"), 0.02 * torch.randn(N, K, device="cuda"), torch.ones(K, device="cuda")
    grad_y = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)

    def block(x, w, nw, linear):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return torch.nn.functional.silu(linear(torch.nn.functional.rms_norm(x, (K,), nw), w))

    def grads(fn, linear):
        leaves = [_leaf(t) for t in (x, w, nw)]
        fn(*leaves, linear).backward(grad_y)
        return [t.grad for t in leaves]

    torch._dynamo.reset()
    plain = grads(block, torch.nn.functional.linear)  # autocast's bf16 matmul
    eager = grads(block, app.fast.kernels.fp8_linear)
    compiled = grads(torch.compile(block), app.fast.kernels.fp8_linear)
    for name, c, e, r in zip(("dx", "dweight", "dnorm"), compiled, eager, plain):
        assert _rel_err(e, r) < 0.06, f"eager fp8 {name}: relative error {_rel_err(e, r):.3f} vs the bf16 matmul"
        # Inductor's fused norm rounds a few inputs differently, and e4m3 turns that into ~1.7% (H100)
        assert _rel_err(c, e) < 0.03, f"compiled fp8 {name} differs from eager by {_rel_err(c, e):.3f}"


@pytest.mark.gpu
@no_interpreter
@pytest.mark.parametrize("K", [768, 3072])
def test_gpu_fp8_linear_keeps_e4m3_precision_under_fast_accumulation(K):
    """Both e4m3 products, the forward and the input gradient, accumulate without fp32 promotion on CUDA: their
    error stays e4m3's at the contraction widths of GPT-2's blocks (a square weight: both contract over K)."""
    torch.manual_seed(0)
    x = torch.randn(4096, K, device="cuda", requires_grad=True)
    w = torch.randn(K, K, device="cuda") / K ** 0.5
    g = torch.randn(4096, K, device="cuda")
    x_ref = x.detach().clone().requires_grad_()
    y, y_ref = app.fast.kernels.fp8_linear(x, w), app.fast.kernels.fp8_linear_reference(x_ref, w)
    (y.float() * g).sum().backward()
    (y_ref * g).sum().backward()
    for name, a, b in (("forward", y.float(), y_ref), ("input gradient", x.grad, x_ref.grad)):
        err = _rel_err(a, b)
        assert 0.01 <= err < 0.05, f"fp8_linear {name} at K={K}: relative error {err:.4f}"


class _RowFeatures:
    """The two things Inductor's persistent-reduction choice reads of a kernel."""

    def __init__(self, width: int):
        import sympy
        from torch._inductor.runtime.hints import ReductionHint

        self.reduction_numel, self._hint = sympy.Integer(width), ReductionHint.INNER

    def get_reduction_hint(self):
        return self._hint


@no_interpreter
def test_wide_rows_choice_is_scoped_to_the_compiles_that_ask_for_it(monkeypatch):
    """kernels=rows makes rows up to WIDE_ROW_LIMIT one-pass and no wider, in the graphs of the torch.compile that
    takes `compile_kwargs(wide_rows=True)` (forward and backward), and nowhere else: the process-wide Inductor
    config and choices are left as they were."""
    from torch._inductor import compile_fx, config
    from torch._inductor.virtualized import V

    from app.fast.compile import compile_kwargs
    from app.fast.kernels.wide_rows import WIDE_ROW_LIMIT, WideRowChoices

    choices = WideRowChoices()
    assert choices.should_use_persistent_reduction(_RowFeatures(4096), False)
    assert choices.should_use_persistent_reduction(_RowFeatures(WIDE_ROW_LIMIT), False)
    assert not choices.should_use_persistent_reduction(_RowFeatures(2 * WIDE_ROW_LIMIT), False)

    seen = []  # the choices each graph compiles under (torch 2.13 keys its cache on WideRowChoices.uuid())
    inner = compile_fx._compile_fx_inner
    monkeypatch.setattr(compile_fx, "_compile_fx_inner", lambda *a, **k: seen.append(
        (type(V.choices).__name__, config.inductor_choices_class)) or inner(*a, **k))
    x = torch.randn(4, 64, requires_grad=True)

    def fn(t: torch.Tensor) -> torch.Tensor:
        return t.abs().amax(-1) * t.sum(-1)

    torch._dynamo.reset()
    # compile here, not from an earlier run's cache
    with config.patch(fx_graph_cache=False), torch._functorch.config.patch(enable_autograd_cache=False):
        wide = torch.compile(fn, **compile_kwargs("tuned", wide_rows=True))
        out = wide(x)
        out.sum().backward()  # the backward graph compiles here, after the forward call returned
        torch.testing.assert_close(out, fn(x))
        assert seen == [("WideRowChoices", WideRowChoices)] * 2
        assert config.inductor_choices_class is None and type(V.choices).__name__ == "InductorChoices"
        seen.clear()
        torch.compile(lambda t: t.abs().amax(-1) + 1)(x.detach())  # another compile: Inductor's own choices
        assert seen == [("InductorChoices", None)]
    torch._dynamo.reset()


def test_compile_kwargs_follow_the_compile_mode():
    from app.fast.compile import compile_kwargs
    from app.fast.kernels.wide_rows import wide_row_inductor

    assert compile_kwargs("default") == {} and compile_kwargs("reduce-overhead") == {"mode": "reduce-overhead"}
    assert compile_kwargs("tuned") == {"options": {"coordinate_descent_tuning": True}}
    assert compile_kwargs("max-autotune", wide_rows=True) == {"mode": "max-autotune", "backend": wide_row_inductor}


@no_interpreter
def test_auto_kernels_add_wide_rows_and_the_relu2_kernels_only_for_fp8_blocks():
    """kernels=auto: the fused loss and the window kernel, plus one-pass wide rows (the run's compile) and the ReLU²
    feed-forward's row kernels when the blocks run in FP8."""
    from app.fast.fp8 import Fp8Relu2MLP
    from app.fast.loss_head import FastHead
    from app.fast.windows import SlidingWindowAttention
    from app.config import from_dict
    from app.model.gpt import ModelConfig
    from app.train.config import TrainConfig
    from app.train.step import build_model, compile_args

    for fp8 in ("off", "head", "all"):
        cfg = from_dict(TrainConfig, {"perf": {"kernels": "auto", "fp8": fp8, "compile": "true"}})
        mcfg = ModelConfig.preset("tiny", n_layer=2, d_model=32, n_head=2, max_seq_len=16, mlp="relu2",
                                  attn_windows=[4, 0])
        model = build_model(cfg, mcfg, torch.device("cpu"))
        assert type(model.lm_head) is FastHead and model.lm_head.fused and model.lm_head.fp8 is (fp8 != "off")
        window = model.model.layers[0].self_attn
        assert type(window) is SlidingWindowAttention and window.kernel
        assert (type(model.model.layers[1].mlp) is Fp8Relu2MLP) is (fp8 == "all")
        assert ("backend" in compile_args(cfg, torch.device("cpu"))) is (fp8 == "all")


@pytest.mark.gpu
@no_interpreter
def test_gpu_wide_rows_cast_is_one_pass_and_exact():
    """Under kernels=rows a 4096-wide row's amax and FP8 cast compile to one persistent kernel (Inductor's default:
    a looped reduction) whose result dequantises to the activation within e4m3's precision."""
    from torch._inductor.utils import run_and_get_code

    from app.fast.compile import compile_kwargs
    from app.fast.kernels.fp8_linear import to_fp8_rows

    g, u = (torch.randn(2048, 4096, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    ref = torch.nn.functional.silu(g.float()) * u.float()
    row_max = ref.abs().amax(dim=-1, keepdim=True)

    def act_cast(g, u):
        return to_fp8_rows(torch.nn.functional.silu(g) * u)

    for wide_rows in (False, True):
        torch._dynamo.reset()
        (h8, inv), codes = run_and_get_code(torch.compile(act_cast, **compile_kwargs(wide_rows=wide_rows)), g, u)
        assert ("persistent_reduction" in "".join(codes)) is wide_rows
        # e4m3 keeps 3 mantissa bits (relative error <= 2^-4) plus bf16's rounding of the product
        err = ((h8.float() * inv - ref).abs() / row_max).max().item()
        assert err < 0.07, f"wide_rows={wide_rows}: dequantised error {err:.3f} of the row's max"
    torch._dynamo.reset()
