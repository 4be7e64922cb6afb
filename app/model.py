"""A GPT in the Llama layout (RMSNorm, rotary embeddings, SwiGLU, no biases), single-device PyTorch.

Module names match Hugging Face `LlamaForCausalLM`, so an export is a straight state-dict copy.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class ModelConfig:
    """Model shape. `vocab_size` is the tokenizer's; embeddings are padded to a multiple of 128."""

    vocab_size: int = 8192  # tokenizer vocabulary
    n_layer: int = 2
    n_head: int = 4
    n_kv_head: int = 0  # key/value heads (grouped-query attention); 0 = n_head
    d_model: int = 64
    ffn_hidden: int = 0  # SwiGLU hidden width; 0 = 8/3 * d_model rounded up to a multiple of 256
    max_seq_len: int = 128
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False  # share the input embedding with the output projection
    init_std: float = 0.02
    lmatch_vocab: int = 0  # rows of the retrieval-match embedding (vocab_size + 1); 0 = off

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        if self.n_kv_head == 0:
            self.n_kv_head = self.n_head
        if self.ffn_hidden == 0:
            self.ffn_hidden = 256 * math.ceil(8 * self.d_model / 3 / 256)
        if min(self.vocab_size, self.n_layer, self.n_head, self.d_model, self.max_seq_len) < 1:
            raise ValueError("vocab_size, n_layer, n_head, d_model and max_seq_len must be >= 1")
        if self.d_model % self.n_head or (self.d_model // self.n_head) % 2:
            raise ValueError(f"d_model={self.d_model} must split into n_head={self.n_head} heads of even size")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head={self.n_head} must be a multiple of n_kv_head={self.n_kv_head}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def padded_vocab_size(self) -> int:
        return 128 * math.ceil(self.vocab_size / 128)

    @staticmethod
    def preset(name: str, **overrides) -> "ModelConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; presets: {', '.join(PRESETS)}")
        return replace(PRESETS[name], **overrides)


PRESETS = {
    "tiny": ModelConfig(vocab_size=8192, n_layer=2, n_head=4, d_model=64, max_seq_len=128),
    "small": ModelConfig(vocab_size=8192, n_layer=6, n_head=6, d_model=384, max_seq_len=256),
    "gpt2-124m": ModelConfig(vocab_size=50257, n_layer=12, n_head=12, d_model=768, max_seq_len=1024,
                             tie_embeddings=True),
    "gpt2-350m": ModelConfig(vocab_size=50257, n_layer=24, n_head=16, d_model=1024, max_seq_len=1024,
                             tie_embeddings=True),
    "gpt2-1.5b": ModelConfig(vocab_size=50257, n_layer=48, n_head=25, d_model=1600, max_seq_len=1024,
                             tie_embeddings=True),
    "llama3-8b": ModelConfig(vocab_size=128256, n_layer=32, n_head=32, n_kv_head=8, d_model=4096,
                             ffn_hidden=14336, max_seq_len=8192, rope_theta=500000.0),
}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32, cast back, then scale (Hugging Face Llama semantics).
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def rotary_tables(cfg: ModelConfig, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [T, head_dim] for the given positions (rotate-half layout)."""
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, device=positions.device).float() / cfg.head_dim))
    freqs = torch.outer(positions.float(), inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, H, T, hd]; rotates pairs (i, i + hd/2) like Hugging Face's `rotate_half`."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


class KVCache:
    """Preallocated keys/values for every layer: [B, n_kv_head, max_len, head_dim] each."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, device, dtype=torch.float32):
        shape = (batch, cfg.n_kv_head, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.length = 0
        self.max_len = max_len

    def reset(self) -> None:
        self.length = 0


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        hd = cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_head * hd, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_head * hd, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_head * hd, bias=False)
        self.o_proj = nn.Linear(cfg.n_head * hd, cfg.d_model, bias=False)

    def forward(self, x, cos, sin, layer: int, cache: KVCache | None):
        B, T, _ = x.shape
        cfg = self.cfg
        q = self.q_proj(x).view(B, T, cfg.n_head, cfg.head_dim).transpose(1, 2)  # [B, H, T, hd]
        k = self.k_proj(x).view(B, T, cfg.n_kv_head, cfg.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, cfg.n_kv_head, cfg.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        causal = True
        if cache is not None:
            start = cache.length
            cache.k[layer][:, :, start:start + T] = k
            cache.v[layer][:, :, start:start + T] = v
            k, v = cache.k[layer][:, :, :start + T], cache.v[layer][:, :, :start + T]
            causal = T > 1
            if causal and start:  # a chunk after cached tokens: mask by absolute position
                mask = torch.ones(T, start + T, dtype=torch.bool, device=x.device).tril(start)
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=cfg.n_kv_head != cfg.n_head)
                return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=cfg.n_kv_head != cfg.n_head)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.ffn_hidden, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.ffn_hidden, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_hidden, cfg.d_model, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, layer: int, cache: KVCache | None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, layer, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    """The `model.` part of the Hugging Face layout: embeddings, blocks, final norm."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.padded_vocab_size, cfg.d_model)
        if cfg.lmatch_vocab:
            self.lmatch_embed = nn.Embedding(cfg.lmatch_vocab, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.model = Decoder(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.padded_vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialise every parameter (call after construction, or after `to_empty()` from meta)."""
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if name.endswith("layernorm.weight") or name == "model.norm.weight":
                p.fill_(1.0)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, 0.0, std / math.sqrt(2 * self.cfg.n_layer))
            else:
                nn.init.normal_(p, 0.0, std)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *,
                lmatch: torch.Tensor | None = None, kv_cache: KVCache | None = None):
        """idx [B, T] -> (logits [B, T, padded_vocab], mean cross-entropy vs targets or None)."""
        B, T = idx.shape
        start = kv_cache.length if kv_cache is not None else 0
        if start + T > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {start + T} tokens exceeds max_seq_len={self.cfg.max_seq_len}")
        x = self.model.embed_tokens(idx)
        if lmatch is not None:
            if not self.cfg.lmatch_vocab:
                raise ValueError("lmatch input given but the model has no lmatch embedding (lmatch_vocab=0)")
            x = x + self.model.lmatch_embed(lmatch)
        cos, sin = rotary_tables(self.cfg, torch.arange(start, start + T, device=idx.device))
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, i, kv_cache)
        if kv_cache is not None:
            kv_cache.length += T
        logits = self.lm_head(self.model.norm(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def num_params(self, exclude_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embedding:
            n -= self.model.embed_tokens.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 x non-embedding params + attention (12 L d T)."""
        c = self.cfg
        return 6 * self.num_params(exclude_embedding=True) + 12 * c.n_layer * c.d_model * seq_len
