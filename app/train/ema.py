"""An exponential moving average (EMA) of the model's weights, for evaluation and export.

Late in a run the weights still jitter around the minimum the LR lets them reach; their running
average sits nearer to it, so it validates lower at no training cost (one fused lerp per step).
The trainer evaluates and exports the average; the optimizer keeps stepping the raw weights.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch


class WeightEMA:
    """Shadow copies of `model`'s trainable parameters (same device and dtype; a tied matrix once),
    averaged as shadow = d * shadow + (1 - d) * weight after each `update()`, with d = min(decay,
    (1 + n) / (10 + n)) for the n-th update: early averages do not drag the freshly initialised weights."""

    def __init__(self, model: torch.nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay, self.updates = decay, 0
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.shadow = [p.detach().clone() for p in self.params]

    def rate(self) -> float:
        """The decay the next update uses."""
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self) -> None:
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1.0 - self.rate())
        self.updates += 1

    @contextlib.contextmanager
    def swapped(self) -> Iterator[None]:
        """Within the block the model's parameters hold the averages; afterwards their own values again.
        Copied in place, so compiled code and captured CUDA graphs that hold the parameters see them."""
        with torch.no_grad():
            own = [p.detach().clone() for p in self.params]
            torch._foreach_copy_([p.detach() for p in self.params], self.shadow)
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_([p.detach() for p in self.params], own)

    def state_dict(self) -> dict[str, Any]:
        return {"updates": self.updates, "shadow": list(self.shadow)}

    @torch.no_grad()
    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Restore `state_dict()` output (the decay stays this run's); a ValueError when it averaged other shapes."""
        shadow = sd["shadow"]
        if len(shadow) != len(self.shadow) or any(a.shape != b.shape for a, b in zip(shadow, self.shadow)):
            raise ValueError(f"EMA state has {len(shadow)} tensors whose shapes do not match this model's "
                             f"{len(self.shadow)} parameters")
        self.updates = int(sd["updates"])
        torch._foreach_copy_(self.shadow, [t.to(s.device, s.dtype) for t, s in zip(shadow, self.shadow)])
