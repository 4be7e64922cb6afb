"""A GPT in the Llama layout (RMSNorm, rotary embeddings, SwiGLU, no biases), single-device PyTorch.
`ModelConfig.mlp` can swap SwiGLU for GPT-2's GELU or modded-nanogpt's ReLU^2 feed-forward.

Module names match Hugging Face `LlamaForCausalLM`, so an export is a straight state-dict copy:
`model.embed_tokens`, `model.layers.{i}.self_attn.{q,k,v,o}_proj`, `model.layers.{i}.mlp.{gate,up,down}_proj`,
`model.layers.{i}.{input,post_attention}_layernorm`, `model.norm`, `lm_head` (plus `model.lmatch_embed`
when the retrieval-match feature is on). Shapes in comments: B batch, T tokens, H heads, D head_dim.
"""
from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from app.fast import kernels
from app.config import ConfigError
from app.fast.kernels.fp8_linear import on_fp8_gpu

VOCAB_MULTIPLE = 128  # embedding / lm_head rows are padded to this multiple: faster matmuls
FFN_MULTIPLE = 256  # the Llama rule rounds the SwiGLU width up to this multiple
MLP_KINDS = ("swiglu", "gelu", "relu2")


@dataclass
class KernelChoice:
    """Which faster paths replace plain PyTorch ops (a runtime choice, not part of the model's shape).
    `loss`: training forwards return (None, loss) from the fused linear + cross-entropy, no logits (CUDA).
    `norm`, `rotary`: the Triton RMSNorm / rotary kernels (CUDA). `proj`: q/k/v and gate/up each run as one
    matmul over their concatenated weights (any device; parameters and state dict unchanged; in bf16 measured
    4-5% slower at GPT-2 124M on an H100 under torch.compile, with fp32 and with bf16 weights: the
    split/concatenated gradients cost more than the larger GEMMs save; under `ModelConfig.fp8` one FP8
    product each way and one weight-gradient product over a group cast once per step, `project`; for q/k/v with
    rotary inside and the backward's gradient join in one Triton kernel, `kernels.fp8_qkv_rotary`).
    `rows`: torch.compile keeps rows up to 8192 wide in registers for row reductions (`kernels.wide_rows`; for
    the FP8 casts of the MLP's hidden rows under `ModelConfig.fp8`). `window`: sliding-window layers (1 < w < T)
    run the Triton window kernel (`kernels.window_attention`) instead of flex_attention's block-sparse one (CUDA).
    `mlp`: under `ModelConfig.fp8` the ReLU² feed-forward runs as one function whose activation passes (and their
    e4m3 casts) are Triton row kernels (`kernels.fp8_relu2_mlp`; CUDA).
    (No full-attention choice: on H100, torch 2.11's SDPA already runs cuDNN's flash kernels, the fastest.)"""

    loss: bool = False
    norm: bool = False
    rotary: bool = False
    proj: bool = False
    rows: bool = False
    window: bool = False
    mlp: bool = False


KERNELS = KernelChoice()  # set once per process by the trainer (`use_kernels`)
KERNEL_NAMES = tuple(f.name for f in fields(KernelChoice))


def use_kernels(spec: str) -> KernelChoice:
    """Set the process-wide kernel choice from "none", "all" or a comma list of KERNEL_NAMES."""
    names = {"none": set(), "all": set(KERNEL_NAMES)}.get(spec, set(filter(None, spec.split(","))))
    unknown = names - set(KERNEL_NAMES)
    if unknown:
        raise ConfigError(f"kernels: unknown {sorted(unknown)}; use none, all, or a comma list of {','.join(KERNEL_NAMES)}")
    rows_before = KERNELS.rows
    for name in KERNEL_NAMES:
        setattr(KERNELS, name, name in names)
    if KERNELS.rows or rows_before:  # (importing Inductor only where it matters)
        from app.fast.kernels.wide_rows import use_wide_rows

        use_wide_rows(KERNELS.rows)
    return KERNELS


@dataclass
class ModelConfig:
    """Model shape. `validate()` (run on construction) resolves the 0 = "derive it" fields."""

    vocab_size: int = 8192  # the tokenizer's true vocabulary; tables use padded_vocab_size rows
    n_layer: int = 2  # transformer blocks
    n_head: int = 4  # query heads
    n_kv_head: int = 0  # key/value heads (grouped-query attention); 0 = n_head
    d_model: int = 64  # residual stream width
    ffn_hidden: int = 0  # MLP hidden width; 0 = SwiGLU's 8/3 d_model rounded up to a multiple of 256, else 4 d_model
    # Feed-forward: swiglu = down(silu(gate(x)) * up(x)) (Llama); gelu = down(gelu_tanh(up(x))) (GPT-2); relu2 =
    # down(relu(up(x))^2) (modded-nanogpt). At the default widths all three hold ~8 d_model^2 parameters.
    mlp: str = "swiglu"
    max_seq_len: int = 128  # longest context in tokens (rotary positions, KV cache)
    rope_theta: float = 10000.0  # rotary base wavelength
    norm_eps: float = 1e-5  # RMSNorm epsilon
    tie_embeddings: bool = False  # lm_head shares the input embedding matrix
    init_std: float = 0.02  # std of the normal init (output projections get /sqrt(2 n_layer))
    dropout: float = 0.0  # training-only dropout on embeddings, attention weights and residual branches
    lmatch_vocab: int = 0  # rows of the retrieval-match embedding (>= vocab_size + 1; id vocab_size = no match); 0 = off
    # Training matmuls in FP8 on sm89+ CUDA (else as usual): the blocks' forward and input-gradient products with
    # per-row scales (weight gradients bf16, `kernels.fp8_linear`), and the FP8 head.
    fp8: bool = False
    # Only the lm_head's training matmuls in FP8 (modded-nanogpt's FP8 head: e4m3 logits product, e5m2 gradient
    # products under the fused loss). fp8 implies it.
    fp8_head: bool = False
    # Sliding attention windows, cycled over the layers (layer i: attn_windows[i % len]); 0 = full causal, w >= 1 =
    # the w most recent positions (itself included); [] = all full. [1, 64, 0] is TScale's mix. On the command
    # line: --model.attn_windows=1,64,0 (or the YAML/JSON list [1,64,0]).
    attn_windows: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Resolve derived widths and check the shape; ConfigError (a ValueError) names the bad field."""
        for name in ("vocab_size", "n_layer", "n_head", "d_model", "max_seq_len"):
            if getattr(self, name) < 1:
                raise ConfigError(f"ModelConfig.{name}={getattr(self, name)} must be >= 1")
        for name in ("n_kv_head", "ffn_hidden", "lmatch_vocab"):
            if getattr(self, name) < 0:
                raise ConfigError(f"ModelConfig.{name}={getattr(self, name)} must be >= 0 (0 = default)")
        if not isinstance(self.attn_windows, (list, tuple)) or not all(
                isinstance(w, int) and not isinstance(w, bool) and w >= 0 for w in self.attn_windows):
            raise ConfigError(f"ModelConfig.attn_windows={self.attn_windows} must be integers >= 0 "
                              "(0 = full causal attention, w = the w most recent positions)")
        self.attn_windows = list(self.attn_windows)
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"ModelConfig.dropout={self.dropout} must be in [0, 1)")
        for name in ("rope_theta", "norm_eps", "init_std"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"ModelConfig.{name}={getattr(self, name)} must be > 0")
        self.n_kv_head = self.n_kv_head or self.n_head
        if self.mlp not in MLP_KINDS:
            raise ConfigError(f"ModelConfig.mlp={self.mlp!r} must be one of {', '.join(MLP_KINDS)}")
        self.ffn_hidden = self.ffn_hidden or (FFN_MULTIPLE * math.ceil(8 * self.d_model / 3 / FFN_MULTIPLE)
                                              if self.mlp == "swiglu" else 4 * self.d_model)
        if self.d_model % self.n_head or (self.d_model // self.n_head) % 2:
            raise ConfigError(f"ModelConfig: d_model={self.d_model} must split into n_head={self.n_head} "
                              "heads of even size (rotary embeddings rotate pairs)")
        if self.n_head % self.n_kv_head:
            raise ConfigError(f"ModelConfig: n_head={self.n_head} must be a multiple of n_kv_head={self.n_kv_head}")
        if self.lmatch_vocab and self.lmatch_vocab <= self.vocab_size:
            raise ConfigError(f"ModelConfig: lmatch_vocab={self.lmatch_vocab} must be >= vocab_size + 1 = "
                              f"{self.vocab_size + 1} (id vocab_size means 'no match'), or 0 for off")

    def window(self, layer: int) -> int:
        """Layer `layer`'s attention window: 0 = full causal, w >= 1 = the w most recent positions."""
        return self.attn_windows[layer % len(self.attn_windows)] if self.attn_windows else 0

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def mlp_inputs(self) -> int:
        """The MLP's input projections: 2 for SwiGLU (gate, up), 1 for the others (up)."""
        return 2 if self.mlp == "swiglu" else 1

    @property
    def padded_vocab_size(self) -> int:
        return VOCAB_MULTIPLE * math.ceil(self.vocab_size / VOCAB_MULTIPLE)

    @staticmethod
    def preset(name: str, **overrides: Any) -> ModelConfig:
        """A named shape with field overrides; derived widths follow overridden shapes."""
        if name not in PRESETS:
            raise ConfigError(f"unknown model preset {name!r}; presets: {', '.join(PRESETS)}")
        unknown = set(overrides) - {f.name for f in fields(ModelConfig)}
        if unknown:
            raise ConfigError(f"unknown ModelConfig field(s) {sorted(unknown)} in overrides of preset {name!r}")
        return ModelConfig(**{**PRESETS[name], **overrides})


# Presets hold only what they set, so an override of d_model / n_head re-derives ffn_hidden / n_kv_head.
# GPT-2 sizes tie embeddings as GPT-2 did; their counts include the (tied) 50304 x d_model table.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(n_layer=2, n_head=4, d_model=64, max_seq_len=128),  # CPU tests
    "gpt2-124m": dict(vocab_size=50257, n_layer=12, n_head=12, d_model=768, max_seq_len=1024, tie_embeddings=True),
    "gpt2-350m": dict(vocab_size=50257, n_layer=24, n_head=16, d_model=1024, max_seq_len=1024, tie_embeddings=True),
    "gpt2-1.5b": dict(vocab_size=50257, n_layer=48, n_head=25, d_model=1600, max_seq_len=1024, tie_embeddings=True),
    "llama3-8b": dict(vocab_size=128256, n_layer=32, n_head=32, n_kv_head=8, d_model=4096, ffn_hidden=14336,
                      max_seq_len=8192, rope_theta=500000.0),
}


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in fp32, cast back, then scaled (Hugging Face Llama semantics)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if KERNELS.norm and x.is_cuda:
            return kernels.rms_norm(x, self.weight, self.eps)
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def rotary_tables(cfg: ModelConfig, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [T, D] for absolute `positions` [T] in the rotate-half layout (angles computed in fp32).

    Computed per forward rather than kept as a buffer: a buffer would be garbage after `to_empty()`
    and is not in checkpoints; this costs one [T, D/2] outer product per forward, not per layer."""
    cos, sin = _rotary_angles(positions, cfg.head_dim, cfg.rope_theta)
    return cos.to(dtype), sin.to(dtype)


# An opaque op, so that torch.compile materialises the tables once per forward: as plain pointwise code
# Inductor inlined pow/sin/cos into every layer's q/k kernel, forward and backward (13% of a 124M step).
@torch.library.custom_op("spotlm::rotary_angles", mutates_args=())
def _rotary_angles(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    exponents = torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim
    angles = torch.outer(positions.float(), 1.0 / (theta ** exponents))
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


@_rotary_angles.register_fake
def _(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (positions.shape[0], head_dim)
    return positions.new_empty(shape, dtype=torch.float32), positions.new_empty(shape, dtype=torch.float32)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, H, T, D] by position: pairs (i, i + D/2), like Hugging Face's `rotate_half`."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def runs_fp8(x: torch.Tensor, weights: Sequence[torch.Tensor], fp8: bool) -> bool:
    """Whether x's product with `weights` runs in FP8: asked for (`fp8`), gradients on (training), and the
    device and every weight's shape allow it (`kernels.fp8_fits`)."""
    return fp8 and torch.is_grad_enabled() and all(kernels.fp8_fits(x, w) for w in weights)


def linear(x: torch.Tensor, module: nn.Linear | torch.Tensor, fp8: bool) -> torch.Tensor:
    """x @ weight.T of a bias-free `module` (or a bare weight): in FP8 (`kernels.fp8_linear`) when `fp8`,
    gradients are on (training) and the device and shapes allow it (`kernels.fp8_fits`); otherwise the
    plain (autocast) matmul, through the module itself so that hooks on it still run."""
    weight = module.weight if isinstance(module, nn.Linear) else module
    if runs_fp8(x, (weight,), fp8):
        return kernels.fp8_linear(x, weight, getattr(module, "fp8_cast", None))  # see GPT.fp8_weights_cast_once
    return module(x) if isinstance(module, nn.Linear) else F.linear(x, weight)


def project(x: torch.Tensor, linears: Sequence[nn.Linear], fp8: bool,
            cached: kernels.Fp8Weight | None = None) -> list[torch.Tensor]:
    """Each of the bias-free `linears` applied to x; with KERNELS.proj as one matmul over their concatenated
    weights (one larger GEMM, x read once), split afterwards into views. In FP8 that product takes `cached`,
    the e4m3 copies of the concatenation (`GPT.fp8_weights_cast_once`), and the weights' gradients come from
    one product too, where the bf16 path concatenates the weights and splits their gradient."""
    if not KERNELS.proj or len(linears) == 1:
        return [linear(x, m, fp8) for m in linears]
    sizes = [m.out_features for m in linears]
    if runs_fp8(x, [m.weight for m in linears], fp8):
        return list(kernels.fp8_linear(x, [m.weight for m in linears], cached).split(sizes, dim=-1))
    weight = torch.cat([m.weight for m in linears])
    return list(linear(x, weight, fp8).split(sizes, dim=-1))


# A layer's FP8 weight groups: each the linears of one FP8 product, with the module that takes their e4m3 copies
# as its `fp8_cast` while `GPT.fp8_weights_cast_once` runs (the linear itself, or the module that projects).
Fp8Group = tuple[nn.Module, list[nn.Linear]]


def fp8_groups(owner: nn.Module, projected: Sequence[nn.Linear], single: Sequence[nn.Linear]) -> list[Fp8Group]:
    """The groups of a module that `project`s x through `projected` (one group under KERNELS.proj, owned by
    `owner`) and applies each of `single` on its own."""
    if KERNELS.proj and len(projected) > 1:
        return [(owner, list(projected)), *((m, [m]) for m in single)]
    return [(m, [m]) for m in (*projected, *single)]


# A boolean SDPA mask, a flex_attention block mask, an int w (the window kernel over w), None = plain causal
AttnMask = torch.Tensor | BlockMask | int | None


def window_mask(pos: torch.Tensor, n_keys: int, window: int) -> torch.Tensor:
    """Which of keys 0..n_keys-1 the queries at absolute positions `pos` [..., T] attend: bool [..., T, n_keys],
    causal (key <= pos) and, for a window w >= 1, among the w most recent (key > pos - w)."""
    keys = torch.arange(n_keys, device=pos.device)
    mask = keys <= pos[..., None]
    if window:
        mask &= keys > pos[..., None] - window
    return mask


# Built eagerly (a graph break under torch.compile, before any traced op: the mask enters the graph as an input)
# and cached, so each (T, window, device) is built once per process, not per step or per layer.
@torch.compiler.disable
@functools.lru_cache(maxsize=32)
def sliding_block_mask(T: int, window: int, device: torch.device) -> BlockMask:
    """flex_attention's block-sparse mask of causal attention within `window` over T positions: key blocks
    wholly outside every query's window are skipped, not computed."""
    def in_window(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        return (kv <= q) & (q - kv < window)
    return create_block_mask(in_window, None, None, T, T, device=device)


@functools.cache
def _compiled_flex() -> Any:
    return torch.compile(flex_attention)


def sliding_flex_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: BlockMask,
                           gqa: bool) -> torch.Tensor:
    """flex_attention of q [B, H, T, D] over k, v [B, Hkv, T, D] under `block_mask`; compiled on its own
    when not already inside torch.compile (eager flex_attention materialises every score)."""
    fn = flex_attention if torch.compiler.is_compiling() else _compiled_flex()
    return fn(q, k, v, block_mask=block_mask, enable_gqa=gqa)


def masks_for_windows(windows: Sequence[int], T: int, device: torch.device, cache: KVCache | KVSlots | None,
                      flex: bool) -> dict[int, AttnMask]:
    """The mask of each of `windows` (0 = full causal; window 1 needs none, see `Attention`) for a forward of
    T new tokens. With a cache: the cache's mask. Without: for 1 < w < T, when `flex` (CUDA, no dropout), w
    itself under KERNELS.window (the window kernel needs no mask) or else a flex_attention block mask, and
    without `flex` a boolean [T, T] mask; windows 0 and >= T are plain causal (no entry)."""
    windows = set(windows) - {1}
    if cache is not None:
        return {w: cache.attn_mask(T, device, w) for w in windows}
    if flex:
        return {w: w if KERNELS.window else sliding_block_mask(T, w, device) for w in windows if 1 < w < T}
    return {w: window_mask(torch.arange(T, device=device), T, w) for w in windows if 1 < w < T}


class KVCache:
    """Preallocated keys and values of every layer, [B, n_kv_head, max_len, head_dim] each, and how many
    positions are filled. The model appends to it; dropping the object frees the memory."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32):
        if batch < 1 or not 1 <= max_len <= cfg.max_seq_len:
            raise ValueError(f"KVCache needs batch >= 1 and 1 <= max_len <= max_seq_len={cfg.max_seq_len}; "
                             f"got batch={batch}, max_len={max_len}")
        shape = (batch, cfg.n_kv_head, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.batch, self.max_len, self.length = batch, max_len, 0
        self.lengths = [0] * batch  # filled positions per row when the rows are used as slots (`slots()`)

    def reset(self) -> None:
        """Forget the cached positions (the memory is reused)."""
        self.length = 0
        self.lengths = [0] * self.batch

    def slots(self, rows: Sequence[int]) -> KVSlots:
        """A view of some rows of this cache as independent sequences, each continuing at its own
        position `lengths[row]` (slot-based continuous batching); pass it to the model as `kv_cache`."""
        return KVSlots(self, rows)

    def positions(self, new: int, device: torch.device | str) -> torch.Tensor:
        """Absolute positions [new] of the next `new` input tokens."""
        return torch.arange(self.length, self.length + new, device=device)

    def advance(self, new: int) -> None:
        """Count `new` more filled positions (after every layer has stored them)."""
        self.length += new

    def attn_mask(self, new: int, device: torch.device | str, window: int = 0) -> torch.Tensor | None:
        """The attention mask [new, length + new] of `new` queries after the cached positions (query i sees
        keys up to length + i, and with a window w >= 1 only the w most recent of them), or None when plain
        causal attention is exact (a prefill, or one new token seeing everything cached, no window cutting)."""
        if (self.length == 0 or new == 1) and not 0 < window < self.length + new:
            return None
        return window_mask(self.positions(new, device), self.length + new, window)

    def check_room(self, batch: int, new: int) -> None:
        """Raise a ValueError unless `new` more positions of a `batch`-row input fit."""
        if batch != self.batch:
            raise ValueError(f"input batch {batch} does not match the KV cache batch {self.batch}")
        if self.length + new > self.max_len:
            raise ValueError(f"KV cache full: {self.length} cached + {new} new positions > max_len={self.max_len}")

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [B, n_kv_head, T, D] after the cached positions; return all keys/values so far."""
        end = self.length + k.size(2)
        self.k[layer][:, :, self.length:end] = k
        self.v[layer][:, :, self.length:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class KVSlots:
    """Rows `rows` of a KVCache run as independent sequences in one batch: input row i is cache row
    rows[i], at its own position cache.lengths[rows[i]]; its queries see only that row's own keys up to
    their position. Right-padded prefills (every row starting at 0) are plain causal attention (within
    the layer's window, if it has one); keys written past a row's true length are overwritten by its next
    tokens before anything attends them."""

    def __init__(self, cache: KVCache, rows: Sequence[int]):
        rows = [int(r) for r in rows]
        if not rows or min(rows) < 0 or max(rows) >= cache.batch or len(set(rows)) != len(rows):
            raise ValueError(f"KV cache slots must be distinct rows in [0, {cache.batch}); got {rows}")
        self.cache, self.rows, self.batch = cache, rows, len(rows)
        self.starts = [cache.lengths[r] for r in rows]
        self.length = max(self.starts)  # the furthest row (GPT's max_seq_len check)
        device = cache.k[0].device
        lo = rows[0]
        self._span = slice(lo, lo + len(rows)) if rows == list(range(lo, lo + len(rows))) else None
        self._rows = torch.tensor(rows, device=device)
        self._starts = torch.tensor(self.starts, device=device)

    def check_room(self, batch: int, new: int) -> None:
        if batch != self.batch:
            raise ValueError(f"input batch {batch} does not match the {self.batch} KV cache slots")
        if self.length + new > self.cache.max_len:
            raise ValueError(f"KV cache full: {self.length} cached + {new} new positions > "
                             f"max_len={self.cache.max_len}")

    def positions(self, new: int, device: torch.device | str) -> torch.Tensor:
        """Absolute positions [B, new] of the next input tokens of each row."""
        return self._starts.to(device)[:, None] + torch.arange(new, device=device)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [B, n_kv_head, T, D] at each row's positions; return the keys/values attention
        reads: the new ones for a prefill from position 0, else the rows' cache up to the furthest row."""
        T = k.size(2)
        pos = self._starts[:, None] + torch.arange(T, device=k.device)  # [B, T]
        ck, cv = self.cache.k[layer], self.cache.v[layer]
        ck[self._rows[:, None], :, pos] = k.transpose(1, 2)  # indexed dims first: [B, T, Hkv, D]
        cv[self._rows[:, None], :, pos] = v.transpose(1, 2)
        if self.length == 0:
            return k, v
        end = self.length + T
        if self._span is not None:
            return ck[self._span, :, :end], cv[self._span, :, :end]
        return ck[:, :, :end].index_select(0, self._rows), cv[:, :, :end].index_select(0, self._rows)

    def attn_mask(self, new: int, device: torch.device | str, window: int = 0) -> torch.Tensor | None:
        """[B, 1, new, length + new]: row b's query i sees keys up to starts[b] + i, and with a window
        w >= 1 only the w most recent of them (None: plain causal attention is exact)."""
        if (self.length == 0 or (self.batch == 1 and new == 1)) and not 0 < window < self.length + new:
            return None
        return window_mask(self.positions(new, device), self.length + new, window)[:, None]

    def advance(self, new: int) -> None:
        for r in self.rows:
            self.cache.lengths[r] += new


class Attention(nn.Module):
    """Causal multi-head attention with grouped-query K/V heads and rotary positions, over the layer's
    window (`ModelConfig.window`): full, or the w most recent positions."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.cfg, self.layer, self.window = cfg, layer, cfg.window(layer)
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_head * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_head * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_head * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.d_model, bias=False)
        self.fp8_cast: kernels.Fp8Weight | None = None  # q/k/v's e4m3 copies within `GPT.fp8_weights_cast_once`

    def fp8_groups(self) -> list[Fp8Group]:
        """This layer's FP8 weight groups (`fp8_groups`); a window-1 layer runs no q/k products."""
        projected = (self.v_proj,) if self.window == 1 else (self.q_proj, self.k_proj, self.v_proj)
        return fp8_groups(self, projected, (self.o_proj,))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None,
                masks: dict[int, AttnMask] | None = None) -> torch.Tensor:
        """x [B, T, d_model] -> [B, T, d_model]. `masks`: `GPT.attention_masks` of this forward, shared
        by the layers (None: this layer builds its own)."""
        if self.window == 1:
            return self.own_value(x)
        B, T, _ = x.shape
        cfg = self.cfg
        q, k, v = self.project_rotated(x, cos, sin)
        gqa = cfg.n_kv_head != cfg.n_head
        dropout = cfg.dropout if self.training else 0.0
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # [B, Hkv, start + T, D]
        if masks is None:
            masks = masks_for_windows([self.window], T, x.device, cache, flex=x.is_cuda and not dropout)
        mask = masks.get(self.window)
        if isinstance(mask, int):  # sliding window under KERNELS.window, training / prefill
            y = kernels.window_attention(q.to(v.dtype), k.to(v.dtype), v, mask)
        elif isinstance(mask, BlockMask):  # sliding window, training / prefill: block-sparse flex attention
            y = sliding_flex_attention(q.to(v.dtype), k.to(v.dtype), v, mask, gqa)  # one dtype (autocast's)
        elif mask is not None:  # a window, a chunk after cached positions, or slots at different positions
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, enable_gqa=gqa)
        else:  # training / prefill (square causal), or one new token seeing everything cached
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, dropout_p=dropout, enable_gqa=gqa)
        return linear(y.transpose(1, 2).reshape(B, T, cfg.n_head * cfg.head_dim), self.o_proj, cfg.fp8)

    def project_rotated(self, x: torch.Tensor, cos: torch.Tensor,
                        sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [B, H, T, D], k and v [B, Hkv, T, D] of x, q and k rotated. Under KERNELS.proj in FP8 one product
        whose backward joins rotary's and v's gradients in one kernel (`kernels.fp8_qkv_rotary`)."""
        B, T, _ = x.shape
        cfg, linears = self.cfg, (self.q_proj, self.k_proj, self.v_proj)
        weights = [m.weight for m in linears]
        if KERNELS.proj and cos.dim() == 2 and runs_fp8(x, weights, cfg.fp8):
            return kernels.fp8_qkv_rotary(x, weights, cos, sin, cfg.head_dim, self.fp8_cast)
        q, k, v = project(x, linears, cfg.fp8, self.fp8_cast)
        q = q.view(B, T, cfg.n_head, cfg.head_dim).transpose(1, 2)  # [B, H, T, D]
        k = k.view(B, T, cfg.n_kv_head, cfg.head_dim).transpose(1, 2)  # [B, Hkv, T, D]
        v = v.view(B, T, cfg.n_kv_head, cfg.head_dim).transpose(1, 2)
        if KERNELS.rotary and x.is_cuda and cos.dim() == 2:  # per-row tables ([B, 1, T, D]): PyTorch path
            return (*kernels.apply_rotary(q, k, cos, sin), v)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

    def own_value(self, x: torch.Tensor) -> torch.Tensor:
        """A window-1 layer: softmax over one key is exactly 1, so each token's output is its own value,
        whatever the path: no attention, no q/k projections, and the cache is not written (no later query
        reads this layer's keys). q_proj / k_proj still get a (zero) gradient: DDP expects one for every
        parameter."""
        B, T, _ = x.shape
        cfg = self.cfg
        y = linear(x, self.v_proj, cfg.fp8).view(B, T, cfg.n_kv_head, cfg.head_dim)
        if cfg.n_kv_head != cfg.n_head:  # query head h reads kv head h // group
            y = y.repeat_interleave(cfg.n_head // cfg.n_kv_head, dim=2)  # [B, T, H, D]
        if self.training and cfg.dropout:  # attention dropout of that one weight, as SDPA would apply it
            y = y * F.dropout(y.new_ones(B, T, cfg.n_head, 1), cfg.dropout)
        y = linear(y.reshape(B, T, cfg.n_head * cfg.head_dim), self.o_proj, cfg.fp8)
        if torch.is_grad_enabled():
            y = y + 0.0 * (self.q_proj.weight.sum() + self.k_proj.weight.sum())
        return y


class MLP(nn.Module):
    """The feed-forward `cfg.mlp`: down(activate(*project_in(x))); SwiGLU has gate_proj and up_proj, the others
    up_proj only."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fp8, self.kind = cfg.fp8, cfg.mlp
        if cfg.mlp == "swiglu":
            self.gate_proj = nn.Linear(cfg.d_model, cfg.ffn_hidden, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.ffn_hidden, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_hidden, cfg.d_model, bias=False)
        self.fp8_cast: kernels.Fp8Weight | None = None  # gate/up's e4m3 copies within `GPT.fp8_weights_cast_once`

    def projected(self) -> tuple[nn.Linear, ...]:
        return (self.gate_proj, self.up_proj) if self.kind == "swiglu" else (self.up_proj,)

    def fp8_groups(self) -> list[Fp8Group]:
        """This MLP's FP8 weight groups (`fp8_groups`)."""
        return fp8_groups(self, self.projected(), (self.down_proj,))

    def project_in(self, x: torch.Tensor) -> list[torch.Tensor]:
        """[gate(x), up(x)] for SwiGLU, [up(x)] otherwise."""
        return project(x, self.projected(), self.fp8, self.fp8_cast)

    def activate(self, *h: torch.Tensor) -> torch.Tensor:
        """The hidden activation of `project_in`'s outputs."""
        if self.kind == "swiglu":
            gate, up = h
            return F.silu(gate) * up
        return F.gelu(h[0], approximate="tanh") if self.kind == "gelu" else F.relu(h[0]).square()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up, down = self.up_proj, self.down_proj
        if KERNELS.mlp and self.kind == "relu2" and runs_fp8(x, (up.weight, down.weight), self.fp8):
            return kernels.fp8_relu2_mlp(x, up.weight, down.weight, getattr(up, "fp8_cast", None),
                                         getattr(down, "fp8_cast", None))
        return linear(self.activate(*self.project_in(x)), down, self.fp8)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)  # identity at dropout=0 and in eval()

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None,
                masks: dict[int, AttnMask] | None = None) -> torch.Tensor:
        x = x + self.drop(self.self_attn(self.input_layernorm(x), cos, sin, cache, masks))
        return x + self.drop(self.mlp(self.post_attention_layernorm(x)))


class Decoder(nn.Module):
    """The `model.` part of the Hugging Face layout: embeddings, blocks, final norm."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.padded_vocab_size, cfg.d_model)
        if cfg.lmatch_vocab:
            self.lmatch_embed = nn.Embedding(cfg.lmatch_vocab, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)


class GPT(nn.Module):
    """Decoder-only language model. Build (on any device, meta included), then `init_weights()` or load."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.model = Decoder(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.padded_vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Make lm_head share the input embedding when `tie_embeddings` (again after `to_empty()`, which
        gives each module its own new parameter, or after `load_state_dict(assign=True)`)."""
        if self.cfg.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def to_empty(self, *, device: torch.device | str | None, recurse: bool = True) -> GPT:
        super().to_empty(device=device, recurse=recurse)
        self.tie_weights()
        return self

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialise every parameter: normal(0, init_std); o_proj / down_proj scaled by 1/sqrt(2 n_layer)
        (each block adds two residual branches); norms to 1. Call after construction or `to_empty()`."""
        self.tie_weights()
        std = self.cfg.init_std
        for name, p in self.named_parameters():  # a tied weight is listed (and drawn) once
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, 0.0, std / math.sqrt(2 * self.cfg.n_layer))
            else:
                nn.init.normal_(p, 0.0, std)

    @contextlib.contextmanager
    def fp8_weights_cast_once(self, cast: Callable[[list[torch.Tensor]], list] = kernels.fp8_weights):
        """Within: the decoder's FP8 linears (`ModelConfig.fp8`, CUDA) take e4m3 copies of their weights cast
        here by `cast` (`kernels.fp8_weights`, or a compiled form of it), once, instead of casting each weight
        in every micro-batch's forward and backward: the same bits, since the weights stay put until the
        optimizer step, which must come after the block. Elsewhere a no-op."""
        groups = [g for b in self.model.layers for g in (*b.self_attn.fp8_groups(), *b.mlp.fp8_groups())
                  ] if self.cfg.fp8 else []
        first = groups[0][1][0].weight if groups else None
        if first is None or not first.is_cuda or not on_fp8_gpu(first):
            yield
            return
        for (owner, _), c in zip(groups, cast([[m.weight for m in ms] for _, ms in groups]), strict=True):
            owner.fp8_cast = c
        try:
            yield
        finally:
            for owner, _ in groups:
                owner.fp8_cast = None

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *, lmatch: torch.Tensor | None = None,
                kv_cache: KVCache | KVSlots | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx [B, T] token ids -> (logits [B, T, padded_vocab] for every position, mean cross-entropy
        against `targets` [B, T] (-1 = ignored) or None; logits are None when the fused loss kernel is on).
        `lmatch` [B, T]: retrieval-match ids, required
        exactly when the model has an lmatch table. With `kv_cache`, positions continue after the cached
        ones, attention covers them, and the new keys/values are appended."""
        self._check_inputs(idx, targets, lmatch, kv_cache)
        # Before any tensor op: under torch.compile, building a flex block mask breaks the graph here, where
        # the part before the break is empty.
        masks = self.attention_masks(idx.size(1), idx.device, kv_cache)
        h = self.model.norm(self.trunk(idx, lmatch, kv_cache, masks))
        fp8_head = self.cfg.fp8 or self.cfg.fp8_head
        if targets is not None and KERNELS.loss and h.is_cuda:  # the [B, T, vocab] logits are never made
            return None, kernels.fused_linear_cross_entropy(h, self.lm_head.weight, targets, ignore_index=-1,
                                                            fp8=fp8_head and torch.is_grad_enabled())
        logits = linear(h, self.lm_head, fp8_head)  # [B, T, padded_vocab]
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-1)
        return logits, loss

    def rotary(self, T: int, kv_cache: KVCache | KVSlots | None, dtype: torch.dtype,
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of the next T positions: [T, D] after the cache's length, or [B, 1, T, D] for slots."""
        positions = kv_cache.positions(T, device) if kv_cache is not None else torch.arange(T, device=device)
        cos, sin = rotary_tables(self.cfg, positions.flatten(), dtype)
        if positions.dim() == 2:  # per-row positions: tables broadcast over the heads
            cos, sin = cos.view(*positions.shape, -1)[:, None], sin.view(*positions.shape, -1)[:, None]
        return cos, sin

    def attention_masks(self, T: int, device: torch.device,
                        kv_cache: KVCache | KVSlots | None = None) -> dict[int, AttnMask]:
        """The attention masks of a forward of T new tokens (`masks_for_windows`), one per distinct window."""
        windows = {self.cfg.window(i) for i in range(self.cfg.n_layer)}
        flex = device.type == "cuda" and not (self.training and self.cfg.dropout > 0)
        return masks_for_windows(sorted(windows), T, device, kv_cache, flex)

    def trunk(self, idx: torch.Tensor, lmatch: torch.Tensor | None = None,
              kv_cache: KVCache | KVSlots | None = None, masks: dict[int, AttnMask] | None = None) -> torch.Tensor:
        """The residual stream after the last block, [B, T, d_model] (before the final norm); appends the
        new keys/values to `kv_cache`. `masks`: `attention_masks(T, ...)` when the caller built them.
        Inputs are not checked here: `forward` checks them."""
        T = idx.size(1)
        if masks is None:
            masks = self.attention_masks(T, idx.device, kv_cache)
        x = self.model.embed_tokens(idx)  # [B, T, d_model]
        if lmatch is not None:
            x = x + self.model.lmatch_embed(lmatch)
        cos, sin = self.rotary(T, kv_cache, x.dtype, idx.device)
        for block in self.model.layers:
            x = block(x, cos, sin, kv_cache, masks)
        if kv_cache is not None:
            kv_cache.advance(T)
        return x

    def _check_inputs(self, idx: torch.Tensor, targets: torch.Tensor | None, lmatch: torch.Tensor | None,
                      kv_cache: KVCache | None) -> None:
        """Shape and consistency checks with one-line messages (no device sync: values are not read)."""
        if idx.dim() != 2:
            raise ValueError(f"idx must be [batch, tokens]; got shape {tuple(idx.shape)}")
        for name, t in (("targets", targets), ("lmatch", lmatch)):
            if t is not None and t.shape != idx.shape:
                raise ValueError(f"{name} shape {tuple(t.shape)} differs from idx shape {tuple(idx.shape)}")
        if lmatch is not None and not self.cfg.lmatch_vocab:
            raise ValueError("lmatch ids given but the model has no lmatch embedding (lmatch_vocab=0)")
        if lmatch is None and self.cfg.lmatch_vocab:
            raise ValueError(f"this model reads retrieval-match ids: pass lmatch= ({self.cfg.vocab_size} = no match)")
        start = kv_cache.length if kv_cache is not None else 0
        if start + idx.size(1) > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {start + idx.size(1)} tokens exceeds max_seq_len={self.cfg.max_seq_len}")
        if kv_cache is not None:
            kv_cache.check_room(idx.size(0), idx.size(1))

    def num_params(self, exclude_embedding: bool = False) -> int:
        """Parameter count (a tied matrix once); `exclude_embedding` leaves out the input lookup tables
        (embed_tokens, lmatch_embed), so a tied lm_head is left out with them."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embedding:
            n -= self.model.embed_tokens.weight.numel()
            if self.cfg.lmatch_vocab:
                n -= self.model.lmatch_embed.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward) for MFU: 6 x the parameters used in matmuls
        (everything but the lookup tables, lm_head included even when tied; not the q/k projections of
        window-1 layers, which never run) + attention 12 d x each layer's context: T = seq_len for a full
        layer, min(w, T) for a window w >= 2, 0 for w = 1 (no attention runs), so that MFU counts what is
        computed."""
        c = self.cfg
        matmul_params = self.num_params(exclude_embedding=True)
        if c.tie_embeddings:
            matmul_params += self.lm_head.weight.numel()
        windows = [c.window(i) for i in range(c.n_layer)]
        matmul_params -= windows.count(1) * (c.n_head + c.n_kv_head) * c.head_dim * c.d_model
        context = sum(seq_len if w == 0 else 0 if w == 1 else min(w, seq_len) for w in windows)
        return 6.0 * matmul_params + 12.0 * c.d_model * context
