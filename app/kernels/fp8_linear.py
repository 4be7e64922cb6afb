"""FP8 matmuls for training: `x @ weight.T` with both operands cast to float8 under per-tensor scales.

The forward casts x and the weight to e4m3 (scale = e4m3 max / the tensor's absolute max), the backward
casts the output gradient to e5m2 (wider range, as gradients need); all three products run through
`torch._scaled_mm` (cuBLASLt FP8 on sm89+ CUDA; PyTorch's CPU kernel elsewhere, which tests use).
The fp8 copies of x and the weight are what is saved for backward: half the bytes of bf16 activations.
This is torchao's "tensorwise" recipe written as one autograd.Function that torch.compile traces, so
Inductor fuses each amax and cast into the neighbouring pointwise ops.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


@torch.compiler.assume_constant_result  # a constant of the traced graph, not a graph break
def fp8_supported(device_index: int) -> bool:
    """True when this CUDA device has FP8 tensor cores (compute capability 8.9 or newer: Ada, Hopper, ...)."""
    return torch.cuda.get_device_capability(device_index) >= (8, 9)


def on_fp8_gpu(t: torch.Tensor) -> bool:
    """True when t lives on a CUDA device with FP8 tensor cores (`fp8_supported`); t must be on CUDA."""
    return fp8_supported(t.device.index if t.device.index is not None else torch.cuda.current_device())


def fp8_fits(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """True when `fp8_linear` can run: a CUDA device with FP8 and every matmul dimension a multiple of 16
    (cuBLASLt's rule; the token count is an inner dimension of the weight-gradient product)."""
    if not (x.is_cuda and weight.is_cuda):
        return False
    tokens = x.numel() // x.shape[-1]
    return all(n % 16 == 0 for n in (tokens, *weight.shape)) and on_fp8_gpu(x)


def to_fp8(t: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """t cast to `dtype` after scaling its absolute max to dtype's max, and the inverse scale (fp32, 0-dim)."""
    top = torch.finfo(dtype).max
    amax = t.detach().abs().amax().float().clamp(min=1e-12)
    scale = top / amax
    return (t.float() * scale).clamp(-top, top).to(dtype), scale.reciprocal()


class _Fp8Matmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        x8, x_inv = to_fp8(x, E4M3)  # [M, K]
        w8, w_inv = to_fp8(weight, E4M3)  # [N, K]
        ctx.save_for_backward(x8, x_inv, w8, w_inv)
        ctx.dtypes = x.dtype, weight.dtype
        # _scaled_mm wants its first operand row-major and its second column-major: w8.t() is.
        return torch._scaled_mm(x8, w8.t(), scale_a=x_inv, scale_b=w_inv, out_dtype=out_dtype)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x8, x_inv, w8, w_inv = ctx.saved_tensors
        x_dtype, w_dtype = ctx.dtypes
        g8, g_inv = to_fp8(grad_out, E5M2)  # [M, N]
        grad_x = torch._scaled_mm(g8, w8.t().contiguous().t(), scale_a=g_inv, scale_b=w_inv, out_dtype=x_dtype)
        grad_w = torch._scaled_mm(g8.t().contiguous(), x8.t().contiguous().t(), scale_a=g_inv, scale_b=x_inv,
                                  out_dtype=torch.float32)
        return grad_x, grad_w.to(w_dtype), None


def fp8_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`F.linear(x, weight)` (no bias) with FP8 operands: x [..., K], weight [N, K] -> [..., N] in the
    autocast dtype under autocast, else in x's dtype. Differentiable in x and weight; the gradients come
    from FP8 products too. Callers check `fp8_fits` on CUDA (CPU tensors always work)."""
    device = x.device.type
    out_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
    with torch.autocast(device, enabled=False):
        y = _Fp8Matmul.apply(x.reshape(-1, x.shape[-1]), weight, out_dtype)
    return y.view(*x.shape[:-1], weight.shape[0])


def fp8_linear_reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """What `fp8_linear` approximates: the exact `F.linear(x, weight)`."""
    return F.linear(x, weight)
