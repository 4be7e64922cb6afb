"""FP8 training matmuls for the plain model's blocks (`kernels.fp8_linear`'s rowwise e4m3 recipe).

`Fp8Linear` runs a linear's forward and input-gradient products in FP8 whenever gradients are on and the device and
shapes allow it (`kernels.fp8_fits`), and the plain matmul otherwise (evaluation, generation, CPU). `Fp8Relu2MLP`
runs a ReLU² feed-forward as one function whose activation passes are Triton row kernels (`kernels.fp8_relu2_mlp`).
`fp8_weights_cast_once` casts every FP8 weight to e4m3 once per optimizer step instead of in every micro-batch.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
import torch.nn as nn

from app.fast import kernels
from app.fast.kernels.fp8_linear import Fp8Weight, on_fp8_gpu
from app.model.gpt import MLP


class Fp8Linear(nn.Linear):
    """A bias-free nn.Linear whose training products run in FP8 where they can."""

    fp8_cast: Fp8Weight | None = None  # this weight's e4m3 copies while `fp8_weights_cast_once` runs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and kernels.fp8_fits(x, self.weight):
            return kernels.fp8_linear(x, self.weight, self.fp8_cast)
        return super().forward(x)


class Fp8Relu2MLP(MLP):
    """A ReLU² MLP over `Fp8Linear`s whose training forward is one FP8 function with Triton activation passes."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up, down = self.up_proj, self.down_proj
        if torch.is_grad_enabled() and kernels.fp8_fits(x, up.weight) and kernels.fp8_fits(x, down.weight):
            return kernels.fp8_relu2_mlp(x, up.weight, down.weight, up.fp8_cast, down.fp8_cast)
        return super().forward(x)


@contextlib.contextmanager
def fp8_weights_cast_once(model: nn.Module, cast: Callable[[list[torch.Tensor]], list[Fp8Weight]] = kernels.fp8_weights
                          ) -> Iterator[None]:
    """Within: every `Fp8Linear` of `model` reads e4m3 copies of its weight made here, once, by `cast`
    (`kernels.fp8_weights` or a compiled form of it), instead of casting in every micro-batch's forward and
    backward: the same bits, since weights stay put until the optimizer step, which must come after the block.
    A no-op without FP8 linears or off FP8 GPUs."""
    linears = [m for m in model.modules() if isinstance(m, Fp8Linear)]
    first = linears[0].weight if linears else None
    if first is None or not first.is_cuda or not on_fp8_gpu(first):
        yield
        return
    for m, c in zip(linears, cast([m.weight for m in linears]), strict=True):
        m.fp8_cast = c
    try:
        yield
    finally:
        for m in linears:
            m.fp8_cast = None
