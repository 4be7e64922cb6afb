"""Fused linear + cross-entropy: the mean loss of `hidden @ weight.T` without materialising the [N, V] logits.

Liger-Kernel's chunked approach: per chunk of tokens, cuBLAS computes the logits, one Triton program per
row computes the logsumexp and the loss and overwrites the logits with d loss / d logits, and two more
matmuls turn those into the chunk's hidden gradient and its share of the weight gradient. The gradients
are computed during forward and only scaled by the incoming gradient in backward. Chunks are thousands
of tokens (a fixed logits budget), not Liger's hidden-sized ones: a chunk of a few hundred tokens makes
the weight-gradient product (K = chunk) slow and rewrites the whole [V, D] gradient once per chunk.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from app.kernels.backend import jit, next_power_of_2, num_warps_for, tl, use_triton

_MAX_BLOCK_V = 32768  # vocabulary columns one program holds at a time (Liger-Kernel's limit)
_CHUNK_LOGITS = 1 << 28  # logits elements per chunk (512 MiB in bf16): 4096 tokens of a 50k vocabulary


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
def _ce_rows_kernel(logits_ptr, logits_stride, targets_ptr, loss_ptr, n_valid_ptr, V, ignore_index, softcap,
                    HAS_SOFTCAP: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    logits_ptr += row * logits_stride
    target = tl.load(targets_ptr + row)
    ignored = target == ignore_index
    in_range = (target >= 0) & (target < V)
    # Ignored rows get a zero loss and zero gradient (no branch: one code path for every row).
    scale = tl.where(ignored, 0.0, 1.0 / tl.load(n_valid_ptr))

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

    # Pass 2: overwrite the logits with d loss / d logits = (softmax - onehot) / n_valid.
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


class _FusedLinearCEFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                chunk_size: int, softcap: float | None) -> torch.Tensor:
        N, D = hidden.shape
        V = weight.shape[0]
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        # A device tensor, not a Python int: no host sync in the training step.
        n_valid = (targets != ignore_index).sum().clamp_(min=1).to(torch.float32)
        loss_rows = torch.empty(N, dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros((V, D), dtype=torch.float32, device=weight.device) if need_weight else None
        logits = torch.empty((min(chunk_size, N), V), dtype=hidden.dtype, device=hidden.device)
        block = min(_MAX_BLOCK_V, next_power_of_2(V))
        for start in range(0, N, chunk_size):
            h = hidden[start:start + chunk_size]
            rows = h.shape[0]
            z = logits[:rows]
            torch.mm(h, weight.t(), out=z)
            _ce_rows_kernel[(rows,)](z, z.stride(0), targets[start:start + rows], loss_rows[start:start + rows],
                                     n_valid, V, ignore_index, 0.0 if softcap is None else softcap,
                                     HAS_SOFTCAP=softcap is not None, BLOCK_V=block, num_warps=num_warps_for(block))
            if need_hidden:
                torch.mm(z, weight, out=grad_hidden[start:start + rows])
            if need_weight:
                _add_weight_grad(grad_weight, z, h)
        if need_weight:
            grad_weight = grad_weight.to(weight.dtype)
        ctx.save_for_backward(grad_hidden, grad_weight)
        return loss_rows.sum() / n_valid

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        return _scaled(grad_hidden, grad_output), _scaled(grad_weight, grad_output), None, None, None, None


def _scaled(grad: torch.Tensor | None, grad_output: torch.Tensor) -> torch.Tensor | None:
    # Out of place: a retained graph may run backward again over the same saved gradients.
    return None if grad is None else grad * grad_output.to(grad.dtype)


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
                               softcap: float | None = None) -> torch.Tensor:
    """Mean cross-entropy of `hidden @ weight.T` over targets != ignore_index, as a 0-dim fp32 tensor.

    hidden [N, D] (or [..., D] with targets [...]), weight [V, D], targets [N] integers. With Triton (CUDA, or
    CPU under the interpreter) the logits are computed `chunk_size` tokens at a time (default: Liger's
    heuristic) and never held whole; otherwise `linear_cross_entropy_reference` runs. Differentiable w.r.t.
    hidden and weight; 0 (with zero gradients) when every target is ignored. A target outside [0, V) that is
    not ignore_index raises on the reference path and gives a NaN loss on the Triton path."""
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
    return _fused(hidden.contiguous(), weight, targets.contiguous(), ignore_index, chunk, softcap)


# Run eagerly even inside a compiled model: the chunk loop is a handful of cuBLAS calls and kernel
# launches, nothing for Inductor to fuse; a clean graph break beats tracing `out=` slices per chunk.
@torch.compiler.disable
def _fused(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int, chunk: int,
           softcap: float | None) -> torch.Tensor:
    with torch.autocast(hidden.device.type, enabled=False):
        return _FusedLinearCEFn.apply(hidden, weight, targets, ignore_index, chunk, softcap)
