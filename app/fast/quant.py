"""`quantize(model, mode)`: a plain GPT's linears swapped for weight-only quantized ones, for serving.

A decode step reads every weight once for a few rows of activations, so its time is the weights' bytes: int8 or
FP8 (e4m3) weights halve them. Activations stay in the model's dtype; each `QuantLinear` multiplies them by its 8-bit
weight through `kernels.int8_linear.weight_only_linear` (a Triton kernel on CUDA for decode-sized batches, a dense
matmul for prefills, the fp32 dequantized reference on CPU). Scales are symmetric absmax, one per output channel or
per group of input channels, kept in fp32.

Unlike `accelerate` (same parameters, new class), the stored tensors change: `<linear>.weight` becomes the 8-bit
buffer and `<linear>.weight_scale` is added, both buffers, so the state dict of a quantized model loads into another
`quantize`d the same way (meta-device builds included). Inference only: the model is put in eval mode, and a
quantized linear refuses to run in training mode. Quantize after the model's last `.to(dtype)`: a later cast would
round the fp32 scales (and widen FP8 weights), which `QuantLinear.forward` then refuses.
"""
from __future__ import annotations

from typing import Literal, get_args

import torch
import torch.nn as nn

from app.fast.kernels.fp8_linear import on_fp8_gpu
from app.fast.kernels.int8_linear import QMAX, quantize_weight, weight_only_linear
from app.model.gpt import GPT, LMHead

QuantMode = Literal["none", "int8", "fp8"]
STORAGE: dict[str, torch.dtype] = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}


class QuantLinear(nn.Module):
    """A bias-free linear y = x @ (weight * weight_scale).T whose weight [out, in] is int8 or e4m3 and whose fp32
    weight_scale [out, G] covers groups of in / G input channels (G = 1: per output channel). No parameters."""

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype, groups: int = 1,
                 device: torch.device | str | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=dtype, device=device))
        self.register_buffer("weight_scale", torch.empty(out_features, groups, dtype=torch.float32, device=device))

    @classmethod
    def of(cls, linear: nn.Linear, dtype: torch.dtype, group_size: int = 0) -> QuantLinear:
        """`linear`'s weight quantized to `dtype` (`kernels.int8_linear.quantize_weight`), on its device."""
        if linear.bias is not None:
            raise ValueError("quantize takes bias-free linears (the plain model has no biases)")
        q, scale = quantize_weight(linear.weight, dtype, group_size)
        out = cls(linear.in_features, linear.out_features, dtype, scale.shape[1], device="meta")
        out.weight, out.weight_scale = q, scale
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            raise RuntimeError("quantized linears are inference-only: call model.eval() (train the plain model)")
        if self.weight.dtype not in QMAX or self.weight_scale.dtype != torch.float32:
            raise RuntimeError(f"a quantized linear holds {self.weight.dtype} weights, {self.weight_scale.dtype} "
                               "scales: the model was cast after quantize; quantize after its last .to(dtype)")
        return weight_only_linear(x, self.weight, self.weight_scale)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, dtype={self.weight.dtype}, "
                f"groups={self.weight_scale.shape[1]}")


class QuantLMHead(QuantLinear):
    """The output layer, quantized: `LMHead`'s loss over the quantized logits."""

    loss = LMHead.loss


def quantize(model: GPT, mode: QuantMode | str, head: bool = False, group_size: int = 0) -> GPT:
    """Make the linears of `model`'s blocks (and the output layer when `head`; a tied one gets its own quantized
    copy, the embedding stays) weight-only `mode` linears, in place, on the model's device; returns it in eval mode.
    mode none returns the model untouched. `group_size` 0: one scale per output channel; g: one per g input channels.
    ValueError (one line) for an unknown mode, a group size that does not divide a width, FP8 on a CUDA GPU without
    it (before Ada / Hopper), or a model already quantized."""
    if mode not in get_args(QuantMode):
        raise ValueError(f"quantize mode {mode!r} is not one of {', '.join(get_args(QuantMode))}")
    if group_size < 0:
        raise ValueError(f"group_size={group_size} must be >= 0 (0 = one scale per output channel)")
    if mode == "none":
        return model
    if any(isinstance(m, QuantLinear) for m in model.modules()):
        raise ValueError("this model is already quantized")
    weight = model.lm_head.weight
    if mode == "fp8" and weight.is_cuda and not on_fp8_gpu(weight):
        raise ValueError("quantize mode fp8 needs a GPU with FP8 (compute capability 8.9+: Ada, Hopper); use int8")
    dtype = STORAGE[mode]
    for block in model.model.layers:
        for parent in list(block.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, QuantLinear.of(child, dtype, group_size))
    if head:
        model.lm_head = QuantLMHead.of(model.lm_head, dtype, group_size)
    return model.eval()
