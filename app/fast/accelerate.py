"""`accelerate(model, perf)`: a plain GPT rewritten in place with the fast paths a `PerfConfig` selects.

As torchtitan's model converters (`convert_to_float8_training`) do, the model knows nothing of its accelerations: this
walks it and swaps modules for subclasses that add a fast forward and fall back to the plain one wherever the fast
path cannot run (CPU, no FP8 tensor cores, shapes the kernels do not take, a KV cache):

- fp8=all: the blocks' linears become `Fp8Linear` (not the q/k of window-1 layers, which never run);
- kernels has mlp, fp8=all, ReLU² MLPs: `Fp8Relu2MLP`, the feed-forward as one FP8 function with Triton row kernels;
- sliding-window layers (1 < w): `SlidingWindowAttention`, block-sparse flex_attention on CUDA, or with kernels has
  window the Triton window kernel;
- kernels has loss, or fp8 != off: the head becomes `FastHead` (the fused linear + cross-entropy; the FP8 head).

`rows` is not a module: it changes how torch.compile generates code (`app.fast.compile`). A module keeps its
parameters, their names (the state dict, checkpoints and exports are the plain model's) and its hooks: only its class
changes, as `torch.nn.utils.parametrize` and FSDP2 re-class modules. Apply it before `parallelize` and torch.compile.
"""
from __future__ import annotations

import torch.nn as nn

from app.fast.config import PerfConfig
from app.fast.fp8 import Fp8Linear, Fp8Relu2MLP
from app.fast.loss_head import FastHead
from app.fast.windows import SlidingWindowAttention
from app.model.gpt import GPT


def accelerate(model: GPT, perf: PerfConfig) -> GPT:
    """Swap the fast paths `perf` selects into `model` (in place, on any device, before any parallelism); returns it.
    With kernels=none and fp8=off the only change is the window layers' block-sparse attention on CUDA."""
    kernels = perf.kernel_set()
    for block in model.model.layers:
        attn, mlp = block.self_attn, block.mlp
        if perf.fp8 == "all":
            qk = (attn.q_proj, attn.k_proj) if attn.window != 1 else ()
            for linear in (*qk, attn.v_proj, attn.o_proj, *mlp.children()):  # (the MLP's children: its linears)
                swap_class(linear, Fp8Linear)
            if "mlp" in kernels and mlp.kind == "relu2":
                swap_class(mlp, Fp8Relu2MLP)
        if attn.window > 1:
            swap_class(attn, SlidingWindowAttention, kernel="window" in kernels)
    if "loss" in kernels or perf.fp8 != "off":
        swap_class(model.lm_head, FastHead, fused="loss" in kernels, fp8=perf.fp8 != "off")
    return model


def swap_class(module: nn.Module, cls: type[nn.Module], **attrs: object) -> None:
    """Make `module` a `cls` (a subclass of its class that adds behaviour, no parameters) with `attrs` set."""
    if not issubclass(cls, type(module)):
        raise TypeError(f"{cls.__name__} is not a subclass of {type(module).__name__}: accelerate a plain model, "
                        "before parallelize")
    module.__class__ = cls
    for name, value in attrs.items():
        setattr(module, name, value)
