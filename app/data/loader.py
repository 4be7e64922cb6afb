"""Deterministic token loader over a manifest's shards: fixed windows, seeded epoch order,
per-rank slices of each global batch, and a position that is one integer (saved in checkpoints).

The training stream is the concatenation of a split's shards. It is cut into non-overlapping
windows of `seq_len + 1` tokens (inputs and shifted targets). Epoch `e` visits the windows in a
permutation seeded by `(seed, e)`. Global step `s` consumes samples `[s*G, (s+1)*G)` of that
endless sequence (G = sequences per global batch); rank `r` of `W` takes the contiguous
`G/W` block `r`, split into micro-batches. The batch a step sees therefore depends only on
`(seed, step)`, never on how many workers there are or how often the run was interrupted.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from app.data.shards import Manifest, read_shard


class TokenStream:
    """Random access to the concatenated tokens of one split (shards memory-mapped), or to any list
    of per-token arrays aligned with them (the retrieval-match ids of the index stage)."""

    def __init__(self, manifest: Manifest, split: str, arrays: list[np.ndarray] | None = None):
        paths = manifest.shard_paths(split)
        if not paths:
            raise ValueError(f"{manifest.root}: split {split!r} has no shards")
        infos = manifest.shards[split]
        self.shards = arrays if arrays is not None else [read_shard(p) for p in paths]
        if len(self.shards) != len(infos):
            raise ValueError(f"{manifest.root}: {len(self.shards)} arrays for the {len(infos)} shards of {split!r}")
        for arr, info, p in zip(self.shards, infos, paths):
            if len(arr) != info["n_tokens"]:
                raise ValueError(f"{p}: has {len(arr)} tokens, manifest says {info['n_tokens']}")
        self.starts = np.cumsum([0] + [len(a) for a in self.shards]).tolist()
        self.n_tokens = self.starts[-1]

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens `[start, start+length)` of the stream as int64 (crosses shard ends as needed)."""
        out = np.empty(length, dtype=np.int64)
        pos, done = start, 0
        while done < length:
            i = bisect.bisect_right(self.starts, pos) - 1
            shard, off = self.shards[i], pos - self.starts[i]
            take = min(length - done, len(shard) - off)
            out[done:done + take] = shard[off:off + take]
            done, pos = done + take, pos + take
        return out


@dataclass
class BatchPlan:
    """How a global batch of `global_batch` sequences splits over ranks and micro-steps."""

    global_batch: int  # sequences per optimizer step, all ranks together
    micro_batch: int  # sequences per forward/backward on one rank
    world_size: int

    def __post_init__(self):
        per_rank, rem = divmod(self.global_batch, self.world_size)
        if rem or per_rank % self.micro_batch:
            raise ValueError(
                f"global batch of {self.global_batch} sequences does not split into {self.world_size} "
                f"workers x micro-batches of {self.micro_batch}; choose batch sizes that divide evenly")

    @property
    def per_rank(self) -> int:
        return self.global_batch // self.world_size

    @property
    def accum_steps(self) -> int:
        return self.per_rank // self.micro_batch


def match_stream(manifest: Manifest, split: str) -> TokenStream | None:
    """The retrieval-match ids of `split` aligned with its tokens (the LMatch next-id memmaps listed in
    `manifest.extras["lmatch"]`, see index/lmatch.py; vocab_size = no match), or None when the dataset
    has no LMatch index for that split."""
    if not manifest.extras.get("lmatch"):
        return None
    from index.lmatch import lmatch_paths, read_lmatch  # only datasets with an index need it

    paths = lmatch_paths(manifest, split)
    return TokenStream(manifest, split, [read_lmatch(p)[0] for p in paths]) if paths else None


class Batch(NamedTuple):
    """One micro-batch: inputs and next-token targets `[B, T]` int64, and the inputs' retrieval-match
    ids `[B, T]` (None without an index)."""

    inputs: torch.Tensor
    targets: torch.Tensor
    lmatch: torch.Tensor | None = None


def _batches(stream: TokenStream, match: TokenStream | None, starts: list[int], seq_len: int,
             size: int) -> list[Batch]:
    """Windows of `seq_len + 1` tokens at `starts`, stacked into batches of `size` rows."""
    if not starts:
        return []
    data = torch.from_numpy(np.stack([stream.read(s, seq_len + 1) for s in starts]))
    ids = torch.from_numpy(np.stack([match.read(s, seq_len) for s in starts])) if match is not None else None
    return [Batch(data[i:i + size, :-1], data[i:i + size, 1:], ids[i:i + size] if ids is not None else None)
            for i in range(0, len(starts), size)]


class TrainLoader:
    """The micro-batches of rank `rank` for any global step, from `(seed, step)` alone."""

    def __init__(self, stream: TokenStream, seq_len: int, plan: BatchPlan, rank: int, seed: int,
                 match: TokenStream | None = None):
        self.stream, self.seq_len, self.plan, self.rank, self.seed = stream, seq_len, plan, rank, seed
        self.match = match
        self.n_windows = (stream.n_tokens - 1) // seq_len
        if self.n_windows < 1:
            raise ValueError(f"the training split has {stream.n_tokens} tokens: too few for one "
                             f"sequence of {seq_len}; lower seq_len or add data")
        self._epoch, self._order = -1, np.empty(0, dtype=np.int64)

    def _window(self, sample: int) -> int:
        epoch, i = divmod(sample, self.n_windows)
        if epoch != self._epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._epoch, self._order = epoch, rng.permutation(self.n_windows)
        return int(self._order[i])

    def micro_batches(self, step: int) -> list[Batch]:
        """`accum_steps` micro-batches of `[micro_batch, seq_len]` each."""
        first = step * self.plan.global_batch + self.rank * self.plan.per_rank
        starts = [self._window(first + j) * self.seq_len for j in range(self.plan.per_rank)]
        return _batches(self.stream, self.match, starts, self.seq_len, self.plan.micro_batch)

    def epoch_of(self, step: int) -> float:
        return step * self.plan.global_batch / self.n_windows


def eval_batches(stream: TokenStream, seq_len: int, batch: int, max_tokens: int, rank: int,
                 world_size: int, match: TokenStream | None = None) -> list[Batch]:
    """This rank's share of the first `max_tokens` of a split (0 = all of it), as fixed sequential windows."""
    n = (stream.n_tokens - 1) // seq_len
    if max_tokens:
        n = min(n, max(1, max_tokens // seq_len))
    return _batches(stream, match, [w * seq_len for w in range(rank, n, world_size)], seq_len, batch)
