"""Kernels for the model's hot spots (Triton: fused linear + cross-entropy, sliding-window attention, the FP8 ReLU²
feed-forward's activation passes; FP8 matmuls), each with a PyTorch reference.

Every Triton-backed function runs its Triton kernels when its tensors are on CUDA (or on CPU under Triton's
interpreter: TRITON_INTERPRET=1 or SPOTLM_TRITON_INTERPRET_TEST=1 set before import) and its reference otherwise.
`fp8_linear` runs `torch._scaled_mm` wherever it is called; callers check `fp8_fits` on CUDA.
"""
from app.fast.kernels.fused_linear_ce import (
    default_chunk_size,
    fused_linear_cross_entropy,
    linear_cross_entropy_reference,
)
from app.fast.kernels.fp8_linear import Fp8Weight, fp8_fits, fp8_linear, fp8_linear_reference, fp8_weights
from app.fast.kernels.fp8_relu2 import fp8_relu2_mlp
from app.fast.kernels.sliding_attention import window_attention, window_attention_reference

__all__ = [
    "Fp8Weight",
    "default_chunk_size",
    "fp8_fits",
    "fp8_linear",
    "fp8_linear_reference",
    "fp8_relu2_mlp",
    "fp8_weights",
    "fused_linear_cross_entropy",
    "linear_cross_entropy_reference",
    "window_attention",
    "window_attention_reference",
]
