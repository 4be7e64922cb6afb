"""Memory options of a training run (`MemoryConfig`) and a planner that picks the fastest set that fits both
the GPU and the host memory (read from the machine: MemAvailable and cgroup limits), or says which is short.

    python -m app.train.memory_plan --preset llama3-8b --gpu_gb 80 --seq_len 262144 [--host_gb 115]

How the activation numbers were calibrated: the per-token, per-layer bytes below are not a fit but a count
of the tensors autograd saves in one `Block` of app/model/gpt.py, for each checkpointing mode and for both
residual dtypes (fp32 parameters under bf16 autocast: r = 4; bf16 parameters: r = 2). They were checked,
byte for byte, against `torch.autograd.graph.saved_tensors_hooks` counts of the real block on CPU
(tests/test_memory.py::test_activation_formula_matches_saved_tensors re-checks it on several shapes; the
CPU flash-attention kernel saves the same tensors as CUDA's: q, k, v, out, logsumexp). What the count
cannot see, the transient working memory of backward and of the loss, is a formula with constants
(`TRANSIENT_*` below) that bench/memory.py reports against torch.cuda.max_memory_allocated on the GPU
(`predicted_peak_gb` beside `peak_gb`), so the error is visible in every benchmark run; the host side
likewise (`predicted_host_gb` beside `host_peak_gb`). tests/test_memory.py replays every probe committed in
bench/results/memory*.json through `estimate` and holds both within 10%.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal, get_args

from app.config import ConfigError

Checkpointing = Literal["none", "selective", "full"]
CHECKPOINTING: tuple[str, ...] = get_args(Checkpointing)
GB = 1e9
GiB = 1 << 30


@dataclass
class MemoryConfig:
    """How one training step uses GPU memory. Everything is off by default (each option costs speed)."""

    auto: bool = False  # let the planner choose the options below from the GPU's memory (app.train.memory_plan.plan)
    checkpointing: Checkpointing = "none"  # selective: recompute norms and the SwiGLU product; full: whole blocks
    mlp_chunk: int = 0  # checkpointing=full: run the MLP over checkpointed tiles of this many tokens (0 = whole)
    offload_activations: bool = False  # saved activations (with full checkpointing: the block inputs) to pinned CPU memory
    offload_min_bytes: int = 1 << 20  # smaller saved tensors stay on the GPU
    # offloaded layer inputs as saved, or FP8 e4m3 with a scale per token (needs checkpointing=full)
    offload_dtype: Literal["native", "fp8"] = "native"
    offload_keep_layers: int = 0  # offload_activations: the last this many blocks keep their inputs on the GPU
    host_budget_gb: float = 0.0  # auto: host memory the plan may use (0 = what the machine has available)
    offload_optimizer: bool = False  # AdamW on the CPU over fp32 master weights; bf16 weights and grads on the GPU
    # offload_optimizer: the step waits for the CPU AdamW (sync) or the next forward waits per block; both exact
    optimizer_mode: Literal["sync", "overlap"] = "sync"
    optimizer_state_dtype: Literal["fp32", "bf16"] = "fp32"  # offload_optimizer: dtype of the CPU Adam moments
    fsdp: bool = False  # FSDP2 fully_shard per block + root over the Ray Train workers (instead of DDP)
    fsdp_cpu_offload: bool = False  # fsdp: CPUOffloadPolicy (sharded params, grads and optimizer state on the CPU)

    def validate(self) -> None:
        if self.fsdp and self.offload_optimizer:
            raise ConfigError("memory.fsdp and memory.offload_optimizer do not combine: use memory.fsdp_cpu_offload")
        if self.fsdp_cpu_offload and not self.fsdp:
            raise ConfigError("memory.fsdp_cpu_offload needs memory.fsdp=true")
        if self.offload_dtype == "fp8" and not (self.offload_activations and self.checkpointing == "full"):
            raise ConfigError("memory.offload_dtype=fp8 needs memory.offload_activations=true and "
                              "memory.checkpointing=full (only block inputs may be stored in FP8)")
        if self.offload_keep_layers < 0 or self.offload_keep_layers and not self.offload_activations:
            raise ConfigError("memory.offload_keep_layers must be >= 0 and needs memory.offload_activations=true")

    def saving(self) -> bool:
        """True when an option trades speed for memory: checkpointing, an offload or FSDP."""
        return self.fsdp or self.offload_optimizer or self.offload_activations or self.checkpointing != "none"

    def label(self) -> str:
        parts = [f"ckpt={self.checkpointing}" + (f"/mlp{self.mlp_chunk}" if self.mlp_chunk else "")]
        if self.offload_activations:
            parts.append("offload_act" + ("(fp8)" if self.offload_dtype == "fp8" else "")
                         + (f"/keep{self.offload_keep_layers}" if self.offload_keep_layers else ""))
        if self.offload_optimizer:
            parts.append(f"offload_opt({self.optimizer_mode},{self.optimizer_state_dtype})")
        if self.fsdp:
            parts.append("fsdp+cpu" if self.fsdp_cpu_offload else "fsdp")
        return ",".join(parts)


# Working memory of backward beyond the saved activations, per token: gradients of the residual stream
# and of one block's widest intermediates (multiples of d_model and ffn_hidden, in bytes).
# TRANSIENT_F: bytes of one ffn-wide bf16 gradient; the MLP's backward holds mlp_inputs + 1 of them (SwiGLU: dgate,
# dup, dproduct).
TRANSIENT_D, TRANSIENT_F = 12, 2  # 3 residual-wide grads (x r bytes / 4 here: 12 -> 3 r d)
# `peak` predicts torch.cuda.max_memory_allocated; the GPU must also hold the allocator's fragmentation. With
# expandable segments the allocator unmaps cached free pages before it reports out of memory, so the reserved
# bytes beyond the live ones (bench/results/memory_*.json: reserved_gb vs peak_gb) are mostly a cache, not a need.
ALLOCATOR_SLACK = 1.05
OFFLOAD_RING_BYTES = 4 * 16 * 2**20 * 2 * 2  # app.train.offload: 4 pinned slots x 16M bf16 elements, grads + params
CUDA_CONTEXT_GB = 0.6  # CUDA context + cuBLAS workspaces are outside max_memory_allocated, but not outside the GPU
PREFETCH_BYTES = 2 * GiB  # app.train.parallel.ActivationOffloader's prefetch window (stored bytes)
# Host memory of a training process beyond the options' buffers: the CUDA runtime, torch's libraries, Python
# and the data loader (an estimate: bench/memory.py measures the host peak beside the prediction).
HOST_FIXED_GB = 5.0
KEEP_MARGIN = 0.95  # plan: blocks kept on the GPU under activation offload fill at most this share of its budget
HOST_SAFETY = 0.9  # the auto host budget: this share of what the machine has available (the kernel, other processes)


PIECE_MIN = 2 << 20  # bytes: the smallest piece an offloaded tensor's host copy is cut into


def piece_sizes(nbytes: int) -> list[int]:
    """Byte sizes, largest first, that add up to `nbytes`: powers of two down to PIECE_MIN, then what remains.
    torch's caching host allocator rounds every pinned block up to a power of two (a 1.2 GB block holds
    2.1 GB), so app.train.parallel cuts host copies into these pieces: less than PIECE_MIN is wasted."""
    out, rem = [], int(nbytes)
    while rem > PIECE_MIN:
        out.append(1 << (rem.bit_length() - 1))
        rem -= out[-1]
    return out + ([rem] if rem else [])


def pinned_bytes(nbytes: float) -> float:
    """Pinned host bytes that hold a tensor of `nbytes` cut by `piece_sizes`."""
    return float(sum(1 << max(n - 1, 0).bit_length() for n in piece_sizes(int(nbytes))))


@dataclass
class Estimate:
    """Bytes of one training step at its peak, by part: GPU (`peak` = the live bytes, what
    torch.cuda.max_memory_allocated reports; `gpu_need` adds fragmentation and the CUDA context) and host
    (`host` = the CPU optimizer's state and staging, the pinned copies of offloaded activations, and the
    process's fixed share)."""

    weights: float
    grads: float
    optimizer: float
    activations: float  # on the GPU
    loss: float
    transient: float
    peak: float  # GPU: max_memory_allocated
    gpu_need: float  # GPU memory the step needs: peak x ALLOCATOR_SLACK + the CUDA context
    host_optimizer: float
    host_activations: float  # pinned copies of the offloaded activations (`pinned_bytes`)
    host: float  # host peak: the two above + HOST_FIXED_GB

    def gb(self) -> dict[str, float]:
        return {k: round(v / GB, 2) for k, v in asdict(self).items()}


@dataclass
class Plan:
    memory: MemoryConfig
    fused_loss: bool
    estimate: Estimate
    fits: bool
    step_s: float  # estimated seconds per step (app.train.memory_plan.step_seconds)
    gpu_gb: float
    host_gb: float  # the host budget the plan was made for
    considered: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {"memory": asdict(self.memory), "label": self.memory.label(), "fused_loss": self.fused_loss,
                "fits": self.fits, "step_s": self.step_s, "gpu_gb": self.gpu_gb, "host_gb": self.host_gb,
                "estimate_gb": self.estimate.gb(), "considered": self.considered}

    def shortfall(self) -> str:
        """One line: which budget the plan misses and by how much (empty when it fits)."""
        e, short = self.estimate, []
        for name, need, have in (("GPU", e.gpu_need / GB, self.gpu_gb), ("host", e.host / GB, self.host_gb)):
            if need > have:
                short.append(f"{name} short by {need - have:.1f} GB (needs {need:.1f} of {have:.1f})")
        return "; ".join(short)


def _shape(preset_or_cfg):
    from app.model.gpt import ModelConfig

    if isinstance(preset_or_cfg, str):
        return ModelConfig.preset(preset_or_cfg)
    return preset_or_cfg


def num_params(cfg) -> int:
    """Parameters of GPT(cfg) (a tied matrix once), without building it."""
    d, f, hd = cfg.d_model, cfg.ffn_hidden, cfg.head_dim
    V = cfg.padded_vocab_size
    block = d * cfg.n_head * hd * 2 + d * cfg.n_kv_head * hd * 2 + (cfg.mlp_inputs + 1) * d * f + 2 * d
    emb = V * d + (cfg.lmatch_vocab * d if cfg.lmatch_vocab else 0)
    return emb + cfg.n_layer * block + d + (0 if cfg.tie_embeddings else V * d)


def layer_activation_bytes(cfg, checkpointing: str, residual_bytes: int) -> float:
    """Bytes autograd saves per token in one block (weights and the shared rotary tables excluded).

    r = residual_bytes (4: fp32 params under bf16 autocast; 2: bf16 params); q = n_head * head_dim,
    kv = n_kv_head * head_dim, h = n_head, f = ffn_hidden. Attention saves q, k, v, out (bf16) and the fp32
    logsumexp: 4q + 4kv + 4h. Each RMSNorm saves its fp32 input copy, the fp32 rsqrt and the normalised
    value: 4d + 4 + r d; its output is saved by the projections that read it (once as bf16 when r = 2;
    once per projection as an autocast cast when r = 4: 3 in attention, mlp_inputs in the MLP). SwiGLU saves
    gate, up, silu(gate) and their product: 8f; GELU / ReLU^2 their input and output: 4f (so 4 f x
    mlp_inputs; selective checkpointing keeps only the input projections: half that)."""
    d, f, h = cfg.d_model, cfg.ffn_hidden, cfg.n_head
    g = cfg.mlp_inputs
    q, kv = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
    r = residual_bytes
    attn = 4 * q + 4 * kv + 4 * h
    proj_in = 2 * 2 * d if r == 2 else (3 + g) * 2 * d  # the norm outputs as the projections save them
    if checkpointing == "none":
        return 2 * (4 * d + 4 + r * d) + proj_in + attn + 4 * g * f
    if checkpointing == "selective":
        return 2 * r * d + proj_in + attn + 2 * g * f
    if checkpointing == "full":
        return r * d
    raise ValueError(checkpointing)


def _offloaded(cfg, mem: MemoryConfig, T: int, r: int) -> tuple[float, float]:
    """(GPU bytes, host bytes) of the saved activations under activation offload: the kept blocks' and the
    copies in flight (the block in use + the prefetch window) on the GPU; the pinned copies on the host
    (FP8: one byte a value + a 4-byte scale per token; each cut into pieces, `pinned_bytes`)."""
    L = cfg.n_layer
    per_layer = layer_activation_bytes(cfg, mem.checkpointing, r) * T
    kept = min(mem.offload_keep_layers, L)
    moved = L - kept
    if mem.offload_dtype == "fp8":
        stored = [per_layer / r, 4 * T]
    else:
        stored = [per_layer]
    host = moved * sum(pinned_bytes(b) for b in stored)
    window = min(moved * per_layer, 2 * per_layer + PREFETCH_BYTES)  # prefetched copies stay as stored till used
    return kept * per_layer + window, host


def estimate(preset_or_cfg, seq_len: int, batch: int = 1, mem: MemoryConfig | None = None, *,
             fused_loss: bool = True, world_size: int = 1, master_weights: bool = False) -> Estimate:
    """Peak GPU bytes and host bytes of one training step (forward, backward, AdamW step) under `mem`.
    `master_weights`: bf16 weights and gradients with fp32 masters on the GPU (app/train/master.py) where `mem`
    has neither the CPU optimizer nor FSDP (which bring their own mixed precision)."""
    cfg = _shape(preset_or_cfg)
    mem = mem or MemoryConfig()
    P = num_params(cfg)
    T = seq_len * batch
    d, f, L, V = cfg.d_model, cfg.ffn_hidden, cfg.n_layer, cfg.padded_vocab_size
    master_weights = master_weights and not (mem.offload_optimizer or mem.fsdp)
    bf16_params = mem.offload_optimizer or mem.fsdp or master_weights  # FSDP2 unshards to bf16 (mixed precision)
    r = 2 if bf16_params else 4
    host_opt = host_acts = 0.0
    block_params = P - V * d * (1 if cfg.tie_embeddings else 2)
    block_params /= L
    if mem.offload_optimizer:
        weights, grads, optimizer = 2 * P, 2 * P, 0.0
        host_opt = _opt_host(cfg, mem)  # fp32 master + moments + pinned staging rings
    elif mem.fsdp:
        n = max(world_size, 1)
        sharded = 16 * P / n  # fp32 params + grads + Adam moments, this rank's shard
        unsharded = 2 * 2 * block_params * 2 + 2 * (P - L * block_params)  # two bf16 blocks in flight + root
        if mem.fsdp_cpu_offload:
            weights, grads, optimizer, host_opt = unsharded, 2 * 2 * block_params, 0.0, sharded
        else:
            weights, grads, optimizer = 4 * P / n + unsharded, 4 * P / n, 8 * P / n
    elif master_weights:
        weights, grads, optimizer = 2 * P + 4 * P, 2 * P, 8 * P  # bf16 + fp32 masters, bf16 grads, Adam
    else:
        weights, grads, optimizer = 4 * P + 2 * P, 4 * P, 8 * P  # fp32 + autocast's bf16 copies, fp32 grads, Adam

    if mem.offload_activations:
        acts, host_acts = _offloaded(cfg, mem, T, r)
    else:
        acts = L * layer_activation_bytes(cfg, mem.checkpointing, r) * T
    acts += 2 * T * cfg.head_dim * r + 8 * T  # rotary tables, token ids
    # backward of one block: gradients of the residual, of q/k/v/out and of the MLP (per MLP tile when
    # tiled), plus what that block recomputes (selective: norms and the MLP's activation; full: its selective
    # set, the MLP's part per tile; the norms' fp32 recompute runs at each norm's own backward, after the
    # attention's or the MLP's saved tensors and gradients are freed, so it is not on top of them)
    q, kv = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
    g = cfg.mlp_inputs
    tile = min(T, mem.mlp_chunk) if mem.checkpointing == "full" and mem.mlp_chunk else T
    transient = T * (TRANSIENT_D * r * d // 4 + 4 * q + 4 * kv) + tile * TRANSIENT_F * (g + 1) * f
    if mem.checkpointing == "selective":
        transient += T * (8 * d + 2 * g * f)
    elif mem.checkpointing == "full":
        transient += layer_activation_bytes(cfg, "selective", r) * T - 2 * g * f * (T - tile) + tile * 2 * g * f
    # final norm and the loss
    loss = T * (4 * d + 4 + r * d + 2 * d)
    if fused_loss:  # grad_weight (fp32) and grad_hidden kept from forward, one chunk of logits
        loss += 4 * V * d + 2 * T * d + 2 * 2 * T * d
    else:  # bf16 logits, fp32 copy, log_softmax output, its gradient
        loss += 14 * T * V
    peak = weights + grads + optimizer + acts + max(loss, transient)
    return Estimate(weights, grads, optimizer, acts, loss, transient, peak,
                    peak * ALLOCATOR_SLACK + CUDA_CONTEXT_GB * GB, host_opt, host_acts,
                    host_opt + host_acts + HOST_FIXED_GB * GB)


def host_available_gb(proc: str = "/proc", cgroup: str = "/sys/fs/cgroup") -> float:
    """Host memory this process may still use, in GB: /proc/meminfo's MemAvailable, lowered to the room
    left under a cgroup limit when one is set (cgroup v2 memory.max - memory.current; v1
    memory.limit_in_bytes - memory.usage_in_bytes)."""
    avail = float("inf")
    try:
        with open(f"{proc}/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    for limit, usage in (("memory.max", "memory.current"),
                         ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes")):
        try:
            with open(f"{cgroup}/{limit}") as fh:
                raw = fh.read().strip()
            with open(f"{cgroup}/{usage}") as fh:
                used = int(fh.read().strip())
        except (OSError, ValueError):
            continue
        if raw.isdigit() and int(raw) < 1 << 60:  # "max" / v1's huge number: no limit
            avail = min(avail, max(int(raw) - used, 0))
    if avail == float("inf"):
        raise RuntimeError(f"cannot read the host's available memory from {proc}/meminfo")
    return avail / GB


def host_budget_gb(mem: MemoryConfig, sharers: int = 1) -> float:
    """The host budget of a plan: `mem.host_budget_gb`, or (0) HOST_SAFETY x what the machine has available,
    split between the `sharers` training processes of this node."""
    if mem.host_budget_gb > 0:
        return mem.host_budget_gb
    return HOST_SAFETY * host_available_gb() / max(sharers, 1)


# Step-time model for ranking plans (bench/memory.py measures the real numbers): achieved bf16 FLOP/s,
# PCIe bandwidth each way, and host memory bandwidth of the CPU AdamW (~24 bytes moved per parameter).
GPU_FLOPS, PCIE_BPS, CPU_ADAM_BPS = 400e12, 20e9, 20e9


def step_seconds(preset_or_cfg, seq_len: int, batch: int, mem: MemoryConfig, est: Estimate | None = None) -> float:
    """Estimated seconds of one step: matmul + causal attention FLOPs (x4/3 for full recompute), plus the
    PCIe time activation offload cannot hide behind forward / backward, plus the CPU optimizer step."""
    cfg = _shape(preset_or_cfg)
    T, L, d, f = seq_len * batch, cfg.n_layer, cfg.d_model, cfg.ffn_hidden
    matmul = 6 * (num_params(cfg) - cfg.padded_vocab_size * d * (0 if cfg.tie_embeddings else 1)) * T
    attn = 6 * L * d * T * seq_len  # causal: half of 12 L d T per token
    flops = matmul + attn
    if mem.checkpointing == "full":
        flops *= 4 / 3
        if mem.mlp_chunk:
            flops += 2 * (cfg.mlp_inputs + 1) * d * f * L * T  # the MLP forward again (tiles are checkpointed)
    elif mem.checkpointing == "selective":
        flops *= 1.02
    t = flops / GPU_FLOPS
    if mem.offload_activations:
        acts = (est or estimate(cfg, seq_len, batch, mem)).host_activations  # bytes each way
        t += max(0.0, acts / PCIE_BPS - t / 3) + max(0.0, acts / PCIE_BPS - 2 * t / 3)
    if mem.offload_optimizer:
        P = num_params(cfg)
        t += 4 * P / PCIE_BPS + (24 if mem.optimizer_state_dtype == "fp32" else 20) * P / CPU_ADAM_BPS
    if mem.fsdp_cpu_offload:
        t += 16 * num_params(cfg) / PCIE_BPS
    return t


def _opt_host(cfg, mem: MemoryConfig) -> float:
    return num_params(cfg) * (4 + (8 if mem.optimizer_state_dtype == "fp32" else 4)) + OFFLOAD_RING_BYTES


def candidates(world_size: int = 1) -> list[MemoryConfig]:
    """The option sets the planner weighs, from the cheapest in speed (how many blocks keep their inputs on
    the GPU under activation offload is `plan`'s choice)."""
    out = []
    for opt in ({}, {"offload_optimizer": True}, {"offload_optimizer": True, "optimizer_state_dtype": "bf16"}):
        for ck in CHECKPOINTING:
            for act in (False, True):
                if act and ck == "none":
                    continue  # offloading every saved tensor moves ~20x the bytes of full checkpointing
                out.append(MemoryConfig(checkpointing=ck, offload_activations=act, **opt))
                if ck == "full":
                    for dtype in ("native", "fp8") if act else ("native",):
                        out.append(MemoryConfig(checkpointing=ck, offload_activations=act, mlp_chunk=16384,
                                                offload_dtype=dtype, **opt))
    if world_size > 1:
        for ck in CHECKPOINTING:
            for cpu in (False, True):
                out.append(MemoryConfig(checkpointing=ck, fsdp=True, fsdp_cpu_offload=cpu))
    return out


def _options(mem: MemoryConfig) -> int:
    """How many speed-costing options `mem` turns on (the planner's tie-break: fewer is simpler)."""
    return (CHECKPOINTING.index(mem.checkpointing) + (mem.mlp_chunk > 0) + mem.offload_activations
            + (mem.offload_dtype == "fp8") + mem.offload_optimizer)


def plan(preset_or_cfg, gpu_gb: float, seq_len: int, batch: int = 1, *, host_gb: float = 100.0,
         fused_loss: bool = True, world_size: int = 1, headroom_gb: float = 1.0, master_weights: bool = False) -> Plan:
    """The fastest (by `step_seconds`) option set whose `gpu_need` fits in `gpu_gb` less `headroom_gb` and whose
    host peak fits in `host_gb`; within 1% of the fastest, the fewest options, then the lower GPU peak.
    Under activation offload, the last blocks keep their inputs on the GPU, as many as its budget holds (fewer
    transfers). When nothing fits, the set closest to fitting (the least shortfall, as shares of the two
    budgets), with fits=False. `master_weights`: as in `estimate`."""
    gpu_budget, host_budget = (gpu_gb - headroom_gb) * GB, host_gb * GB
    L = _shape(preset_or_cfg).n_layer

    def est(m: MemoryConfig) -> Estimate:
        return estimate(preset_or_cfg, seq_len, batch, m, fused_loss=fused_loss, world_size=world_size,
                        master_weights=master_weights)

    rows = []
    for mem in candidates(world_size):
        e = est(mem)
        if mem.offload_activations and e.gpu_need <= gpu_budget:
            keep = max((k for k in range(1, L + 1)  # a margin: each kept block is a little speed, an OOM a run
                        if est(replace(mem, offload_keep_layers=k)).gpu_need <= KEEP_MARGIN * gpu_budget), default=0)
            if 0 < keep < L:  # all of them kept is the same set without offload
                mem = replace(mem, offload_keep_layers=keep)
                e = est(mem)
        ok = e.gpu_need <= gpu_budget and e.host <= host_budget
        rows.append((mem, e, ok, step_seconds(preset_or_cfg, seq_len, batch, mem, e)))
    fitting = [r for r in rows if r[2]]
    if fitting:
        best = min(r[3] for r in fitting)
        near = [r for r in fitting if r[3] <= best * 1.01]
        mem, e, ok, s = min(near, key=lambda r: (_options(r[0]), r[1].peak))
    else:
        mem, e, ok, s = min(rows, key=lambda r: max(r[1].gpu_need / gpu_budget - 1, 0)
                            + max(r[1].host / host_budget - 1, 0))
    considered = [{"label": m.label(), "peak_gb": round(x.peak / GB, 2), "gpu_need_gb": round(x.gpu_need / GB, 2),
                   "host_gb": round(x.host / GB, 2), "fits": k, "step_s": round(sp, 3)} for m, x, k, sp in rows]
    return Plan(replace(mem), fused_loss, e, ok, round(s, 3), gpu_gb - headroom_gb, host_gb, considered)


def resolve(mem: MemoryConfig, preset_or_cfg, seq_len: int, batch: int, gpu_gb: float, **kw) -> MemoryConfig:
    """`mem` itself, or the planner's choice when `mem.auto`; raises ConfigError (one line: which budget is
    short and by how much) when no option set fits both the GPU and the host."""
    if not mem.auto:
        return mem
    p = plan(preset_or_cfg, gpu_gb, seq_len, batch, **kw)
    if not p.fits:
        name = preset_or_cfg if isinstance(preset_or_cfg, str) else getattr(preset_or_cfg, "name", "the model")
        raise ConfigError(f"memory.auto: no option set trains {name} at {seq_len} tokens x {batch}; the closest, "
                          f"{p.memory.label()}: {p.shortfall()}")
    return replace(p.memory, host_budget_gb=mem.host_budget_gb)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="llama3-8b")
    ap.add_argument("--gpu_gb", type=float, default=80.0)
    ap.add_argument("--host_gb", type=float, default=0.0, help="host budget (0: what this machine has available)")
    ap.add_argument("--seq_len", type=int, default=131072)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--world_size", type=int, default=1)
    ap.add_argument("--no_fused_loss", action="store_true")
    ap.add_argument("--vocab_size", type=int, default=0)
    ap.add_argument("--all", action="store_true", help="print every option set considered")
    a = ap.parse_args(argv)
    from app.model.gpt import ModelConfig

    cfg = ModelConfig.preset(a.preset, **({"vocab_size": a.vocab_size} if a.vocab_size else {}))
    host_gb = a.host_gb or host_budget_gb(MemoryConfig())
    p = plan(cfg, a.gpu_gb, a.seq_len, a.batch, host_gb=host_gb, fused_loss=not a.no_fused_loss,
             world_size=a.world_size)
    out = p.summary()
    out.update(preset=a.preset, seq_len=a.seq_len, batch=a.batch, params_b=round(num_params(cfg) / 1e9, 3))
    out["shortfall"] = p.shortfall()
    if not a.all:
        out.pop("considered")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
