"""The output layer's fast paths: the fused linear + cross-entropy loss, and the FP8 head.

With `fused`, training and evaluation losses on CUDA come from `kernels.fused_linear_cross_entropy`, which never
makes the [B, T, vocab] logits (forward returns None for them). With `fp8` (modded-nanogpt's FP8 head) the head's
training products run in FP8: the e4m3 logits, and under the fused loss the gradient products from e5m2 d loss /
d logits too.
"""
from __future__ import annotations

import torch

from app.fast import kernels
from app.model.gpt import LMHead


class FastHead(LMHead):
    """An `LMHead` with the fused loss (`fused`) and / or FP8 training products (`fp8`)."""

    fused: bool = False  # loss without logits on CUDA
    fp8: bool = False  # training products in FP8 where they can run

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.fp8 and torch.is_grad_enabled() and kernels.fp8_fits(h, self.weight):
            return kernels.fp8_linear(h, self.weight)
        return super().forward(h)

    def loss(self, h: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        if self.fused and h.is_cuda:
            return None, kernels.fused_linear_cross_entropy(h, self.weight, targets, ignore_index=-1,
                                                            fp8=self.fp8 and torch.is_grad_enabled())
        return super().loss(h, targets)
