"""The run's optimizer (AdamW, its CPU-offloaded or fp32-master forms, or Muon + AdamW), its learning-rate
schedule, and the clipped step."""
from __future__ import annotations

import math

import torch

from app.train.config import TrainConfig
from app.train.master import MasterAdamW
from app.train.memory_plan import MemoryConfig
from app.train.muon import Muon, muon_params
from app.train.parallel import make_offload_optimizer


class CosineSchedule:
    """LR multiplier: linear warmup, then cosine decay to `min_ratio` at `total` steps."""

    def __init__(self, warmup: int, total: int, min_ratio: float):
        self.warmup, self.total, self.min_ratio = warmup, total, min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """The run's schedule (`cfg.schedule`) over `cfg.max_steps`, as a multiplier of every group's peak lr."""
    schedule = CosineSchedule(cfg.schedule.warmup_steps, cfg.max_steps, cfg.schedule.min_lr_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def uses_bf16_weights(cfg: TrainConfig, device: torch.device, memory: MemoryConfig | None = None) -> bool:
    """Whether the run keeps bf16 weights with fp32 masters (`cfg.optim.bf16_weights`, "auto" resolved on
    `device`), under `memory` (default: the run's). Not by default under DiLoCo (its outer step works on fp32 weights)
    nor onebit (its hook is half of an fp32 Adam)."""
    if cfg.optim.bf16_weights != "auto":
        return cfg.optim.bf16_weights == "true"
    return (device.type == "cuda" and cfg.sync.mode == "ddp"
            and not cfg.optim.masters_excluded(cfg.memory if memory is None else memory))


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW (weight decay on matrices only), its CPU-offloaded form, AdamW over fp32 masters of bf16 weights
    (`uses_bf16_weights`: casts the model's weights), Muon + AdamW (`cfg.optim.name`), or under sync.mode=onebit
    momentum-free SGD applying the update direction its hook leaves in the gradients (1-bit Adam's second half;
    SGD's L2 term is then exactly AdamW's decoupled decay)."""
    o = cfg.optim
    betas = (o.beta1, o.beta2)
    if o.name == "muon":
        hidden, rest = muon_params(model)
        # The same per-step shrink (1 - lr * wd) as AdamW applies, whatever muon_lr is.
        groups = [{"params": hidden, "muon": True, "lr": o.muon_lr, "weight_decay": o.weight_decay * o.lr / o.muon_lr},
                  {"params": [p for p in rest if p.dim() >= 2], "weight_decay": o.weight_decay},
                  {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0}]
        return Muon(groups, lr=o.lr, momentum=o.muon_momentum, betas=betas)
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.sync.mode == "onebit":
        return torch.optim.SGD(groups, lr=o.lr)
    if cfg.memory.offload_optimizer:  # AdamW on the CPU (fp32 master); the model's weights become bf16 on CUDA
        return make_offload_optimizer(model, groups, cfg.memory, lr=o.lr, betas=betas, weight_decay=o.weight_decay)
    if uses_bf16_weights(cfg, device):
        return MasterAdamW(groups, lr=o.lr, betas=betas, weight_decay=o.weight_decay)
    return torch.optim.AdamW(groups, lr=o.lr, betas=betas, fused=device.type == "cuda")


def optimizer_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, grad_clip: float) -> torch.Tensor:
    """Clip and step; returns the pre-clip gradient norm (on device)."""
    grad_norm = (torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip) if grad_clip
                 else torch.zeros((), device=next(model.parameters()).device))
    if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor
        grad_norm = grad_norm.full_tensor()
    optimizer.step()
    return grad_norm
