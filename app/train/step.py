"""One optimizer step: the model built with its fast paths, forward/backward over the micro-batches with
gradient accumulation, the clipped update; eager, or replayed as one CUDA graph."""
from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch

from app.data.loader import Batch
from app.fast import kernels
from app.fast.accelerate import accelerate
from app.fast.compile import compile_kwargs
from app.fast.config import GRAPHING_COMPILE_MODES
from app.fast.fp8 import fp8_weights_cast_once
from app.fast.step_graph import StepGraph
from app.log import get_logger
from app.model.gpt import GPT, ModelConfig
from app.train.config import TrainConfig
from app.train.optim import optimizer_step

log = get_logger(__name__)


def build_model(cfg: TrainConfig, mcfg: ModelConfig, device: torch.device) -> GPT:
    """The run's model, initialised from `cfg.seed`, with the fast paths of `cfg.perf` (`accelerate`), on `device`."""
    torch.manual_seed(cfg.seed)
    model = GPT(mcfg)
    model.init_weights()
    return accelerate(model, cfg.perf).to(device)


def compile_args(cfg: TrainConfig, device: torch.device) -> dict[str, Any] | None:
    """torch.compile's keyword arguments for the run on `device` (`cfg.perf`); None where it does not compile."""
    if not cfg.perf.compiles(device):
        return None
    return compile_kwargs(cfg.perf.compile_mode, wide_rows="rows" in cfg.perf.kernel_set())


def compiled(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.nn.Module:
    """`model` under torch.compile when the run compiles (by default: on GPU), else itself."""
    args = compile_args(cfg, device)
    return model if args is None else torch.compile(model, **args)


def forward_backward(fwd: torch.nn.Module, batches: list[Batch], device: torch.device, autocast,
                     no_sync=None, params: list[torch.nn.Parameter] | None = None) -> torch.Tensor:
    """Accumulate the gradients of one optimizer step over `batches`; returns their mean loss (on device).
    `no_sync` (DDP's) skips the gradient all-reduce on all but the last micro-batch. `params` (one process,
    no DDP or FSDP: they hook autograd's own accumulation): every trainable parameter; their gradients are
    then summed with one foreach add per micro-batch rather than autograd's add kernel per parameter."""
    loss_sum = torch.zeros((), device=device)
    for i, b in enumerate(batches):
        last = i == len(batches) - 1
        lmatch = b.lmatch.to(device, non_blocking=True) if b.lmatch is not None else None
        with (no_sync() if no_sync is not None and not last else contextlib.nullcontext()), autocast():
            _, loss = fwd(b.inputs.to(device, non_blocking=True), b.targets.to(device, non_blocking=True),
                          lmatch=lmatch)
        if params is None:
            (loss / len(batches)).backward()
        else:
            add_grads(params, torch.autograd.grad(loss / len(batches), params, allow_unused=True))
        loss_sum += loss.detach()
    return loss_sum / len(batches)


def add_grads(params: list[torch.nn.Parameter], grads: tuple[torch.Tensor | None, ...]) -> None:
    """p.grad += g for each pair (p.grad = g where p has none yet; g None: nothing), the sums as one foreach add.
    (Autograd adds each later micro-batch's gradients one parameter at a time: hundreds of kernels.) A new p.grad
    takes p's layout, as autograd's own accumulation gives it: a gradient can come back as a broadcast view (a
    window-1 layer's zero q/k gradient is an expanded scalar), which the in-place clip and optimizer reject."""
    sums = [(p.grad, g) for p, g in zip(params, grads, strict=True) if g is not None and p.grad is not None]
    for p, g in zip(params, grads):
        if g is not None and p.grad is None:
            p.grad = g if g.stride() == p.stride() else torch.empty_like(p, dtype=g.dtype).copy_(g)
    if sums:
        torch._foreach_add_([a for a, _ in sums], [g for _, g in sums])


def graph_fits(cfg: TrainConfig, device: torch.device, world: int) -> bool:
    """Whether the step can run as one CUDA graph: one CUDA device holding the weights, the optimizer and
    every activation (no FSDP, offload or activation checkpointing), and a compile mode without graphs of its own."""
    return (device.type == "cuda" and world == 1 and cfg.perf.compile_mode not in GRAPHING_COMPILE_MODES
            and not cfg.memory.saving())


def step_function(cfg: TrainConfig, fwd, model, raw: GPT, optimizer, device: torch.device, autocast, world: int,
                  apply: Callable[[], torch.Tensor] | None = None):
    """batches -> (mean loss, pre-clip grad norm) of one optimizer step (gradients zeroed after it):
    eager, or replayed as one CUDA graph (`perf.cuda_graph`, one CUDA device, weights and optimizer on it).
    `apply` (eager only): what the step does with the gradients instead of the clipped optimizer step, returning
    a gradient norm (DiLoCo's synchronous warm start)."""
    ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)  # also one worker's, under sync.mode=onebit
    no_sync = model.no_sync if ddp else None
    # The foreach sums hold a micro-batch's gradients until its backward ends: not where memory is being saved
    params = [p for p in raw.parameters() if p.requires_grad] if world == 1 and not ddp and not cfg.memory.saving() \
        else None
    # Not ahead of FSDP (each forward gathers the weights from shards) nor of the offloaded optimizer (its
    # forward pre-hooks wait for the weights of the last update)
    cast_once = not (cfg.memory.fsdp or cfg.memory.offload_optimizer)
    clip = 0.0 if cfg.sync.mode == "onebit" else cfg.optim.grad_clip  # onebit's "gradients" are Adam's updates
    cast = kernels.fp8_weights  # compiled in the default mode: Inductor fuses each weight's casts
    if cfg.perf.compiles(device):
        cast = torch.compile(cast, **compile_kwargs(wide_rows="rows" in cfg.perf.kernel_set()))

    def body(batches: list[Batch]) -> tuple[torch.Tensor, torch.Tensor]:
        with fp8_weights_cast_once(raw, cast) if cast_once else contextlib.nullcontext():
            loss = forward_backward(fwd, batches, device, autocast, no_sync, params)
        return loss, optimizer_step(raw, optimizer, clip) if apply is None else apply()

    if cfg.perf.cuda_graph != "false" and graph_fits(cfg, device, world) and not ddp and apply is None:
        log.info("the training step runs as one CUDA graph (perf.cuda_graph=%s)", cfg.perf.cuda_graph)
        return StepGraph(body, raw, optimizer, device)  # its gradients stay in the graph's pool
    if cfg.perf.cuda_graph == "true":
        log.warning("perf.cuda_graph needs one CUDA device and no FSDP, offload or activation checkpointing: "
                    "stepping eagerly")

    def eager(batches: list[Batch]) -> tuple[torch.Tensor, torch.Tensor]:
        out = body(batches)
        optimizer.zero_grad(set_to_none=True)
        return out
    return eager
