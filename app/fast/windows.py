"""Sliding-window layers (1 < w) on CUDA without a KV cache: attention over only the key blocks a window touches.

The plain model masks a [T, T] score matrix; here flex_attention skips whole 128-position key blocks outside every
query's window (`sliding_block_mask`), or with `kernel` the Triton window kernel (`kernels.window_attention`) reads
only the 64-key blocks the window touches. With a KV cache, off CUDA and under training dropout the plain masked
attention runs.
"""
from __future__ import annotations

import functools
from typing import Any

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from app.fast import kernels
from app.model.gpt import Attention, Cache


# Built eagerly (outside torch.compile's trace, before any traced op: the mask enters the trace as an input) and
# cached, so each (T, window, device) is built once per process, not per step or per layer.
@torch.compiler.disable
@functools.lru_cache(maxsize=32)
def sliding_block_mask(T: int, window: int, device: torch.device) -> BlockMask:
    """flex_attention's block-sparse mask of causal attention within `window` over T positions."""
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


class SlidingWindowAttention(Attention):
    """An `Attention` of window 1 < w whose training / prefill forwards on CUDA skip the keys outside the window."""

    kernel: bool = False  # the Triton window kernel instead of flex_attention's block-sparse one

    def mask(self, T: int, device: torch.device, cache: Cache | None) -> Any:
        """The window itself (for the kernel) or a block mask (flex) where they run, else the plain mask."""
        if cache is None and 1 < self.window < T and device.type == "cuda" and not (self.training and self.cfg.dropout):
            return self.window if self.kernel else sliding_block_mask(T, self.window, device)
        return super().mask(T, device, cache)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Any) -> torch.Tensor:
        if isinstance(mask, int):  # (one dtype: autocast's, v's)
            return kernels.window_attention(q.to(v.dtype), k.to(v.dtype), v, mask)
        if isinstance(mask, BlockMask):
            return sliding_flex_attention(q.to(v.dtype), k.to(v.dtype), v, mask, self.cfg.n_kv_head != self.cfg.n_head)
        return super().attend(q, k, v, mask)
