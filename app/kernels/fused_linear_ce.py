"""Fused linear + cross-entropy: the mean loss of `hidden @ weight.T` without materialising the [N, V] logits.

Liger-Kernel's chunked approach: per chunk of tokens, cuBLAS computes the logits, one Triton program per
row computes the logsumexp and the loss and overwrites the logits with d loss / d logits, and two more
matmuls turn those into the chunk's hidden gradient and its share of the weight gradient. The gradients
(of the summed loss) are computed during forward and only scaled by incoming gradient / tokens in backward.
Chunks are thousands of tokens (a fixed logits budget), not Liger's hidden-sized ones: a chunk of a few
hundred tokens makes the weight-gradient product (K = chunk) slow and rewrites the whole [V, D] gradient
once per chunk.

With `fp8` (modded-nanogpt's FP8 head, forward product only) the logits come from `torch._scaled_mm` over
e4m3 hidden and weight under per-tensor scales; the two gradient products stay bf16, over d loss / d logits
written in place as before. Doing those in FP8 too (e5m2 gradients) measured no faster on an H100: cuBLASLt's
FP8 wants both operands K-major, so the weight-gradient product needs the [chunk, V] gradient transposed, and
writing it transposed (N x V bytes more memory) cost what the faster products saved.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from app.kernels.backend import jit, next_power_of_2, num_warps_for, tl, use_triton
from app.kernels.fp8_linear import E4M3, on_fp8_gpu, to_fp8

_CHUNK_LOGITS = 1 << 28  # logits elements per chunk (512 MiB in bf16): 4096 tokens of a 50k vocabulary
# The FP8 logits product's operands: e4m3 hidden, its inverse scale, e4m3 weight, its inverse scale.
Fp8Operands = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def linear_cross_entropy_reference(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                   ignore_index: int = -1, softcap: float | None = None) -> torch.Tensor:
    """Mean cross-entropy of fp32 logits `hidden @ weight.T` (optionally `softcap * tanh(logits / softcap)`)
    over targets != ignore_index; 0 when every target is ignored."""
    logits = (hidden @ weight.T).float()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    total = F.cross_entropy(logits, targets.long(), ignore_index=ignore_index, reduction="sum")
    return total / (targets != ignore_index).sum().clamp(min=1)


def default_chunk_size(n_tokens: int, vocab: int) -> int:
    """Tokens per chunk: all of them, or the largest power of two whose logits fit `_CHUNK_LOGITS` elements."""
    fit = max(1, _CHUNK_LOGITS // vocab)
    return n_tokens if n_tokens <= fit else 1 << (fit.bit_length() - 1)


@jit
def _softcap(z, softcap, HAS_SOFTCAP: tl.constexpr):
    if HAS_SOFTCAP:
        z = softcap * (2.0 * tl.sigmoid(2.0 * z / softcap) - 1.0)  # softcap * tanh(z / softcap)
    return z


@jit
def _ce_rows_kernel(logits_ptr, logits_stride, targets_ptr, loss_ptr, V, ignore_index, softcap,
                    HAS_SOFTCAP: tl.constexpr, BLOCK_V: tl.constexpr):
    """One row per program: its loss, and d (sum of losses) / d logits written over the logits."""
    row = tl.program_id(0).to(tl.int64)
    logits_ptr += row * logits_stride
    target = tl.load(targets_ptr + row)
    ignored = target == ignore_index
    in_range = (target >= 0) & (target < V)

    # Pass 1: running max and sum of exponentials over the row (online softmax, fp32).
    m = float("-inf")
    d = 0.0
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < V
        z = _softcap(tl.load(logits_ptr + cols, mask=mask, other=0.0).to(tl.float32), softcap, HAS_SOFTCAP)
        z = tl.where(mask, z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=0))
        d = d * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        m = m_new
    lse = m + tl.log(d)
    z_target = _softcap(tl.load(logits_ptr + target, mask=in_range, other=0.0).to(tl.float32), softcap, HAS_SOFTCAP)
    # An out-of-range target makes the loss NaN: visible, and checking it on the host would cost a sync.
    loss = tl.where(in_range, lse - z_target, float("nan"))
    tl.store(loss_ptr + row, tl.where(ignored, 0.0, loss))

    # Pass 2: overwrite the logits with d loss / d logits = softmax - onehot (0 for an ignored row).
    scale = tl.where(ignored, 0.0, 1.0)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < V
        z = _softcap(tl.load(logits_ptr + cols, mask=mask, other=0.0).to(tl.float32), softcap, HAS_SOFTCAP)
        grad = (tl.exp(z - lse) - tl.where(cols == target, 1.0, 0.0)) * scale
        if HAS_SOFTCAP:
            capped = z / softcap
            grad = grad * (1.0 - capped * capped)  # d tanh = 1 - tanh^2
        tl.store(logits_ptr + cols, grad.to(logits_ptr.dtype.element_ty), mask=mask)


def _add_weight_grad(grad_weight: torch.Tensor, dlogits: torch.Tensor, hidden: torch.Tensor) -> None:
    """grad_weight (fp32) += dlogits.T @ hidden."""
    if hidden.dtype == grad_weight.dtype:
        grad_weight.addmm_(dlogits.t(), hidden)
    elif grad_weight.is_cuda:  # bf16/fp16 on CUDA: cuBLAS accumulates the product into the fp32 sum itself
        torch.addmm(grad_weight, dlogits.t(), hidden, out_dtype=grad_weight.dtype, out=grad_weight)
    else:  # bf16/fp16 elsewhere: each chunk's product is rounded once, the running sum stays in fp32
        grad_weight.add_(dlogits.t() @ hidden)


def _row_block(V: int) -> int:
    """Vocabulary columns a row program holds at a time. H100, 4096-row bf16 chunks: 8192 (16 warps) beats
    Liger-Kernel's 32768 (32 warps) up to 64K columns (V = 50304: 0.41 vs 0.46 ms in the GPT-2 training step's
    profile; V = 32000: 0.24 vs 0.27 ms), 32768 wins above (V = 128256: 1.01 vs 1.10 ms)."""
    return min(8192 if V <= 65536 else 32768, next_power_of_2(V))


def _ce_rows(z: torch.Tensor, targets: torch.Tensor, loss_rows: torch.Tensor, ignore_index: int,
             softcap: float | None) -> None:
    """The losses of the logits z [rows, V] into loss_rows, and d (sum of losses) / d z over z in place."""
    rows, V = z.shape
    block = _row_block(V)
    cap = 0.0 if softcap is None else softcap
    _ce_rows_kernel[(rows,)](z, z.stride(0), targets, loss_rows, V, ignore_index, cap, HAS_SOFTCAP=softcap is not None,
                             BLOCK_V=block, num_warps=num_warps_for(block))


def _chunks(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, loss_rows: torch.Tensor,
            ignore_index: int, chunk: int, softcap: float | None, need_hidden: bool, need_weight: bool,
            fp8: Fp8Operands | None):
    """(d sum / d hidden, d sum / d weight in fp32) of the summed loss, the loss rows written to loss_rows.
    `fp8`: the logits from these e4m3 copies of hidden and weight instead, the rest in bf16."""
    N, D = hidden.shape
    grad_hidden = torch.empty_like(hidden) if need_hidden else None
    grad_weight = torch.zeros((weight.shape[0], D), dtype=torch.float32, device=weight.device) if need_weight else None
    logits = torch.empty((min(chunk, N), weight.shape[0]), dtype=hidden.dtype, device=hidden.device)
    for start in range(0, N, chunk):
        h = hidden[start:start + chunk]
        z = logits[:h.shape[0]]
        if fp8:
            h8, h_inv, w8, w_inv = fp8
            torch._scaled_mm(h8[start:start + chunk], w8.t(), scale_a=h_inv, scale_b=w_inv, out_dtype=z.dtype,
                             use_fast_accum=True, out=z)
        else:
            torch.mm(h, weight.t(), out=z)
        _ce_rows(z, targets[start:start + chunk], loss_rows[start:start + chunk], ignore_index, softcap)
        if need_hidden:
            torch.mm(z, weight, out=grad_hidden[start:start + chunk])
        if need_weight:
            _add_weight_grad(grad_weight, z, h)
    return grad_hidden, grad_weight


class _FusedLinearCEFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                chunk_size: int, softcap: float | None, fp8: Fp8Operands | None) -> torch.Tensor:
        # Device tensors, not Python ints: no host sync in the training step.
        n_valid = (targets != ignore_index).sum().clamp_(min=1).to(torch.float32)
        loss_rows = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        grad_hidden, grad_weight = _chunks(hidden, weight, targets, loss_rows, ignore_index, chunk_size, softcap,
                                           ctx.needs_input_grad[0], ctx.needs_input_grad[1], fp8)
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        ctx.save_for_backward(grad_hidden, grad_weight, n_valid)
        return loss_rows.sum() / n_valid

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad_hidden, grad_weight, n_valid = ctx.saved_tensors
        scale = grad_output / n_valid  # the saved gradients are of the summed loss
        return _scaled(grad_hidden, scale), _scaled(grad_weight, scale), None, None, None, None, None


def _scaled(grad: torch.Tensor | None, scale: torch.Tensor) -> torch.Tensor | None:
    # Out of place: a retained graph may run backward again over the same saved gradients.
    return None if grad is None else grad * scale.to(grad.dtype)


def _check_inputs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                  chunk_size: int | None, softcap: float | None) -> None:
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"fused_linear_cross_entropy: hidden {tuple(hidden.shape)} and weight "
                         f"{tuple(weight.shape)} must be [N, D] and [V, D]")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"fused_linear_cross_entropy: targets {tuple(targets.shape)} must be [N] = [{hidden.shape[0]}]")
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise ValueError(f"fused_linear_cross_entropy: targets must be integers, got {targets.dtype}")
    if not hidden.device == weight.device == targets.device:
        raise ValueError(f"fused_linear_cross_entropy: hidden, weight and targets are on {hidden.device}, "
                         f"{weight.device} and {targets.device}; they must share one device")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"fused_linear_cross_entropy: hidden is {hidden.dtype} but weight is {weight.dtype} "
                         "(cast one, or call under torch.autocast)")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"fused_linear_cross_entropy: chunk_size must be >= 1, got {chunk_size}")
    if softcap is not None and softcap <= 0:
        raise ValueError(f"fused_linear_cross_entropy: softcap must be > 0, got {softcap}")


def _autocast(hidden: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Under torch.autocast, run the matmuls in the autocast dtype, as an nn.Linear would."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        return hidden.to(dtype), weight.to(dtype)
    return hidden, weight


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                               ignore_index: int = -1, chunk_size: int | None = None,
                               softcap: float | None = None, fp8: bool = False) -> torch.Tensor:
    """Mean cross-entropy of `hidden @ weight.T` over targets != ignore_index, as a 0-dim fp32 tensor.

    hidden [N, D] (or [..., D] with targets [...]), weight [V, D], targets [N] integers. With Triton (CUDA, or
    CPU under the interpreter) the logits are computed `chunk_size` tokens at a time (default: Liger's
    heuristic) and never held whole; otherwise `linear_cross_entropy_reference` runs. Differentiable w.r.t.
    hidden and weight; 0 (with zero gradients) when every target is ignored. A target outside [0, V) that is
    not ignore_index raises on the reference path and gives a NaN loss on the Triton path. `fp8`: the Triton
    path's logits product in FP8 where it can run (`fp8_head_fits`), with e4m3's precision (the gradients
    follow those logits: a few percent of relative error per element)."""
    if hidden.dim() > 2:
        if targets.shape != hidden.shape[:-1]:
            raise ValueError(f"fused_linear_cross_entropy: targets {tuple(targets.shape)} must be hidden "
                             f"{tuple(hidden.shape)} without its last dim")
        hidden, targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    hidden, weight = _autocast(hidden, weight)
    _check_inputs(hidden, weight, targets, chunk_size, softcap)
    if not use_triton(hidden, weight, targets):
        return linear_cross_entropy_reference(hidden, weight, targets, ignore_index, softcap)
    chunk = chunk_size or default_chunk_size(hidden.shape[0], weight.shape[0])
    hidden = hidden.contiguous()
    # Cast here, not in `_fused`: under torch.compile Inductor fuses each amax and cast (the weight's straight
    # from the parameter), where eager casts took ~0.5 ms per call at GPT-2's 50k x 768 head.
    operands = None
    if fp8 and fp8_head_fits(hidden, weight):
        with torch.no_grad():
            operands = (*to_fp8(hidden, E4M3), *to_fp8(weight, E4M3))
    return _fused(hidden, weight, targets.contiguous(), ignore_index, chunk, softcap, operands)


def fp8_head_fits(hidden: torch.Tensor, weight: torch.Tensor) -> bool:
    """True when the FP8 logits product can run: D and V multiples of 16 (cuBLASLt's rule for K and N) and FP8
    tensor cores on CUDA (sm89+); on CPU (Triton's interpreter, tests) `torch._scaled_mm` has a kernel."""
    if hidden.shape[1] % 16 or weight.shape[0] % 16:
        return False
    return not hidden.is_cuda or on_fp8_gpu(hidden)


# Run eagerly even inside a compiled model: the chunk loop is a handful of cuBLAS calls and kernel
# launches, nothing for Inductor to fuse; a clean graph break beats tracing `out=` slices per chunk.
@torch.compiler.disable
def _fused(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int, chunk: int,
           softcap: float | None, fp8: Fp8Operands | None) -> torch.Tensor:
    with torch.autocast(hidden.device.type, enabled=False):
        return _FusedLinearCEFn.apply(hidden, weight, targets, ignore_index, chunk, softcap, fp8)
