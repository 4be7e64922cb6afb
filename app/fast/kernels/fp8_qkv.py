"""q/k/v as one FP8 product followed by rotary (`fp8_qkv_rotary`), whose backward joins the three output
gradients in one pass (a Triton kernel, `qkv_grad_rows`).

Attention hands back dq, dk (gradients of the rotated q, k) and dv as [B, H, T, D] tensors in whatever
layout its backward wrote them. The q/k/v product's backward (`fp8_linear`) needs them as one bf16 row per
token, [B*T, (Hq + 2 Hkv) D], for the weight gradient, and the same rows cast to e4m3 with one power-of-two
scale per row for the input gradient. torch.compile fuses rotary's backward, the join and the cast into one
persistent row reduction over the 2304-wide rows of GPT-2 124M. This kernel reads each gradient once and writes
both copies, `block_t` tokens per program. H200, 64 x 1024 tokens of GPT-2 124M: 0.34 ms (1 token, 4 warps; the
fastest of 15 shapes) against Inductor's 0.53 ms (gradients in [B, T, H, D] memory, as cuDNN leaves them) and
0.63 ms ([B, H, T, D], the window kernel's), with the reference's bits (measured by the probe that is now
`bench.kernels`' qkv_grad_rows case).
"""
from __future__ import annotations

import torch

from app.fast.kernels.backend import jit, next_power_of_2, tl, unit_last, use_triton
from app.fast.kernels.fp8_linear import E4M3, Fp8Weight, fp8_backward, fp8_forward, to_fp8_rows
from app.fast.kernels.rotary import rotate_half


def rotary_backward_reference(d: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The gradient of x -> x*cos + rotate_half(x)*sin given the output's gradient d [..., D] (fp32 math,
    d's dtype out, as torch.compile's fused backward rounds it once)."""
    d1, d2 = d.float().chunk(2, dim=-1)
    c1, c2 = cos.float().chunk(2, dim=-1)
    s1, s2 = sin.float().chunk(2, dim=-1)
    return torch.cat([d1 * c1 + d2 * s2, d2 * c2 - d1 * s1], dim=-1).to(d.dtype)


def rotary_fp32(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [..., D] (bf16) rotated by cos, sin (rotate_half layout) in fp32 math, rounded once to x's dtype, as
    torch.compile's fused rotary computes it. The final cast is a real one (x is the bf16 product's output): a no-op
    `.to()` inside an autograd.Function's forward returns its input, and torch 2.11's Dynamo then routes that
    output's gradient to the wrong slot (pytorch#180642's mechanism): q and k got zero gradients on an H200."""
    x32 = x.float()
    return (x32 * cos + rotate_half(x32) * sin).to(x.dtype)


def qkv_grad_rows_reference(dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, cos: torch.Tensor,
                            sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What `qkv_grad_rows` computes, in PyTorch: rotary's backward on dq and dk, the three joined per token
    into g [B*T, (Hq + 2 Hkv) D] (dq's dtype), and `to_fp8_rows(g)`."""
    gq, gk = rotary_backward_reference(dq, cos, sin), rotary_backward_reference(dk, cos, sin)
    B, _, T, _ = dq.shape
    g = torch.cat([t.transpose(1, 2).reshape(B * T, -1) for t in (gq, gk, dv.to(dq.dtype))], dim=-1)
    return (g, *to_fp8_rows(g))


@jit
def _qkv_grad_kernel(DQ, DK, DV, COS, SIN, G, G8, G_INV,
                     sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t, sc_t,
                     T, ROWS, HQ, HKV, HALF: tl.constexpr, BLOCK_T: tl.constexpr,
                     BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr):
    # One program per BLOCK_T tokens; columns of q and k are (head, dim in the first half) pairs, so each
    # program holds both halves that rotary mixes; v's columns are (head, dim) pairs.
    rows = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < ROWS
    b = (rows // T)[:, None]
    t = (rows % T)[:, None]
    D = 2 * HALF
    width = (HQ + 2 * HKV) * D
    out = rows[:, None] * width

    jq = tl.arange(0, BLOCK_Q)[None, :]
    hq, dq_ = jq // HALF, jq % HALF
    mq = row_ok[:, None] & (jq < HQ * HALF)
    jk = tl.arange(0, BLOCK_K)[None, :]
    hk, dk_ = jk // HALF, jk % HALF
    mk = row_ok[:, None] & (jk < HKV * HALF)
    jv = tl.arange(0, BLOCK_V)[None, :]
    mv = row_ok[:, None] & (jv < HKV * D)

    q1, q2 = _rotate_back(DQ + b * sq_b + hq * sq_h + t * sq_t + dq_, COS, SIN, t * sc_t + dq_, HALF, mq)
    k1, k2 = _rotate_back(DK + b * sk_b + hk * sk_h + t * sk_t + dk_, COS, SIN, t * sc_t + dk_, HALF, mk)
    v = tl.load(DV + b * sv_b + (jv // D) * sv_h + t * sv_t + jv % D, mask=mv, other=0.0).to(tl.float32)

    amax = tl.maximum(tl.max(tl.abs(q1), 1), tl.max(tl.abs(q2), 1))
    amax = tl.maximum(amax, tl.maximum(tl.max(tl.abs(k1), 1), tl.max(tl.abs(k2), 1)))
    amax = tl.maximum(amax, tl.max(tl.abs(v), 1))
    scale, inv = _row_scale(amax)
    tl.store(G_INV + rows, inv, mask=row_ok)
    scale = scale[:, None]

    cq = out + hq * D + dq_
    _store_pair(G, G8, cq, q1, scale, mq)
    _store_pair(G, G8, cq + HALF, q2, scale, mq)
    ck = out + HQ * D + hk * D + dk_
    _store_pair(G, G8, ck, k1, scale, mk)
    _store_pair(G, G8, ck + HALF, k2, scale, mk)
    _store_pair(G, G8, out + (HQ + HKV) * D + jv, v, scale, mv)


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


@jit
def _rotate_back(ptr, COS, SIN, table, HALF: tl.constexpr, mask):
    """Both halves of rotary's backward (x -> x*cos + rotate_half(x)*sin, transposed) at `ptr`, in fp32
    rounded to bf16 (as the unfused backward's bf16 output is)."""
    x1 = tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(ptr + HALF, mask=mask, other=0.0).to(tl.float32)
    c1 = tl.load(COS + table, mask=mask, other=0.0).to(tl.float32)
    c2 = tl.load(COS + table + HALF, mask=mask, other=0.0).to(tl.float32)
    s1 = tl.load(SIN + table, mask=mask, other=0.0).to(tl.float32)
    s2 = tl.load(SIN + table + HALF, mask=mask, other=0.0).to(tl.float32)
    return _round_bits(x1 * c1 + x2 * s2, 16), _round_bits(x2 * c2 - x1 * s1, 16)


@jit
def _store_pair(G, G8, cols, x, scale, mask):
    tl.store(G + cols, x.to(tl.bfloat16), mask=mask)
    tl.store(G8 + cols, _e4m3(x * scale), mask=mask)


def qkv_grad_rows(dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  block_t: int = 1, num_warps: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq [B, Hq, T, D], dk and dv [B, Hkv, T, D] (any strides with a unit last one; gradients of rotated q, k
    and of v) and the rotary tables cos, sin [T, D] -> (g, g8, g_inv): g [B*T, (Hq + 2 Hkv) D] in dq's dtype
    (the kernel's: bf16), its rows cast to e4m3 g8 with inverse scales g_inv [B*T, 1] (fp32), as
    `qkv_grad_rows_reference`."""
    if dq.dtype != torch.bfloat16 or not use_triton(dq, dk, dv, cos, sin):  # (the kernel rounds to bf16)
        return qkv_grad_rows_reference(dq, dk, dv, cos, sin)
    dq, dk, dv = unit_last(dq, dk, dv)
    cos, sin = cos.contiguous(), sin.contiguous()
    B, HQ, T, D = dq.shape
    HKV = dk.shape[1]
    rows, width = B * T, (HQ + 2 * HKV) * D
    g = torch.empty(rows, width, device=dq.device, dtype=dq.dtype)
    g8 = torch.empty(rows, width, device=dq.device, dtype=E4M3)
    g_inv = torch.empty(rows, 1, device=dq.device, dtype=torch.float32)
    if rows:
        _qkv_grad_kernel[(-(-rows // block_t),)](
            dq, dk, dv, cos, sin, g, g8, g_inv, dq.stride(0), dq.stride(1), dq.stride(2), dk.stride(0), dk.stride(1),
            dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2), cos.stride(0), T, rows, HQ, HKV, HALF=D // 2,
            BLOCK_T=block_t, BLOCK_Q=next_power_of_2(HQ * D // 2), BLOCK_K=next_power_of_2(HKV * D // 2),
            BLOCK_V=next_power_of_2(HKV * D), num_warps=num_warps)
    return g, g8, g_inv


class _Fp8QkvRotary(torch.autograd.Function):
    """`fp8_qkv_rotary`: its backward gets dq, dk, dv as attention wrote them and makes the product's output
    gradient and its e4m3 rows in one `qkv_grad_rows` pass."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: tuple[int, int, int],
                w8: torch.Tensor | None, w_inv: torch.Tensor | None, wt8: torch.Tensor | None,
                wt_inv: torch.Tensor | None, *weights: torch.Tensor):
        B, T, K = x.shape
        H, HKV, D = heads
        cached = None if w8 is None else (w8, w_inv, wt8, wt_inv)
        y, wt8, wt_inv = fp8_forward(x.reshape(B * T, K), weights, cached)
        q, k, v = (t.view(B, T, -1, D).transpose(1, 2) for t in y.split([H * D, HKV * D, HKV * D], dim=-1))
        q, k = rotary_fp32(q, cos, sin), rotary_fp32(k, cos, sin)
        ctx.save_for_backward(x, wt8, wt_inv, cos, sin)
        ctx.weights = [(w.shape[0], w.dtype) for w in weights]
        return q, k, v

    @staticmethod
    def backward(ctx, dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor):
        x, wt8, wt_inv, cos, sin = ctx.saved_tensors
        g, g8, g_inv = qkv_grad_rows(dq, dk, dv, cos, sin)
        grad_x, grads_w = fp8_backward(x.reshape(-1, x.shape[-1]), wt8, wt_inv, g, g8, g_inv, ctx.weights)
        return grad_x.view(x.shape), None, None, None, None, None, None, None, *grads_w


def fp8_qkv_rotary(x: torch.Tensor, weights: tuple[torch.Tensor, torch.Tensor, torch.Tensor], cos: torch.Tensor,
                   sin: torch.Tensor, head_dim: int, cached: Fp8Weight | None = None):
    """x [B, T, K] (bf16) through q/k/v weights [H D, K], [Hkv D, K], [Hkv D, K] as one FP8 product
    (`fp8_linear`'s recipe), q and k rotated by cos, sin [T, D] (rotate_half layout): returns q [B, H, T, D],
    k and v [B, Hkv, T, D] (bf16 views over the product's rows). `cached`: the e4m3 copies of the
    concatenated weights (`fp8_weight`). Differentiable in x and the weights."""
    heads = (weights[0].shape[0] // head_dim, weights[1].shape[0] // head_dim, head_dim)
    with torch.autocast(x.device.type, enabled=False):
        return _Fp8QkvRotary.apply(x, cos, sin, heads, *(cached or (None,) * 4), *weights)
