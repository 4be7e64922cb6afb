"""Causal sliding-window attention (each query sees its `window` most recent positions, itself included) as
Triton kernels, forward and backward, and its PyTorch reference.

FlashAttention's loop restricted to the window: a block of 64 queries reads only the key blocks its window
touches (two for a window of 64), so the cost grows with the window, not the sequence. FlexAttention's
128-position sparse blocks read 256 keys per query for a window of 64, and in a 124M training step cost as
much as a full causal cuDNN layer; its smaller sparse blocks find no kernel configuration in torch 2.11's
backward. The backward is deterministic, no atomics: for a window of at most one block (the
model's 64), one kernel walks each (batch, query head) along the sequence, key block by key block: each key
block meets only its own and the next query block, so one step finishes the key block's gradients and its own
query block's, reading q, k, v, o and the output gradient once and carrying one query block (and its partial
query gradient) to the next step; for wider windows two kernels (key/value gradients, then query gradients),
which read each key block once per query block that sees it.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from app.fast.kernels.backend import jit, tl, triton, unit_last, use_triton

BLOCK = 64  # queries per program and keys per step, both passes
HEAD_DIMS = (16, 32, 64, 128)  # head sizes the kernels take (tl.arange needs a power of two; >= 16 for tl.dot)
# The one-kernel backward's launch by head size: the best of 4/8 warps x 1-3 stages (`bench.kernels`)
ONE_PASS_LAUNCH = {64: dict(num_warps=4, num_stages=2), 128: dict(num_warps=8, num_stages=1)}


def window_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int) -> torch.Tensor:
    """SDPA of q [B, H, T, D] over k, v [B, Hkv, T, D] where query i sees keys j with i - window < j <= i."""
    i = torch.arange(q.size(2), device=q.device)
    mask = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < window)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=k.size(1) != q.size(1))


@jit
def _scores(q, k, offs_m, offs_n, T, WINDOW, scale_log2):
    """The [BLOCK, BLOCK] scores in log2 units, -inf outside the causal window (and past T)."""
    s = (tl.dot(q, tl.trans(k)) * scale_log2).to(tl.float32)  # (Inductor passes float arguments as fp64)
    keep = (offs_n[None, :] <= offs_m[:, None]) & (offs_m[:, None] - offs_n[None, :] < WINDOW)
    return tl.where(keep & (offs_m[:, None] < T), s, float("-inf"))


@jit
def _load_tile(base, offs, stride_t, offs_d, T):
    """Rows `offs` (zeros past T) of the [T, D] matrix at `base` with row stride `stride_t`."""
    return tl.load(base + offs[:, None] * stride_t + offs_d[None, :], mask=offs[:, None] < T, other=0.0)


@jit
def _store_tile(base, offs, stride_t, offs_d, T, tile):
    """`tile` into rows `offs` (those before T) of the [T, D] matrix at `base`, in its element type."""
    tl.store(base + offs[:, None] * stride_t + offs_d[None, :], tile.to(base.dtype.element_ty), mask=offs[:, None] < T)


@jit
def _load_row_stats(base, offs, T):
    """Per-query floats (log-sum-exp or delta) of rows `offs`, zeros past T."""
    return tl.load(base + offs, mask=offs < T, other=0.0)


@jit
def _key_range(m_blk, T, WINDOW, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """[lo, hi): the keys that query block m_blk's windows touch, lo aligned to BLOCK_N."""
    lo = tl.maximum(m_blk * BLOCK_M - WINDOW + 1, 0) // BLOCK_N * BLOCK_N
    return lo, tl.minimum((m_blk + 1) * BLOCK_M, T)


@jit
def _attention_window_fwd(Q, K, V, O, LSE, sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, so_b, so_h, so_t,
                H, GROUP, T, WINDOW, scale_log2, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr):
    m_blk, bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    offs_m = m_blk * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    q = _load_tile(Q + b * sq_b + h * sq_h, offs_m, sq_t, offs_d, T)
    k_base = K + b * sk_b + (h // GROUP) * sk_h
    v_base = V + b * sk_b + (h // GROUP) * sk_h
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    lo, hi = _key_range(m_blk, T, WINDOW, BLOCK_M, BLOCK_N)
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        k = _load_tile(k_base, offs_n, sk_t, offs_d, T)
        v = _load_tile(v_base, offs_n, sk_t, offs_d, T)
        s = _scores(q, k, offs_m, offs_n, T, WINDOW, scale_log2)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key yet: keep zeros, not NaNs
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    l_i = tl.where(l_i == 0.0, 1.0, l_i)  # (rows past T only: every real row sees itself)
    _store_tile(O + b * so_b + h * so_h, offs_m, so_t, offs_d, T, acc / l_i[:, None])
    tl.store(LSE + bh * T + offs_m, m_i + tl.log2(l_i), mask=offs_m < T)


@jit
def _pair_grads(q, do, lse, delta, k, v, offs_m, offs_n, T, WINDOW, scale_log2):
    """A query block against a key block: the probabilities p = exp2(s - lse) and the score gradients
    ds = p * (do @ v.T - delta), both [BLOCK_M, BLOCK_N] fp32 (FlashAttention-2's backward)."""
    p = tl.exp2(_scores(q, k, offs_m, offs_n, T, WINDOW, scale_log2) - lse[:, None])
    return p, p * (tl.dot(do, tl.trans(v)) - delta[:, None])


@jit
def _attention_window_bwd_kv(Q, K, V, DO, LSE, DELTA, DK, DV, sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, sd_b, sd_h, sd_t,
                   sg_b, sg_h, sg_t, H, GROUP, T, WINDOW, scale_log2, sm_scale,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr):
    # One program per (key block, batch x kv head): every query (of every head in its group) that sees it.
    n_blk, bhk = tl.program_id(0), tl.program_id(1).to(tl.int64)
    Hkv = H // GROUP
    b, hk = bhk // Hkv, bhk % Hkv
    offs_n = n_blk * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    k = _load_tile(K + b * sk_b + hk * sk_h, offs_n, sk_t, offs_d, T)
    v = _load_tile(V + b * sk_b + hk * sk_h, offs_n, sk_t, offs_d, T)
    dk = tl.zeros([BLOCK_N, D], tl.float32)
    dv = tl.zeros([BLOCK_N, D], tl.float32)
    lo = n_blk * BLOCK_N // BLOCK_M * BLOCK_M
    hi = tl.minimum(n_blk * BLOCK_N + BLOCK_N - 1 + WINDOW, T)  # the last query whose window reaches this block
    for g in range(GROUP):
        h = hk * GROUP + g
        for start in range(lo, hi, BLOCK_M):
            offs_m = start + tl.arange(0, BLOCK_M)
            q = _load_tile(Q + b * sq_b + h * sq_h, offs_m, sq_t, offs_d, T)
            do = _load_tile(DO + b * sd_b + h * sd_h, offs_m, sd_t, offs_d, T)
            lse = _load_row_stats(LSE + (b * H + h) * T, offs_m, T)
            delta = _load_row_stats(DELTA + (b * H + h) * T, offs_m, T)
            p, ds = _pair_grads(q, do, lse, delta, k, v, offs_m, offs_n, T, WINDOW, scale_log2)
            dv += tl.dot(tl.trans(p.to(do.dtype)), do)
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q)
    _store_tile(DK + b * sg_b + hk * sg_h, offs_n, sg_t, offs_d, T, dk * sm_scale)
    _store_tile(DV + b * sg_b + hk * sg_h, offs_n, sg_t, offs_d, T, dv)


@jit
def _attention_window_bwd_q(Q, K, V, DO, LSE, DELTA, DQ, sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, sd_b, sd_h, sd_t,
                  H, GROUP, T, WINDOW, scale_log2, sm_scale,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr):
    m_blk, bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    offs_m = m_blk * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    q = _load_tile(Q + b * sq_b + h * sq_h, offs_m, sq_t, offs_d, T)
    do = _load_tile(DO + b * sd_b + h * sd_h, offs_m, sd_t, offs_d, T)
    lse = _load_row_stats(LSE + bh * T, offs_m, T)
    delta = _load_row_stats(DELTA + bh * T, offs_m, T)
    k_base = K + b * sk_b + (h // GROUP) * sk_h
    v_base = V + b * sk_b + (h // GROUP) * sk_h
    dq = tl.zeros([BLOCK_M, D], tl.float32)
    lo, hi = _key_range(m_blk, T, WINDOW, BLOCK_M, BLOCK_N)
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        k = _load_tile(k_base, offs_n, sk_t, offs_d, T)
        v = _load_tile(v_base, offs_n, sk_t, offs_d, T)
        _, ds = _pair_grads(q, do, lse, delta, k, v, offs_m, offs_n, T, WINDOW, scale_log2)
        dq += tl.dot(ds.to(k.dtype), k)
    _store_tile(DQ + b * sq_b + h * sq_h, offs_m, sq_t, offs_d, T, dq * sm_scale)


# The walk addresses its tiles through these rather than `_load_tile` with offsets it holds: offsets made per
# call are recomputed, not kept live, and the walk's register spills drop (sm_90 ptxas: 776 -> 560 bytes a thread).
@jit
def _load_block(base, start, stride_t, T, BLOCK: tl.constexpr, D: tl.constexpr):
    """Rows [start, start + BLOCK) of the [T, D] matrix at `base` (unit last stride), zeros past T."""
    return _load_tile(base, start + tl.arange(0, BLOCK), stride_t, tl.arange(0, D), T)


@jit
def _store_block(base, start, stride_t, T, tile, BLOCK: tl.constexpr, D: tl.constexpr):
    """`tile` into rows [start, start + BLOCK) (those before T) of the [T, D] matrix at `base`."""
    _store_tile(base, start + tl.arange(0, BLOCK), stride_t, tl.arange(0, D), T, tile)


@jit
def _query_block(q_base, do_base, o_base, lse_base, start, sq_t, sd_t, so_t, T, BLOCK: tl.constexpr,
                 D: tl.constexpr):
    """What query block [start, start + BLOCK) brings to the backward: q, do, its log2-sum-exp rows and its delta
    rows (rowsum(o * do)); zeros past T."""
    q = _load_block(q_base, start, sq_t, T, BLOCK, D)
    do = _load_block(do_base, start, sd_t, T, BLOCK, D)
    o = _load_block(o_base, start, so_t, T, BLOCK, D)
    lse = _load_row_stats(lse_base, start + tl.arange(0, BLOCK), T)
    return q, do, lse, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)


@jit
def _attention_window_bwd_seq(Q, K, V, O, DO, LSE, DQ, DK, DV, sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, so_b, so_h, so_t,
                              sd_b, sd_h, sd_t, sg_b, sg_h, sg_t, H, GROUP, T, WINDOW, scale_log2, sm_scale,
                              BLOCK: tl.constexpr, D: tl.constexpr):
    # One program per (batch, query head), key block by key block: with WINDOW <= BLOCK, key block m meets query
    # blocks m and m + 1 only. Each step finishes key block m's gradients and query block m's (the part from key
    # block m - 1 carried over in dq), and hands query block m + 1, loaded once, to the next step. DK/DV are
    # this head's own gradients (the caller sums a kv group's heads).
    bh = tl.program_id(0).to(tl.int64)
    b, h = bh // H, bh % H
    offs = tl.arange(0, BLOCK)
    q_base, do_base, o_base = Q + b * sq_b + h * sq_h, DO + b * sd_b + h * sd_h, O + b * so_b + h * so_h
    k_base, v_base = K + b * sk_b + (h // GROUP) * sk_h, V + b * sk_b + (h // GROUP) * sk_h
    dq_base, dk_base, dv_base = DQ + b * sq_b + h * sq_h, DK + b * sg_b + h * sg_h, DV + b * sg_b + h * sg_h
    lse_base = LSE + bh * T
    q_n, do_n, lse_n, delta_n = _query_block(q_base, do_base, o_base, lse_base, 0, sq_t, sd_t, so_t, T, BLOCK, D)
    dq = tl.zeros([BLOCK, D], tl.float32)
    for start in range(0, T, BLOCK):
        offs_m = start + offs
        q, do, lse, delta = q_n, do_n, lse_n, delta_n
        k = _load_block(k_base, start, sk_t, T, BLOCK, D)
        v = _load_block(v_base, start, sk_t, T, BLOCK, D)
        p, ds = _pair_grads(q, do, lse, delta, k, v, offs_m, offs_m, T, WINDOW, scale_log2)
        dv = tl.dot(tl.trans(p.to(do.dtype)), do)
        dk = tl.dot(tl.trans(ds.to(q.dtype)), q)
        dq += tl.dot(ds.to(k.dtype), k)
        _store_block(dq_base, start, sq_t, T, dq * sm_scale, BLOCK, D)
        # query block m + 1 (all masked past T)
        q_n, do_n, lse_n, delta_n = _query_block(q_base, do_base, o_base, lse_base, start + BLOCK, sq_t, sd_t, so_t,
                                                 T, BLOCK, D)
        p, ds = _pair_grads(q_n, do_n, lse_n, delta_n, k, v, offs_m + BLOCK, offs_m, T, WINDOW, scale_log2)
        dv += tl.dot(tl.trans(p.to(do_n.dtype)), do_n)
        dk += tl.dot(tl.trans(ds.to(q_n.dtype)), q_n)
        dq = tl.dot(ds.to(k.dtype), k)
        _store_block(dk_base, start, sg_t, T, dk * sm_scale, BLOCK, D)
        _store_block(dv_base, start, sg_t, T, dv, BLOCK, D)


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def window_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's forward: (o [B, H, T, D] laid out as [B, T, H, D], the rows' log2-sum-exp [B * H, T]);
    q, k, v with unit last strides, k and v of one layout."""
    B, H, T, D = q.shape
    o = q.new_empty(B, T, H, D).transpose(1, 2)  # the o_proj input, no copy
    lse = torch.empty(B * H, T, device=q.device, dtype=torch.float32)
    sm_scale = 1.0 / math.sqrt(D)
    _attention_window_fwd[(triton.cdiv(T, BLOCK), B * H)](
        q, k, v, o, lse, *_strides(q), *_strides(k), *_strides(o), H, H // k.size(1), T, window,
        sm_scale * math.log2(math.e), BLOCK_M=BLOCK, BLOCK_N=BLOCK, D=D, num_warps=4, num_stages=2)
    return o, lse


def window_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
                    do: torch.Tensor, window: int, one_pass: bool | None = None) -> tuple[torch.Tensor, ...]:
    """(dq, dk, dv) from `window_forward`'s o and lse and the output gradient do (unit last stride).
    `one_pass`: the one-kernel walk (possible for window <= BLOCK) or the two kernels; None picks the walk
    where it is possible, except for grouped kv heads of size 128, where its fp32 per-head gradients make it the
    slower one (`bench.kernels`' window_attention section)."""
    B, H, T, D = q.shape
    group = H // k.size(1)
    one_pass = window <= BLOCK and (D <= 64 or group == 1) if one_pass is None else one_pass
    if one_pass and window > BLOCK:
        raise ValueError(f"window_backward: the one-pass kernel needs window <= {BLOCK}, got {window}")
    # dq in q's own strides (the kernels write it with them, and q may be a view of a packed projection); dk and
    # dv share one layout (the kernels write both with dk's strides), as k and v do
    dq = torch.empty_strided(q.shape, q.stride(), dtype=q.dtype, device=q.device)
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    sm_scale = 1.0 / math.sqrt(D)
    scale_log2 = sm_scale * math.log2(math.e)
    if one_pass:
        # per query head: a kv group's heads write fp32 gradients apart, summed here
        dkh, dvh = (dk, dv) if group == 1 else (q.new_empty(B, H, T, D, dtype=torch.float32) for _ in range(2))
        _attention_window_bwd_seq[(B * H,)](
            q, k, v, o, do, lse, dq, dkh, dvh, *_strides(q), *_strides(k), *_strides(o), *_strides(do),
            *_strides(dkh), H, group, T, window, scale_log2, sm_scale, BLOCK=BLOCK, D=D,
            **ONE_PASS_LAUNCH[max(D, 64)])
        if group > 1:
            dk.copy_(dkh.view(B, k.size(1), group, T, D).sum(2))
            dv.copy_(dvh.view(B, k.size(1), group, T, D).sum(2))
        return dq, dk, dv
    delta = (o.float() * do.float()).sum(-1).reshape(B * H, T)
    common = dict(BLOCK_M=BLOCK, BLOCK_N=BLOCK, D=D, num_warps=4, num_stages=2)
    _attention_window_bwd_kv[(triton.cdiv(T, BLOCK), B * k.size(1))](
        q, k, v, do, lse, delta, dk, dv, *_strides(q), *_strides(k), *_strides(do), *_strides(dk),
        H, group, T, window, scale_log2, sm_scale, **common)
    _attention_window_bwd_q[(triton.cdiv(T, BLOCK), B * H)](
        q, k, v, do, lse, delta, dq, *_strides(q), *_strides(k), *_strides(do),
        H, group, T, window, scale_log2, sm_scale, **common)
    return dq, dk, dv


class _WindowAttentionFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int):
        q, k, v = unit_last(q, k, v)
        if k.stride() != v.stride():
            k, v = k.contiguous(), v.contiguous()
        o, lse = window_forward(q, k, v, window)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.window = window
        return o

    @staticmethod
    def backward(ctx, do: torch.Tensor):
        q, k, v, o, lse = ctx.saved_tensors
        (do,) = unit_last(do)
        return *window_backward(q, k, v, o, lse, do, ctx.window), None


def window_fits(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether `window_attention` runs its kernels here (CUDA or the interpreter, a head size in HEAD_DIMS,
    k and v of one layout); otherwise it takes the reference."""
    return use_triton(q, k, v) and q.size(-1) in HEAD_DIMS and k.shape == v.shape


def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int) -> torch.Tensor:
    """Causal attention of q [B, H, T, D] over k, v [B, Hkv, T, D] (H a multiple of Hkv) in which query i
    sees keys i - window < j <= i, scaled by 1/sqrt(D); the output is [B, H, T, D] (laid out as [B, T, H, D]).
    Differentiable w.r.t. q, k, v. Triton kernels where `window_fits`, `window_attention_reference` else."""
    if q.dim() != 4 or k.dim() != 4 or q.size(1) % k.size(1) or (q.size(0), q.size(2), q.size(3)) != (
            k.size(0), k.size(2), k.size(3)):
        raise ValueError(f"window_attention: q [B, H, T, D] and k, v [B, Hkv, T, D] with H a multiple of Hkv; "
                         f"got {tuple(q.shape)}, {tuple(k.shape)}")
    if window < 1:
        raise ValueError(f"window_attention: window must be >= 1, got {window}")
    if not window_fits(q, k, v):
        return window_attention_reference(q, k, v, window)
    return _WindowAttentionFn.apply(q, k, v, window)
