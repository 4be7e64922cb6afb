"""Weight-only quantized matmuls for serving: `x @ dequantize(q, scale).T` with q int8 or e4m3, x in bf16/fp32.

A decode step multiplies a few rows (one per stream) by every weight of the model once, so its time is the time to
read the weights: an 8-bit copy halves it. The kernel here reads q [N, K] in its 8 bits, converts each tile to the
activation dtype in registers and multiplies it on the tensor cores (fp32 sums), so the bf16 weight never exists in
memory. Scales are fp32 [N, G]: one per output channel (G = 1, applied once to each output) or one per group of
K / G consecutive input channels (applied to each weight tile before its product). Its tile shape is tuned per weight
shape on the first call (Triton's autotuner; one fixed shape under the interpreter). Rows beyond `SMALL_M` (prefills)
take the dense matmul of the weight cast to x's dtype instead: there the product's compute, not the weight read, is
the cost. torch._int_mm (int8 x int8, rows > 16 only) would quantize the activations too, which this keeps exact.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from app.fast.kernels.backend import INTERPRET, jit, next_power_of_2, tl, triton, use_triton

QMAX = {torch.int8: 127.0, torch.float8_e4m3fn: 448.0}  # the largest magnitude each storage type holds
SMALL_M = 64  # rows up to this many take the weight-only kernel; more: the dense matmul (compute-bound there)


def quantize_weight(weight: torch.Tensor, dtype: torch.dtype, group_size: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [N, K] as (q [N, K] in `dtype`, scale fp32 [N, G]): symmetric absmax scaling per output channel
    (group_size 0, G = 1) or per `group_size` input channels (G = K / group_size), so each group's largest weight maps
    to the type's largest value. int8 rounds to nearest: |weight - q * scale| <= scale / 2 for every weight."""
    if dtype not in QMAX:
        raise ValueError(f"weight-only quantization stores int8 or float8_e4m3fn, not {dtype}")
    N, K = weight.shape
    group = group_size or K
    if K % group:
        raise ValueError(f"group_size={group_size} does not divide the weight's {K} input channels")
    w = weight.detach().float().reshape(N, K // group, group)
    scale = w.abs().amax(-1).clamp(min=1e-12) / QMAX[dtype]  # [N, G]
    q = w / scale[..., None]
    q = q.round().clamp(-127, 127) if dtype == torch.int8 else q.clamp(-QMAX[dtype], QMAX[dtype])
    return q.to(dtype).reshape(N, K), scale


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The fp32 weight [N, K] that (q, scale) stand for."""
    N, K = q.shape
    return (q.float().reshape(N, scale.shape[1], -1) * scale[..., None]).reshape(N, K)


def weight_only_linear_reference(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """`F.linear(x, dequantize_weight(q, scale))` in fp32, in x's dtype: what the kernel computes."""
    return F.linear(x.float(), dequantize_weight(q, scale)).to(x.dtype)


def weight_only_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [..., K] @ dequantize_weight(q, scale).T -> [..., N] in x's dtype: the Triton kernel for up to `SMALL_M`
    rows where Triton runs (CUDA, or CPU under the interpreter), else a dense matmul (in x's dtype on CUDA; in fp32,
    the reference, on CPU)."""
    rows = x.reshape(-1, x.shape[-1])
    if not use_triton(rows, q):
        return _dense(x, q, scale) if x.is_cuda else weight_only_linear_reference(x, q, scale)
    if rows.shape[0] > SMALL_M:
        return _dense(x, q, scale)
    y = _launch(rows if rows.stride(-1) == 1 else rows.contiguous(), q, scale)
    return y.view(*x.shape[:-1], q.shape[0])


def _dense(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The dense matmul in x's dtype: per channel, q cast as is (int8 and e4m3 values are exact in bf16) and the
    output scaled; per group, the weight dequantized first."""
    if scale.shape[1] == 1:
        return F.linear(x, q.to(x.dtype)) * scale[:, 0].to(x.dtype)
    return F.linear(x, dequantize_weight(q, scale).to(x.dtype))


def _launch(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    (M, K), N = x.shape, q.shape[0]
    block_m = max(16, next_power_of_2(M))  # tl.dot's smallest tile is 16
    y = torch.empty(M, N, device=x.device, dtype=x.dtype)
    args = (x, q, scale, y, M, N, K, x.stride(0), q.stride(0), scale.stride(0), y.stride(0))
    consts = dict(GROUP=K // scale.shape[1], PER_CHANNEL=scale.shape[1] == 1,
                  IEEE=x.dtype == torch.float32 or INTERPRET, BLOCK_M=block_m)
    if INTERPRET:  # one tile shape: the interpreter checks the arithmetic, not the speed
        _weight_only_kernel[(triton.cdiv(N, 32), triton.cdiv(M, block_m))](*args, **consts, BLOCK_N=32, BLOCK_K=128)
    else:
        _tuned_kernel[lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), triton.cdiv(M, block_m))](*args, **consts)
    return y


@jit
def _weight_only_kernel(x_ptr, q_ptr, s_ptr, y_ptr, M, N, K, stride_xm, stride_qn, stride_sn, stride_ym,
                        GROUP: tl.constexpr, PER_CHANNEL: tl.constexpr, IEEE: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """y[m, n] = sum_k x[m, k] q[n, k] scale[n, k // GROUP]: one [BLOCK_M, BLOCK_N] output tile per program."""
    rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + rk
        x = tl.load(x_ptr + rm[:, None] * stride_xm + k[None, :], mask=(rm[:, None] < M) & (k[None, :] < K), other=0.0)
        w_mask = (k[:, None] < K) & (rn[None, :] < N)
        w = tl.load(q_ptr + rn[None, :] * stride_qn + k[:, None], mask=w_mask, other=0.0)  # [BLOCK_K, BLOCK_N]
        if PER_CHANNEL and not IEEE:  # int8 and e4m3 values are exact in bf16: no fp32 detour
            w = w.to(x.dtype)
        elif PER_CHANNEL:
            w = w.to(tl.float32)
        else:
            w = w.to(tl.float32) * tl.load(s_ptr + rn[None, :] * stride_sn + k[:, None] // GROUP, mask=w_mask,
                                           other=0.0)
        if IEEE:  # fp32 activations: a full-precision product, not TF32's (and the interpreter's bf16 dot is wrong)
            acc += tl.dot(x.to(tl.float32), w, input_precision="ieee")
        else:
            acc += tl.dot(x, w.to(x.dtype))
    if PER_CHANNEL:
        acc = acc * tl.load(s_ptr + rn * stride_sn, mask=rn < N, other=0.0)[None, :]
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


# Tile shapes tried once per weight shape and row tile (on the first call, e.g. the engine's warm-up before its graph
# captures): narrow output tiles spread a weight's rows over every SM, long K tiles keep more bytes in flight per SM.
_CONFIGS = [(16, 128, 4, 4), (16, 256, 4, 3), (16, 512, 4, 2), (32, 128, 4, 4), (32, 256, 4, 3), (32, 512, 8, 2),
            (64, 128, 4, 4), (64, 256, 8, 3)]  # (BLOCK_N, BLOCK_K, num_warps, num_stages)
_tuned_kernel = None if triton is None else triton.autotune(
    [triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=st) for n, k, w, st in _CONFIGS],
    key=["N", "K", "BLOCK_M", "PER_CHANNEL"])(_weight_only_kernel)
