"""How the Ray Train workers combine their work (`--sync.mode`), and the bytes each rank sends for it.

- ddp: DDP's all-reduce of the gradients, through `counting_allreduce_hook` (DDP's own default hook, counted).
- onebit: `onebit_hook`, a DDP communication hook sending 1 bit per gradient element plus one scale per tensor,
  with error feedback on both sides of the two-phase compressed all-reduce of 1-bit Adam.
- diloco: `DiLoCo`, rounds of local inner steps, then an outer Nesterov step on the workers' averaged deltas.

Bytes are what this rank sends, by the standard ring costs: all-reduce 2(W-1)/W x payload, all-gather (W-1)/W x
the gathered total, all_to_all the exact sizes sent to other ranks.
"""
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from app.log import get_logger
from app.train.config import SyncConfig

log = get_logger(__name__)


def allreduce_bytes(nbytes: int, world: int) -> float:
    """Bytes one rank sends in a ring all-reduce of `nbytes`."""
    return 2 * (world - 1) / world * nbytes


def allgather_bytes(total: int, world: int) -> float:
    """Bytes one rank sends in a ring all-gather whose gathered result is `total` bytes."""
    return (world - 1) / world * total


@dataclass
class CommCounter:
    """Bytes this rank sent for synchronisation since this worker started."""

    sent: float = 0.0


def counting_allreduce_hook(counter: CommCounter, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP's default all-reduce (divide by the world size, sum: the same numbers as no hook), counted."""
    buf = bucket.buffer()
    counter.sent += allreduce_bytes(buf.numel() * buf.element_size(), dist.get_world_size())
    return default_hooks.allreduce_hook(None, bucket)


# ---------------------------------------------------------------- 1-bit compression

_BIT_WEIGHTS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


def pack_signs(x: torch.Tensor) -> torch.Tensor:
    """The sign bits of `x` (1 = x >= 0; numel a multiple of 8), 8 per uint8."""
    bits = (x >= 0).to(torch.uint8).view(-1, 8)
    return (bits * _BIT_WEIGHTS.to(x.device)).sum(1, dtype=torch.uint8)


def unpack_signs(packed: torch.Tensor) -> torch.Tensor:
    """±1.0 per bit of `pack_signs`'s output."""
    bits = (packed.unsqueeze(1) & _BIT_WEIGHTS.to(packed.device)) > 0
    return bits.view(-1).float() * 2 - 1


def segment_scales(x: torch.Tensor, seg: torch.Tensor, n_seg: int) -> torch.Tensor:
    """Mean |x| over each segment (`seg[i]` is element i's segment): the 1-bit scale that keeps each
    tensor's mean magnitude."""
    sums = torch.zeros(n_seg, dtype=torch.float32, device=x.device).index_add_(0, seg, x.abs().float())
    counts = torch.bincount(seg, minlength=n_seg).clamp(min=1).to(sums)
    return sums / counts


@dataclass
class _Layout:
    """A DDP bucket cut for the two-phase all-reduce: padded to `padded` elements (W chunks of `chunk`, each a
    multiple of 8), a segment per gradient tensor (the padding is one more), each chunk's segments."""

    numel: int
    padded: int
    chunk: int
    seg: torch.Tensor  # [padded] segment of each element
    n_seg: int
    chunk_segs: list[torch.Tensor]  # per chunk: its segments, ascending

    @staticmethod
    def of(bucket: dist.GradBucket, world: int) -> "_Layout":
        sizes = [g.numel() for g in bucket.gradients()]
        numel = sum(sizes)
        padded = math.ceil(numel / (8 * world)) * 8 * world
        seg = torch.repeat_interleave(torch.arange(len(sizes) + 1),
                                      torch.tensor([*sizes, padded - numel]))
        chunk = padded // world
        return _Layout(numel, padded, chunk, seg, len(sizes) + 1,
                       [torch.unique(seg[j * chunk:(j + 1) * chunk]) for j in range(world)])


@dataclass
class OneBitState:
    """The onebit hook's state on one rank: error-feedback residuals of its whole buckets (worker side) and of
    the bucket chunk it averages (server side), by bucket index; the bytes it sent."""

    counter: CommCounter
    worker: dict[int, torch.Tensor] = field(default_factory=dict)
    server: dict[int, torch.Tensor] = field(default_factory=dict)
    layouts: dict[int, _Layout] = field(default_factory=dict)

    def state_dict(self) -> dict[str, Any]:
        return {"worker": {k: v.cpu() for k, v in self.worker.items()},
                "server": {k: v.cpu() for k, v in self.server.items()}}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.worker, self.server = dict(sd["worker"]), dict(sd["server"])


def _compress(x: torch.Tensor, seg: torch.Tensor, n_seg: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(packed signs, per-segment scales, the decompressed x) of `x`."""
    scales = segment_scales(x, seg, n_seg)
    packed = pack_signs(x)
    return packed, scales, unpack_signs(packed) * scales[seg]


def _residual(store: dict[int, torch.Tensor], key: int, like: torch.Tensor) -> torch.Tensor:
    r = store.get(key)
    if r is None:
        r = store[key] = torch.zeros_like(like)
    elif r.shape != like.shape:
        raise RuntimeError(f"onebit: bucket {key} changed size ({r.numel()} -> {like.numel()} elements); "
                           "the residuals no longer line up")
    return r.to(like.device)


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8).view(-1)


def _as_floats(b: torch.Tensor) -> torch.Tensor:
    return b.clone().view(torch.float32)  # a copy: a slice of a message need not be 4-byte aligned


def onebit_hook(state: OneBitState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """The mean of the workers' gradients in 1 bit per element: each rank adds its residual, sends chunk j of
    its sign bits (with the scales of chunk j's tensors) to rank j (all_to_all); rank j averages its chunk,
    compresses it again with its own residual, and every rank all-gathers the compressed chunks."""
    world, rank = dist.get_world_size(), dist.get_rank()
    buf = bucket.buffer()
    lay = state.layouts.get(bucket.index())
    if lay is None:
        lay = state.layouts[bucket.index()] = _Layout.of(bucket, world)
    seg = lay.seg.to(buf.device)
    x = torch.zeros(lay.padded, dtype=torch.float32, device=buf.device)
    x[:lay.numel] = buf.float()
    x += _residual(state.worker, bucket.index(), x)
    packed, scales, approx = _compress(x, seg, lay.n_seg)
    state.worker[bucket.index()] = x - approx

    # Phase 1: chunk j's bits and its tensors' scales to rank j.
    cb = lay.chunk // 8
    send = [torch.cat([packed[j * cb:(j + 1) * cb], _as_bytes(scales[lay.chunk_segs[j]])]) for j in range(world)]
    mine = cb + 4 * len(lay.chunk_segs[rank])
    recv = torch.empty(world * mine, dtype=torch.uint8, device=buf.device)
    dist.all_to_all_single(recv, torch.cat(send), [mine] * world, [len(s) for s in send])
    state.counter.sent += sum(len(s) for j, s in enumerate(send) if j != rank)

    # This rank's chunk: the mean of the workers' decompressed chunks, compressed again with its residual.
    my_seg = seg[rank * lay.chunk:(rank + 1) * lay.chunk]
    local = torch.searchsorted(lay.chunk_segs[rank].to(buf.device), my_seg)  # segment -> its place in the scales
    total = torch.zeros(lay.chunk, dtype=torch.float32, device=buf.device)
    for m in recv.view(world, mine):
        total += unpack_signs(m[:cb]) * _as_floats(m[cb:])[local]
    y = total / world
    y += _residual(state.server, bucket.index(), y)
    n_local = len(lay.chunk_segs[rank])
    c_packed, c_scales, c_approx = _compress(y, local, n_local)
    state.server[bucket.index()] = y - c_approx

    # Phase 2: every rank's compressed chunk to every rank (scales padded to the longest chunk's count).
    width = max(len(s) for s in lay.chunk_segs)
    msg = torch.cat([c_packed, _as_bytes(torch.cat([c_scales, c_scales.new_zeros(width - n_local)]))])
    gathered = [torch.empty_like(msg) for _ in range(world)]
    dist.all_gather(gathered, msg)
    state.counter.sent += allgather_bytes(world * msg.numel(), world)
    out = torch.empty(lay.padded, dtype=torch.float32, device=buf.device)
    for j, m in enumerate(gathered):
        segs = seg[j * lay.chunk:(j + 1) * lay.chunk]
        where = torch.searchsorted(lay.chunk_segs[j].to(buf.device), segs)
        out[j * lay.chunk:(j + 1) * lay.chunk] = unpack_signs(m[:cb]) * _as_floats(m[cb:])[where]
    buf.copy_(out[:lay.numel])
    fut: torch.futures.Future = torch.futures.Future()
    fut.set_result(buf)
    return fut


# ---------------------------------------------------------------- DiLoCo

def encode(x: torch.Tensor, how: str) -> tuple[torch.Tensor, torch.Tensor]:
    """`x` compressed (`how`: int8 with a max-abs scale, or onebit: signs with a mean-abs scale) as
    (uint8 payload, its fp32 scale); the payload of onebit is padded to whole bytes."""
    flat = x.detach().float().view(-1)
    if how == "int8":
        scale = flat.abs().max().clamp(min=1e-30) / 127
        return _as_bytes(torch.round(flat / scale).clamp(-127, 127).to(torch.int8)), scale.view(1)
    pad = -flat.numel() % 8
    return pack_signs(torch.cat([flat, flat.new_zeros(pad)])), flat.abs().mean().view(1)


def decode(payload: torch.Tensor, scale: torch.Tensor, how: str, like: torch.Tensor) -> torch.Tensor:
    """`encode`'s inverse, shaped like `like` (fp32)."""
    if how == "int8":
        values = payload.view(torch.int8).float()
    else:
        values = unpack_signs(payload)[:like.numel()]
    return (values * scale).view(like.shape)


@dataclass
class RoundResult:
    """One outer step: each worker's inner steps this round, and the bytes this rank sent in it."""

    inner_steps: list[int]
    sent: float


class DiLoCo:
    """DiLoCo's outer loop over `params` (this worker's model): a copy of the global parameters, the outer
    Nesterov momentum, and this rank's error-feedback residuals of its compressed deltas."""

    def __init__(self, params: list[torch.nn.Parameter], cfg: SyncConfig, counter: CommCounter):
        self.params, self.cfg, self.counter = params, cfg, counter
        self.global_params = [p.detach().float().clone() for p in params]
        self.momentum = [torch.zeros_like(g) for g in self.global_params]
        self.residuals = [torch.zeros_like(g) for g in self.global_params] if cfg.compress != "none" else []

    @torch.no_grad()
    def outer_step(self, inner_steps: int) -> RoundResult:
        """Average the workers' deltas (global - local) weighted by their inner steps this round, apply them
        to the global parameters with outer Nesterov SGD, and set the local ones to the result. Every rank
        calls it once per round."""
        world = dist.get_world_size() if dist.is_initialized() else 1
        before = self.counter.sent
        steps = _gather_ints(inner_steps, world, self.params[0].device)
        weights = [s / sum(steps) for s in steps]
        deltas = [g - p.detach().float() for g, p in zip(self.global_params, self.params)]
        avg = self._mean_delta(deltas, weights, world) if world > 1 else deltas
        lr, mu = self.cfg.outer_lr, self.cfg.outer_momentum
        for g, m, d, p in zip(self.global_params, self.momentum, avg, self.params):
            m.mul_(mu).add_(d)
            g.sub_(d.add(m, alpha=mu), alpha=lr)
            p.copy_(g)
        return RoundResult(steps, self.counter.sent - before)

    def _mean_delta(self, deltas: list[torch.Tensor], weights: list[float], world: int) -> list[torch.Tensor]:
        rank = dist.get_rank()
        if self.cfg.compress == "none":
            flat = torch.cat([d.view(-1) for d in deltas]) * weights[rank]
            dist.all_reduce(flat)
            self.counter.sent += allreduce_bytes(flat.numel() * 4, world)
            return _split(flat, deltas)
        payloads, scales = [], []
        for i, d in enumerate(deltas):
            x = d + self.residuals[i]
            p, s = encode(x, self.cfg.compress)
            self.residuals[i] = x - decode(p, s, self.cfg.compress, x)
            payloads.append(p)
            scales.append(s)
        msg = torch.cat([*payloads, _as_bytes(torch.cat(scales))])
        gathered = [torch.empty_like(msg) for _ in range(world)]
        dist.all_gather(gathered, msg)
        self.counter.sent += allgather_bytes(world * msg.numel(), world)
        sizes = [p.numel() for p in payloads]
        total = [torch.zeros_like(d) for d in deltas]
        for w, m in zip(weights, gathered):  # in rank order: every rank sums the same way
            parts = list(m[:sum(sizes)].split(sizes))
            sc = _as_floats(m[sum(sizes):])
            for i, d in enumerate(deltas):
                total[i] += w * decode(parts[i], sc[i:i + 1], self.cfg.compress, d)
        return total

    def global_state(self) -> dict[str, Any]:
        """What every rank shares (rank 0 saves it): the outer momentum."""
        return {"momentum": [m.cpu().clone() for m in self.momentum]}

    def rank_state(self) -> dict[str, Any]:
        """What is this rank's own: its residuals."""
        return {"residuals": [r.cpu().clone() for r in self.residuals]}

    def load(self, global_state: dict[str, Any] | None, rank_state: dict[str, Any] | None) -> None:
        """Restore from a checkpoint (the global parameters are the model's weights, loaded already); a rank
        without its own state (more workers than before) starts with empty residuals."""
        self.global_params = [p.detach().float().clone() for p in self.params]
        if global_state is not None:
            self.momentum = [m.to(g.device) for m, g in zip(global_state["momentum"], self.global_params)]
        if rank_state is not None and self.residuals:
            self.residuals = [r.to(g.device) for r, g in zip(rank_state["residuals"], self.global_params)]


def _gather_ints(value: int, world: int, device: torch.device) -> list[int]:
    if world == 1:
        return [value]
    out = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world)]
    dist.all_gather(out, torch.tensor([value], dtype=torch.int64, device=device))
    return [int(t.item()) for t in out]


def _split(flat: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    return [t.view(x.shape) for t, x in zip(flat.split([x.numel() for x in like]), like)]


# ---------------------------------------------------------------- one worker's synchronisation

class Sync:
    """The run's synchronisation (`sync.mode`) on one worker: the DDP hook it puts on the wrapped model, the
    DiLoCo outer loop, the bytes sent, and the state a checkpoint keeps (shared, and this rank's own)."""

    def __init__(self, cfg: SyncConfig, raw: torch.nn.Module, world: int):
        self.cfg, self.world = cfg, world
        self.counter = CommCounter()
        self.onebit = OneBitState(self.counter) if cfg.mode == "onebit" and world > 1 else None
        self.diloco = DiLoCo([p for p in raw.parameters() if p.requires_grad], cfg, self.counter) \
            if cfg.mode == "diloco" else None

    def wraps(self) -> bool:
        """Whether the model is wrapped in DDP (DiLoCo's workers step on their own)."""
        return self.world > 1 and self.diloco is None

    def ddp_kwargs(self) -> dict[str, Any]:
        # onebit: find_unused_parameters stops DDP from rebuilding its buckets after the first step, so the
        # residuals (one per bucket) line up with the same buckets after a resume.
        return {"find_unused_parameters": True} if self.onebit is not None else {}

    def register(self, ddp: torch.nn.parallel.DistributedDataParallel) -> None:
        """Put the mode's communication hook on the DDP-wrapped model."""
        if self.onebit is not None:
            ddp.register_comm_hook(self.onebit, onebit_hook)
        else:
            ddp.register_comm_hook(self.counter, counting_allreduce_hook)

    def shared_state(self) -> dict[str, Any] | None:
        """What rank 0 saves for every rank (DiLoCo's outer momentum)."""
        return self.diloco.global_state() if self.diloco is not None else None

    def rank_state(self, optimizer: torch.optim.Optimizer, rank: int) -> dict[str, Any] | None:
        """What this rank saves of its own: residuals; a DiLoCo worker's optimizer (rank 0's is the checkpoint's)."""
        if self.onebit is not None:
            return {"onebit": self.onebit.state_dict()}
        if self.diloco is not None:
            return {**self.diloco.rank_state(), **({"optimizer": optimizer.state_dict()} if rank else {})}
        return None

    def load(self, shared: dict[str, Any] | None, own: dict[str, Any] | None, optimizer: torch.optim.Optimizer,
             rank: int) -> None:
        """Restore after the model and optimizer were loaded from the checkpoint. A rank without its own state
        (the run had fewer workers) starts its residuals, and a DiLoCo worker its optimizer, fresh."""
        if own is None and (self.onebit is not None or self.diloco is not None):
            log.warning("rank %d has no state of its own in the checkpoint: its residuals%s start fresh", rank,
                        " and optimizer" if self.diloco is not None and rank else "")
            if self.diloco is not None and rank:
                optimizer.state.clear()
        if self.onebit is not None and own is not None:
            self.onebit.load_state_dict(own["onebit"])
        if self.diloco is not None:
            self.diloco.load(shared, own)
            if own is not None and rank:
                optimizer.load_state_dict(own["optimizer"])
