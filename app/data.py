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

import numpy as np
import torch

from app.shards import Manifest, read_shard


class TokenStream:
    """Random access to the concatenated tokens of one split (shards memory-mapped)."""

    def __init__(self, manifest: Manifest, split: str):
        paths = manifest.shard_paths(split)
        if not paths:
            raise ValueError(f"{manifest.root}: split {split!r} has no shards")
        infos = manifest.shards[split]
        self.shards = [read_shard(p) for p in paths]
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


class TrainLoader:
    """The micro-batches of rank `rank` for any global step, from `(seed, step)` alone."""

    def __init__(self, stream: TokenStream, seq_len: int, plan: BatchPlan, rank: int, seed: int):
        self.stream, self.seq_len, self.plan, self.rank, self.seed = stream, seq_len, plan, rank, seed
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

    def micro_batches(self, step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """`accum_steps` pairs of (inputs, targets), each `[micro_batch, seq_len]` int64."""
        first = step * self.plan.global_batch + self.rank * self.plan.per_rank
        rows = [self.stream.read(self._window(first + j) * self.seq_len, self.seq_len + 1)
                for j in range(self.plan.per_rank)]
        data = torch.from_numpy(np.stack(rows))
        mb = self.plan.micro_batch
        return [(data[i:i + mb, :-1], data[i:i + mb, 1:]) for i in range(0, len(rows), mb)]

    def epoch_of(self, step: int) -> float:
        return step * self.plan.global_batch / self.n_windows


def eval_batches(stream: TokenStream, seq_len: int, batch: int, max_tokens: int, rank: int,
                 world_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's share of the first `max_tokens` of a split, as fixed sequential windows."""
    n = min((stream.n_tokens - 1) // seq_len, max(1, max_tokens // seq_len))
    mine = list(range(rank, n, world_size))
    out = []
    for i in range(0, len(mine), batch):
        rows = [stream.read(w * seq_len, seq_len + 1) for w in mine[i:i + batch]]
        data = torch.from_numpy(np.stack(rows))
        out.append((data[:, :-1], data[:, 1:]))
    return out
