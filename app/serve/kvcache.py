"""The serving KV cache: every layer's keys and values preallocated (`KVCache`), and views of its rows as
independent sequences at their own positions (`KVSlots`, slot-based continuous batching).

Both implement the cache protocol the model talks to (`app.model.gpt.Cache`): `positions` of the new tokens,
`update` (store a layer's new keys/values, return what attention reads), `attn_mask`, `advance`, and for
`GPT.forward`'s input checks `check_room`. The engine's decode view (`app.serve.engine.DecodeSlots`) is a third.
`PrefixCache` keeps the KV of prompt blocks for later prompts that start with the same tokens.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Sequence

import numpy as np
import torch

from app.model.gpt import ModelConfig, window_mask


class KVCache:
    """Preallocated keys and values of every layer, [B, n_kv_head, max_len + spare, head_dim] each, and how many
    positions are filled. The model appends to it; dropping the object frees the memory."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, spare: int = 0):
        """`spare`: scratch positions after max_len, written (never read) by padded speculative queries."""
        if batch < 1 or not 1 <= max_len <= cfg.max_seq_len or spare < 0:
            raise ValueError(f"KVCache needs batch >= 1, 1 <= max_len <= max_seq_len={cfg.max_seq_len} and "
                             f"spare >= 0; got batch={batch}, max_len={max_len}, spare={spare}")
        shape = (batch, cfg.n_kv_head, max_len + spare, cfg.head_dim)
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
        """Raise a ValueError unless `new` more positions of a `batch`-row input fit every slot."""
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


class PrefixCache:
    """Keys and values of prompt blocks (`block` positions each) kept for reuse by later prompts that start
    with the same tokens (chat system prompts): a pool of `tokens // block` blocks per layer, found by a
    chain digest of the block's tokens and all before it (blake2b: a block's KV depends on every earlier
    token), least recently used first out. `load` copies a prompt's longest cached run of blocks into a
    KVCache row; `store` keeps the full blocks of a row's prompt after its prefill. Reused keys are those
    the same model computed for the same tokens at the same positions, so a prefill from them continues
    exactly as from scratch (up to the floating-point order of a differently batched forward)."""

    def __init__(self, cfg: ModelConfig, tokens: int, block: int = 16, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32):
        if block < 1 or tokens < block:
            raise ValueError(f"a prefix cache needs block >= 1 and tokens >= block; got tokens={tokens}, "
                             f"block={block}")
        self.block, n = block, tokens // block
        shape = (n, cfg.n_kv_head, block, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.table: OrderedDict[bytes, int] = OrderedDict()  # chain digest -> pool block, oldest use first
        self.free = list(range(n - 1, -1, -1))
        self.reused = 0  # prompt tokens loaded instead of computed

    def digests(self, prompt: Sequence[int], full: bool = False) -> list[bytes]:
        """Chain digests of the prompt's blocks: the full ones with `full`, else those that leave at least
        one prompt token to prefill (its logits give the first new token)."""
        n = len(prompt) // self.block if full else self.loadable(prompt)
        ids = np.asarray(prompt[:n * self.block], dtype=np.int64).reshape(n, self.block)
        out, h = [], b""
        for row in ids:
            h = hashlib.blake2b(h + row.tobytes(), digest_size=16).digest()
            out.append(h)
        return out

    def loadable(self, prompt: Sequence[int]) -> int:
        """How many of the prompt's blocks a load may cover: those leaving at least one token to prefill."""
        return (len(prompt) - 1) // self.block

    def cached(self, digests: Sequence[bytes]) -> int:
        """How many leading blocks are cached (no LRU touch)."""
        n = 0
        while n < len(digests) and digests[n] in self.table:
            n += 1
        return n

    def load_many(self, cache: KVCache, rows: Sequence[int], prompts: Sequence[Sequence[int]],
                  digests: Sequence[Sequence[bytes]] | None = None) -> list[int]:
        """Copy each prompt's longest cached run of leading blocks into its `cache` row (positions from 0) and
        mark them recently used -> the number of positions loaded per prompt (multiples of `block`). One gather
        and one scatter per layer for all the prompts (a copy per block and layer costs a launch each).
        `digests`: each prompt's `digests(full=True)`, when the caller has them."""
        loaded, where, blocks = [], [], []  # where: (cache row, block index) of each pool block in `blocks`
        for i, (row, prompt) in enumerate(zip(rows, prompts)):
            ds = (digests[i] if digests is not None else self.digests(prompt, full=True))
            ds = ds[:self.loadable(prompt)]
            n = self.cached(ds)
            for d in reversed(ds[:n]):  # the first block last: the most recently used, evicted last
                self.table.move_to_end(d)
            where += [(row, b) for b in range(n)]
            blocks += [self.table[d] for d in ds[:n]]
            loaded.append(n * self.block)
        if blocks:
            at, pool = self._positions(where, blocks)
            for layer in range(len(self.k)):  # pool [N, H, block, D] -> the rows' [N, block, H, D] at those positions
                cache.k[layer][at] = self.k[layer][pool].transpose(1, 2)
                cache.v[layer][at] = self.v[layer][pool].transpose(1, 2)
        self.reused += sum(loaded)
        return loaded

    def store_many(self, cache: KVCache, rows: Sequence[int], prompts: Sequence[Sequence[int]],
                   digests: Sequence[Sequence[bytes]] | None = None) -> None:
        """Keep the full blocks of each prompt, prefilled in its `cache` row, that are not cached yet (evicting the
        least recently used blocks when the pool is full), copied in one gather and one scatter per layer."""
        copies: dict[int, tuple[int, int]] = {}  # pool block -> (cache row, block index); a reused pool block: the last
        for i, (row, prompt) in enumerate(zip(rows, prompts)):
            for b, d in enumerate(digests[i] if digests is not None else self.digests(prompt, full=True)):
                if d in self.table:
                    continue
                if not self.free:
                    self.free.append(self.table.popitem(last=False)[1])
                slot = self.free.pop()
                self.table[d] = slot
                copies[slot] = (row, b)
        if copies:
            at, pool = self._positions(list(copies.values()), list(copies))
            for layer in range(len(self.k)):  # the rows' [N, block, H, D] at those positions -> pool [N, H, block, D]
                self.k[layer][pool] = cache.k[layer][at].transpose(1, 2)
                self.v[layer][pool] = cache.v[layer][at].transpose(1, 2)

    def _positions(self, where: list[tuple[int, int]], blocks: list[int]) -> tuple[tuple, torch.Tensor]:
        """KVCache indices of N (row, block index) pairs (rows [N, 1], :, positions [N, block]: indexed dims first,
        [N, block, H, D]) and the N pool blocks as a tensor, from one host-to-device copy."""
        idx = torch.tensor([[r for r, _ in where], [b for _, b in where], blocks], device=self.k[0].device)
        pos = idx[1, :, None] * self.block + torch.arange(self.block, device=idx.device)
        return (idx[0, :, None], slice(None), pos), idx[2]
