"""parallelize(model, mem, ...): activation checkpointing, activation offload, FSDP2 and torch.compile.

Everything here changes how a step uses memory, never what it computes: parameter names, the state dict
and the loss are the same as the plain model's (checkpointed forwards are patched on the module instances,
so checkpoints and exports keep the Hugging Face layout).

- checkpointing="selective": per block, the two RMSNorms and the MLP's activation (the SwiGLU product) + down
  projection are recomputed in backward (saved: the norm inputs, the MLP's input projections: gate and up);
  matmul and attention outputs are kept.
- checkpointing="full": each block runs under `torch.utils.checkpoint` (non-reentrant); only its input is kept;
  its recompute in backward is itself selective, and with `mlp_chunk` the MLP runs in checkpointed token tiles.
- offload_activations: each block's saved tensors go to pinned CPU memory on a side CUDA stream while the
  forward goes on, and come back (prefetched a few tensors ahead, on another stream) in backward. With full
  checkpointing the only saved tensor of a block is its input (saved by checkpoint's `_NoopSaveInputs`,
  through these hooks), so exactly the layer inputs are offloaded. On CPU tensors the hooks make a copy
  (a no-op in effect, kept so tests go through the same path). `offload_dtype="fp8"` stores each offloaded
  layer input as FP8 e4m3 with one fp32 scale per row (token): half the host bytes and transfers of bf16;
  `offload_keep_layers` leaves the last blocks' inputs on the GPU (backward needs them first).
- fsdp: FSDP2 `fully_shard` per block then the root (bf16 params / fp32 reduce), optionally with
  `CPUOffloadPolicy`; needs an initialised process group (Ray Train sets one up).
"""
from __future__ import annotations

import functools
import weakref
from typing import Any

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from app.train.memory_plan import MemoryConfig, piece_sizes


# ----------------------------------------------------------------------------------------------------------
# activation checkpointing
# ----------------------------------------------------------------------------------------------------------
def _ckpt(fn, *args):
    return checkpoint(fn, *args, use_reentrant=False)  # RNG state kept: dropout masks recompute equal


def _selective_mlp(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return _ckpt(lambda *h: mlp.down_proj(mlp.activate(*h)), *mlp.project_in(x))


def _patch(module: nn.Module, new_forward) -> None:
    module._spotlm_orig_forward = getattr(module, "_spotlm_orig_forward", module.forward)
    module.forward = new_forward


def _unpatch(module: nn.Module) -> None:
    if hasattr(module, "_spotlm_orig_forward"):
        module.forward = module._spotlm_orig_forward
        del module._spotlm_orig_forward


def _tiled_mlp(mlp: nn.Module, orig, chunk: int, x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] <= chunk:
        return orig(x)
    return torch.cat([_ckpt(orig, x[:, i:i + chunk]) for i in range(0, x.shape[1], chunk)], dim=1)


def apply_checkpointing(model: nn.Module, mode: str, mlp_chunk: int = 0) -> nn.Module:
    """Patch every block of `model.model.layers` for `mode` (none | selective | full); returns model.

    full = the whole block checkpointed, with the selective patches inside it, so the backward's recompute
    of one block holds only the selective set. `mlp_chunk` > 0 (with full): the MLP runs over token tiles of
    that many positions, each checkpointed, so its ffn-wide intermediates exist for one tile at a time."""
    if mode not in ("none", "selective", "full"):
        raise ValueError(f"checkpointing must be none | selective | full, got {mode!r}")
    for block in model.model.layers:
        for m in (block, block.input_layernorm, block.post_attention_layernorm, block.mlp):
            _unpatch(m)
        if mode in ("selective", "full"):
            for norm in (block.input_layernorm, block.post_attention_layernorm):
                _patch(norm, functools.partial(_ckpt, norm.forward))
            mlp_fwd = functools.partial(_selective_mlp, block.mlp)
            if mode == "full" and mlp_chunk > 0:
                mlp_fwd = functools.partial(_tiled_mlp, block.mlp, mlp_fwd, mlp_chunk)
            _patch(block.mlp, mlp_fwd)
        if mode == "full":
            _patch(block, functools.partial(_ckpt, block.forward))
    return model


# ----------------------------------------------------------------------------------------------------------
# activation offload
# ----------------------------------------------------------------------------------------------------------
class _Host:
    """A tensor's host copy: contiguous ones as `piece_sizes` pieces of its bytes (no power-of-two rounding of
    one large pinned block), others as one block with their strides (dense) or contiguous."""

    __slots__ = ("whole", "pieces", "shape", "dtype")

    def __init__(self, x: torch.Tensor, pinned: bool):
        """Start the copy of `x` (call on the copy stream; non-blocking when pinned)."""
        x = x.detach()
        self.shape, self.dtype, self.whole, self.pieces = x.shape, x.dtype, None, []
        if not x.is_contiguous():
            self.whole = (torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, pin_memory=pinned) if _dense(x)
                          else torch.empty(x.shape, dtype=x.dtype, pin_memory=pinned))
            self.whole.copy_(x, non_blocking=pinned)
            return
        flat, o = x.reshape(-1).view(torch.uint8), 0
        for n in piece_sizes(flat.numel()):
            self.pieces.append(torch.empty(n, dtype=torch.uint8, pin_memory=pinned))
            self.pieces[-1].copy_(flat[o:o + n], non_blocking=pinned)
            o += n

    def to(self, device: torch.device, non_blocking: bool) -> torch.Tensor:
        """The tensor back on `device` (on the current stream)."""
        if self.whole is not None:
            return self.whole.to(device, non_blocking=non_blocking)
        out, o = torch.empty(sum(p.numel() for p in self.pieces), dtype=torch.uint8, device=device), 0
        for p in self.pieces:
            out[o:o + p.numel()].copy_(p, non_blocking=non_blocking)
            o += p.numel()
        return out.view(self.dtype).view(self.shape)


class _Packed:
    """One offloaded tensor: its host copy (`cpu`, a _Host; fp8: the e4m3 values with `scale`, one fp32 per
    row) and, once fetched, its device copy (`gpu`, `gpu_scale`; dequantized into `gpu` on first use)."""

    __slots__ = ("cpu", "scale", "dtype", "d2h", "gpu", "gpu_scale", "h2d", "device", "index", "nbytes")

    def __init__(self, cpu, d2h, device, index, nbytes, scale=None, dtype=None):
        self.cpu, self.d2h, self.device, self.index, self.nbytes = cpu, d2h, device, index, nbytes
        self.scale, self.dtype = scale, dtype
        self.gpu = self.gpu_scale = self.h2d = None


# FP8 storage of offloaded layer inputs. One scale per row (token), not per tensor: a few tokens of the
# residual stream carry activations hundreds of times the median (attention sinks); a per-tensor scale set
# by them would push every other token into e4m3's subnormals. A row's scale costs 4 bytes per d_model bytes.
FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
_QUANT_ROWS = 16384  # rows per (de)quantization pass: bounds the fp32 temporaries to rows x width x 4 bytes


def _fp8_ok(t: torch.Tensor) -> bool:
    return t.is_floating_point() and t.dtype != FP8 and t.is_contiguous() and t.dim() >= 2 and t.shape[-1] >= 16


def quantize_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 values, fp32 scale per row) of a contiguous tensor, rows = all dims but the last: each row is
    scaled so its largest magnitude maps to e4m3's largest finite value (all-zero rows get scale 1)."""
    rows = t.reshape(-1, t.shape[-1])
    q = torch.empty(rows.shape, dtype=FP8, device=t.device)
    scale = torch.empty(rows.shape[0], 1, dtype=torch.float32, device=t.device)
    for i in range(0, rows.shape[0], _QUANT_ROWS):
        x = rows[i:i + _QUANT_ROWS].float()
        amax = x.abs().amax(-1, keepdim=True)
        s = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
        scale[i:i + _QUANT_ROWS] = s
        q[i:i + _QUANT_ROWS] = (x / s).to(FP8)
    return q.view(t.shape), scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The inverse of `quantize_rows`, as `dtype` (on q's device, in row passes like it)."""
    rows = q.reshape(-1, q.shape[-1])
    out = torch.empty(rows.shape, dtype=dtype, device=q.device)
    for i in range(0, rows.shape[0], _QUANT_ROWS):
        out[i:i + _QUANT_ROWS] = rows[i:i + _QUANT_ROWS].float() * scale[i:i + _QUANT_ROWS]
    return out.view(q.shape)


_VIEWS = {"TBackward0", "ViewBackward0", "TransposeBackward0", "ExpandBackward0", "UnsafeViewBackward0",
          "PermuteBackward0", "AliasBackward0"}


def _is_param_or_cast(t: torch.Tensor) -> bool:
    """Parameters (leaves that need grad), autocast's casts of them, and views of either (a linear saves
    its weight transposed): weights, not activations."""
    if t.requires_grad and t.is_leaf:
        return True
    fn = t.grad_fn
    while fn is not None and type(fn).__name__ in _VIEWS and fn.next_functions:
        fn = fn.next_functions[0][0]
    if fn is not None and type(fn).__name__ == "ToCopyBackward0" and fn.next_functions:
        fn = fn.next_functions[0][0]
    return fn is not None and type(fn).__name__ == "AccumulateGrad"


def _dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense (contiguous up to a permutation of dims): copies keep its strides."""
    if t.is_contiguous():
        return True
    dims = sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz != 1)
    expected = 1
    for st, sz in dims:
        if st != expected:
            return False
        expected *= sz
    return True


class ActivationOffloader:
    """saved_tensors_hooks that move a block's saved activations to pinned CPU memory and back.

    pack: on CUDA, the copy runs on a side stream (the forward does not wait for it) into pinned memory from
    torch's caching host allocator; `record_stream` keeps the GPU block alive until the copy is done.
    unpack: brings the tensor back on another side stream and prefetches the tensors packed just before it
    (backward runs in reverse order) up to `prefetch_bytes` ahead; the compute stream waits only on events.
    Tensors smaller than `min_bytes`, weights, tensors that need no grad (rotary tables, shared by every
    block) and CPU tensors when `cpu_copy` is off are left where they are.
    `dtype="fp8"`: floating, contiguous tensors go over as e4m3 + a scale per row (`quantize_rows`, on the
    compute stream before the copy) and come back dequantized to their dtype when backward first reads them;
    meant for full checkpointing, where the only tensors packed are the block inputs."""

    def __init__(self, min_bytes: int = 1 << 20, prefetch_bytes: int = 2 << 30, cpu_copy: bool = True,
                 dtype: str = "native"):
        if dtype not in ("native", "fp8"):
            raise ValueError(f"offload dtype must be native | fp8, got {dtype!r}")
        self.min_bytes, self.prefetch_bytes, self.cpu_copy, self.dtype = min_bytes, prefetch_bytes, cpu_copy, dtype
        self.order: list[_Packed | None] = []
        self.packed_bytes = 0  # bytes offloaded in the current forward (for tests and benchmarks)
        self.packed_count = 0
        self._streams: dict[Any, tuple[torch.cuda.Stream, torch.cuda.Stream]] = {}
        self._seen = {}

    def reset(self) -> None:
        """Forget the previous forward's handles (called at the start of each forward)."""
        self.order, self.packed_bytes, self.packed_count = [], 0, 0
        self._seen: dict[tuple, tuple[weakref.ref, _Packed]] = {}

    def _streams_for(self, device):
        if device not in self._streams:
            self._streams[device] = (torch.cuda.Stream(device), torch.cuda.Stream(device))
        return self._streams[device]

    def pack(self, t: torch.Tensor):
        nbytes = t.numel() * t.element_size()
        if nbytes < self.min_bytes or not t.requires_grad and t.grad_fn is None or _is_param_or_cast(t):
            return t
        if t.device.type == "cpu" and not self.cpu_copy or t.device.type not in ("cpu", "cuda"):
            return t
        # Views go over as their (contiguous) base, once: the q/k/v projections save three views of one norm
        # output, attention's output and o_proj's input share a storage. The dedup key is only trusted while
        # the base is alive (then its memory cannot have been reused by another tensor).
        base = t._base if t._base is not None else t
        whole = _dense(base) and base.numel() * base.element_size() <= 2 * nbytes
        src = base if whole else t
        key = (src.data_ptr(), src.dtype, tuple(src.shape), tuple(src.stride()), src._version, src.device)
        hit = self._seen.get(key)
        if hit is not None and hit[0]() is not None:
            p = hit[1]
        else:
            p = self._copy_out(src)
            self._seen[key] = (weakref.ref(base), p)
        if whole and src is not t:
            return (p, tuple(t.shape), tuple(t.stride()), t.storage_offset() - src.storage_offset())
        return (p, None, None, 0)

    def _copy_out(self, src: torch.Tensor) -> _Packed:
        scale = dtype = None
        if self.dtype == "fp8" and _fp8_ok(src):
            dtype = src.dtype
            src, scale = quantize_rows(src.detach())
        parts = [src] if scale is None else [src, scale]
        nbytes = sum(x.numel() * x.element_size() for x in parts)
        if src.device.type == "cpu":
            host, ev = [_Host(x, pinned=False) for x in parts], None
        else:
            d2h, _ = self._streams_for(src.device)
            d2h.wait_stream(torch.cuda.current_stream(src.device))
            with torch.cuda.stream(d2h):
                host = [_Host(x, pinned=True) for x in parts]
                ev = torch.cuda.Event()
                ev.record(d2h)
            for x in parts:
                x.record_stream(d2h)
        p = _Packed(host[0], ev, src.device, len(self.order), nbytes, scale=host[1] if scale is not None else None,
                    dtype=dtype)
        self.order.append(p)
        self.packed_bytes += nbytes
        self.packed_count += 1
        return p

    def _fetch(self, p: _Packed) -> None:
        _, h2d = self._streams_for(p.device)
        with torch.cuda.stream(h2d):
            h2d.wait_event(p.d2h)
            p.gpu = p.cpu.to(p.device, non_blocking=True)
            if p.scale is not None:
                p.gpu_scale = p.scale.to(p.device, non_blocking=True)
            p.h2d = torch.cuda.Event()
            p.h2d.record(h2d)

    def unpack(self, packed):
        if not isinstance(packed, tuple):
            return packed
        p, shape, stride, offset = packed
        t = self._get(p)
        if shape is not None:
            t = t.as_strided(shape, stride, t.storage_offset() + offset)
        return t

    def _get(self, p: _Packed) -> torch.Tensor:
        if p.device.type == "cpu":
            if p.gpu is None:
                p.gpu = p.cpu.to(p.device, non_blocking=False)
                if p.scale is not None:
                    p.gpu = dequantize_rows(p.gpu, p.scale.to(p.device, non_blocking=False), p.dtype)
            return p.gpu
        main = torch.cuda.current_stream(p.device)
        if p.gpu is not None and self.order[p.index] is None:  # unpacked before (a shared handle)
            main.wait_event(p.h2d)
            return p.gpu
        if p.gpu is None:
            self._fetch(p)
        ahead, i = 0, p.index - 1
        while i >= 0 and ahead < self.prefetch_bytes:
            q = self.order[i]
            if q is not None:
                if q.gpu is None:
                    self._fetch(q)
                ahead += q.nbytes
            i -= 1
        self.order[p.index] = None  # in use: no more prefetching of it
        main.wait_event(p.h2d)
        p.gpu.record_stream(main)
        if p.gpu_scale is not None:  # dequantized once, on the compute stream, when backward needs it
            p.gpu_scale.record_stream(main)
            p.gpu, p.gpu_scale = dequantize_rows(p.gpu, p.gpu_scale, p.dtype), None
        return p.gpu

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)


def apply_activation_offload(model: nn.Module, offloader: ActivationOffloader, keep_layers: int = 0
                             ) -> ActivationOffloader:
    """Run every block's forward but the last `keep_layers` under the offloader's hooks (outside any checkpoint
    of the block, so a fully checkpointed block offloads exactly its input; the kept blocks' inputs stay on
    the GPU, where backward reads them first); reset the handles at each root forward."""
    def wrap(orig, *args, **kwargs):
        with offloader.hooks():
            return orig(*args, **kwargs)

    layers = list(model.model.layers)
    for block in layers[:max(len(layers) - keep_layers, 0)]:
        block._spotlm_offload_forward = block.forward
        block.forward = functools.partial(wrap, block.forward)
    model.register_forward_pre_hook(lambda *_: offloader.reset())
    return offloader


# ----------------------------------------------------------------------------------------------------------
# FSDP2
# ----------------------------------------------------------------------------------------------------------
def apply_fsdp(model: nn.Module, device: torch.device, cpu_offload: bool = False,
               param_dtype: torch.dtype | None = None, reduce_dtype: torch.dtype | None = torch.float32,
               mesh=None) -> nn.Module:
    """FSDP2: `fully_shard` each block, then the root (embeddings, final norm, lm_head). Mixed precision
    (bf16 compute, fp32 reductions) on CUDA; parameters stay sharded fp32 (the optimizer's master copy)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    kwargs: dict[str, Any] = {}
    if mesh is not None:
        kwargs["mesh"] = mesh
    if param_dtype is not None:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    if cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=device.type == "cuda")
    layers = list(model.model.layers)
    for i, block in enumerate(layers):
        # The last block is resharded by the root right after anyway: keep it unsharded after forward.
        fully_shard(block, reshard_after_forward=i < len(layers) - 1, **kwargs)
    fully_shard(model, **kwargs)
    if model.cfg.tie_embeddings:
        model.tie_weights()
    return model


# ----------------------------------------------------------------------------------------------------------
# all of it
# ----------------------------------------------------------------------------------------------------------
def parallelize(model: nn.Module, mem: MemoryConfig, *, device: torch.device | str = "cpu",
                compile: dict[str, Any] | None = None, world_size: int = 1,
                offloader: ActivationOffloader | None = None) -> nn.Module:
    """Apply `mem` to `model` (a GPT, in place, after `app.fast.accelerate`) and return the module to call for
    training.

    Order: checkpointing, then activation offload (its hooks wrap the checkpointed block), then FSDP2
    (when `mem.fsdp` and `world_size` >= 1 with a process group), then torch.compile with the keyword arguments
    `compile` (None: not compiled; per block when offloading activations or FSDP is on, since those hooks run
    Python per block; else the whole model). `model.spotlm_offloader` holds the offloader (for its byte counts)."""
    device = torch.device(device)
    mem.validate()
    apply_checkpointing(model, mem.checkpointing, mem.mlp_chunk)
    if mem.offload_activations:
        off = offloader or ActivationOffloader(min_bytes=mem.offload_min_bytes if device.type == "cuda" else 0,
                                               dtype=mem.offload_dtype)
        model.spotlm_offloader = apply_activation_offload(model, off, mem.offload_keep_layers)
    if mem.fsdp:
        import torch.distributed as dist

        if not dist.is_initialized():
            raise RuntimeError("memory.fsdp needs an initialised torch.distributed process group")
        apply_fsdp(model, device, cpu_offload=mem.fsdp_cpu_offload,
                   param_dtype=torch.bfloat16 if device.type == "cuda" else None)
    if compile is not None:
        if mem.offload_activations or mem.fsdp:
            for block in model.model.layers:
                block.compile(**compile)
            return model
        return torch.compile(model, **compile)
    return model


def compiles_per_block(mem: MemoryConfig) -> bool:
    """Whether torch.compile should go per block (Python hooks between blocks) rather than on the whole model."""
    return mem.offload_activations or mem.fsdp or (mem.offload_optimizer and mem.optimizer_mode == "overlap")


def resolve_memory(mem: MemoryConfig, mcfg, seq_len: int, micro_batch: int, device: torch.device | str,
                   world_size: int = 1, fused_loss: bool = True, master_weights: bool = False) -> MemoryConfig:
    """`mem`, or with `mem.auto` the planner's choice for this GPU's memory and the host budget
    (`mem.host_budget_gb`, or what the machine has available, shared by this node's training processes:
    LOCAL_WORLD_SIZE, which Ray Train sets); on CPU no option, as CPU runs are small. Raises ConfigError when
    nothing fits. `master_weights`: the run keeps bf16 weights with fp32 masters where the chosen options
    allow (`memory_plan.estimate`)."""
    import os

    from app.train.memory_plan import host_budget_gb, resolve

    device = torch.device(device)
    if not mem.auto:
        return mem
    if device.type != "cuda":
        return MemoryConfig()
    gpu_gb = torch.cuda.get_device_properties(device).total_memory / 1e9
    host_gb = host_budget_gb(mem, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return resolve(mem, mcfg, seq_len, micro_batch, gpu_gb, host_gb=host_gb, world_size=world_size,
                   fused_loss=fused_loss, master_weights=master_weights)


def make_offload_optimizer(model: nn.Module, groups: list[dict], mem: MemoryConfig, *, lr: float, betas,
                           weight_decay: float):
    """The CPU-offloaded AdamW (app.train.offload) for `mem.offload_optimizer`; casts the model's weights to bf16 on CUDA."""
    from app.train.offload import build

    return build(model, groups, lr=lr, betas=betas, weight_decay=weight_decay, mode=mem.optimizer_mode,
                 state_dtype=mem.optimizer_state_dtype)


def set_full_state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer, model_sd: dict, optim_sd: dict) -> None:
    """Load unsharded (model, optimizer) state dicts into a sharded model; a collective like `full_state_dicts`."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd,
                   options=StateDictOptions(full_state_dict=True))


def full_state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Unsharded (model, optimizer) state dicts on CPU; with FSDP2 a collective: call it on every rank."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return _full(model_sd), _full(optim_sd)


def _full(obj: Any) -> Any:
    """Plain tensors everywhere: get_state_dict can hand back DTensors (seen on one-rank meshes)."""
    if hasattr(obj, "full_tensor"):
        return obj.full_tensor().cpu()
    if isinstance(obj, dict):
        return {k: _full(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_full(v) for v in obj)
    return obj
