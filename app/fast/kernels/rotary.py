"""Rotary position embeddings (Hugging Face `rotate_half` layout) as fused Triton kernels, and their reference."""
from __future__ import annotations

import torch

from app.fast.kernels.backend import jit, next_power_of_2, num_warps_for, tl, unit_last, use_triton


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[-x2, x1] of x's halves x1, x2 along the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def rotary_reference(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                     sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Hugging Face Llama `apply_rotary_pos_emb`: x * cos + rotate_half(x) * sin for q and k, in their dtypes."""
    return ((q * cos + rotate_half(q) * sin).to(q.dtype),
            (k * cos + rotate_half(k) * sin).to(k.dtype))


@jit
def _rotary_kernel(x_ptr, y_ptr, cos_ptr, sin_ptr,
                   x_stride_b, x_stride_h, x_stride_t, y_stride_b, y_stride_h, y_stride_t, table_stride_t,
                   H, T, HALF, BACKWARD: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    # One program per (batch, position): every head of that position, both halves of each head.
    pid = tl.program_id(0).to(tl.int64)
    b = pid // T
    t = pid % T
    heads = tl.arange(0, BLOCK_H)[:, None]
    cols = tl.arange(0, BLOCK_HALF)[None, :]
    col_mask = cols < HALF
    mask = (heads < H) & col_mask
    table = t * table_stride_t + cols
    cos1 = tl.load(cos_ptr + table, mask=col_mask, other=0.0).to(tl.float32)
    cos2 = tl.load(cos_ptr + table + HALF, mask=col_mask, other=0.0).to(tl.float32)
    sin1 = tl.load(sin_ptr + table, mask=col_mask, other=0.0).to(tl.float32)
    sin2 = tl.load(sin_ptr + table + HALF, mask=col_mask, other=0.0).to(tl.float32)
    x_row = x_ptr + b * x_stride_b + t * x_stride_t + heads * x_stride_h + cols
    x1 = tl.load(x_row, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_row + HALF, mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:
        # The transpose of x -> x*cos + rotate_half(x)*sin (a rotation by -sin when the halves agree).
        y1 = x1 * cos1 + x2 * sin2
        y2 = x2 * cos2 - x1 * sin1
    else:
        y1 = x1 * cos1 - x2 * sin1
        y2 = x2 * cos2 + x1 * sin2
    y_row = y_ptr + b * y_stride_b + t * y_stride_t + heads * y_stride_h + cols
    tl.store(y_row, y1.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(y_row + HALF, y2.to(y_ptr.dtype.element_ty), mask=mask)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool) -> torch.Tensor:
    """Launch the kernel over x [B, H, T, hd] (any strides with a unit last stride); returns a contiguous tensor."""
    (x,) = unit_last(x)
    B, H, T, hd = x.shape
    y = torch.empty((B, H, T, hd), dtype=x.dtype, device=x.device)
    block_h, block_half = next_power_of_2(H), next_power_of_2(hd // 2)
    if y.numel():
        _rotary_kernel[(B * T,)](x, y, cos, sin, x.stride(0), x.stride(1), x.stride(2),
                                 y.stride(0), y.stride(1), y.stride(2), cos.stride(0), H, T, hd // 2,
                                 BACKWARD=backward, BLOCK_H=block_h, BLOCK_HALF=block_half,
                                 num_warps=num_warps_for(2 * block_h * block_half))
    return y


class _RotaryFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        ctx.save_for_backward(cos, sin)
        return _rotate(q, cos, sin, backward=False), _rotate(k, cos, sin, backward=False)

    @staticmethod
    def backward(ctx, dq: torch.Tensor, dk: torch.Tensor):
        cos, sin = ctx.saved_tensors
        return _rotate(dq, cos, sin, backward=True), _rotate(dk, cos, sin, backward=True), None, None


def _table(name: str, table: torch.Tensor, T: int, hd: int) -> torch.Tensor:
    """cos/sin as a contiguous [T, hd] table; leading singleton dims ([1, 1, T, hd]) are accepted."""
    if table.dim() < 2 or tuple(table.shape[-2:]) != (T, hd) or table.numel() != T * hd:
        raise ValueError(f"apply_rotary: {name} must be [T, hd] = [{T}, {hd}], got {tuple(table.shape)}")
    return table.reshape(T, hd).contiguous()


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [B, H, T, hd] and k [B, Hkv, T, hd] by position tables cos, sin [T, hd] (rotate_half layout).

    Outputs keep q's and k's dtypes. Fused Triton kernels (fp32 math) on CUDA or under the interpreter,
    `rotary_reference` otherwise; differentiable w.r.t. q and k (cos and sin get no gradient)."""
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"apply_rotary: q and k must be [B, H, T, hd], got {tuple(q.shape)} and {tuple(k.shape)}")
    B, _, T, hd = q.shape
    if (k.shape[0], k.shape[2], k.shape[3]) != (B, T, hd):
        raise ValueError(f"apply_rotary: k {tuple(k.shape)} must match q {tuple(q.shape)} in batch, length and head size")
    if hd % 2:
        raise ValueError(f"apply_rotary: head size must be even, got {hd}")
    cos, sin = _table("cos", cos, T, hd), _table("sin", sin, T, hd)
    if not use_triton(q, k, cos, sin):
        return rotary_reference(q, k, cos, sin)
    return _RotaryFn.apply(q, k, cos, sin)
