"""The FP8 ReLU² feed-forward (modded-nanogpt's MLP, `fp8_linear`'s recipe): down(relu(up(x))²) as one
autograd function whose activation passes are Triton row kernels.

Each pass is one memory-bound sweep over the hidden rows (3072 wide at GPT-2 124M). Forward: read h = up(x), write
relu(h)² cast to e4m3 with one power-of-two scale per row (`relu2_rows`); h is saved, the bf16 activation is not.
Backward: read the activation's gradient and h, write the bf16 hidden gradient (the up projection's weight
gradient takes it), its e4m3 rows (its input gradient takes them) and the recomputed bf16 activation (the down
projection's weight gradient takes it) (`relu2_rows_backward`). Under torch.compile Inductor fuses the same work
into two one-pass kernels of its own (`kernels=rows`); these run closer to a plain copy's bandwidth (`bench.kernels`'
relu2_rows section). They round as eager PyTorch does, so their outputs are bit for bit the PyTorch references'.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from app.fast.kernels.backend import INTERPRET, jit, next_power_of_2, tl, use_triton
from app.fast.kernels.fp8_linear import E4M3, Fp8Weight, fp8_forward, fp8_product, fp8_weight, to_fp8_rows, weight_grad

MAX_WIDTH = 16384  # widest hidden row a program holds in registers; wider rows take the references


@jit
def _row_scale(amax):
    """`to_fp8_rows`'s scale 2^floor(log2(448 / max(amax, 1e-12))) and its inverse, from amax's bits (exact
    where log2 and the division are approximate on the GPU; amax = m 2^e: 2^(8-e) when m <= 1.75, else 2^(7-e))."""
    bits = tl.maximum(amax, 1e-12).to(tl.int32, bitcast=True)
    k = 8 - (((bits >> 23) & 0xFF) - 127) - ((bits & 0x7FFFFF) > 0x600000).to(tl.int32)
    return ((127 + k) << 23).to(tl.float32, bitcast=True), ((127 - k) << 23).to(tl.float32, bitcast=True)


@jit
def _round_bits(x, DROP: tl.constexpr):
    """fp32 x rounded to the nearest value with its last DROP mantissa bits zero (ties to even), so that
    casting it to a narrower type is exact whatever rounding the cast does (Triton's interpreter truncates)."""
    b = x.to(tl.int32, bitcast=True)
    b = b + ((1 << (DROP - 1)) - 1) + ((b >> DROP) & 1)
    return (b & -(1 << DROP)).to(tl.float32, bitcast=True)


@jit
def _e4m3(x):
    """fp32 x (|x| <= 448) rounded to e4m3 (nearest, ties to even): 3 mantissa bits for normal values,
    multiples of 2^-9 below 2^-6 (the subnormals: adding 1.5 * 2^14 rounds there), then cast."""
    sub = (x + 24576.0) - 24576.0
    return tl.where(tl.abs(x) >= 0.015625, _round_bits(x, 20), sub).to(tl.float8e4nv)


def relu2_rows_reference(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """relu(h)² (in h's dtype) cast to e4m3 row by row: `to_fp8_rows(F.relu(h).square())`."""
    return to_fp8_rows(F.relu(h).square())


def relu2_rows_backward_reference(da: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(dh, dh8, dh_inv, a): the gradient dh of a = relu(h)² given da (h's dtype, as autograd rounds it), its
    e4m3 rows `to_fp8_rows(dh)`, and a itself."""
    r = F.relu(h)
    dh = torch.where(h > 0, da * (2 * r), 0.0).to(h.dtype)
    return (dh, *to_fp8_rows(dh), r.square())


@jit
def _bf16(x, SOFT: tl.constexpr):
    """fp32 x rounded to bf16 (nearest, ties to even), as fp32: the GPU's conversion, or bit arithmetic where SOFT
    (Triton's interpreter truncates)."""
    return _round_bits(x, 16) if SOFT else x.to(tl.bfloat16).to(tl.float32)


@jit
def _to_e4m3(x, SOFT: tl.constexpr):
    """fp32 x (|x| <= 448) cast to e4m3 rounding to nearest: one conversion instruction on the GPU; bit arithmetic
    where SOFT (slower on the GPU, even in these memory-bound passes)."""
    return _e4m3(x) if SOFT else x.to(tl.float8e4nv)


@jit
def _relu2_fwd_kernel(H, A8, A_INV, N, stride, BLOCK: tl.constexpr, SOFT: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    r = tl.maximum(tl.load(H + row * stride + cols, mask=mask, other=0.0).to(tl.float32), 0.0)
    a = _bf16(r * r, SOFT)  # the bf16 activation the reference casts
    scale, inv = _row_scale(tl.max(a, 0))
    tl.store(A_INV + row, inv)
    tl.store(A8 + row * N + cols, _to_e4m3(a * scale, SOFT), mask=mask)


@jit
def _relu2_bwd_kernel(DA, H, DH, DH8, DH_INV, A, N, stride_da, stride_h, BLOCK: tl.constexpr, SOFT: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    h = tl.load(H + row * stride_h + cols, mask=mask, other=0.0).to(tl.float32)
    da = tl.load(DA + row * stride_da + cols, mask=mask, other=0.0).to(tl.float32)
    r = tl.maximum(h, 0.0)
    dh = _bf16(tl.where(h > 0, da * (2 * r), 0.0), SOFT)
    out = row * N + cols
    tl.store(A + out, _bf16(r * r, SOFT).to(tl.bfloat16), mask=mask)
    tl.store(DH + out, dh.to(tl.bfloat16), mask=mask)
    scale, inv = _row_scale(tl.max(tl.abs(dh), 0))
    tl.store(DH_INV + row, inv)
    tl.store(DH8 + out, _to_e4m3(dh * scale, SOFT), mask=mask)


def _launch(N: int, backward: bool) -> dict:
    """A row kernel's launch options for rows N wide: the fastest measured at GPT-2's widths (4 warps per 4096
    columns forward, 8 backward; two rows per program were no faster)."""
    block = next_power_of_2(N)
    warps = (8 if backward else 4) * max(1, block // 4096)
    return dict(BLOCK=block, SOFT=INTERPRET, num_warps=min(warps, 32))


def _kernels_fit(*ts: torch.Tensor) -> bool:
    """Whether the row kernels run on ts: all bf16, rows of at most MAX_WIDTH, on CUDA (or under the interpreter)."""
    return all(t.dtype == torch.bfloat16 for t in ts) and ts[0].shape[-1] <= MAX_WIDTH and use_triton(*ts)


def relu2_rows(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`relu2_rows_reference(h)` for h [M, N] (unit last stride): (a8 [M, N] e4m3, a_inv [M, 1] fp32)."""
    if not _kernels_fit(h):
        return relu2_rows_reference(h)
    M, N = h.shape
    a8 = torch.empty(M, N, device=h.device, dtype=E4M3)
    a_inv = torch.empty(M, 1, device=h.device, dtype=torch.float32)
    if M:
        _relu2_fwd_kernel[(M,)](h, a8, a_inv, N, h.stride(0), **_launch(N, backward=False))
    return a8, a_inv


def relu2_rows_backward(da: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """`relu2_rows_backward_reference(da, h)` for da, h [M, N] (unit last strides): (dh, dh8, dh_inv, a)."""
    if not _kernels_fit(h, da):
        return relu2_rows_backward_reference(da, h)
    M, N = h.shape
    dh, a = torch.empty_like(h), torch.empty_like(h)
    dh8 = torch.empty(M, N, device=h.device, dtype=E4M3)
    dh_inv = torch.empty(M, 1, device=h.device, dtype=torch.float32)
    if M:
        _relu2_bwd_kernel[(M,)](da, h, dh, dh8, dh_inv, a, N, da.stride(0), h.stride(0), **_launch(N, backward=True))
    return dh, dh8, dh_inv, a


class _Fp8Relu2Mlp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, up: torch.Tensor, down: torch.Tensor, *casts: torch.Tensor | None) -> torch.Tensor:
        up_cast, down_cast = casts[:4], casts[4:]  # (flat: the weights' `fp8_weight` copies, or Nones)
        h, up_t8, up_t_inv = fp8_forward(x, up, up_cast if up_cast[0] is not None else None)
        w8, w_inv, down_t8, down_t_inv = down_cast if down_cast[0] is not None else fp8_weight(down)
        y = fp8_product(*relu2_rows(h), w8, w_inv)
        ctx.save_for_backward(x, h, up_t8, up_t_inv, down_t8, down_t_inv)
        ctx.dtypes = up.dtype, down.dtype
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, h, up_t8, up_t_inv, down_t8, down_t_inv = ctx.saved_tensors
        up_dtype, down_dtype = ctx.dtypes
        da = fp8_product(*to_fp8_rows(dy), down_t8, down_t_inv)
        dh, dh8, dh_inv, a = relu2_rows_backward(da, h)
        grad_down, grad_up = weight_grad(dy, a, down_dtype), weight_grad(dh, x, up_dtype)
        return fp8_product(dh8, dh_inv, up_t8, up_t_inv).to(x.dtype), grad_up, grad_down, *(None,) * 8


def fp8_relu2_mlp(x: torch.Tensor, up: torch.Tensor, down: torch.Tensor, up_cast: Fp8Weight | None = None,
                  down_cast: Fp8Weight | None = None) -> torch.Tensor:
    """`fp8_linear(relu(fp8_linear(x, up))², down)`: x [..., K], up [N, K], down [K', N] -> [..., K'] in the
    autocast dtype under autocast (else x's); the same FP8 products, with the activation's passes in
    `relu2_rows` / `relu2_rows_backward`. `up_cast`, `down_cast`: the weights' `fp8_weight` copies (cast once per
    step), else cast here. Differentiable in x, up and down; on CUDA callers check `fp8_fits` for both weights."""
    device = x.device.type
    out_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
    with torch.autocast(device, enabled=False):
        y = _Fp8Relu2Mlp.apply(x.reshape(-1, x.shape[-1]), up, down, *(up_cast or (None,) * 4),
                               *(down_cast or (None,) * 4))
    return y.view(*x.shape[:-1], y.shape[-1]).to(out_dtype)
