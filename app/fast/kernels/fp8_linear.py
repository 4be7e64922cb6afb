"""FP8 matmuls for training: `x @ weight.T` with the forward and input-gradient products in float8.

The recipe is torchao's "rowwise with high-precision weight gradient": every operand is cast to e4m3 with
one power-of-two scale per row of the contraction (per token for x and the output gradient, per output
channel for the weight in the forward, per input channel in the backward), so one outlier token or
channel costs precision only in its own row, and the scaling itself is exact. Both FP8 products run
through `torch._scaled_mm` (CUTLASS/cuBLASLt on sm89+ CUDA; PyTorch's CPU kernel elsewhere, which tests
use). The weight-gradient product stays in the compute dtype: in FP8 it would need transposed copies of
x and the output gradient with per-column scales, which cost about what the faster product saves at
GPT-2 widths (measured with torchao's tensorwise recipe: 0.87-0.93x), and it is the product whose
precision the optimizer sees directly. Under torch.compile each row's amax and cast is fused into the
kernel that produces the row (a norm, an activation, a gradient); in one pass for rows up to 1024 wide,
and up to 8192 under `kernels=rows` (`wide_rows`), which the MLP's hidden rows need. A weight's two
e4m3 copies (`fp8_weight`) can be cast once per optimizer step and passed in (`cached`): the weights do not
change between the micro-batches of a step, and casting each weight twice per micro-batch cost a 124M step
~800 small kernels.
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
    multiples of 16 (cuBLASLt's rule for inner dimensions; tokens too, as the shape checked on the H100)."""
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


def fp8_weight(weight: torch.Tensor | Sequence[torch.Tensor]) -> Fp8Weight:
    """The e4m3 copies of `weight` [N, K] that `fp8_linear` casts when it is not given them; of a sequence of
    weights [N_i, K], the copies of their concatenation [sum N_i, K]."""
    with torch.no_grad():
        w = weight if isinstance(weight, torch.Tensor) else weight[0] if len(weight) == 1 else torch.cat(list(weight))
        return (*to_fp8_rows(w), *to_fp8_rows(w.t().contiguous()))


def fp8_weights(weights: Sequence[torch.Tensor | Sequence[torch.Tensor]]) -> list[Fp8Weight]:
    """`fp8_weight` of each of `weights` (one function to compile: Inductor fuses each weight's casts)."""
    return [fp8_weight(w) for w in weights]


def fp8_product(a8: torch.Tensor, a_inv: torch.Tensor, b8: torch.Tensor, b_inv: torch.Tensor) -> torch.Tensor:
    """a8 [M, K] @ b8 [N, K].T in bf16 from two rowwise e4m3 operands and their inverse scales [M, 1], [N, 1]:
    the forward product (x and the weight) and the input gradient's (the output gradient and the weight's
    transposed copy)."""
    # _scaled_mm wants its first operand row-major and its second column-major (b8.t() is). Fast accumulation (no
    # periodic fp32 promotion), as torchao does here: 10-15% faster at GPT-2's shapes on an H200 (qkv 891 -> 1013
    # TFLOP/s, MLP up 899 -> 1037); the input gradient's contractions are as short (768-3072), and the weight
    # gradient, which the optimizer sees directly, keeps its bf16 product with fp32 sums.
    return torch._scaled_mm(a8, b8.t(), scale_a=a_inv, scale_b=b_inv.reshape(1, -1), out_dtype=torch.bfloat16,
                            use_fast_accum=True)


def fp8_forward(x: torch.Tensor, weights: Sequence[torch.Tensor],
                cached: Fp8Weight | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [M, K] @ cat(weights).T in bf16 from e4m3 operands, and what `fp8_backward` needs of the weight:
    (y, wt8, wt_inv). `cached`: the weights' `fp8_weight` (None: cast them here)."""
    w8, w_inv, wt8, wt_inv = cached if cached is not None else fp8_weight(weights)
    return fp8_product(*to_fp8_rows(x), w8, w_inv), wt8, wt_inv


def fp8_backward(x: torch.Tensor, wt8: torch.Tensor, wt_inv: torch.Tensor, grad_out: torch.Tensor,
                 g8: torch.Tensor, g_inv: torch.Tensor, weights: Sequence[tuple[int, torch.dtype]]):
    """The gradients of `fp8_forward`'s product given its output gradient grad_out [M, N] and that gradient's
    rowwise e4m3 cast (g8, g_inv): x's (in x's dtype) from an e4m3 product, and one per weight (`weights`:
    each one's (rows, dtype)) from one product in grad_out's dtype, as without FP8."""
    return fp8_product(g8, g_inv, wt8, wt_inv).to(x.dtype), weight_grads(grad_out, x, weights)


def weight_grads(grad_out: torch.Tensor, x: torch.Tensor, weights: Sequence[tuple[int, torch.dtype]]):
    """The gradients of the weights (`weights`: each one's (rows, dtype)) whose concatenation multiplied x [M, K]
    into an output with gradient grad_out [M, N]: one product in grad_out's dtype, split by rows."""
    grad_w = grad_out.t().mm(x.to(grad_out.dtype))
    grads_w = grad_w.split([n for n, _ in weights])  # rows of one product: contiguous views
    return [g.to(dtype) for g, (_, dtype) in zip(grads_w, weights)]


class _Fp8Matmul(torch.autograd.Function):
    """x [M, K] @ cat(weights) [N, K].T in bf16 (the rowwise FP8 kernels' output type), for one weight or
    several that share the input (q/k/v): one product each way, one scale per row across all of them. The
    caller casts the output: an earlier form that took the output dtype as an argument and returned
    `y.to(out_dtype)` (the same tensor, for bf16) compiled into a backward that returned zero gradients on an
    H100 (torch 2.11); most likely the no-op `.to()`, the mechanism isolated later in `fp8_qkv_rotary` (see
    `fp8_qkv.rotary_fp32`). `tests/test_kernels.py` checks compiled against eager."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w8: torch.Tensor | None, w_inv: torch.Tensor | None,
                wt8: torch.Tensor | None, wt_inv: torch.Tensor | None, *weights: torch.Tensor) -> torch.Tensor:
        y, wt8, wt_inv = fp8_forward(x, weights, None if w8 is None else (w8, w_inv, wt8, wt_inv))
        ctx.save_for_backward(x, wt8, wt_inv)
        ctx.weights = [(w.shape[0], w.dtype) for w in weights]
        return y

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, wt8, wt_inv = ctx.saved_tensors
        grad_x, grads_w = fp8_backward(x, wt8, wt_inv, grad_out, *to_fp8_rows(grad_out), ctx.weights)
        return grad_x, None, None, None, None, *grads_w


def fp8_linear(x: torch.Tensor, weight: torch.Tensor | Sequence[torch.Tensor],
               cached: Fp8Weight | None = None) -> torch.Tensor:
    """`F.linear(x, weight)` (no bias) with FP8 forward and input-gradient products: x [..., K], weight
    [N, K] -> [..., N] in the autocast dtype under autocast, else in x's dtype. Differentiable in x and
    weight (the weight gradient from a bf16 product). A sequence of weights [N_i, K] acts as their
    concatenation (one product each way; split the output yourself) and gets one gradient each. `cached`:
    `fp8_weight(weight)` of the weight as it is now (cast earlier, once for several calls); a stale copy is
    the caller's bug. Callers check `fp8_fits` on CUDA (CPU tensors always work)."""
    weights = (weight,) if isinstance(weight, torch.Tensor) else tuple(weight)
    device = x.device.type
    out_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
    with torch.autocast(device, enabled=False):
        y = _Fp8Matmul.apply(x.reshape(-1, x.shape[-1]), *(cached or (None,) * 4), *weights)
    return y.view(*x.shape[:-1], y.shape[-1]).to(out_dtype)


def fp8_linear_reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """What `fp8_linear` approximates: the exact `F.linear(x, weight)`."""
    return F.linear(x, weight)
