"""The per-worker training loop and the Ray `TorchTrainer` that runs it, fault-tolerantly."""
from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from app import storage
from app.train import checkpoint
from app.fast import kernels
from app.fast.accelerate import accelerate
from app.fast.compile import compile_kwargs
from app.fast.config import GRAPHING_COMPILE_MODES, PerfConfig
from app.fast.fp8 import fp8_weights_cast_once
from app.config import ConfigError, from_dict, to_dict
from app.data.loader import Batch, BatchPlan, TokenStream, TrainLoader, eval_batches, match_stream
from app.train.ema import WeightEMA
from app.log import forward_logs, get_logger, relay_worker_logs
from app.train.master import MasterAdamW
from app.train.memory_plan import MemoryConfig
from app.model.gpt import GPT, PRESETS, ModelConfig
from app.train.muon import Muon, muon_params
from app.train.parallel import (compiles_per_block, full_state_dicts, make_offload_optimizer, parallelize,
                          resolve_memory, set_full_state_dicts)
from app.train.preemption import PreemptionWatcher, install_sigterm_handler
from app.data.shards import load_manifest
from app.fast.step_graph import StepGraph

log = get_logger(__name__)

# Dense bf16 peak FLOP/s per GPU, for MFU (H100/H200 SXM; A100).
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}
DRAIN_CHECK_EVERY = 10  # steps between queries of Ray's node-drain notice (a barrier over the workers)


@dataclass
class TrainConfig:
    """Training run: data, model, schedule, checkpoints and workers."""

    data: str = "runs/shards"  # tokenized shards directory (with manifest.json), local or s3://
    index: bool = False  # feed the LMatch retrieval id of every token as an extra input (jobs.build_index first)
    storage: str = "runs"  # where runs live (checkpoints, export), local or s3://
    name: str = "spotlm-run"  # run name: the same name continues the same run
    preset: str = "tiny"  # model preset (app.model.gpt.ModelConfig.preset)
    model: dict[str, Any] = field(default_factory=dict)  # ModelConfig overrides, e.g. --model.n_layer=4
    seq_len: int = 0  # tokens per sequence; 0 = the model's max_seq_len
    micro_batch: int = 8  # sequences per forward/backward on one worker
    batch_tokens: int = 0  # tokens per optimizer step over all workers; 0 = one micro-batch per worker
    max_steps: int = 200  # optimizer steps in total (a resumed run continues up to this)
    lr: float = 1e-3  # peak learning rate
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 20  # linear warmup steps
    weight_decay: float = 0.1  # AdamW decay on matrices (not norms)
    beta1: float = 0.9
    beta2: float = 0.95
    optimizer: str = "adamw"  # adamw | muon (app/train/muon.py: Muon on the blocks' matrices, AdamW on the rest at `lr`)
    muon_lr: float = 0.02  # peak learning rate of the Muon matrices (same schedule as `lr`)
    muon_momentum: float = 0.95
    grad_clip: float = 1.0  # max global grad norm; 0 = off
    # bf16 weights and gradients, AdamW on fp32 master copies (app/train/master.py): auto = on CUDA with AdamW, unless
    # memory.fsdp / memory.offload_optimizer (their own mixed precision) or ema_decay (it averages fp32 weights)
    bf16_weights: str = "auto"  # auto | true | false
    ema_decay: float = 0.0  # > 0: keep an average of the weights (app/train/ema.py); evaluation and export use it
    eval_every: int = 50  # steps between validation passes; 0 = only at the end
    eval_tokens: int = 65536  # validation tokens per pass; 0 = the whole validation split
    target_val_loss: float = 0.0  # > 0: stop (checkpoint, export) once a validation pass reaches it
    checkpoint_every: int = 100  # steps between checkpoints (and one at the end)
    keep_checkpoints: int = 3  # keep the newest K checkpoints
    log_every: int = 10  # steps between log lines
    num_workers: int = 1  # Ray Train workers (one per GPU on GPU nodes); the most, when elastic
    min_workers: int = 0  # > 0: elastic between min_workers and num_workers, same tokens per step
    resize_check_s: float = 60.0  # elastic: how often to look for room to grow back
    use_gpu: str = "auto"  # auto (if the Ray cluster has GPUs) | true | false
    cpus_per_worker: float = 1.0  # CPU resources each worker reserves
    max_failures: int = 3  # worker-group restarts on errors before the run fails
    max_preemptions: int = 100  # restarts after preemption notices (not counted as failures)
    spot_notice: str = "auto"  # poll the AWS spot interruption notice: auto (on EC2) | off | <metadata URL>
    catch_sigterm: bool = True  # SIGTERM means "checkpoint at the next step and stop", not "die now"
    seed: int = 1337  # model init and data order
    deterministic: bool = False  # deterministic kernels: bitwise-repeatable runs (CPU)
    perf: PerfConfig = field(default_factory=PerfConfig)  # --perf.kernels=..., --perf.fp8=all, ... (app/fast/config.py)
    resume: bool = False  # continue an existing run (its latest checkpoint)
    async_checkpoint: bool = True  # upload checkpoints in the background; training goes on meanwhile
    upload_retries: int = 5  # retries (exponential backoff) of a failed checkpoint upload
    export: str = ""  # exported model directory; "" = <storage>/<name>/export; "none" = skip
    memory: MemoryConfig = field(default_factory=MemoryConfig)  # --memory.checkpointing=full, --memory.auto=true, ... (app/train/memory_plan.py)

    def validate(self) -> None:
        if self.preset not in PRESETS:
            raise ConfigError(f"unknown preset {self.preset!r}; presets: {', '.join(PRESETS)}")
        for k in ("max_steps", "micro_batch", "num_workers", "checkpoint_every", "log_every"):
            if getattr(self, k) < 1:
                raise ConfigError(f"{k} must be >= 1, got {getattr(self, k)}")
        if self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError("lr must be > 0 and min_lr_ratio in [0, 1]")
        if self.min_workers > self.num_workers:
            raise ConfigError(f"min_workers={self.min_workers} is more than num_workers={self.num_workers}")
        if any(v not in ("auto", "true", "false") for v in (self.use_gpu, self.bf16_weights)):
            raise ConfigError("use_gpu and bf16_weights take auto | true | false")
        if self.eval_tokens < 0:
            raise ConfigError(f"eval_tokens must be >= 0 (0 = the whole split), got {self.eval_tokens}")
        self.perf.validate()
        if self.optimizer not in ("adamw", "muon"):
            raise ConfigError(f"optimizer must be adamw or muon, got {self.optimizer!r}")
        if self.optimizer == "muon" and (self.memory.offload_optimizer or self.memory.fsdp):
            raise ConfigError("optimizer=muon needs whole weight matrices on the GPU: not with "
                              "memory.offload_optimizer or memory.fsdp")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"ema_decay must be in [0, 1) (0 = off), got {self.ema_decay}")
        if self.ema_decay and (self.memory.fsdp or self.memory.offload_optimizer):
            raise ConfigError("ema_decay averages whole fp32 weights on the GPU: not with memory.fsdp or "
                              "memory.offload_optimizer")
        if self.bf16_weights == "true" and self.masters_excluded(self.memory):
            raise ConfigError("bf16_weights=true steps fp32 master weights with AdamW: not with optimizer=muon, "
                              "ema_decay, memory.fsdp or memory.offload_optimizer")
        self.memory.validate()

    @property
    def run_dir(self) -> str:
        return storage.join(storage.absolute(self.storage), self.name)

    def masters_excluded(self, memory: MemoryConfig) -> bool:
        """Whether these options rule out bf16 weights with fp32 masters under `memory`: Muon, the weight
        average (it averages fp32 weights), FSDP and the CPU optimizer (their own mixed precision)."""
        return self.optimizer != "adamw" or bool(self.ema_decay) or memory.fsdp or memory.offload_optimizer

    @property
    def export_dir(self) -> str | None:
        if self.export == "none":
            return None
        return storage.absolute(self.export) if self.export else storage.join(self.run_dir, "export")


def model_config(cfg: TrainConfig, vocab_size: int) -> ModelConfig:
    """The run's ModelConfig: the preset, the tokenizer's vocabulary (and its retrieval-match table
    with `index`: vocab_size + 1 rows, the last meaning "no match"), then the overrides."""
    data = to_dict(ModelConfig.preset(cfg.preset, vocab_size=vocab_size, lmatch_vocab=vocab_size + 1 if cfg.index else 0))
    # Derived widths follow an overridden shape (or MLP kind) unless they are overridden too.
    if "d_model" in cfg.model or "mlp" in cfg.model:
        data["ffn_hidden"] = 0
    if "n_head" in cfg.model:
        data["n_kv_head"] = 0
    return from_dict(ModelConfig, {**data, **cfg.model})


class CosineSchedule:
    """LR multiplier: linear warmup, then cosine decay to `min_ratio` at `total` steps."""

    def __init__(self, warmup: int, total: int, min_ratio: float):
        self.warmup, self.total, self.min_ratio = warmup, total, min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def uses_bf16_weights(cfg: TrainConfig, device: torch.device, memory: MemoryConfig | None = None) -> bool:
    """Whether the run keeps bf16 weights with fp32 masters (`cfg.bf16_weights`, "auto" resolved on `device`),
    under `memory` (default: the run's)."""
    if cfg.bf16_weights != "auto":
        return cfg.bf16_weights == "true"
    return device.type == "cuda" and not cfg.masters_excluded(cfg.memory if memory is None else memory)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW (weight decay on matrices only), its CPU-offloaded form, AdamW over fp32 masters of bf16 weights
    (`uses_bf16_weights`: casts the model's weights), or Muon + AdamW (`cfg.optimizer`)."""
    if cfg.optimizer == "muon":
        hidden, rest = muon_params(model)
        # The same per-step shrink (1 - lr * wd) as AdamW applies, whatever muon_lr is.
        groups = [{"params": hidden, "muon": True, "lr": cfg.muon_lr, "weight_decay": cfg.weight_decay * cfg.lr / cfg.muon_lr},
                  {"params": [p for p in rest if p.dim() >= 2], "weight_decay": cfg.weight_decay},
                  {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0}]
        return Muon(groups, lr=cfg.lr, momentum=cfg.muon_momentum, betas=(cfg.beta1, cfg.beta2))
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.memory.offload_optimizer:  # AdamW on the CPU (fp32 master); the model's weights become bf16 on CUDA
        return make_offload_optimizer(model, groups, cfg.memory, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                      weight_decay=cfg.weight_decay)
    if uses_bf16_weights(cfg, device):
        return MasterAdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                             fused=device.type == "cuda")


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


def optimizer_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, grad_clip: float) -> torch.Tensor:
    """Clip and step; returns the pre-clip gradient norm (on device)."""
    grad_norm = (torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip) if grad_clip
                 else torch.zeros((), device=next(model.parameters()).device))
    if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor
        grad_norm = grad_norm.full_tensor()
    optimizer.step()
    return grad_norm


def graph_fits(cfg: TrainConfig, device: torch.device, world: int) -> bool:
    """Whether the step can run as one CUDA graph: one CUDA device holding the weights, the optimizer and
    every activation (no FSDP, offload or activation checkpointing), and a compile mode without graphs of its own."""
    return (device.type == "cuda" and world == 1 and cfg.perf.compile_mode not in GRAPHING_COMPILE_MODES
            and not cfg.memory.saving())


def step_function(cfg: TrainConfig, fwd, model, raw: GPT, optimizer, device: torch.device, autocast, world: int):
    """batches -> (mean loss, pre-clip grad norm) of one optimizer step (gradients zeroed after it):
    eager, or replayed as one CUDA graph (`perf.cuda_graph`, one CUDA device, weights and optimizer on it)."""
    no_sync = getattr(model, "no_sync", None) if world > 1 else None
    # The foreach sums hold a micro-batch's gradients until its backward ends: not where memory is being saved
    params = [p for p in raw.parameters() if p.requires_grad] if world == 1 and not cfg.memory.saving() else None
    # Not ahead of FSDP (each forward gathers the weights from shards) nor of the offloaded optimizer (its
    # forward pre-hooks wait for the weights of the last update)
    cast_once = not (cfg.memory.fsdp or cfg.memory.offload_optimizer)
    cast = kernels.fp8_weights  # compiled in the default mode: Inductor fuses each weight's casts
    if cfg.perf.compiles(device):
        cast = torch.compile(cast, **compile_kwargs(wide_rows="rows" in cfg.perf.kernel_set()))

    def body(batches: list[Batch]) -> tuple[torch.Tensor, torch.Tensor]:
        with fp8_weights_cast_once(raw, cast) if cast_once else contextlib.nullcontext():
            loss = forward_backward(fwd, batches, device, autocast, no_sync, params)
        return loss, optimizer_step(raw, optimizer, cfg.grad_clip)

    if cfg.perf.cuda_graph != "false" and graph_fits(cfg, device, world):
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


def index_stream(manifest, split: str) -> TokenStream:
    """`--index`: the split's LMatch ids (app.data.loader.match_stream); a ConfigError when they were not built."""
    stream = match_stream(manifest, split)
    if stream is None:
        raise ConfigError(f"--index: {manifest.root} has no LMatch index for {split!r}; run "
                          f"`python -m jobs.build_index --data={manifest.root}` first")
    return stream


def batch_plan(cfg: TrainConfig, seq_len: int, world_size: int) -> BatchPlan:
    """Global batch in sequences from `batch_tokens` (constant whatever the worker count)."""
    global_batch = cfg.batch_tokens // seq_len if cfg.batch_tokens else cfg.micro_batch * world_size
    if cfg.batch_tokens and cfg.batch_tokens % seq_len:
        raise ConfigError(f"batch_tokens={cfg.batch_tokens} is not a multiple of seq_len={seq_len}")
    return BatchPlan(global_batch, cfg.micro_batch, world_size)


def _all_reduce_mean(values: list[float], device: torch.device) -> list[float]:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return (t / dist.get_world_size()).tolist()


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches, device: torch.device, autocast) -> float:
    """Mean validation loss over this rank's batches, averaged over all ranks."""
    model.eval()
    total, count = 0.0, 0
    for b in batches:
        lmatch = b.lmatch.to(device) if b.lmatch is not None else None
        with autocast():
            _, loss = model(b.inputs.to(device), b.targets.to(device), lmatch=lmatch)
        total, count = total + loss.item() * b.targets.numel(), count + b.targets.numel()
    model.train()
    loss_sum, n = _all_reduce_mean([total, float(count)], device)
    return loss_sum / max(n, 1.0)


def _log_step(cfg: TrainConfig, m: dict[str, Any]) -> None:
    """Rank 0's line for a logged step: loss, learning rate, speed, epoch, and the validation loss if evaluated."""
    mfu = f" | mfu {m['mfu']:.1%}" if "mfu" in m else ""
    val = f" | val loss {m['val_loss']:.4f}" if "val_loss" in m else ""
    log.info("step %d/%d | loss %.4f | lr %.2e | %s tok/s%s | epoch %.2f%s", m["step"], cfg.max_steps, m["train_loss"],
             m["lr"], f"{m['tokens_per_s']:,.0f}", mfu, m["epoch"], val)


def _write_progress(run_dir: str, state: checkpoint.TrainState, metrics: dict[str, Any], resumed_from: int) -> None:
    """`<run>/progress.json`: where the run is now (for people, dashboards and benchmarks)."""
    storage.write_json(storage.join(run_dir, "progress.json"), {
        "step": state.step, "time": time.time(), "resumes": state.resumes, "resumed_from_step": resumed_from,
        "train_time_s": state.train_time_s, "val_curve": state.val_curve,
        **{k: metrics[k] for k in ("train_loss", "tokens_per_s", "checkpoint_stall_s", "first_step_s", "val_loss")
           if k in metrics}})


def _any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if `flag` is true on any rank (so all ranks stop at the same step)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _mfu(flops_per_token: float, tokens_per_s: float, world: int) -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_FLOPS.items() if k in name), None)
    return flops_per_token * tokens_per_s / (peak * world) if peak else None


def _eval_due(cfg: TrainConfig, step: int) -> bool:
    return bool(cfg.eval_every) and step % cfg.eval_every == 0


def synced_seconds(since: float, device: torch.device) -> float:
    """Seconds since `since`, after the queued GPU work has finished."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - since


def _resolve(flag: str, default: bool) -> bool:
    return default if flag == "auto" else flag == "true"


def train_loop(config: dict[str, Any], log_sink: Any = None) -> None:
    """The training function each Ray Train worker runs (also resumes after any restart); its log
    lines (rank 0's, and every rank's warnings) also go to `log_sink` (`relay_worker_logs`)."""
    import ray.train
    import ray.train.torch

    cfg = from_dict(TrainConfig, config)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if log_sink is not None:
        forward_logs(log_sink, logging.INFO if rank == 0 else logging.WARNING)
    device = ray.train.torch.get_device()
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else contextlib.nullcontext

    # ---- data and model ----
    manifest = load_manifest(cfg.data)
    mcfg = model_config(cfg, manifest.vocab_size)
    seq_len = cfg.seq_len or mcfg.max_seq_len
    plan = batch_plan(cfg, seq_len, world)
    has_val = bool(manifest.shards.get("val"))
    loader = TrainLoader(TokenStream(manifest, "train"), seq_len, plan, rank, cfg.seed,
                         index_stream(manifest, "train") if cfg.index else None)
    val = eval_batches(TokenStream(manifest, "val"), seq_len, cfg.micro_batch, cfg.eval_tokens, rank, world,
                       index_stream(manifest, "val") if cfg.index else None) if has_val else []
    raw = build_model(cfg, mcfg, device)
    cfg.memory = resolve_memory(cfg.memory, mcfg, seq_len, cfg.micro_batch, device, world,
                                master_weights=uses_bf16_weights(cfg, device, MemoryConfig()))
    per_block = compiles_per_block(cfg.memory)  # before the optimizer: FSDP2 replaces the parameters
    parallelize(raw, cfg.memory, device=device, world_size=world,
                compile=compile_args(cfg, device) if per_block else None)
    optimizer = make_optimizer(raw, cfg, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, CosineSchedule(cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio))
    state = checkpoint.TrainState(config=to_dict(cfg))
    ema = WeightEMA(raw, cfg.ema_decay) if cfg.ema_decay else None

    # ---- resume from the latest complete checkpoint, if any ----
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = checkpoint.load(d, raw, optimizer, scheduler, set_state=functools.partial(
                set_full_state_dicts, raw, optimizer) if cfg.memory.fsdp else None, ema=ema)
        state.resumes += 1
        if rank == 0:
            log.info("resumed %s at step %d (%d tokens seen)", cfg.name, state.step, state.tokens)
    watcher = PreemptionWatcher(
        aws_endpoint=None if cfg.spot_notice in ("auto", "off") else cfg.spot_notice,
        aws_auto=cfg.spot_notice == "auto", extra_check=lambda: ray.train.get_preemption_info() is not None)
    if cfg.catch_sigterm:
        install_sigterm_handler(watcher)
    model = ray.train.torch.prepare_model(raw, move_to_device=False) if world > 1 and not cfg.memory.fsdp else raw
    fwd = model if per_block else compiled(model, cfg, device)
    if rank == 0:
        log.info("model %s: %.2fM params, seq %d, global batch %d seqs (%d tokens), %d accum x %d micro x %d workers",
                 cfg.preset, raw.num_params() / 1e6, seq_len, plan.global_batch, plan.global_batch * seq_len,
                 plan.accum_steps, plan.micro_batch, world)

    step = step_function(cfg, fwd, model, raw, optimizer, device, autocast, world)
    flops_per_token = raw.flops_per_token(seq_len)
    t_last, steps_since, last_stall, resumed_from, first_step_s = time.perf_counter(), 0, 0.0, state.step, 0.0
    start_step, metrics = state.step, {}
    while state.step < cfg.max_steps:
        # ---- forward/backward with gradient accumulation ----
        batches = loader.micro_batches(state.step)
        mean_loss, grad_norm = step(batches)
        scheduler.step()
        if ema is not None:
            ema.update()
        if state.step == start_step:  # the first step of each start compiles: timed apart
            first_step_s = synced_seconds(t_last, device)
            t_last, steps_since = time.perf_counter(), -1
        state.step += 1
        state.samples += plan.global_batch
        state.tokens += plan.global_batch * seq_len
        steps_since += 1
        last = state.step == cfg.max_steps

        # ---- log ----
        metrics: dict[str, Any] = {"step": state.step, "tokens": state.tokens, "resumes": state.resumes,
                                   "preemptions": state.preemptions}
        progress_from = None  # set when this step logs
        if state.step % cfg.log_every == 0 or last or (val and _eval_due(cfg, state.step)):
            dt = synced_seconds(t_last, device)
            state.train_time_s += dt
            (train_loss,) = _all_reduce_mean([mean_loss.item()], device)
            tps = steps_since * plan.global_batch * seq_len / dt if steps_since > 0 else 0.0
            mfu = _mfu(flops_per_token, tps, world)
            state.loss_curve[str(state.step)] = train_loss
            metrics.update(train_loss=train_loss, tokens_per_s=tps, lr=scheduler.get_last_lr()[0],
                           checkpoint_stall_s=last_stall, train_time_s=state.train_time_s,
                           first_step_s=first_step_s,
                           grad_norm=float(grad_norm), epoch=loader.epoch_of(state.step))
            if mfu is not None:
                metrics["mfu"] = mfu
            progress_from = resumed_from  # progress.json is written once, after this step's evaluation
            t_last, steps_since, last_stall, resumed_from = time.perf_counter(), 0, 0.0, state.step

        # ---- eval and checkpoint ----
        if val and (_eval_due(cfg, state.step) or last):
            t_eval = time.perf_counter()
            with ema.swapped() if ema is not None else contextlib.nullcontext():
                metrics["val_loss"] = evaluate(fwd, val, device, autocast)
            state.best_val_loss = min(metrics["val_loss"], state.best_val_loss or math.inf)
            state.val_curve[str(state.step)] = [state.train_time_s, metrics["val_loss"]]
            if cfg.target_val_loss and metrics["val_loss"] <= cfg.target_val_loss:
                last = True  # reached the target: finish here (checkpoint and export)
            metrics["eval_s"] = time.perf_counter() - t_eval
            t_last = time.perf_counter()
        if rank == 0 and progress_from is not None:
            _log_step(cfg, metrics)
            _write_progress(cfg.run_dir, state, metrics, progress_from)
        metrics["done"] = last
        # ---- preemption: checkpoint at this step boundary and hand back to the driver ----
        preempted = _any_rank(watcher.should_stop(check_extra=state.step % DRAIN_CHECK_EVERY == 0), device)
        if preempted:
            state.preemptions += 1
            metrics["preemptions"] = state.preemptions
            if rank == 0:
                log.warning("preempted (%s) at step %d: checkpointing and stopping", watcher.reason or "another rank",
                            state.step)
        if preempted or state.step % cfg.checkpoint_every == 0 or last:
            last_stall = _report(metrics, state, raw, optimizer, scheduler, rank, cfg, ema)
            t_last = time.perf_counter()
        if preempted or last:
            break
    watcher.close()
    if state.step < cfg.max_steps and not metrics.get("done"):
        return  # preempted: the driver starts the run again

    # ---- export ----
    if cfg.export_dir:
        with ema.swapped() if ema is not None else contextlib.nullcontext():
            weights = _final_weights(raw, optimizer, cfg)  # a collective under FSDP: every rank calls it
    if rank == 0 and cfg.export_dir:
        from app.model.export import export_model

        final = GPT(mcfg)
        final.load_state_dict(weights)
        export_model(final, cfg.export_dir, manifest.tokenizer_path,
                     meta={"run": cfg.name, "step": state.step, "val_loss": state.best_val_loss,
                           "eot_id": manifest.eot_id})


def _final_weights(model: GPT, optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> dict[str, torch.Tensor]:
    """The trained weights as a full fp32 CPU state dict: gathered from the shards under FSDP, the fp32
    master copy when the optimizer keeps one (offloaded, or `bf16_weights`: the model's copy is bf16)."""
    sd = full_state_dicts(model, optimizer)[0] if cfg.memory.fsdp else checkpoint.model_weights(model, optimizer)
    # A copy even on CPU: the live parameters change after this (the weight average swaps back out).
    return {k: v.detach().to("cpu", torch.float32, copy=True) for k, v in sd.items()}


def _report(metrics: dict[str, Any], state: checkpoint.TrainState, model, optimizer, scheduler, rank: int,
            cfg: TrainConfig, ema: WeightEMA | None) -> float:
    """Checkpoint through Ray Train: rank 0 writes the state, every rank calls report (a barrier).
    Returns the seconds the training loop was held up."""
    import ray.train

    t0 = time.perf_counter()
    if cfg.memory.fsdp:  # gathering the shards is a collective: every rank takes part
        model, optimizer = full_state_dicts(model, optimizer)
    if rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return time.perf_counter() - t0
    # Training stalls only for the copy to CPU memory: writing the files and uploading them happen
    # in Ray's upload hook, in the background when async_checkpoint is on. The directory is not a
    # context manager: Ray deletes it once uploaded.
    snap = checkpoint.snapshot(model, optimizer, scheduler, state, ema)
    d = tempfile.mkdtemp(prefix=f"spotlm-ckpt-{cfg.name}-")
    mode = ray.train.CheckpointUploadMode.ASYNC if cfg.async_checkpoint else ray.train.CheckpointUploadMode.SYNC
    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d),
                     checkpoint_dir_name=f"checkpoint_{state.step:08d}", checkpoint_upload_mode=mode,
                     checkpoint_upload_fn=functools.partial(_write_and_upload, snap, cfg.run_dir,
                                                            cfg.upload_retries),
                     delete_local_checkpoint_after_upload=True)
    return time.perf_counter() - t0


def _write_and_upload(snap: dict[str, Any], run_dir: str, retries: int, ckpt, dir_name: str):
    """Ray Train's checkpoint upload hook: write the snapshot, then our retrying, DONE-last upload."""
    import ray.train

    checkpoint.write(ckpt.path, snap)
    checkpoint.upload(ckpt.path, storage.join(run_dir, dir_name), retries=retries)
    # The same place, named through Ray's own filesystem object (Ray checks it is under its storage).
    st = ray.train.get_context().get_storage()
    return ray.train.Checkpoint(path=f"{st.experiment_fs_path}/{dir_name}", filesystem=st.storage_filesystem)


def check_storage(path: str) -> None:
    """Fail fast, with one clear line, when the run's storage cannot be written and read back."""
    probe = storage.join(path, ".spotlm-storage-probe")
    try:
        storage.write_text(probe, "ok")
        ok = storage.read_text(probe) == "ok"
        storage.remove(probe)
    except OSError as e:
        raise ConfigError(f"storage {path} is unreachable: {e}") from None
    if not ok:
        raise ConfigError(f"storage {path} did not read back what was written")


def list_checkpoints(run_dir: str) -> list[str]:
    """Complete checkpoint directories of a run, oldest first."""
    dirs = [f.rsplit("/", 1)[0] for f in storage.list_files(run_dir) if f.endswith("/" + checkpoint.DONE)]
    return sorted(d for d in dirs if d.rsplit("/", 1)[1].startswith("checkpoint_"))


def preflight(cfg: TrainConfig) -> None:
    """Check in the driver, before any Ray work, what the workers would otherwise fail on (spending the
    failure budget): the dataset (and its LMatch ids with `index`), a model the preset and `--model.*`
    overrides can build over the dataset's vocabulary, sequences it can take, a global batch that splits
    over the workers, a storage that reads back what it writes, and checkpoints that agree with `resume`.
    Raises a ValueError (ConfigError, ShardFormatError) of one line; checks only, so it may run twice."""
    manifest = load_manifest(cfg.data)
    if cfg.index:
        index_stream(manifest, "train")
    mcfg = model_config(cfg, manifest.vocab_size)
    if cfg.seq_len > mcfg.max_seq_len:
        raise ConfigError(f"seq_len={cfg.seq_len} exceeds the model's max_seq_len={mcfg.max_seq_len} "
                          "(--model.max_seq_len raises it)")
    batch_plan(cfg, cfg.seq_len or mcfg.max_seq_len, cfg.num_workers)
    check_storage(cfg.run_dir)
    existing = list_checkpoints(cfg.run_dir)
    if existing and not cfg.resume:
        raise ConfigError(f"run {cfg.name!r} already has checkpoints in {cfg.run_dir}: pass --resume to "
                          "continue it, or choose another --name")
    if cfg.resume and not existing:
        raise ConfigError(f"--resume: run {cfg.name!r} has no checkpoint in {cfg.run_dir}")


def train(cfg: TrainConfig):
    """Run (or continue) a training run on Ray Train; returns Ray's `Result`.

    Errors restart the worker group up to `max_failures` times (Ray's budget); a preempted run
    checkpoints and is started again here, up to `max_preemptions` times, without using it."""
    preflight(cfg)
    use_gpu = _resolve(cfg.use_gpu, _cluster_has_gpus())
    # Ray Train's controller polls workers every 2 s by default, which stalls every report().
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    t0 = time.perf_counter()
    with relay_worker_logs() as log_sink:
        for _ in range(cfg.max_preemptions + 1):
            result = _trainer(cfg, use_gpu, log_sink).fit()
            # The loop only returns unfinished when it was preempted (after a checkpoint).
            metrics = result.metrics or {}
            if result.error or metrics.get("done") or metrics.get("step", 0) >= cfg.max_steps:
                break
            log.warning("run %s was preempted at step %d; starting it again from that checkpoint",
                        cfg.name, result.metrics["step"])
    if not result.error:
        _log_summary(cfg, result.metrics or {}, time.perf_counter() - t0)
    return result


def _log_summary(cfg: TrainConfig, metrics: dict[str, Any], seconds: float) -> None:
    """One line for the end of a run: steps, the last validation loss, time, where the model went."""
    val = f", val loss {metrics['val_loss']:.4f}" if "val_loss" in metrics else ""
    export = f"; model in {cfg.export_dir}" if cfg.export_dir else ""
    log.info("trained %s: %d steps%s in %.0f s%s", cfg.name, metrics.get("step", 0), val, seconds, export)


def _cluster_has_gpus() -> bool:
    """Whether the Ray cluster (not this driver's machine: a head is often CPU-only) has GPUs."""
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0 if ray.is_initialized() else torch.cuda.is_available()


def _trainer(cfg: TrainConfig, use_gpu: bool, log_sink: Any = None):
    import ray.train
    from ray.train.torch import TorchTrainer

    return TorchTrainer(
        functools.partial(train_loop, log_sink=log_sink),
        train_loop_config=to_dict(cfg),
        scaling_config=ray.train.ScalingConfig(
            num_workers=(cfg.min_workers, cfg.num_workers) if cfg.min_workers else cfg.num_workers,
            use_gpu=use_gpu, resources_per_worker={"CPU": cfg.cpus_per_worker},
            elastic_resize_monitor_interval_s=cfg.resize_check_s),
        run_config=ray.train.RunConfig(
            name=cfg.name, storage_path=storage.absolute(cfg.storage),
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.keep_checkpoints)),
    )
