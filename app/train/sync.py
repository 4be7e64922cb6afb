"""How the Ray Train workers combine their work (`--sync.mode`), and the bytes each rank sends for it.

- ddp: DDP's all-reduce of the gradients, through `counting_allreduce_hook` (DDP's own default hook, counted).
- onebit: `onebit_hook`, 1-bit Adam as a DDP communication hook: the momentum averaged in 1 bit per element plus
  one scale per run of up to 2,048 elements of a tensor, error feedback on both sides of a two-phase all-reduce;
  the second moment refreshed from an int8 all-reduce of the gradients at steps 0, 1, 2, 4, ... and every
  `sync.refresh_every`, rescaled per tensor in between by its squared gradient norm.
- diloco: `DiLoCo`, rounds of local inner steps, then an outer Nesterov step on the workers' averaged deltas (in
  fp32, or int8 / 1 bit through the same two-phase mean), optionally after a synchronous 1-bit Adam warm start.

Bytes are what this rank sends, by the standard ring costs: all-reduce 2(W-1)/W x payload, all-gather (W-1)/W x
the gathered total, all_to_all the exact sizes sent to other ranks.
"""
import functools
import itertools
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


# ---------------------------------------------------------------- 1-bit Adam

BLOCK = 256  # elements per int8 scale; a bucket is padded to BLOCK x world elements
SIGN_BLOCK = 2048  # at most this many elements share a 1-bit scale (+1.6% bytes: 4 per 256 of bits)
_REFRESH_DECAY = 0.5  # the second moment's EMA over refreshes: they are far apart, so the newest weighs half
_NORM_DECAY = 0.95  # the per-tensor squared-norm EMA that rescales the second moment between refreshes
# 8 bytes of 0/1 read as one (little-endian) int64, times this, give those bits in the product's top byte, the
# first byte's highest: byte i sits at bit 8i and its term 2^(63-9i) puts it at bit 63-i; every other partial
# product lands below bit 56 or past bit 63 (the int64 product wraps: those are dropped).
_GATHER_BITS = 0x8040201008040201 - (1 << 64)


@functools.cache
def _sign_rows(device: torch.device) -> torch.Tensor:
    """Row b: the 8 bits of byte b, highest first, as -1.0 / +1.0 (on `device`, made once)."""
    return (((torch.arange(256)[:, None] >> torch.arange(7, -1, -1)) & 1).float() * 2 - 1).to(device)


def pack_signs(x: torch.Tensor) -> torch.Tensor:
    """The sign bits of `x` (1 = x >= 0; numel a multiple of 8), 8 per uint8, the first element's highest."""
    words = (x >= 0).view(torch.uint8).view(torch.int64)  # 8 elements' 0/1 bytes per word
    return ((words * _GATHER_BITS) >> 56).to(torch.uint8)


def unpack_signs(packed: torch.Tensor) -> torch.Tensor:
    """±1.0 per bit of `pack_signs`'s output."""
    return _sign_rows(packed.device).index_select(0, packed.int()).view(-1)


def refreshes(step: int, every: int) -> bool:
    """Whether optimizer step `step` (from 0) refreshes 1-bit Adam's second moment: steps 0, 1, 2, 4, 8, ...
    (it changes fastest early on) and every `every` steps."""
    return step & (step - 1) == 0 or step % every == 0


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8).view(-1)


def _as_floats(b: torch.Tensor) -> torch.Tensor:
    return b.clone().view(torch.float32)  # a copy: a slice of a message need not be 4-byte aligned


def _equal_runs(pieces: list[int]) -> list[tuple[int, int, int]]:
    """`pieces` (lengths, end to end) as runs of equal lengths: (offset of the run, pieces in it, their length)."""
    runs, offset = [], 0
    for n, same in itertools.groupby(pieces):
        k = len(list(same))
        runs.append((offset, k, n))
        offset += k * n
    return runs


@dataclass
class BucketLayout:
    """A flat buffer of tensors (`sizes`: a DDP bucket's, or a model's) cut for the two-phase all-reduce: padded
    to `padded` elements, W chunks of `chunk` (a multiple of BLOCK); per chunk, the lengths of its pieces: each
    tensor's part in it (the padding one more) cut into runs of at most SIGN_BLOCK, one 1-bit scale each; and
    per chunk those pieces as runs of equal lengths (`_equal_runs`), which the 1-bit codec reduces as one view."""

    numel: int
    padded: int
    chunk: int
    pieces: list[list[int]]
    runs: list[list[tuple[int, int, int]]]

    @staticmethod
    def of(sizes: list[int], world: int) -> "BucketLayout":
        numel = sum(sizes)
        padded = math.ceil(numel / (BLOCK * world)) * BLOCK * world
        chunk = padded // world
        ends = [e for e in itertools.accumulate([*sizes, padded - numel]) if e > 0]
        pieces = []
        for j in range(world):
            lo, hi = j * chunk, (j + 1) * chunk
            cuts = sorted({lo, hi, *(e for e in ends if lo < e < hi)})
            pieces.append([n for a, b in zip(cuts, cuts[1:])
                           for n in [SIGN_BLOCK] * ((b - a) // SIGN_BLOCK) + [(b - a) % SIGN_BLOCK] if n])
        return BucketLayout(numel, padded, chunk, pieces, [_equal_runs(p) for p in pieces])


class SignCodec:
    """1 bit per element and, per piece of the chunk (a tensor's run of at most SIGN_BLOCK), the mean |x| (fp32).
    Runs of equal-length pieces are reduced as the rows of one view: a handful of ops per chunk, not one per
    piece (a large model's bucket has tens of thousands of pieces)."""

    def __init__(self, lay: BucketLayout):
        self.lay = lay

    def size(self, j: int) -> int:
        return self.lay.chunk // 8 + 4 * len(self.lay.pieces[j])

    def encode(self, x: torch.Tensor, j: int) -> torch.Tensor:
        scales = torch.cat([x[o:o + k * n].view(k, n).abs().mean(1) for o, k, n in self.lay.runs[j]]).float()
        return torch.cat([pack_signs(x), _as_bytes(scales)])

    def decode(self, msg: torch.Tensor, j: int) -> torch.Tensor:
        cb = self.lay.chunk // 8
        out, scales, first = unpack_signs(msg[:cb]), _as_floats(msg[cb:self.size(j)]), 0
        for o, k, n in self.lay.runs[j]:
            out[o:o + k * n].view(k, n).mul_(scales[first:first + k, None])
            first += k
        return out


class Int8Codec:
    """int8 per element and, per BLOCK elements, the max |x| / 127 (fp32)."""

    def __init__(self, lay: BucketLayout):
        self.lay = lay

    def size(self, j: int) -> int:
        return self.lay.chunk + 4 * (self.lay.chunk // BLOCK)

    def encode(self, x: torch.Tensor, j: int) -> torch.Tensor:
        blocks = x.view(-1, BLOCK)
        scale = blocks.abs().amax(1).clamp(min=1e-30) / 127
        q = torch.round(blocks / scale[:, None]).clamp(-127, 127).to(torch.int8)
        return torch.cat([_as_bytes(q), _as_bytes(scale)])

    def decode(self, msg: torch.Tensor, j: int) -> torch.Tensor:
        n = self.lay.chunk
        return (msg[:n].view(torch.int8).float().view(-1, BLOCK) * _as_floats(msg[n:self.size(j)])[:, None]).view(-1)


def two_phase_mean(x: torch.Tensor, lay: BucketLayout, codec: "SignCodec | Int8Codec", counter: CommCounter,
                   residuals: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """The mean over ranks of `x` (padded to `lay.padded`), every message in `codec`'s form: each rank sends
    chunk j to rank j (all_to_all); rank j averages its chunk, encodes the mean again, and every rank
    all-gathers the encoded means. With `residuals` (this rank's whole-bucket and own-chunk error feedback,
    updated in place) what an encoding leaves out is added to the next call's input on both sides."""
    world, rank, chunk = dist.get_world_size(), dist.get_rank(), lay.chunk
    if residuals is not None:
        x = x + residuals[0]
    send = [codec.encode(x[j * chunk:(j + 1) * chunk], j) for j in range(world)]
    if residuals is not None:
        residuals[0].copy_(x - torch.cat([codec.decode(m, j) for j, m in enumerate(send)]))
    mine = codec.size(rank)
    recv = torch.empty(world * mine, dtype=torch.uint8, device=x.device)
    dist.all_to_all_single(recv, torch.cat(send), [mine] * world, [len(m) for m in send])
    counter.sent += sum(len(m) for j, m in enumerate(send) if j != rank)

    y = sum(codec.decode(m, rank) for m in recv.view(world, mine)) / world
    if residuals is not None:
        y = y + residuals[1]
    msg = codec.encode(y, rank)
    if residuals is not None:
        residuals[1].copy_(y - codec.decode(msg, rank))
    width = max(codec.size(j) for j in range(world))  # all_gather needs equal sizes: pad to the longest
    msg = torch.cat([msg, msg.new_zeros(width - len(msg))])
    gathered = [torch.empty_like(msg) for _ in range(world)]
    dist.all_gather(gathered, msg)
    counter.sent += allgather_bytes(world * width, world)
    return torch.cat([codec.decode(m, j) for j, m in enumerate(gathered)])


@dataclass
class Moments:
    """1-bit Adam's state of one bucket, the same on every rank: momentum, second moment (as of the last refresh),
    steps, refreshes; and per tensor an EMA of the workers' mean squared gradient norm, now and at the last
    refresh (their ratio carries the second moment's overall drift between refreshes)."""

    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    steps: int = 0
    refreshes: int = 0
    norms: torch.Tensor | None = None
    norms_at_refresh: torch.Tensor | None = None


@dataclass
class OneBitState:
    """The onebit hook's state on one rank, by bucket index: 1-bit Adam's moments (shared by the ranks), the
    error-feedback residuals of its whole buckets (worker side) and of the chunk it averages (server side)."""

    counter: CommCounter
    beta1: float = 0.9
    eps: float = 1e-8
    refresh_every: int = 64
    moments: dict[int, Moments] = field(default_factory=dict)
    worker: dict[int, torch.Tensor] = field(default_factory=dict)
    server: dict[int, torch.Tensor] = field(default_factory=dict)
    layouts: dict[int, BucketLayout] = field(default_factory=dict)

    def shared_state(self) -> dict[str, Any]:
        return {k: {f: (v.cpu() if isinstance(v, torch.Tensor) else v) for f, v in vars(m).items()}
                for k, m in self.moments.items()}

    def rank_state(self) -> dict[str, Any]:
        return {"worker": {k: v.cpu() for k, v in self.worker.items()},
                "server": {k: v.cpu() for k, v in self.server.items()}}

    def load(self, shared: dict[str, Any] | None, own: dict[str, Any] | None) -> None:
        if shared is not None:
            self.moments = {k: Moments(**m) for k, m in shared.items()}
        if own is not None:
            self.worker, self.server = dict(own["worker"]), dict(own["server"])

    def update(self, key: int, grad: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """1-bit Adam (Tang et al. 2021): Adam's update direction m / sqrt(v) for the flat gradient `grad` (of tensors
        `sizes`; `key` names its state), the same on every rank. Between refreshes each rank's momentum step on its
        own gradient, divided by the shared sqrt(v), is averaged in 1 bit per element with error feedback on both
        sides (Adam's normalised update is near ±1 everywhere, which 1 bit carries well). The second moment, which
        1 bit cannot carry, is refreshed from an int8 mean of the gradients at the steps `refreshes` names (0/1
        Adam's idea), where the momentum takes that same mean; in between, each tensor's follows the workers' mean
        squared gradient norm of that tensor (a float per tensor, all-reduced every step), and each element's
        update is clamped to Adam's bound of 1."""
        world = dist.get_world_size()
        lay = self.layouts.get(key) or self.layouts.setdefault(key, BucketLayout.of(sizes, world))
        m = self.moments.get(key)
        if m is None:
            m = self.moments[key] = Moments(torch.zeros(lay.numel), torch.zeros(lay.numel))
        m.exp_avg, m.exp_avg_sq = m.exp_avg.to(grad.device), m.exp_avg_sq.to(grad.device)
        b1, n = self.beta1, lay.numel
        self._track_norms(m, grad, sizes)
        x = torch.zeros(lay.padded, dtype=torch.float32, device=grad.device)
        if refreshes(m.steps, self.refresh_every):
            x[:n] = grad.float()
            g = two_phase_mean(x, lay, Int8Codec(lay), self.counter)[:n]
            m.exp_avg_sq.mul_(_REFRESH_DECAY).addcmul_(g, g, value=1 - _REFRESH_DECAY)
            m.exp_avg.mul_(b1).add_(g, alpha=1 - b1)
            m.refreshes += 1
            m.norms_at_refresh = m.norms.clone()
            update = m.exp_avg / self._denominator(m, sizes)
        else:
            denom = self._denominator(m, sizes)
            # An element no refresh has seen a gradient of has no scale yet: it waits for the next refresh.
            x[:n] = torch.where(m.exp_avg_sq > 0, (m.exp_avg * b1 + grad.float() * (1 - b1)) / denom, 0.0)
            # Adam moves an element by at most its learning rate (Kingma & Ba 2015, sec. 2.1). A stale second
            # moment would let a gradient that grew since the refresh through as a larger step, and error
            # feedback would carry it on for many steps (a lasting loss spike early in training at some seeds).
            bound = 1 - b1 ** (m.steps + 1)  # the bias-corrected update's bound of 1
            x[:n].clamp_(-bound, bound)
            res = (_residual(self.worker, key, lay.padded, grad.device),
                   _residual(self.server, key, lay.chunk, grad.device))
            update = two_phase_mean(x, lay, SignCodec(lay), self.counter, res)[:n]
            m.exp_avg = update * denom
        m.steps += 1
        return update / (1 - b1 ** m.steps)

    def _track_norms(self, m: Moments, grad: torch.Tensor, sizes: list[int]) -> None:
        """Fold this step's mean (over ranks) squared gradient norm of each tensor into `m.norms`, an EMA (a few
        floats all-reduced: counted, negligible)."""
        sq = torch.stack([t.float().pow(2).sum() for t in grad.split(sizes)])
        dist.all_reduce(sq)
        self.counter.sent += allreduce_bytes(sq.numel() * 4, dist.get_world_size())
        sq /= dist.get_world_size()
        m.norms = sq if m.norms is None else m.norms.to(sq.device).mul_(_NORM_DECAY).add_(sq, alpha=1 - _NORM_DECAY)

    def second_moment(self, m: Moments, sizes: list[int]) -> torch.Tensor:
        """Adam's v: the bias-corrected second moment of the refreshes so far, each tensor's scaled by how its
        squared gradient norm moved since the last refresh (gradients shrink fast early in training)."""
        v = m.exp_avg_sq / (1 - _REFRESH_DECAY ** m.refreshes)
        for part, drift in zip(v.split(sizes), m.norms / m.norms_at_refresh.clamp(min=1e-30)):
            part.mul_(drift)
        return v

    def _denominator(self, m: Moments, sizes: list[int]) -> torch.Tensor:
        return self.second_moment(m, sizes).sqrt() + self.eps


def _residual(store: dict[int, torch.Tensor], key: int, size: int, device: torch.device) -> torch.Tensor:
    r = store.get(key)
    if r is None or r.numel() != size:  # new, or the world size changed the padding: start afresh
        r = torch.zeros(size, dtype=torch.float32)
    store[key] = r = r.to(device)
    return r


def onebit_hook(state: OneBitState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """1-bit Adam as a DDP communication hook: replaces the bucket's local gradients by `OneBitState.update`'s
    direction, the same on every rank (the optimizer then is momentum-free SGD)."""
    buf = bucket.buffer()
    buf.copy_(state.update(bucket.index(), buf, [g.numel() for g in bucket.gradients()]))
    fut: torch.futures.Future = torch.futures.Future()
    fut.set_result(buf)
    return fut


# ---------------------------------------------------------------- DiLoCo

@dataclass
class RoundResult:
    """One outer step: each worker's inner steps this round, and the bytes this rank sent in it."""

    inner_steps: list[int]
    sent: float


class DiLoCo:
    """DiLoCo's outer loop over `params` (this worker's model): a copy of the global parameters, the outer
    Nesterov momentum, this rank's error-feedback residuals of its compressed deltas, and, for the synchronous
    warm start (`sync.warmup_steps`), 1-bit Adam's state."""

    def __init__(self, params: list[torch.nn.Parameter], cfg: SyncConfig, counter: CommCounter, beta1: float = 0.9):
        self.params, self.cfg, self.counter = params, cfg, counter
        self.sizes = [p.numel() for p in params]
        self.global_params = [p.detach().float().clone() for p in params]
        self.momentum = [torch.zeros_like(g) for g in self.global_params]
        self.residuals: dict[int, torch.Tensor] = {}  # 0: the whole delta's (worker side), 1: own chunk's (server)
        self.warm = OneBitState(counter, beta1=beta1, refresh_every=cfg.refresh_every) if cfg.warmup_steps else None

    @torch.no_grad()
    def outer_step(self, inner_steps: int) -> RoundResult:
        """Average the workers' deltas (global - local) weighted by their inner steps this round, apply them
        to the global parameters with outer Nesterov SGD, and set the local ones to the result. Every rank
        calls it once per round."""
        world = dist.get_world_size() if dist.is_initialized() else 1
        before = self.counter.sent
        steps = _gather_ints(inner_steps, world, self.params[0].device)
        delta = torch.cat([(g - p.detach().float()).view(-1) for g, p in zip(self.global_params, self.params)])
        if world > 1:  # the mean of each rank's delta x (its share of the steps x world) is the weighted mean
            delta = self._mean(delta * (steps[dist.get_rank()] / sum(steps) * world), world)
        lr, mu = self.cfg.outer_lr, self.cfg.outer_momentum
        for g, m, d, p in zip(self.global_params, self.momentum, _split(delta, self.global_params), self.params):
            m.mul_(mu).add_(d)
            g.sub_(d.add(m, alpha=mu), alpha=lr)
            p.copy_(g)
        return RoundResult(steps, self.counter.sent - before)

    def _mean(self, x: torch.Tensor, world: int) -> torch.Tensor:
        if self.cfg.compress == "none":
            dist.all_reduce(x)
            self.counter.sent += allreduce_bytes(x.numel() * 4, world)
            return x / world
        lay = BucketLayout.of(self.sizes, world)
        padded = torch.cat([x, x.new_zeros(lay.padded - lay.numel)])
        res = (_residual(self.residuals, 0, lay.padded, x.device), _residual(self.residuals, 1, lay.chunk, x.device))
        codec = Int8Codec(lay) if self.cfg.compress == "int8" else SignCodec(lay)
        return two_phase_mean(padded, lay, codec, self.counter, res)[:lay.numel]

    @torch.no_grad()
    def warmup_step(self, optimizer: torch.optim.Optimizer) -> torch.Tensor:
        """One synchronous step of the warm start: 1-bit Adam's update from the workers' gradients (in `.grad`),
        applied with each group's learning rate and decoupled weight decay. Returns the local gradient's norm."""
        grad = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).float().view(-1) for p in self.params])
        update = _split(self.warm.update(0, grad, self.sizes), self.params)
        index = {id(p): u for p, u in zip(self.params, update)}
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.mul_(1 - group["lr"] * group["weight_decay"]).sub_(index[id(p)].to(p.dtype), alpha=group["lr"])
        return grad.norm()

    def end_warmup(self, optimizer: torch.optim.Optimizer) -> None:
        """Hand 1-bit Adam's moments to each worker's AdamW (as its state after as many steps), then drop them;
        the rounds start from the warm weights."""
        self.global_params = [p.detach().float().clone() for p in self.params]
        m = self.warm.moments[0]
        v = self.warm.second_moment(m, self.sizes)
        exp_avg, exp_avg_sq = _split(m.exp_avg, self.params), _split(v, self.params)
        index = {id(p): i for i, p in enumerate(self.params)}
        for group in optimizer.param_groups:
            beta2, on_device = group["betas"][1], group.get("fused") or group.get("capturable")
            for p in group["params"]:
                i = index[id(p)]
                optimizer.state[p] = {
                    "step": torch.tensor(float(m.steps), device=p.device if on_device else "cpu"),
                    "exp_avg": exp_avg[i].to(p).clone(), "exp_avg_sq": (exp_avg_sq[i] * (1 - beta2 ** m.steps)).to(p)}
        self.warm = None

    def global_state(self) -> dict[str, Any]:
        """What every rank shares (rank 0 saves it): the outer momentum; 1-bit Adam's moments while warming up."""
        return {"momentum": [m.cpu().clone() for m in self.momentum],
                **({"warm": self.warm.shared_state()} if self.warm is not None else {})}

    def rank_state(self) -> dict[str, Any]:
        """What is this rank's own: its residuals (of the deltas; of 1-bit Adam while warming up)."""
        return {"residuals": {k: r.cpu().clone() for k, r in self.residuals.items()},
                **({"warm": self.warm.rank_state()} if self.warm is not None else {})}

    def load(self, global_state: dict[str, Any] | None, rank_state: dict[str, Any] | None) -> None:
        """Restore from a checkpoint (the global parameters are the model's weights, loaded already); a rank
        without its own state (more workers than before) starts with empty residuals. A checkpoint past the warm
        start keeps no 1-bit Adam state: the warm start is over."""
        self.global_params = [p.detach().float().clone() for p in self.params]
        if global_state is not None:
            self.momentum = [m.to(g.device) for m, g in zip(global_state["momentum"], self.global_params)]
            if "warm" not in global_state:
                self.warm = None
            elif self.warm is not None:
                self.warm.load(global_state["warm"], rank_state and rank_state.get("warm"))
        if rank_state is not None:
            self.residuals = dict(rank_state["residuals"])


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

    def __init__(self, cfg: SyncConfig, raw: torch.nn.Module, world: int, beta1: float = 0.9):
        self.cfg, self.world = cfg, world
        self.counter = CommCounter()
        self.onebit = OneBitState(self.counter, beta1=beta1, refresh_every=cfg.refresh_every) \
            if cfg.mode == "onebit" else None
        self.diloco = DiLoCo([p for p in raw.parameters() if p.requires_grad], cfg, self.counter, beta1=beta1) \
            if cfg.mode == "diloco" else None

    def wraps(self) -> bool:
        """Whether the model is wrapped in DDP: with several workers, and always under onebit (its hook is the
        optimizer's first half); DiLoCo's workers step on their own."""
        return (self.world > 1 or self.onebit is not None) and self.diloco is None

    def ddp_kwargs(self) -> dict[str, Any]:
        # onebit: find_unused_parameters stops DDP from rebuilding its buckets after the first step, so the
        # residuals (one per bucket) line up with the same buckets after a resume.
        return {"find_unused_parameters": True} if self.onebit is not None else {}

    def register(self, model: torch.nn.Module) -> torch.nn.parallel.DistributedDataParallel:
        """Put the mode's communication hook on the DDP-wrapped model (wrapped here if Ray left one worker's
        model bare); returns the wrapped model."""
        if not isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = torch.nn.parallel.DistributedDataParallel(model, **self.ddp_kwargs())
        if self.onebit is not None:
            model.register_comm_hook(self.onebit, onebit_hook)
        else:
            model.register_comm_hook(self.counter, counting_allreduce_hook)
        return model

    def shared_state(self) -> dict[str, Any] | None:
        """What rank 0 saves for every rank: DiLoCo's outer momentum, 1-bit Adam's moments."""
        if self.onebit is not None:
            return {"onebit": self.onebit.shared_state()}
        return self.diloco.global_state() if self.diloco is not None else None

    def rank_state(self, optimizer: torch.optim.Optimizer, rank: int) -> dict[str, Any] | None:
        """What this rank saves of its own: residuals; a DiLoCo worker's optimizer (rank 0's is the checkpoint's)."""
        if self.onebit is not None:
            return {"onebit": self.onebit.rank_state()}
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
        if self.onebit is not None:
            self.onebit.load(shared and shared["onebit"], own and own["onebit"])
        if self.diloco is not None:
            self.diloco.load(shared, own)
            if own is not None and rank:
                optimizer.load_state_dict(own["optimizer"])
