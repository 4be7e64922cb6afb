"""A GPT in the Llama layout (RMSNorm, rotary embeddings, SwiGLU, no biases; GELU / ReLU^2 MLPs and sliding attention
windows as options), single-device PyTorch. Module names are Hugging Face `LlamaForCausalLM`'s, so an export is a
straight state-dict copy. Speed-ups are applied from outside (`app.fast.accelerate`); the KV cache lives with
serving (`app.serve.kvcache`). Shapes: B batch, T tokens, H heads, D head_dim.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, Literal, Protocol, get_args

import torch
import torch.nn as nn
import torch.nn.functional as F

from app.config import ConfigError

VOCAB_MULTIPLE = 128  # embedding / lm_head rows are padded to this multiple: faster matmuls
FFN_MULTIPLE = 256  # the Llama rule rounds the SwiGLU width up to this multiple
MlpKind = Literal["swiglu", "gelu", "relu2"]


@dataclass
class ModelConfig:
    """Model shape. `validate()` (run on construction) resolves the 0 = "derive it" fields."""

    vocab_size: int = 8192  # the tokenizer's true vocabulary; tables use padded_vocab_size rows
    n_layer: int = 2  # transformer blocks
    n_head: int = 4  # query heads
    n_kv_head: int = 0  # key/value heads (grouped-query attention); 0 = n_head
    d_model: int = 64  # residual stream width
    ffn_hidden: int = 0  # MLP hidden width; 0 = SwiGLU's 8/3 d_model rounded up to a multiple of 256, else 4 d_model
    mlp: MlpKind = "swiglu"  # feed-forward: swiglu (Llama), gelu (GPT-2), relu2 (modded-nanogpt: down(relu(up(x))^2))
    max_seq_len: int = 128  # longest context in tokens (rotary positions, KV cache)
    rope_theta: float = 10000.0  # rotary base wavelength
    norm_eps: float = 1e-5  # RMSNorm epsilon
    tie_embeddings: bool = False  # lm_head shares the input embedding matrix
    init_std: float = 0.02  # std of the normal init (output projections get /sqrt(2 n_layer))
    dropout: float = 0.0  # training-only dropout on embeddings, attention weights and residual branches
    lmatch_vocab: int = 0  # rows of the retrieval-match embedding (>= vocab_size + 1; id vocab_size = no match); 0 = off
    # Attention windows cycled over the layers: 0 = full causal, w >= 1 = the w most recent positions (itself
    # included); [] = all full; e.g. 1,64,0 (TScale's mix) or the YAML list [1, 64, 0]
    attn_windows: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Resolve derived widths and check the shape; ConfigError (a ValueError) names the bad field."""
        def require(name: str, ok: bool, rule: str) -> None:
            if not ok:
                raise ConfigError(f"ModelConfig.{name}={getattr(self, name)!r} must be {rule}")
        for name in ("vocab_size", "n_layer", "n_head", "d_model", "max_seq_len"):
            require(name, getattr(self, name) >= 1, ">= 1")
        for name in ("n_kv_head", "ffn_hidden", "lmatch_vocab"):
            require(name, getattr(self, name) >= 0, ">= 0 (0 = default)")
        for name in ("rope_theta", "norm_eps", "init_std"):
            require(name, getattr(self, name) > 0, "> 0")
        require("attn_windows", isinstance(self.attn_windows, (list, tuple)) and all(
            type(w) is int and w >= 0 for w in self.attn_windows), "integers >= 0 (0 = full, w = the w most recent)")
        require("dropout", 0.0 <= self.dropout < 1.0, "in [0, 1)")
        require("mlp", self.mlp in get_args(MlpKind), f"one of {', '.join(get_args(MlpKind))}")
        self.attn_windows, self.n_kv_head = list(self.attn_windows), self.n_kv_head or self.n_head
        self.ffn_hidden = self.ffn_hidden or (FFN_MULTIPLE * math.ceil(8 * self.d_model / 3 / FFN_MULTIPLE)
                                              if self.mlp == "swiglu" else 4 * self.d_model)
        require("d_model", self.d_model % self.n_head == 0 and self.head_dim % 2 == 0,
                f"split into n_head={self.n_head} heads of even size (rotary embeddings rotate pairs)")
        require("n_head", self.n_head % self.n_kv_head == 0, f"a multiple of n_kv_head={self.n_kv_head}")
        require("lmatch_vocab", not 0 < self.lmatch_vocab <= self.vocab_size,
                f">= vocab_size + 1 = {self.vocab_size + 1} (id vocab_size means 'no match'), or 0 for off")

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


# Only what each sets, so overriding d_model / n_head re-derives ffn_hidden / n_kv_head; GPT-2 sizes tie embeddings.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(n_layer=2, n_head=4, d_model=64, max_seq_len=128),  # CPU tests
    "gpt2-124m": dict(vocab_size=50257, n_layer=12, n_head=12, d_model=768, max_seq_len=1024, tie_embeddings=True),
    "gpt2-350m": dict(vocab_size=50257, n_layer=24, n_head=16, d_model=1024, max_seq_len=1024, tie_embeddings=True),
    "gpt2-1.5b": dict(vocab_size=50257, n_layer=48, n_head=25, d_model=1600, max_seq_len=1024, tie_embeddings=True),
    "llama3-8b": dict(vocab_size=128256, n_layer=32, n_head=32, n_kv_head=8, d_model=4096, ffn_hidden=14336,
                      max_seq_len=8192, rope_theta=500000.0),
}


class Cache(Protocol):
    """What the model needs of a KV cache (`app.serve.kvcache`); each forward appends its keys/values."""

    def positions(self, new: int, device: torch.device) -> torch.Tensor: ...  # of the new tokens: [new] or [B, new]
    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]: ...  # store, read all
    def attn_mask(self, new: int, device: torch.device, window: int = 0) -> Any: ...  # bool mask; None = causal
    def advance(self, new: int) -> None: ...  # count the new positions, after every layer stored them
    def check_room(self, batch: int, new: int) -> None: ...  # ValueError unless a [batch, new] input fits


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in fp32, cast back, then scaled (Hugging Face Llama semantics)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


# Made per forward, not kept as a buffer (garbage after `to_empty()`, absent from checkpoints); an opaque op, so
# that torch.compile computes the tables once per forward instead of inlining pow/sin/cos into every layer.
@torch.library.custom_op("spotlm::rotary_tables", mutates_args=())
def rotary_tables(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 cos, sin [T, D] of absolute `positions` [T], rotate-half layout."""
    exponents = torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim
    angles = torch.outer(positions.float(), 1.0 / (theta ** exponents)).repeat(1, 2)  # [T, D]
    return angles.cos(), angles.sin()


@rotary_tables.register_fake
def _(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    return tuple(positions.new_empty(positions.shape[0], head_dim, dtype=torch.float32) for _ in range(2))


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, H, T, D] by position: pairs (i, i + D/2), like Hugging Face's `rotate_half`."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def window_mask(pos: torch.Tensor, n_keys: int, window: int) -> torch.Tensor:
    """bool [..., T, n_keys]: key <= pos for the queries at `pos` [..., T], and key > pos - w for a window w >= 1."""
    keys, pos = torch.arange(n_keys, device=pos.device), pos[..., None]
    return (keys <= pos) & (keys > pos - window) if window else keys <= pos


class Attention(nn.Module):
    """Causal multi-head attention, grouped-query K/V heads, rotary positions, over the layer's window."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.cfg, self.layer, self.window = cfg, layer, cfg.window(layer)
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_head * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_head * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_head * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: Cache | None = None,
                masks: dict[int, Any] | None = None) -> torch.Tensor:
        """x [B, T, d_model] -> [B, T, d_model]; `masks`: each window's `mask` for this forward (None: made here)."""
        if self.window == 1:
            return self.own_value(x)
        B, T, D = *x.shape[:2], self.cfg.head_dim
        q, k, v = (p(x).view(B, T, -1, D).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)  # q [B, H, T, D], k and v [B, Hkv, T, D]
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # [B, Hkv, start + T, D]
        y = self.attend(q, k, v, masks[self.window] if masks is not None else self.mask(T, x.device, cache))
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))

    def mask(self, T: int, device: torch.device, cache: Cache | None) -> Any:
        """The mask of T new tokens: the cache's, bool [T, T] for a window 1 < w < T, or None (causal)."""
        if cache is not None:
            return cache.attn_mask(T, device, self.window)
        return window_mask(torch.arange(T, device=device), T, self.window) if 1 < self.window < T else None

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Any) -> torch.Tensor:
        """softmax(q k^T / sqrt(D)) v [B, H, T, D] over the keys `mask` allows (None: causal), dropout in training."""
        dropout, gqa = self.cfg.dropout if self.training else 0.0, self.cfg.n_kv_head != self.cfg.n_head
        # mask None: training / prefill (square causal), or one new token seeing everything cached
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and q.size(2) > 1,
                                              dropout_p=dropout, enable_gqa=gqa)

    def own_value(self, x: torch.Tensor) -> torch.Tensor:
        """A window-1 layer: softmax over one key is 1, so each token's output is its own value: no attention,
        no q/k, no cache write. q_proj / k_proj still get a (zero) gradient: DDP expects one for every parameter."""
        (B, T, _), cfg = x.shape, self.cfg
        y = self.v_proj(x).view(B, T, cfg.n_kv_head, cfg.head_dim)
        if cfg.n_kv_head != cfg.n_head:  # query head h reads kv head h // group
            y = y.repeat_interleave(cfg.n_head // cfg.n_kv_head, dim=2)  # [B, T, H, D]
        if self.training and cfg.dropout:  # attention dropout of that one weight, as SDPA would apply it
            y = y * F.dropout(y.new_ones(B, T, cfg.n_head, 1), cfg.dropout)
        y = self.o_proj(y.reshape(B, T, cfg.n_head * cfg.head_dim))
        if torch.is_grad_enabled():
            y = y + 0.0 * (self.q_proj.weight.sum() + self.k_proj.weight.sum())
        return y


class MLP(nn.Module):
    """The feed-forward `cfg.mlp`: down(activate(*project_in(x))); gate_proj only for SwiGLU."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.kind = cfg.mlp
        if cfg.mlp == "swiglu":
            self.gate_proj = nn.Linear(cfg.d_model, cfg.ffn_hidden, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.ffn_hidden, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_hidden, cfg.d_model, bias=False)

    def project_in(self, x: torch.Tensor) -> list[torch.Tensor]:  # [gate(x), up(x)] for SwiGLU, else [up(x)]
        return [self.gate_proj(x), self.up_proj(x)] if self.kind == "swiglu" else [self.up_proj(x)]

    def activate(self, *h: torch.Tensor) -> torch.Tensor:  # the hidden activation of project_in's outputs
        if self.kind == "swiglu":
            return F.silu(h[0]) * h[1]
        return F.gelu(h[0], approximate="tanh") if self.kind == "gelu" else F.relu(h[0]).square()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.activate(*self.project_in(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)  # identity at dropout=0 and in eval()

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: Cache | None,
                masks: dict[int, Any] | None = None) -> torch.Tensor:
        x = x + self.drop(self.self_attn(self.input_layernorm(x), cos, sin, cache, masks))
        return x + self.drop(self.mlp(self.post_attention_layernorm(x)))


class LMHead(nn.Linear):
    """The output layer: the final norm's output h [..., d_model] -> logits [..., padded_vocab]."""

    def loss(self, h: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(logits, their mean cross-entropy against `targets` [...], -1 = ignored)."""
        logits = self(h)
        return logits, F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-1)


class GPT(nn.Module):
    """Decoder-only language model. Build (on any device, meta included), then `init_weights()` or load."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.model = nn.ModuleDict(dict(  # the Hugging Face layout's `model.` part
            embed_tokens=nn.Embedding(cfg.padded_vocab_size, cfg.d_model),
            **({"lmatch_embed": nn.Embedding(cfg.lmatch_vocab, cfg.d_model)} if cfg.lmatch_vocab else {}),
            layers=nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer)), norm=RMSNorm(cfg.d_model, cfg.norm_eps)))
        self.lm_head = LMHead(cfg.d_model, cfg.padded_vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        """lm_head shares the input embedding when `tie_embeddings` (to_empty / assign-loads untie them)."""
        if self.cfg.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def to_empty(self, *, device: torch.device | str | None, recurse: bool = True) -> GPT:
        super().to_empty(device=device, recurse=recurse)
        self.tie_weights()
        return self

    @torch.no_grad()
    def init_weights(self) -> None:
        """normal(0, init_std), o_proj / down_proj / sqrt(2 n_layer) (two residual branches per block), norms 1."""
        self.tie_weights()
        std, out_std = self.cfg.init_std, self.cfg.init_std / math.sqrt(2 * self.cfg.n_layer)
        for name, p in self.named_parameters():  # a tied weight is listed (and drawn) once
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                nn.init.normal_(p, 0.0, out_std if name.endswith(("o_proj.weight", "down_proj.weight")) else std)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *, lmatch: torch.Tensor | None = None,
                kv_cache: Cache | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """idx [B, T] -> (logits [B, T, padded_vocab] or None from a head that skips them, mean cross-entropy against
        `targets` [B, T] (-1 ignored) or None). `lmatch` [B, T]: retrieval-match ids, exactly when the model has their
        table. With `kv_cache`: positions continue after the cached ones, which attention covers. Bad inputs raise a
        one-line ValueError (no device sync: values are not read)."""
        if idx.dim() != 2:
            raise ValueError(f"idx must be [batch, tokens]; got shape {tuple(idx.shape)}")
        for name, t in (("targets", targets), ("lmatch", lmatch)):
            if t is not None and t.shape != idx.shape:
                raise ValueError(f"{name} shape {tuple(t.shape)} differs from idx shape {tuple(idx.shape)}")
        if lmatch is not None and not self.cfg.lmatch_vocab:
            raise ValueError("lmatch ids given but the model has no lmatch embedding (lmatch_vocab=0)")
        if lmatch is None and self.cfg.lmatch_vocab:
            raise ValueError(f"this model reads retrieval-match ids: pass lmatch= ({self.cfg.vocab_size} = no match)")
        if idx.size(1) > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {idx.size(1)} tokens exceeds max_seq_len={self.cfg.max_seq_len}")
        if kv_cache is not None:  # a cache holds at most max_seq_len positions
            kv_cache.check_room(idx.size(0), idx.size(1))
        h = self.model.norm(self.trunk(idx, lmatch, kv_cache))
        return (self.lm_head(h), None) if targets is None else self.lm_head.loss(h, targets)

    def trunk(self, idx: torch.Tensor, lmatch: torch.Tensor | None = None, kv_cache: Cache | None = None
              ) -> torch.Tensor:
        """The residual stream after the last block [B, T, d_model], appending to `kv_cache` (unchecked inputs)."""
        T = idx.size(1)
        # One mask per window (1 needs none), made before any tensor op: outside torch.compile's trace it splits nothing
        attns = {b.self_attn.window: b.self_attn for b in self.model.layers if b.self_attn.window != 1}
        masks = {w: attn.mask(T, idx.device, kv_cache) for w, attn in attns.items()}
        x = self.model.embed_tokens(idx)  # [B, T, d_model]
        if lmatch is not None:
            x = x + self.model.lmatch_embed(lmatch)
        pos = kv_cache.positions(T, idx.device) if kv_cache is not None else torch.arange(T, device=idx.device)
        cos, sin = (t.to(x.dtype) for t in rotary_tables(pos.flatten(), self.cfg.head_dim, self.cfg.rope_theta))
        if pos.dim() == 2:  # per-row positions: [B, 1, T, D] tables broadcast over the heads
            cos, sin = cos.view(*pos.shape, -1)[:, None], sin.view(*pos.shape, -1)[:, None]
        for block in self.model.layers:
            x = block(x, cos, sin, kv_cache, masks)
        if kv_cache is not None:
            kv_cache.advance(T)
        return x

    def num_params(self, exclude_embedding: bool = False) -> int:
        """Parameters (a tied matrix once); `exclude_embedding`: without the lookup tables (a tied head with them)."""
        tables = (self.model.embed_tokens, getattr(self.model, "lmatch_embed", None)) if exclude_embedding else ()
        return sum(p.numel() for p in self.parameters()) - sum(t.weight.numel() for t in tables if t is not None)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token for MFU: 6 x the matmul parameters (lm_head even when tied; not a window-1
        layer's q/k, which never run) + 12 d x each layer's context (T, min(w, T) for a window w >= 2, 0 for 1)."""
        c = self.cfg
        matmul_params = self.num_params(exclude_embedding=True) + self.lm_head.weight.numel() * c.tie_embeddings
        windows = [c.window(i) for i in range(c.n_layer)]
        matmul_params -= windows.count(1) * (c.n_head + c.n_kv_head) * c.head_dim * c.d_model
        context = sum(seq_len if w == 0 else 0 if w == 1 else min(w, seq_len) for w in windows)
        return 6.0 * matmul_params + 12.0 * c.d_model * context
