"""Fused linear + cross-entropy: the mean loss of `hidden @ weight.T` without materialising the [N, V] logits.

Liger-Kernel's chunked approach: per chunk of tokens, cuBLAS computes the logits, one Triton program per
row computes the logsumexp and the loss and overwrites the logits with d loss / d logits, and two more
matmuls turn those into the chunk's hidden gradient and its share of the weight gradient. The gradients
(of the summed loss) are computed during forward and only scaled by incoming gradient / tokens in backward.
Chunks are thousands of tokens (a fixed logits budget), not Liger's hidden-sized ones: a chunk of a few
hundred tokens makes the weight-gradient product (K = chunk) slow and rewrites the whole [V, D] gradient
once per chunk.

With `fp8` (modded-nanogpt's FP8 head) the three products run in FP8 through `torch._scaled_mm`: hidden and
weight in e4m3 under per-tensor scales, d loss / d logits in e5m2 under a fixed scale (its entries lie in
(-1, 1)). The row kernel then only finds each row's logsumexp, and a kernel over tiles of rows writes the
e5m2 gradient both ways: [chunk, V] for the hidden gradient and transposed into [V, N] for the whole call, so
that the weight gradient is one FP8 product over every token (cuBLASLt's FP8 wants both operands K-major).
That costs N x V bytes more memory than the bf16 path.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from app.kernels.backend import jit, next_power_of_2, num_warps_for, tl, triton, use_triton
from app.kernels.fp8_linear import E4M3, E5M2, on_fp8_gpu, to_fp8

_MAX_BLOCK_V = 32768  # vocabulary columns one program holds at a time (Liger-Kernel's limit)
_CHUNK_LOGITS = 1 << 28  # logits elements per chunk (512 MiB in bf16): 4096 tokens of a 50k vocabulary
_FP8_GRAD_SCALE = 2.0 ** 15  # d loss / d logits (before 1 / n_valid) lies in (-1, 1); e5m2's max is 57344
_FP8_BLOCK_M, _FP8_BLOCK_V, _FP8_WARPS = 32, 512, 16  # FP8 gradient tiles (32 rows: a 32-byte sector transposed)


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
def _dlogits(z, lse, is_target, scale, softcap, HAS_SOFTCAP: tl.constexpr):
    """scale * d loss / d logits at the (softcapped) logits z: softmax - onehot, times d tanh when capped."""
    grad = (tl.exp(z - lse) - tl.where(is_target, 1.0, 0.0)) * scale
    if HAS_SOFTCAP:
        capped = z / softcap
        grad = grad * (1.0 - capped * capped)  # d tanh = 1 - tanh^2
    return grad


@jit
def _round_to_e5m2(x):
    # x rounded to e5m2's 2 mantissa bits (ties to even) while still fp32, so that the cast after it is exact:
    # Triton 3.9's interpreter loses the carry when its own cast rounds up into the next power of two.
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0xFFFFF + ((bits >> 21) & 1)) & 0xFFE00000
    return bits.to(tl.float32, bitcast=True)


@jit
def _ce_rows_kernel(logits_ptr, logits_stride, targets_ptr, loss_ptr, lse_ptr, V, ignore_index, softcap,
                    HAS_SOFTCAP: tl.constexpr, IN_PLACE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr):
    """One row per program: its loss, and either d (sum of losses) / d logits over the logits (IN_PLACE_GRAD)
    or its logsumexp to lse_ptr (for `_ce_grad_fp8_kernel`)."""
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
    if not IN_PLACE_GRAD:
        tl.store(lse_ptr + row, lse)
        return

    # Pass 2: overwrite the logits with d loss / d logits = softmax - onehot (0 for an ignored row).
    scale = tl.where(ignored, 0.0, 1.0)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < V
        z = _softcap(tl.load(logits_ptr + cols, mask=mask, other=0.0).to(tl.float32), softcap, HAS_SOFTCAP)
        grad = _dlogits(z, lse, cols == target, scale, softcap, HAS_SOFTCAP)
        tl.store(logits_ptr + cols, grad.to(logits_ptr.dtype.element_ty), mask=mask)


@jit
def _ce_grad_fp8_kernel(logits_ptr, logits_stride, lse_ptr, targets_ptr, grad_ptr, grad_stride, grad_t_ptr,
                        grad_t_stride, n_rows, V, ignore_index, softcap, grad_scale, HAS_SOFTCAP: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr):
    """BLOCK_M rows per program: grad_scale * (softmax - onehot) in e5m2, to grad [rows, V] and transposed to
    grad_t [V, rows] (a separate kernel from the logsumexp pass: fused into one, Triton 3.6 on an H100 left some
    transposed elements unwritten)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    target = tl.load(targets_ptr + rows, mask=row_ok, other=ignore_index)
    scale = tl.where(target == ignore_index, 0.0, grad_scale)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = row_ok[:, None] & (cols[None, :] < V)
        z = tl.load(logits_ptr + rows.to(tl.int64)[:, None] * logits_stride + cols[None, :], mask=mask, other=0.0)
        z = _softcap(z.to(tl.float32), softcap, HAS_SOFTCAP)
        grad = _dlogits(z, lse[:, None], cols[None, :] == target[:, None], scale[:, None], softcap, HAS_SOFTCAP)
        grad = _round_to_e5m2(grad).to(grad_ptr.dtype.element_ty)
        tl.store(grad_ptr + rows.to(tl.int64)[:, None] * grad_stride + cols[None, :], grad, mask=mask)
        tl.store(grad_t_ptr + cols.to(tl.int64)[:, None] * grad_t_stride + rows[None, :], tl.trans(grad),
                 mask=(cols[:, None] < V) & row_ok[None, :])


def _add_weight_grad(grad_weight: torch.Tensor, dlogits: torch.Tensor, hidden: torch.Tensor) -> None:
    """grad_weight (fp32) += dlogits.T @ hidden."""
    if hidden.dtype == grad_weight.dtype:
        grad_weight.addmm_(dlogits.t(), hidden)
    elif grad_weight.is_cuda:  # bf16/fp16 on CUDA: cuBLAS accumulates the product into the fp32 sum itself
        torch.addmm(grad_weight, dlogits.t(), hidden, out_dtype=grad_weight.dtype, out=grad_weight)
    else:  # bf16/fp16 elsewhere: each chunk's product is rounded once, the running sum stays in fp32
        grad_weight.add_(dlogits.t() @ hidden)


def _ce_rows(z: torch.Tensor, targets: torch.Tensor, loss_rows: torch.Tensor, ignore_index: int,
             softcap: float | None, fp8_grads: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
    """The losses of the logits z [rows, V] into loss_rows, and d (sum of losses) / d z: over z in place, or with
    `fp8_grads` = (grad [rows, V], grad_t [V, rows]) in e5m2 times _FP8_GRAD_SCALE (z is left as it was)."""
    rows, V = z.shape
    block = min(_MAX_BLOCK_V, next_power_of_2(V))
    lse = torch.empty_like(loss_rows) if fp8_grads else loss_rows  # (unused when the gradient goes in place)
    cap = 0.0 if softcap is None else softcap
    _ce_rows_kernel[(rows,)](z, z.stride(0), targets, loss_rows, lse, V, ignore_index, cap,
                             HAS_SOFTCAP=softcap is not None, IN_PLACE_GRAD=fp8_grads is None, BLOCK_V=block,
                             num_warps=num_warps_for(block))
    if fp8_grads:
        grad, grad_t = fp8_grads
        _ce_grad_fp8_kernel[(triton.cdiv(rows, _FP8_BLOCK_M),)](
            z, z.stride(0), lse, targets, grad, grad.stride(0), grad_t, grad_t.stride(0), rows, V, ignore_index, cap,
            _FP8_GRAD_SCALE, HAS_SOFTCAP=softcap is not None, BLOCK_M=_FP8_BLOCK_M, BLOCK_V=_FP8_BLOCK_V,
            num_warps=_FP8_WARPS)


def _chunks_bf16(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, loss_rows: torch.Tensor,
                 ignore_index: int, chunk: int, softcap: float | None, need_hidden: bool, need_weight: bool):
    """(d sum / d hidden, d sum / d weight in fp32) of the summed loss, the loss rows written to loss_rows."""
    N, D = hidden.shape
    grad_hidden = torch.empty_like(hidden) if need_hidden else None
    grad_weight = torch.zeros((weight.shape[0], D), dtype=torch.float32, device=weight.device) if need_weight else None
    logits = torch.empty((min(chunk, N), weight.shape[0]), dtype=hidden.dtype, device=hidden.device)
    for start in range(0, N, chunk):
        h = hidden[start:start + chunk]
        z = logits[:h.shape[0]]
        torch.mm(h, weight.t(), out=z)
        _ce_rows(z, targets[start:start + chunk], loss_rows[start:start + chunk], ignore_index, softcap)
        if need_hidden:
            torch.mm(z, weight, out=grad_hidden[start:start + chunk])
        if need_weight:
            _add_weight_grad(grad_weight, z, h)
    return grad_hidden, grad_weight


def _chunks_fp8(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, loss_rows: torch.Tensor,
                ignore_index: int, chunk: int, softcap: float | None, need_hidden: bool, need_weight: bool):
    """`_chunks_bf16` with FP8 products: the logits from e4m3 operands, the gradient products from the e5m2
    d loss / d logits; the weight gradient as one product over all N tokens (N x V bytes held for it)."""
    N, D = hidden.shape
    V = weight.shape[0]
    h8, h_inv = to_fp8(hidden, E4M3)
    w8, w_inv = to_fp8(weight, E4M3)
    wt8 = w8.t().contiguous()  # [D, V]: the hidden-gradient product's K-major operand
    g_inv = torch.full((), 1.0 / _FP8_GRAD_SCALE, device=hidden.device)
    grad_hidden = torch.empty_like(hidden) if need_hidden else None
    grad_t = torch.empty((V, N), dtype=E5M2, device=hidden.device)
    logits = torch.empty((min(chunk, N), V), dtype=hidden.dtype, device=hidden.device)
    grad = torch.empty((min(chunk, N), V), dtype=E5M2, device=hidden.device)
    for start in range(0, N, chunk):
        rows = min(chunk, N - start)
        z, g = logits[:rows], grad[:rows]
        torch._scaled_mm(h8[start:start + rows], w8.t(), scale_a=h_inv, scale_b=w_inv, out_dtype=z.dtype,
                         use_fast_accum=True, out=z)
        _ce_rows(z, targets[start:start + rows], loss_rows[start:start + rows], ignore_index, softcap,
                 (g, grad_t[:, start:start + rows]))
        if need_hidden:
            torch._scaled_mm(g, wt8.t(), scale_a=g_inv, scale_b=w_inv, out_dtype=hidden.dtype,
                             out=grad_hidden[start:start + rows])
    del logits, grad
    grad_weight = None
    if need_weight:
        grad_weight = torch._scaled_mm(grad_t, h8.t().contiguous().t(), scale_a=g_inv, scale_b=h_inv,
                                       out_dtype=torch.float32)
    return grad_hidden, grad_weight


class _FusedLinearCEFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                chunk_size: int, softcap: float | None, fp8: bool) -> torch.Tensor:
        # Device tensors, not Python ints: no host sync in the training step.
        n_valid = (targets != ignore_index).sum().clamp_(min=1).to(torch.float32)
        loss_rows = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        chunks = _chunks_fp8 if fp8 else _chunks_bf16
        grad_hidden, grad_weight = chunks(hidden, weight, targets, loss_rows, ignore_index, chunk_size, softcap,
                                          ctx.needs_input_grad[0], ctx.needs_input_grad[1])
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
    path's products in FP8 where they can run (`fp8_head_fits`), with FP8's precision (e4m3 logits, e5m2
    gradients: a few percent of relative error per element)."""
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
    fp8 = fp8 and fp8_head_fits(hidden, weight)
    return _fused(hidden.contiguous(), weight, targets.contiguous(), ignore_index, chunk, softcap, fp8)


def fp8_head_fits(hidden: torch.Tensor, weight: torch.Tensor) -> bool:
    """True when the FP8 path can run: D and V multiples of 16 (cuBLASLt's rule for K and N) and FP8 tensor
    cores on CUDA (sm89+); on CPU (Triton's interpreter, tests) `torch._scaled_mm` has a kernel."""
    if hidden.shape[1] % 16 or weight.shape[0] % 16:
        return False
    return not hidden.is_cuda or on_fp8_gpu(hidden)


# Run eagerly even inside a compiled model: the chunk loop is a handful of cuBLAS calls and kernel
# launches, nothing for Inductor to fuse; a clean graph break beats tracing `out=` slices per chunk.
@torch.compiler.disable
def _fused(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int, chunk: int,
           softcap: float | None, fp8: bool) -> torch.Tensor:
    with torch.autocast(hidden.device.type, enabled=False):
        return _FusedLinearCEFn.apply(hidden, weight, targets, ignore_index, chunk, softcap, fp8)
