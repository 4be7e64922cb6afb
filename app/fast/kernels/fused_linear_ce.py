"""Fused linear + cross-entropy: the mean loss of `hidden @ weight.T` without materialising the [N, V] logits.

Liger-Kernel's chunked approach: per chunk of tokens, cuBLAS computes the logits, one Triton program per
row computes the logsumexp and the loss and overwrites the logits with d loss / d logits, and two more
matmuls turn those into the chunk's hidden gradient and its share of the weight gradient. The gradients
(of the summed loss) are computed during forward and only scaled by incoming gradient / tokens in backward.
Chunks are thousands of tokens (a fixed logits budget), not Liger's hidden-sized ones: a chunk of a few
hundred tokens makes the weight-gradient product (K = chunk) slow and rewrites the whole [V, D] gradient
once per chunk.

With `fp8` (modded-nanogpt's FP8 head) all three products run in FP8: the logits from e4m3 hidden and weight
under per-tensor scales, and both gradient products from d loss / d logits in e5m2. Those gradients lie in
[-1, 1], so one fixed scale (`_GRAD_SCALE`) fits them without an amax pass; a tiled kernel writes them twice,
as [chunk, V] for the hidden gradient and transposed into [V, tokens] for the weight gradient (cuBLASLt's FP8
wants both operands K-major), one byte each where the bf16 path writes two bytes once. The transposed copy
holds up to `_FP8_WGRAD_TOKENS` tokens (V bytes each), so one weight-gradient product covers a GPT-2
micro-batch instead of one per chunk.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from app.fast.kernels.backend import jit, next_power_of_2, num_warps_for, tl, triton, use_triton
from app.fast.kernels.fp8_linear import E4M3, on_fp8_gpu, to_fp8

E5M2 = torch.float8_e5m2

# logits elements per chunk (1 GiB in bf16): 8192 tokens of a 50k vocabulary; larger chunks ran the FP8 head faster
# (the logsumexp pass gains most) for a little more memory
_CHUNK_LOGITS = 1 << 29
# d loss / d logits is in [-1, 1]: times 2^15 it stays under e5m2's max (57344) and keeps values down to 2^-31
_GRAD_SCALE = 2.0 ** 15
_FP8_WGRAD_TOKENS = 1 << 14  # tokens per FP8 weight-gradient product (its transposed e5m2 input: V bytes each)
# The FP8 products' operands: e4m3 hidden [N, D], its inverse scale, e4m3 weight [V, D], its inverse scale, and the
# two e4m3 copies transposed ([D, N], [D, V]) that the gradient products take K-major.
Fp8Operands = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


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
    """d loss / d raw logits times `scale`, from the (softcapped) logits z, their row's logsumexp and the one-hot
    target mask: (softmax - onehot), times d tanh = 1 - tanh^2 under the softcap."""
    grad = (tl.exp(z - lse) - tl.where(is_target, 1.0, 0.0)) * scale
    if HAS_SOFTCAP:
        capped = z / softcap
        grad = grad * (1.0 - capped * capped)
    return grad


@jit
def _ce_rows_kernel(logits_ptr, logits_stride, targets_ptr, loss_ptr, lse_ptr, V, ignore_index, softcap,
                    HAS_SOFTCAP: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr):
    """One row per program: its loss, and d (sum of losses) / d logits written over the logits (WRITE_GRAD),
    else the row's logsumexp into lse."""
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
    if not WRITE_GRAD:
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
def _e5m2_bits(x):
    """x (fp32, |x| < 57344) rounded to float8 e5m2, as its byte. e5m2 is fp16's top byte: round to fp16, then
    drop the low byte rounding to nearest, ties to even. Integer arithmetic, because Triton's interpreter rounds
    fp32 -> e5m2 wrongly where the rounding carries into the exponent (7.9 -> 4.0). Rounding twice (fp16 first)
    differs from one direct rounding in rare ties: the GPU's hardware cast gave some other bytes (and was no
    faster over the tile shapes tried)."""
    bits = x.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    return ((bits + 0x7F + ((bits >> 8) & 1)) >> 8).to(tl.uint8)


@jit
def _ce_grad_e5m2_kernel(z_ptr, z_stride, targets_ptr, lse_ptr, g_ptr, gt_ptr, gt_stride, rows, V, ignore_index,
                         softcap, scale, HAS_SOFTCAP: tl.constexpr, WRITE_T: tl.constexpr,
                         BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr):
    """One [BLOCK_R, BLOCK_V] tile of d (sum of losses) / d logits times `scale`, as e5m2 bytes into g [rows, V]
    and (WRITE_T) transposed into gt [V, >= rows] (row stride gt_stride)."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    in_rows = r < rows
    mask = in_rows[:, None] & (c < V)[None, :]
    z = tl.load(z_ptr + r.to(tl.int64)[:, None] * z_stride + c[None, :], mask=mask, other=0.0).to(tl.float32)
    z = _softcap(z, softcap, HAS_SOFTCAP)
    target = tl.load(targets_ptr + r, mask=in_rows, other=ignore_index)
    lse = tl.load(lse_ptr + r, mask=in_rows, other=0.0)
    row_scale = tl.where(target == ignore_index, 0.0, scale)
    grad = _dlogits(z, lse[:, None], c[None, :] == target[:, None], row_scale[:, None], softcap, HAS_SOFTCAP)
    byte = _e5m2_bits(grad)
    tl.store(g_ptr + r.to(tl.int64)[:, None] * V + c[None, :], byte, mask=mask)
    if WRITE_T:  # Triton gives each store its own coalesced layout: this one runs along the rows
        tl.store(gt_ptr + c.to(tl.int64)[None, :] * gt_stride + r[:, None], byte, mask=mask)


def _add_weight_grad(grad_weight: torch.Tensor, dlogits: torch.Tensor, hidden: torch.Tensor) -> None:
    """grad_weight (fp32) += dlogits.T @ hidden."""
    if hidden.dtype == grad_weight.dtype:
        grad_weight.addmm_(dlogits.t(), hidden)
    elif grad_weight.is_cuda:  # bf16/fp16 on CUDA: cuBLAS accumulates the product into the fp32 sum itself
        torch.addmm(grad_weight, dlogits.t(), hidden, out_dtype=grad_weight.dtype, out=grad_weight)
    else:  # bf16/fp16 elsewhere: each chunk's product is rounded once, the running sum stays in fp32
        grad_weight.add_(dlogits.t() @ hidden)


def _row_launch(V: int, write_grad: bool) -> tuple[int, int]:
    """(vocabulary columns a row program holds at a time, its warps), the fastest measured: writing gradients (bf16
    path), 8192 columns (16 warps) beat Liger-Kernel's 32768 (32 warps) up to 64K columns, 32768 win above; the
    logsumexp alone (FP8 path), 4096 columns at 4 warps (a sweep of 2048-16384 x 4-32 warps x 1-3 stages)."""
    block = min((8192 if V <= 65536 else 32768) if write_grad else 4096, next_power_of_2(V))
    return block, num_warps_for(block) if write_grad else 4


def _ce_rows(z: torch.Tensor, targets: torch.Tensor, loss_rows: torch.Tensor, ignore_index: int,
             softcap: float | None, lse: torch.Tensor | None = None) -> None:
    """The losses of the logits z [rows, V] into loss_rows, and d (sum of losses) / d z over z in place; with
    `lse`, each row's logsumexp into it instead of the gradients."""
    rows, V = z.shape
    block, warps = _row_launch(V, lse is None)
    cap = 0.0 if softcap is None else softcap
    _ce_rows_kernel[(rows,)](z, z.stride(0), targets, loss_rows, loss_rows if lse is None else lse, V, ignore_index,
                             cap, HAS_SOFTCAP=softcap is not None, WRITE_GRAD=lse is None, BLOCK_V=block,
                             num_warps=warps)


def _ce_grad_e5m2(z: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, g: torch.Tensor,
                  gt: torch.Tensor | None, ignore_index: int, softcap: float | None) -> None:
    """d (sum of losses) / d z [rows, V] times `_GRAD_SCALE` in e5m2 bytes: into g [rows, V] and, unless None,
    transposed into gt [V, rows] (a column slice of a wider buffer is fine)."""
    rows, V = z.shape
    # The fastest of 48 tile, warp and stage choices at GPT-2's vocabulary, with the transposed copy; four rows'
    # bytes packed into one int32 for the transposed store did not help.
    block_r, block_v = 32, 64
    grid = (triton.cdiv(rows, block_r), triton.cdiv(V, block_v))
    _ce_grad_e5m2_kernel[grid](z, z.stride(0), targets, lse, g, g if gt is None else gt,
                               0 if gt is None else gt.stride(0), rows, V, ignore_index,
                               0.0 if softcap is None else softcap, _GRAD_SCALE, HAS_SOFTCAP=softcap is not None,
                               WRITE_T=gt is not None, BLOCK_R=block_r, BLOCK_V=block_v, num_warps=4)


def _chunks(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, loss_rows: torch.Tensor,
            ignore_index: int, chunk: int, softcap: float | None, need_hidden: bool, need_weight: bool):
    """(d sum / d hidden, d sum / d weight) of the summed loss, the loss rows written to loss_rows."""
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
    return grad_hidden, grad_weight if grad_weight is None else grad_weight.to(weight.dtype)


def _fp8_chunks(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, loss_rows: torch.Tensor,
                ignore_index: int, chunk: int, softcap: float | None, need_hidden: bool, need_weight: bool,
                fp8: Fp8Operands):
    """`_chunks` with every product in FP8: the logits from the e4m3 `fp8` operands, the gradients from e5m2
    d loss / d logits (`_ce_grad_e5m2`); one weight-gradient product per group of `_FP8_WGRAD_TOKENS` tokens."""
    h8, h_inv, w8, w_inv, ht8, wt8 = fp8
    N, V = hidden.shape[0], weight.shape[0]
    dev = hidden.device
    grad_scale = torch.full((), 1.0 / _GRAD_SCALE, dtype=torch.float32, device=dev)
    grad_hidden = torch.empty_like(hidden) if need_hidden else None
    grad_weight = None
    z = torch.empty((min(chunk, N), V), dtype=hidden.dtype, device=dev)
    g = torch.empty(z.shape, dtype=torch.uint8, device=dev)
    lse = torch.empty(z.shape[0], dtype=torch.float32, device=dev)
    # groups of whole chunks, each a multiple of 16 tokens (K of their product), or one group
    group = max(chunk, _FP8_WGRAD_TOKENS // chunk * chunk) if chunk % 16 == 0 else N
    for first in range(0, N, group):
        last = min(first + group, N)
        gt = torch.empty((V, last - first), dtype=torch.uint8, device=dev) if need_weight else None
        for start in range(first, last, chunk):
            stop = min(start + chunk, last)
            zc, gc, rows = z[:stop - start], g[:stop - start], slice(start, stop)
            torch._scaled_mm(h8[rows], w8.t(), scale_a=h_inv, scale_b=w_inv, out_dtype=z.dtype, use_fast_accum=True,
                             out=zc)
            _ce_rows(zc, targets[rows], loss_rows[rows], ignore_index, softcap, lse=lse)
            _ce_grad_e5m2(zc, targets[rows], lse, gc, None if gt is None else gt[:, start - first:stop - first],
                          ignore_index, softcap)
            if need_hidden:
                torch._scaled_mm(gc.view(E5M2), wt8.t(), scale_a=grad_scale, scale_b=w_inv, out_dtype=hidden.dtype,
                                 out=grad_hidden[rows])
        if need_weight:
            ht = ht8[:, first:last].contiguous()  # [D, tokens of the group]
            part = torch._scaled_mm(gt.view(E5M2), ht.t(), scale_a=grad_scale, scale_b=h_inv,
                                    out_dtype=weight.dtype if last - first == N else torch.float32)
            grad_weight = part if grad_weight is None else grad_weight.add_(part)
    return grad_hidden, grad_weight if grad_weight is None else grad_weight.to(weight.dtype)


class _FusedLinearCEFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                chunk_size: int, softcap: float | None, fp8: Fp8Operands | None) -> torch.Tensor:
        # Device tensors, not Python ints: no host sync in the training step.
        n_valid = (targets != ignore_index).sum().clamp_(min=1).to(torch.float32)
        loss_rows = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        grad_hidden, grad_weight = (_fp8_chunks(hidden, weight, targets, loss_rows, ignore_index, chunk_size, softcap,
                                                *needs, fp8) if fp8 else
                                    _chunks(hidden, weight, targets, loss_rows, ignore_index, chunk_size, softcap,
                                            *needs))
        ctx.save_for_backward(grad_hidden, grad_weight, n_valid)
        return loss_rows.sum() / n_valid

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad_hidden, grad_weight, n_valid = ctx.saved_tensors
        scale = grad_output / n_valid  # the saved gradients are of the summed loss
        grad_hidden, grad_weight = _scaled([grad_hidden, grad_weight], scale)
        return grad_hidden, grad_weight, None, None, None, None, None


def _scaled(grads: list[torch.Tensor | None], scale: torch.Tensor) -> list[torch.Tensor | None]:
    """Each of `grads` times the 0-dim `scale`, out of place (a retained graph may run backward again over the
    same saved gradients). One multi-tensor kernel: a plain `grad * scale` broadcasts the device scalar without
    vectorising."""
    live = [g for g in grads if g is not None]
    out = iter(torch._foreach_mul(live, scale) if live else [])
    return [None if g is None else next(out) for g in grads]


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
    path's three products in FP8 where they can run (`fp8_loss_fits`): e4m3 logits (a few percent of relative
    error per element, which the gradients follow) and e5m2 d loss / d logits in the gradient products."""
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
    # from the parameter), and the transposed copies, which eager PyTorch makes slowly.
    operands = None
    if fp8 and fp8_loss_fits(hidden, weight):
        with torch.no_grad():
            (h8, h_inv), (w8, w_inv) = to_fp8(hidden, E4M3), to_fp8(weight, E4M3)
            operands = (h8, h_inv, w8, w_inv, h8.t().contiguous(), w8.t().contiguous())
    return _fused(hidden, weight, targets.contiguous(), ignore_index, chunk, softcap, operands)


def fp8_loss_fits(hidden: torch.Tensor, weight: torch.Tensor) -> bool:
    """True when the FP8 products can run: D and V multiples of 16 (cuBLASLt's rule for K and N), and on CUDA
    FP8 tensor cores (sm89+) and a token count that is one too (K of the weight-gradient product); on CPU
    (Triton's interpreter, tests) `torch._scaled_mm` has a kernel without those rules."""
    if hidden.shape[1] % 16 or weight.shape[0] % 16:
        return False
    return not hidden.is_cuda or (hidden.shape[0] % 16 == 0 and on_fp8_gpu(hidden))


# Run eagerly even inside a compiled model: the chunk loop is a handful of cuBLAS calls and kernel
# launches, nothing for Inductor to fuse; a clean graph break beats tracing `out=` slices per chunk.
@torch.compiler.disable
def _fused(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int, chunk: int,
           softcap: float | None, fp8: Fp8Operands | None) -> torch.Tensor:
    with torch.autocast(hidden.device.type, enabled=False):
        return _FusedLinearCEFn.apply(hidden, weight, targets, ignore_index, chunk, softcap, fp8)
