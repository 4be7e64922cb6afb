"""AdamW over fp32 master weights, for a model whose weights and gradients are bf16 (llm.c's mixed precision).

Under bf16 autocast with fp32 weights, every micro-batch casts each weight matrix to bf16 for its forward and
each bf16 weight gradient back to fp32 to accumulate it, and the residual stream (the fp32 embeddings' output)
is fp32. With the weights stored in bf16 those casts are gone, the residual stream is bf16, and the gradients
accumulate in bf16 (as llm.c's do): GPT-2 124M on an H100 (bench/train_speed.py) runs 7.6% more tokens/s in
11% less peak memory. The optimizer keeps the fp32 copy that the updates are applied to, since a bf16 weight
would round away any update below 1/256 of its magnitude, and writes the rounded result back into the model
after each step. Per parameter the GPU holds 2 (weight) + 2 (gradient) + 4 (master) + 8 (moments) bytes, as
many as fp32 weights and gradients hold, and no autocast copy of every weight in bf16 during the forward.

The update is torch.optim.AdamW's own (the functional `adam` with decoupled weight decay, fused kernels), run
on the masters with the gradients cast to fp32, so a step from the same master and gradient is bitwise the
same as `torch.optim.AdamW(fused=True)`'s. The state lives under each model parameter (`master`, `exp_avg`,
`exp_avg_sq`, `step`), so checkpoints, `load_state_dict` and the CUDA-graph step (`app/fast/step_graph.py`, which
snapshots and restores the state of the model's parameters around its warm-up) see it like any optimizer's.
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn as nn
from torch.optim.adam import adam

# Gradients are cast to fp32 this many elements at a time: the cast copies never hold more than 512 MiB.
CAST_CHUNK = 1 << 27


class MasterAdamW(torch.optim.Optimizer):
    """AdamW whose parameters are the model's (cast to `dtype` here) and whose arithmetic runs on fp32
    master copies taken before the cast. After `step()` each parameter holds its master rounded to
    `dtype`. `master_state_dict(model)` gives the model's state dict with the masters (for export)."""

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.01, *, dtype: torch.dtype = torch.bfloat16):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.dtype = dtype
        for p in self._params():
            if not p.is_floating_point():
                raise ValueError(f"MasterAdamW: parameters must be floating point, got {p.dtype}")
            st = self.state[p]
            st["master"] = p.detach().to(torch.float32, copy=True)
            # Zeros, not lazily created: the CUDA-graph step restores every state tensor after its warm-up.
            st["exp_avg"] = torch.zeros_like(st["master"])
            st["exp_avg_sq"] = torch.zeros_like(st["master"])
            st["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            p.data = p.data.to(dtype)

    def _params(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    @torch.no_grad()
    def step(self, closure=None):
        with torch.enable_grad():
            loss = closure() if closure is not None else None
        for group in self.param_groups:
            live = [p for p in group["params"] if p.grad is not None]
            for chunk in _chunks(live, CAST_CHUNK):
                st = [self.state[p] for p in chunk]
                masters = [s["master"] for s in st]
                # One multi-tensor cast for the chunk: a `.to()` per gradient cost GPT-2 124M ~100 small copy
                # kernels a step (0.64 ms on an H200, plus their launch gaps in the step's CUDA graph).
                grads = [torch.empty_like(m) for m in masters]
                torch._foreach_copy_(grads, [p.grad for p in chunk])
                adam(masters, grads, [s["exp_avg"] for s in st],
                     [s["exp_avg_sq"] for s in st], [], [s["step"] for s in st], fused=True,
                     decoupled_weight_decay=True, amsgrad=False, beta1=group["betas"][0], beta2=group["betas"][1],
                     lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)
                torch._foreach_copy_(chunk, masters)
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        """Load this optimizer's state dict (masters stay fp32, unlike torch's default load, which casts the
        state to the parameter's dtype), or a torch.optim.AdamW one (master = the current weights, so a run
        that switches to bf16 weights rounds its weights once). Each parameter is then set to its master
        rounded."""
        params = self._params()
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups) or any(
                len(g["params"]) != len(s["params"]) for g, s in zip(self.param_groups, saved_groups)):
            raise ValueError("MasterAdamW.load_state_dict: the saved parameter groups do not match this optimizer's")
        for g, sg in zip(self.param_groups, saved_groups):
            g.update({k: v for k, v in sg.items() if k != "params"})
        ids = [i for sg in saved_groups for i in sg["params"]]
        with torch.no_grad():
            for i, p in zip(ids, params):
                src, st = state_dict["state"].get(i, {}), self.state[p]
                st["master"].copy_(src["master"] if "master" in src else p.detach())
                for k in ("exp_avg", "exp_avg_sq", "step"):
                    if k in src:
                        st[k].copy_(torch.as_tensor(src[k]))
                p.copy_(st["master"])

    def master_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The model's state dict with the fp32 master weights in place of its `dtype` ones."""
        by_id = {id(p): self.state[p]["master"] for p in self._params()}
        return {k: by_id.get(id(v), v) for k, v in model.state_dict(keep_vars=True).items()}


def _chunks(params: list[torch.Tensor], max_numel: int) -> Iterable[list[torch.Tensor]]:
    """`params` in order, in runs of at most `max_numel` elements (a larger tensor is a run of its own)."""
    run, size = [], 0
    for p in params:
        if run and size + p.numel() > max_numel:
            yield run
            run, size = [], 0
        run.append(p)
        size += p.numel()
    if run:
        yield run
