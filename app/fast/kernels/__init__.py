"""Kernels for the model's hot spots (Triton: fused linear + cross-entropy, RMSNorm, rotary, sliding-window
attention; FP8 matmuls, the FP8 q/k/v product's gradient join, the FP8 ReLU² feed-forward's activation), each with a PyTorch reference.

Every Triton-backed function runs its Triton kernels when its tensors are on CUDA (or on CPU under Triton's
interpreter: TRITON_INTERPRET=1 or SPOTLM_TRITON_INTERPRET_TEST=1 set before import) and its reference otherwise.
`fp8_linear` runs `torch._scaled_mm` wherever it is called; callers check `fp8_fits` on CUDA.
"""
from app.fast.kernels.fused_linear_ce import (
    default_chunk_size,
    fused_linear_cross_entropy,
    linear_cross_entropy_reference,
)
from app.fast.kernels.fp8_qkv import fp8_qkv_rotary, qkv_grad_rows, qkv_grad_rows_reference
from app.fast.kernels.fp8_linear import Fp8Weight, fp8_fits, fp8_linear, fp8_linear_reference, fp8_weights
from app.fast.kernels.fp8_relu2 import fp8_relu2_mlp
from app.fast.kernels.rmsnorm import rms_norm, rms_norm_reference
from app.fast.kernels.rotary import apply_rotary, rotary_reference
from app.fast.kernels.sliding_attention import window_attention, window_attention_reference

__all__ = [
    "Fp8Weight",
    "apply_rotary",
    "default_chunk_size",
    "fp8_fits",
    "fp8_linear",
    "fp8_linear_reference",
    "fp8_relu2_mlp",
    "fp8_qkv_rotary",
    "fp8_weights",
    "fused_linear_cross_entropy",
    "linear_cross_entropy_reference",
    "qkv_grad_rows",
    "qkv_grad_rows_reference",
    "rms_norm",
    "rms_norm_reference",
    "rotary_reference",
    "window_attention",
    "window_attention_reference",
]
