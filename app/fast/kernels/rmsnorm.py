"""RMSNorm with fused Triton forward and backward kernels, and its PyTorch reference."""
from __future__ import annotations

import torch

from app.fast.kernels.backend import jit, next_power_of_2, num_programs, num_warps_for, tl, use_triton

_MAX_D = 65536  # one program holds a whole row; wider rows take the reference


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Hugging Face Llama RMSNorm: normalise in fp32, cast to x's dtype, then scale by weight."""
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


@jit
def _rms_norm_fwd_kernel(x_ptr, w_ptr, y_ptr, rstd_ptr, x_stride, y_stride, D, eps,
                         BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / D + eps)
    # Round the normalised row to the input dtype before scaling, as the reference does.
    x_hat = (x * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * y_stride + cols, (x_hat * w).to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + row, rstd)


@jit
def _rms_norm_bwd_kernel(dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_partial_ptr,
                         dy_stride, x_stride, dx_stride, M, D, rows_per_program,
                         BLOCK_D: tl.constexpr):
    # Each program walks a contiguous run of rows and keeps its share of dweight in registers.
    pid = tl.program_id(0)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_D], dtype=tl.float32)
    dy_ptr += row_start.to(tl.int64) * dy_stride
    x_ptr += row_start.to(tl.int64) * x_stride
    dx_ptr += row_start.to(tl.int64) * dx_stride
    for row in range(row_start, row_end):
        x = tl.load(x_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row)
        x_hat = x * rstd
        dw += dy * x_hat.to(x_ptr.dtype.element_ty).to(tl.float32)
        dx_hat = dy * w
        # d/dx of x * rstd(x): rstd * (g - x_hat * mean(g * x_hat)).
        dx = rstd * (dx_hat - x_hat * (tl.sum(dx_hat * x_hat, axis=0) / D))
        tl.store(dx_ptr + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        x_ptr += x_stride
        dy_ptr += dy_stride
        dx_ptr += dx_stride
    tl.store(dw_partial_ptr + pid * D + cols, dw, mask=mask)


class _RMSNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        shape, D = x.shape, x.shape[-1]
        x2 = x.reshape(-1, D).contiguous()
        M = x2.shape[0]
        y = torch.empty((M, D), dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
        rstd = torch.empty(M, dtype=torch.float32, device=x.device)
        block = next_power_of_2(D)
        if M:
            _rms_norm_fwd_kernel[(M,)](x2, weight, y, rstd, x2.stride(0), y.stride(0), D, eps,
                                       BLOCK_D=block, num_warps=num_warps_for(block))
        ctx.save_for_backward(x2, weight, rstd)
        ctx.shape = shape
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2, weight, rstd = ctx.saved_tensors
        M, D = x2.shape
        dy2 = dy.reshape(M, D).contiguous()
        dx = torch.empty_like(x2)
        programs = num_programs(x2.device, M)
        dw_partial = torch.empty((programs, D), dtype=torch.float32, device=x2.device)
        block = next_power_of_2(D)
        if M:
            _rms_norm_bwd_kernel[(programs,)](dy2, x2, weight, rstd, dx, dw_partial,
                                              dy2.stride(0), x2.stride(0), dx.stride(0), M, D,
                                              -(-M // programs), BLOCK_D=block, num_warps=num_warps_for(block))
        dw = dw_partial.sum(0).to(weight.dtype) if M else torch.zeros_like(weight)
        return dx.view(ctx.shape), dw, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """RMSNorm over the last dim of x [..., D] with weight [D]; the output dtype is x's promoted with weight's.

    Fused Triton kernels (fp32 math) on CUDA or under the interpreter, `rms_norm_reference` otherwise;
    differentiable w.r.t. x and weight."""
    if x.dim() < 1 or weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"rms_norm: weight {tuple(weight.shape)} must be [D] for x {tuple(x.shape)} = [..., D]")
    if eps < 0:
        raise ValueError(f"rms_norm: eps must be >= 0, got {eps}")
    if x.shape[-1] > _MAX_D or not use_triton(x, weight):
        return rms_norm_reference(x, weight, eps)
    return _RMSNormFn.apply(x, weight, eps)
