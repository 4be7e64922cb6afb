"""FP8 matmuls for training: `x @ weight.T` with the forward and input-gradient products in float8.

The recipe is torchao's "rowwise with high-precision weight gradient": every operand is cast to e4m3 with
one power-of-two scale per row of the contraction (per token for x and the output gradient, per output
channel for the weight in the forward, per input channel in the backward), so one outlier token or
channel costs precision only in its own row, and the scaling itself is exact. Both FP8 products run
through `torch._scaled_mm` (CUTLASS/cuBLASLt on sm89+ CUDA; PyTorch's CPU kernel elsewhere, which tests
use). The weight-gradient product stays in the compute dtype: in FP8 it would need transposed copies of
x and the output gradient with per-column scales, which cost about what the faster product saves at
GPT-2 widths (torchao's tensorwise recipe, tried: slower than bf16), and it is the product whose
precision the optimizer sees directly. Under torch.compile each row's amax and cast is fused into the
kernel that produces the row (a norm, an activation, a gradient); in one pass for rows up to 1024 wide,
and up to 8192 under `kernels=rows` (`wide_rows`), which the MLP's hidden rows need. A weight's two
e4m3 copies (`fp8_weight`) can be cast once per optimizer step and passed in (`cached`): the weights do not
change between the micro-batches of a step, and casting each weight twice per micro-batch costs a step
hundreds of small kernels.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

E4M3 = torch.float8_e4m3fn


@torch.compiler.assume_constant_result  # a constant of the traced graph, not a graph break
def fp8_supported(device_index: int) -> bool:
    """True when this CUDA device has FP8 tensor cores (compute capability 8.9 or newer: Ada, Hopper, ...)."""
    return torch.cuda.get_device_capability(device_index) >= (8, 9)


def on_fp8_gpu(t: torch.Tensor) -> bool:
    """True when t lives on a CUDA device with FP8 tensor cores (`fp8_supported`); t must be on CUDA."""
    return fp8_supported(t.device.index if t.device.index is not None else torch.cuda.current_device())


def fp8_fits(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """True when `fp8_linear` can run: a CUDA device with FP8 and the token count and both weight dimensions
    multiples of 16 (cuBLASLt's rule for inner dimensions; tokens too, the shape checked on GPUs)."""
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


def to_fp8_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """t [R, C] cast to e4m3 row by row, each row scaled by the power of two that brings its absolute max
    closest to e4m3's max from below, and the inverse scales [R, 1] (fp32): t ~= t8 * inverse."""
    amax = t.detach().abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12)
    scale = torch.exp2(torch.floor(torch.log2(torch.finfo(E4M3).max / amax)))
    return (t.float() * scale).to(E4M3), scale.reciprocal()


# A weight's e4m3 copies: w8 [N, K] with inverse scales [N, 1] (one per output channel, the forward's) and
# wt8 [K, N] with [K, 1] (its transpose, one per input channel, the input gradient's).
Fp8Weight = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def fp8_weight(weight: torch.Tensor) -> Fp8Weight:
    """The e4m3 copies of `weight` [N, K] that `fp8_linear` casts when it is not given them."""
    with torch.no_grad():
        return (*to_fp8_rows(weight), *to_fp8_rows(weight.t().contiguous()))


def fp8_weights(weights: Sequence[torch.Tensor]) -> list[Fp8Weight]:
    """`fp8_weight` of each of `weights` (one function to compile: Inductor fuses each weight's casts)."""
    return [fp8_weight(w) for w in weights]


def fp8_product(a8: torch.Tensor, a_inv: torch.Tensor, b8: torch.Tensor, b_inv: torch.Tensor) -> torch.Tensor:
    """a8 [M, K] @ b8 [N, K].T in bf16 from two rowwise e4m3 operands and their inverse scales [M, 1], [N, 1]:
    the forward product (x and the weight) and the input gradient's (the output gradient and the weight's
    transposed copy)."""
    # _scaled_mm wants its first operand row-major and its second column-major (b8.t() is). Fast accumulation (no
    # periodic fp32 promotion), as torchao does here: faster at GPT-2's shapes, whose contractions (768-3072) are
    # short both ways; the weight gradient, which the optimizer sees directly, keeps its bf16 product, fp32 sums.
    return torch._scaled_mm(a8, b8.t(), scale_a=a_inv, scale_b=b_inv.reshape(1, -1), out_dtype=torch.bfloat16,
                            use_fast_accum=True)


def fp8_forward(x: torch.Tensor, weight: torch.Tensor,
                cached: Fp8Weight | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [M, K] @ weight.T in bf16 from e4m3 operands, and what the input gradient needs of the weight:
    (y, wt8, wt_inv). `cached`: the weight's `fp8_weight` (None: cast it here)."""
    w8, w_inv, wt8, wt_inv = cached if cached is not None else fp8_weight(weight)
    return fp8_product(*to_fp8_rows(x), w8, w_inv), wt8, wt_inv


def weight_grad(grad_out: torch.Tensor, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The gradient (in `dtype`) of the weight that multiplied x [M, K] into an output with gradient grad_out [M, N]:
    one product in grad_out's dtype, as without FP8."""
    return grad_out.t().mm(x.to(grad_out.dtype)).to(dtype)


class _Fp8Matmul(torch.autograd.Function):
    """x [M, K] @ weight [N, K].T in bf16 (the rowwise FP8 kernels' output type). The caller casts the output: an
    earlier form that took the output dtype as an argument and returned `y.to(out_dtype)` (the same tensor, for
    bf16) compiled into a backward that returned zero gradients (torch 2.11): a no-op `.to()` inside an
    autograd.Function's forward returns its input, and Dynamo then routed that output's gradient to the wrong slot
    (pytorch#180642's mechanism). `tests/test_kernels.py` checks compiled against eager."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, w8: torch.Tensor | None, w_inv: torch.Tensor | None,
                wt8: torch.Tensor | None, wt_inv: torch.Tensor | None) -> torch.Tensor:
        y, wt8, wt_inv = fp8_forward(x, weight, None if w8 is None else (w8, w_inv, wt8, wt_inv))
        ctx.save_for_backward(x, wt8, wt_inv)
        ctx.weight_dtype = weight.dtype
        return y

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, wt8, wt_inv = ctx.saved_tensors
        grad_x = fp8_product(*to_fp8_rows(grad_out), wt8, wt_inv).to(x.dtype)
        return grad_x, weight_grad(grad_out, x, ctx.weight_dtype), None, None, None, None


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, cached: Fp8Weight | None = None) -> torch.Tensor:
    """`F.linear(x, weight)` (no bias) with FP8 forward and input-gradient products: x [..., K], weight
    [N, K] -> [..., N] in the autocast dtype under autocast, else in x's dtype. Differentiable in x and
    weight (the weight gradient from a bf16 product). `cached`: `fp8_weight(weight)` of the weight as it is now
    (cast earlier, once for several calls); a stale copy is the caller's bug. Callers check `fp8_fits` on CUDA
    (CPU tensors always work)."""
    device = x.device.type
    out_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
    with torch.autocast(device, enabled=False):
        y = _Fp8Matmul.apply(x.reshape(-1, x.shape[-1]), weight, *(cached or (None,) * 4))
    return y.view(*x.shape[:-1], y.shape[-1]).to(out_dtype)


def fp8_linear_reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """What `fp8_linear` approximates: the exact `F.linear(x, weight)`."""
    return F.linear(x, weight)
