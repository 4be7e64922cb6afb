"""Continuous-batching generation engine: one background thread owns the model and a slot KV cache.

Requests (`Sequence`s) join and leave the running batch between decode steps. Each loop iteration:
1. drops cancelled and timed-out sequences (their KV slot is freed at once);
2. admits waiting sequences into free slots;
3. queues one batched decode step for every sequence already running (one new token each), then
   prefills the admitted ones, up to `max_prefill_tokens` of (right-padded) prompt per forward: each gets
   its first token (time to first token), their host work overlapping the decode on the device.
A sequence finishes at its stop id, its token budget, the context's end, its deadline or a cancel.

Decode runs on static memory: every slot's last token, position, sampling parameters and uniforms live
in device tensors (`DecodeState`), and a step decodes cache rows [0, n) for n the smallest batch bucket
(1, 2, 4, ... max_batch) holding every active slot, reading the first L cached positions for L the
smallest length bucket (kv_bucket, 2 kv_bucket, ... max_len) holding the longest active sequence
(`DecodeSlots` masks each row to its own keys). So a step's shapes depend on (n, L) only: on CUDA
(`cuda_graphs`) each pair's step is captured once as a CUDA graph and replayed; elsewhere the same code
runs eagerly. A step reads one tensor back (the new tokens); free rows inside the bucket are computed and
ignored.

Speculative decoding (a `drafter`, app/serve/speculative.py): before a step each running sequence may get
up to its `draft_tokens` drafts (from the LMatch index's continuation of its context, or from its own
text); when any has one, the step is a verify step instead: every row reads its last token and K drafts
(K the drafts' bucket, rows with fewer masked by their count) in one forward, accepts the longest prefix
speculative sampling agrees with, and emits those drafts plus one token (greedy: exactly plain decoding's
tokens). A row's position advances by what it accepted + 1; the keys of rejected drafts lie past it and
are overwritten by its next tokens. Verify steps are graphed per (n, K, L) on first use.

Prefix reuse (`prefix_cache_tokens`, app.serve.kvcache.PrefixCache): a prompt's leading blocks whose KV an
earlier prompt left in the prefix cache are copied into its slot, and its prefill computes the rest only;
admission puts a prompt whose blocks an earlier prompt of the same round will store into a later group. A
prefill group's blocks are loaded and stored with one gather and one scatter per layer.

Attention kernels: `step` runs without cuDNN's SDPA (`no_cudnn_attention`). cuDNN builds an execution plan
per thread and input shape on first sight; prefills come in ever new shapes (group size, prompt length, cached
length), so that cost landed inside requests, most of all those reading a cached prefix (masked, new shapes).
Flash / memory-efficient attention need no such set-up. The decode graphs captured at `start` keep torch's
own choice: their shapes are fixed, and their set-up is paid once, before the first request.

Memory is bounded: the KV cache is allocated once ([max_batch, heads, max_len + max_draft, head_dim] per layer),
at most `max_batch` sequences are active and `max_queue` wait; `submit` raises `EngineFull` (with a
retry-after estimate) beyond that. Sampling is per row from the sequence's own seeded uniforms
(app.serve.generate.sample_tokens), so a seed gives the same tokens alone, batched, or through `generate`.

Optional retrieval hooks (objects, no import of the index code here):
- `lmatch.lookup(context_ids) -> (next_id, match_len)`: the model's lmatch input of each position
  (next_id = vocab_size means no match); needed exactly for models with `lmatch_vocab > 0`;
- `knn(hidden [B, d]) -> (distances [B, k], next_ids [B, k])`: the next-token distribution becomes
  p = lambda * p_knn + (1 - lambda) * p_lm, p_knn = softmax(-distance / knn_temperature) over the
  neighbours' next ids (ids < 0 are ignored); `hidden` is the final norm's output (the lm_head input).
Time spent in both is counted per sequence (`Sequence.index_ms`).

No Ray here: app/serve/deployment.py wraps this in a Serve deployment; bench/serve_load.py drives it directly.
"""
from __future__ import annotations

import contextlib
import itertools
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol, Sequence as Seq

import torch

from app.serve.generate import check_args, forward_last, sample_tokens, sampling_kind, uniforms
from app.log import get_logger
from app.model.gpt import GPT
from app.serve.kvcache import KVCache, PrefixCache
from app.serve.speculative import Drafter, verify

log = get_logger(__name__)


class LMatchLookup(Protocol):
    def lookup(self, context_ids: Seq[int]) -> tuple[int, int]: ...


Kinds = tuple[bool, bool] | None  # (some row samples "plain", some row "cut"); None: forward only (kNN)
KnnFn = Callable[[torch.Tensor], tuple[Any, Any]]  # hidden [B, d] -> (distances [B, k], next ids [B, k])


_cudnn_lock = threading.Lock()
_cudnn_users = 0  # engines inside `no_cudnn_attention` now
_cudnn_was = True  # the flag before the first of them


@contextlib.contextmanager
def no_cudnn_attention() -> Iterator[None]:
    """Scaled-dot-product attention without the cuDNN backend inside (a process-wide flag: the engines running in
    one process share the setting, reference-counted, and the last one out restores the previous value)."""
    global _cudnn_users, _cudnn_was
    with _cudnn_lock:
        if not _cudnn_users:
            _cudnn_was = torch.backends.cuda.cudnn_sdp_enabled()
            torch.backends.cuda.enable_cudnn_sdp(False)
        _cudnn_users += 1
    try:
        yield
    finally:
        with _cudnn_lock:
            _cudnn_users -= 1
            if not _cudnn_users:
                torch.backends.cuda.enable_cudnn_sdp(_cudnn_was)


class EngineFull(Exception):
    """Raised by `submit` when `max_queue` sequences already wait; `retry_after` in seconds."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


@dataclass
class SamplingParams:
    """How one sequence is generated (validated by `Engine.submit`)."""

    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    seed: int | None = None  # None = a fresh random seed
    logprobs: int | None = None  # None = off; n >= 0: the chosen token's logprob and the n most likely
    timeout_s: float | None = None  # from submission; the sequence then finishes with "timeout"
    stop_ids: Seq[int] | None = None  # None = the engine's eot id
    draft_tokens: int | None = None  # speculative drafts per step (0 = off); None = the engine's default


@dataclass
class TokenLogprob:
    """Log-probability of a chosen token and the `top` most likely ids of its step (model distribution)."""

    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


class Sequence:
    """One generation in the engine. Its tokens grow as the engine runs; `wait`/`iter_tokens` follow it
    from another thread, or set `listener` (called from the engine thread after every update)."""

    _ids = itertools.count()

    def __init__(self, prompt: list[int], params: SamplingParams, deadline: float | None):
        self.id = next(Sequence._ids)
        self.prompt, self.params, self.deadline = prompt, params, deadline
        self.tokens: list[int] = []
        self.logprobs: list[TokenLogprob] = []
        self.finish_reason: str | None = None  # stop | length | timeout | cancelled | error
        self.error: str | None = None
        self.slot: int | None = None
        self.budget = 0
        self.kind = "greedy"  # app.serve.generate.sampling_kind of the params
        self.draft = 0  # speculative drafts per step (0 = off)
        self.stops: frozenset[int] = frozenset()  # token ids that end it
        self.index_ms = 0.0  # time in the lmatch / kNN hooks for this sequence
        self.t_submit = time.monotonic()
        self.t_first: float | None = None
        self.t_done: float | None = None
        self.listener: Callable[[], None] | None = None
        self._context: list[int] = []  # prompt + tokens, when an lmatch hook or a drafter reads it
        self._blocks: list[bytes] = []  # chain digests of the prompt's full blocks, with a prefix cache
        self._cancel: str | None = None
        self._cond = threading.Condition()  # iter_tokens waits on it: woken at every token
        self._finished = threading.Event()  # wait waits on it: woken once

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def cancel(self, reason: str = "cancelled") -> None:
        """Ask the engine to stop this sequence (it frees the slot at its next step); thread-safe."""
        self._cancel = self._cancel or reason

    def wait(self, timeout: float | None = None) -> bool:
        """Block until finished (or `timeout` seconds); True when finished."""
        return self._finished.wait(timeout)

    def iter_tokens(self, timeout: float | None = None) -> Iterator[int]:
        """Yield the tokens as they come, until the sequence finishes (TimeoutError after `timeout` s idle)."""
        n = 0
        while True:
            with self._cond:
                if not self._cond.wait_for(lambda: len(self.tokens) > n or self.done, timeout):
                    raise TimeoutError(f"no token for {timeout} s")
                new, done = self.tokens[n:], self.done
            yield from new
            n += len(new)
            if done and n == len(self.tokens):
                return

    def _notify(self) -> None:
        with self._cond:
            self._cond.notify_all()
        if self.listener is not None:
            try:
                self.listener()
            except Exception:  # a closed event loop on the listening side: nothing to tell
                pass


def batch_buckets(max_batch: int) -> list[int]:
    """The row counts a decode step is padded to: the powers of two below max_batch, then max_batch."""
    out = [1]
    while out[-1] * 2 < max_batch:
        out.append(out[-1] * 2)
    return out + [max_batch] if out[-1] < max_batch else out


def length_buckets(first: int, total: int) -> list[int]:
    """The key counts attention reads are padded to: first, 2 first, 4 first, ... below total, then total
    (first 0: total only, the whole cache every step)."""
    out = []
    while 0 < first < total and (not out or out[-1] < total):
        out.append(min(total, first << len(out)))
    return out if out and out[-1] == total else out + [total]


def bucket_for(rows: int, buckets: Seq[int]) -> int:
    """The smallest bucket >= rows (rows <= the largest bucket)."""
    return next(b for b in buckets if b >= rows)


class DecodeState:
    """Per-slot decode inputs in device memory, [max_batch] each unless noted, written at admission and by
    each decode step (never rebuilt from Python lists per step):
    tok: the last sampled token (the next input); pos: the number of filled KV positions (where tok goes);
    lm: its lmatch id (written per step by the engine, when there is an lmatch hook); drafts [max_batch,
    max_draft], n_draft, lm_draft [max_batch, max_draft + 1]: a speculative step's drafts and lmatch ids;
    temperature / top_k / top_p: the sampling parameters; u [max_batch, max_len + 1]: u[slot, p] is the
    uniform that samples the token at position p (the sequence's seeded `uniforms`, from its prompt end)."""

    def __init__(self, max_batch: int, max_len: int, none_id: int, device: torch.device, max_draft: int = 0):
        long = dict(dtype=torch.long, device=device)
        self.tok = torch.zeros(max_batch, **long)
        self.pos = torch.zeros(max_batch, **long)
        self.lm = torch.full((max_batch,), none_id, **long)
        self.drafts = torch.zeros(max_batch, max_draft, **long)  # a verify step's draft tokens per row
        self.n_draft = torch.zeros(max_batch, **long)  # how many of them are real
        self.lm_draft = torch.full((max_batch, max_draft + 1), none_id, **long)  # lmatch ids of verified positions
        self.temperature = torch.zeros(max_batch, device=device)
        self.top_k = torch.zeros(max_batch, **long)
        self.top_p = torch.ones(max_batch, device=device)
        self.u = torch.zeros(max_batch, max_len + 1, dtype=torch.float64, device=device)
        self.rows = torch.arange(max_batch, **long)

    def admit(self, slots: torch.Tensor, seqs: Seq[Sequence], device: torch.device) -> None:
        """Write the sampling parameters and uniforms of `seqs` into their `slots` rows."""
        self.temperature[slots] = torch.tensor([float(s.params.temperature) for s in seqs], device=device)
        self.top_k[slots] = torch.tensor([int(s.params.top_k) for s in seqs], device=device)
        self.top_p[slots] = torch.tensor([float(s.params.top_p) for s in seqs], device=device)
        u = torch.zeros(len(seqs), self.u.size(1), dtype=torch.float64)
        for i, s in enumerate(seqs):
            u[i, len(s.prompt):len(s.prompt) + s.budget] = uniforms(s.params.seed, s.budget)[:s.budget]
        self.u[slots] = u.to(device)

    def sample(self, logits: torch.Tensor, slots: torch.Tensor, at: torch.Tensor,
               kinds: tuple[bool, bool]) -> torch.Tensor:
        """Tokens [n] for `logits` [n, V] of rows `slots`, the token of row i going to position at[i]."""
        u = self.u[slots, at.clamp(max=self.u.size(1) - 1)]  # free rows of a bucket may run past the end
        return sample_tokens(logits, self.temperature[slots], self.top_k[slots], self.top_p[slots], u, kinds)


class DecodeSlots:
    """Cache rows [0, n) as one decode batch (a `kv_cache` for GPT.trunk): row r's `new` tokens go to positions
    pos[r] + i and query i attends the row's keys 0..pos[r] + i among the first `length` positions (the used
    length's bucket, so attention reads only those); no shape depends on the rows' own lengths, and a forward
    through this can be graph-captured. The engine moves `pos` itself (after sampling); free rows write at
    positions clamped into the read length, unread."""

    def __init__(self, cache: KVCache, pos: torch.Tensor, new: int, length: int):
        self.cache, self.batch, self.length = cache, pos.size(0), length
        self._rows = torch.arange(self.batch, device=pos.device)[:, None]
        self._at = (pos[:, None] + torch.arange(new, device=pos.device)).clamp(max=length - 1)  # [n, new]
        self._keys = torch.arange(length, device=pos.device)
        self._mask = (self._keys <= self._at[:, :, None])[:, None]  # [n, 1, new, length]

    def positions(self, new: int, device: torch.device | str) -> torch.Tensor:
        return self._at

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ck, cv = self.cache.k[layer], self.cache.v[layer]
        ck[self._rows, :, self._at] = k.transpose(1, 2)  # indexed dims first: [n, new, Hkv, D]
        cv[self._rows, :, self._at] = v.transpose(1, 2)
        return ck[:self.batch, :, :self.length], cv[:self.batch, :, :self.length]

    def attn_mask(self, new: int, device: torch.device | str, window: int = 0) -> torch.Tensor:
        """[n, 1, new, length]: query i of row r sees keys 0..pos[r] + i, with a window w >= 1 only the w most
        recent (positions clamped: a free row always keeps its last key, never a fully masked row)."""
        if not window:
            return self._mask
        return self._mask & (self._keys > (self._at - window)[:, :, None])[:, None]

    def advance(self, new: int) -> None:
        pass


class DecodeGraphs:
    """CUDA graphs of `fn(*key)` (a decode or verify step over rows [0, n), key = its static shape and
    sampling kinds), captured on first use of each key and replayed after; the outputs are the graph's
    static tensors, valid until the next replay.
    Capture runs `fn` twice eagerly first (kernel selection, lazy init); those runs may move the decode
    state, so `state` (tok, pos) is saved and restored around them: the KV they write lies at or past each
    row's position, where the real step writes before anything reads it."""

    def __init__(self, fn: Callable[..., tuple[torch.Tensor, ...]], state: DecodeState,
                 pool: Any = None):
        self.fn, self.state = fn, state
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, tuple[torch.Tensor, ...]]] = {}
        self.pool = torch.cuda.graph_pool_handle() if pool is None else pool

    def __call__(self, *key: Any) -> tuple[torch.Tensor, ...]:
        if key not in self.graphs:
            self.graphs[key] = self.capture(*key)
        graph, out = self.graphs[key]
        graph.replay()
        return out

    def capture(self, *key: Any) -> tuple[torch.cuda.CUDAGraph, tuple[torch.Tensor, ...]]:
        saved = self.state.tok.clone(), self.state.pos.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self.fn(*key)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self.fn(*key)
        self.state.tok.copy_(saved[0])
        self.state.pos.copy_(saved[1])
        return graph, out


class Engine:
    """Continuous batching over `model` (eval mode, on its device). Start the loop with `start()`
    (or drive it with `step()` in tests), `submit` sequences, `close()` at the end."""

    def __init__(self, model: GPT, *, eot_id: int | None = None, vocab_limit: int | None = None,
                 max_batch: int = 32, max_queue: int = 256, max_len: int | None = None,
                 max_prefill_tokens: int = 4096, lmatch: LMatchLookup | None = None, knn: KnnFn | None = None,
                 knn_lambda: float = 0.25, knn_temperature: float = 1.0, cuda_graphs: bool | None = None,
                 drafter: Drafter | None = None, draft_tokens: int = 4, max_draft: int = 8, kv_bucket: int = 64,
                 prefix_cache_tokens: int = 0, prefix_block: int = 16):
        """`cuda_graphs`: replay decode steps as CUDA graphs (None = when the model is on CUDA).
        `drafter`: speculative decoding (None = off), `draft_tokens` drafts per step for requests that do
        not say, at most `max_draft`; `kv_bucket`: the smallest number of cached positions attention reads
        (powers of two of it up to max_len cover the longest sequence of a step; 0 = always all);
        `prefix_cache_tokens`: prompt positions whose KV is kept for prompts sharing a prefix, in blocks of
        `prefix_block` (0 = off)."""
        cfg = model.cfg
        if bool(cfg.lmatch_vocab) != (lmatch is not None):
            raise ValueError("an lmatch index is needed exactly when the model has a retrieval-match table "
                             f"(this model: lmatch_vocab={cfg.lmatch_vocab})")
        if max_batch < 1 or max_queue < 0 or max_prefill_tokens < 1:
            raise ValueError("max_batch and max_prefill_tokens must be >= 1, max_queue >= 0")
        if not 0.0 <= knn_lambda <= 1.0 or knn_temperature <= 0:
            raise ValueError("knn_lambda must be in [0, 1] and knn_temperature > 0")
        if drafter is not None and knn is not None:  # kNN mixes on the host per position: not with verify
            raise ValueError("speculative decoding (a drafter) does not combine with a kNN index")
        if not 0 <= draft_tokens <= max_draft or kv_bucket < 0:
            raise ValueError(f"draft_tokens={draft_tokens} must be in [0, max_draft={max_draft}], "
                             f"kv_bucket={kv_bucket} >= 0")
        self.model, self.cfg = model, cfg
        weight = next(model.parameters())
        self.device, self.dtype = weight.device, weight.dtype
        self.eot_id = eot_id
        self.vocab_limit = vocab_limit or cfg.vocab_size
        self.max_batch, self.max_queue, self.max_prefill_tokens = max_batch, max_queue, max_prefill_tokens
        self.max_len = min(max_len or cfg.max_seq_len, cfg.max_seq_len)
        self.lmatch, self.knn, self.knn_lambda, self.knn_temperature = lmatch, knn, knn_lambda, knn_temperature
        self.drafter, self.draft_tokens = drafter, draft_tokens
        self.max_draft = max_draft if drafter is not None else 0
        self.cache = KVCache(cfg, max_batch, self.max_len, self.device, self.dtype, spare=self.max_draft)
        self.prefix = (PrefixCache(cfg, prefix_cache_tokens, prefix_block, self.device, self.dtype)
                       if prefix_cache_tokens else None)
        self.state = DecodeState(max_batch, self.max_len, cfg.vocab_size, self.device, self.max_draft)
        self.buckets = batch_buckets(max_batch)
        self.lengths = length_buckets(kv_bucket, self.max_len + self.max_draft)
        self.draft_buckets = batch_buckets(self.max_draft) if self.max_draft else []
        if cuda_graphs and self.device.type != "cuda":
            raise ValueError(f"cuda_graphs needs a model on CUDA (this one is on {self.device})")
        use_graphs = self.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        self._step_fn = DecodeGraphs(self._decode_rows, self.state) if use_graphs else self._decode_rows
        self._verify_fn = (DecodeGraphs(self._verify_rows, self.state, self._step_fn.pool) if use_graphs
                           else self._verify_rows)
        self._kinds = {"greedy": 0, "plain": 0, "cut": 0}  # active sequences by sampling kind
        pin = self.device.type == "cuda"  # pinned: the copies are asynchronous
        self._lm_host = torch.full((max_batch,), cfg.vocab_size, dtype=torch.long, pin_memory=pin)
        self._draft_host = torch.zeros(max_batch, 2 * self.max_draft + 2, dtype=torch.long, pin_memory=pin)
        self._free = list(range(max_batch - 1, -1, -1))  # a stack: the lowest slot is reused first
        self._active: dict[int, Sequence] = {}  # slot -> sequence
        self._waiting: deque[Sequence] = deque()
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._busy_s = 0.25  # running mean of a sequence's time in a slot (for Retry-After)
        self.steps = self.generated = self.prefilled = 0
        self.drafted = self.accepted = self.verify_steps = 0
        self.failures = 0
        self.last_error: str | None = None

    # ---------------------------------------------------------------- client side (any thread)

    def submit(self, prompt: Seq[int], params: SamplingParams | None = None) -> Sequence:
        """Queue one sequence; ValueError for bad arguments, EngineFull when the queue is full."""
        return self.submit_many([(prompt, params or SamplingParams())])[0]

    def submit_many(self, items: Seq[tuple[Seq[int], SamplingParams]]) -> list[Sequence]:
        """Queue several sequences all or none (e.g. a request's n choices)."""
        seqs = []
        for prompt, p in items:
            prompt = [int(t) for t in prompt]
            check_args(self.model, prompt, p.max_tokens, p.temperature, p.top_k, p.top_p, None, self.lmatch)
            if len(prompt) > self.max_len:
                raise ValueError(f"the prompt has {len(prompt)} tokens; this server reads at most {self.max_len}")
            if p.logprobs is not None and not 0 <= p.logprobs <= 20:
                raise ValueError(f"logprobs={p.logprobs} must be in [0, 20]")
            if p.timeout_s is not None and not p.timeout_s > 0:
                raise ValueError(f"timeout_s={p.timeout_s} must be > 0")
            if p.draft_tokens is not None and (p.draft_tokens < 0 or self.drafter and p.draft_tokens > self.max_draft):
                raise ValueError(f"draft_tokens={p.draft_tokens} must be in [0, max_draft={self.max_draft}]")
            seq = Sequence(prompt, p, time.monotonic() + p.timeout_s if p.timeout_s else None)
            seq.budget = min(p.max_tokens, self.max_len - len(prompt) + 1)
            seq.kind = sampling_kind(p.temperature, p.top_k, p.top_p, self.vocab_limit)
            seq.stops = frozenset(p.stop_ids if p.stop_ids is not None else
                                  (() if self.eot_id is None else (self.eot_id,)))
            seq.draft = (self.draft_tokens if p.draft_tokens is None else p.draft_tokens) if self.drafter else 0
            if seq.budget <= 0:  # max_tokens=0: finishes at admission, no forward
                seq._cancel = "length"
            seqs.append(seq)
        with self._lock:
            if self._closed:
                raise RuntimeError("the engine is closed")
            if len(self._waiting) + len(seqs) > self.max_queue + len(self._free):
                raise EngineFull(f"the server is at capacity ({len(self._active)} running, {len(self._waiting)} "
                                 "waiting): retry later", self.retry_after())
            self._waiting.extend(seqs)
            self._lock.notify()
        return seqs

    def retry_after(self) -> int:
        """Seconds until a slot is likely free: the queue ahead divided over the slots."""
        return max(1, min(60, math.ceil((len(self._waiting) + 1) * self._busy_s / self.max_batch)))

    def stats(self) -> dict[str, Any]:
        graphs = isinstance(self._step_fn, DecodeGraphs)
        return {"active": len(self._active), "waiting": len(self._waiting), "free_slots": len(self._free),
                "max_batch": self.max_batch, "max_queue": self.max_queue, "steps": self.steps,
                "generated_tokens": self.generated, "prefilled_tokens": self.prefilled,
                "failures": self.failures, "alive": self.alive,
                "cuda_graphs": len(self._step_fn.graphs) + len(self._verify_fn.graphs) if graphs else None,
                "speculative_steps": self.verify_steps, "drafted_tokens": self.drafted,
                "accepted_tokens": self.accepted,
                "acceptance_rate": round(self.accepted / self.drafted, 4) if self.drafted else None,
                "prefix_reused_tokens": None if self.prefix is None else self.prefix.reused,
                "prefix_cached_blocks": None if self.prefix is None else len(self.prefix.table)}

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> Engine:
        """Run the loop in a daemon thread (with CUDA graphs: after capturing every bucket's greedy and
        plain-sampling decode step, so that first requests do not wait for captures; speculative steps are
        captured on first use)."""
        if self._thread is None:
            if isinstance(self._step_fn, DecodeGraphs):
                with torch.inference_mode():  # torch's own kernel choice: cuDNN's set-up is paid here, once
                    for key in itertools.product(self.buckets, self.lengths, ((False, False), (True, False))):
                        self._step_fn.graphs[key] = self._step_fn.capture(*key)
            self._thread = threading.Thread(target=self._run, name="spotlm-engine", daemon=True)
            self._thread.start()
        return self

    def close(self) -> None:
        """Stop the loop; every unfinished sequence ends with "cancelled"."""
        with self._lock:
            self._closed = True
            self._lock.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)
        for seq in list(self._active.values()) + list(self._waiting):
            self._finish(seq, "cancelled")
        self._waiting.clear()

    def generate(self, prompt: Seq[int], params: SamplingParams | None = None,
                 timeout: float | None = None) -> Sequence:
        """Submit and wait (a started engine)."""
        seq = self.submit(prompt, params)
        seq.wait(timeout)
        return seq

    # ---------------------------------------------------------------- the loop (engine thread)

    def _run(self) -> None:
        while True:
            with self._lock:
                while not (self._closed or self._waiting or self._active):
                    self._lock.wait()
                if self._closed:
                    return
            self.step()

    @torch.inference_mode()
    def step(self) -> None:
        """One iteration: drop cancelled / timed-out sequences, admit and prefill, decode one token each."""
        with no_cudnn_attention():
            self._step()

    def _step(self) -> None:
        now = time.monotonic()
        if self._waiting:  # cancelled / expired while waiting: out of the queue now, not at admission
            with self._lock:
                gone = [s for s in self._waiting if s._cancel or (s.deadline is not None and now > s.deadline)]
                for seq in gone:
                    self._waiting.remove(seq)
                    self._finish(seq, seq._cancel or "timeout")
        for seq in list(self._active.values()):
            reason = seq._cancel or ("timeout" if seq.deadline is not None and now > seq.deadline else None)
            if reason:
                self._finish(seq, reason)
        admitted = self._admit(now)
        running = [s for s in self._active.values() if s.tokens]
        # The running sequences' decode is queued on the device first: the new prompts' host work (index
        # lookups, the prefill's launches) then overlaps it, and their tokens are read back after.
        decoded = self._guarded(running, self._decode) if running else None
        for group in admitted:
            self._guarded(group, self._prefill)
        if decoded is not None:
            self._guarded(running, lambda seqs: self._emit_decoded(seqs, *decoded))
        self.steps += 1

    def _guarded(self, seqs: list[Sequence], fn: Callable[[list[Sequence]], Any]) -> Any:
        """fn(seqs); an error (a failing index hook, out of memory, ...) ends those sequences with
        "error", frees their slots and returns None; the engine keeps serving the others."""
        try:
            return fn(seqs)
        except Exception as e:  # noqa: BLE001 - any failure must not stop the loop
            self.failures += 1
            self.last_error = f"{type(e).__name__}: {e}"
            log.exception("engine step failed for %d sequence(s)", len(seqs))
            for seq in seqs:
                if not seq.done:
                    seq.error = self.last_error
                    self._finish(seq, "error")
            return None

    def _admit(self, now: float) -> list[list[Sequence]]:
        """Move waiting sequences into free slots; groups whose padded prompts (less their blocks in the
        prefix cache) fit the prefill budget. With a prefix cache a prompt whose leading blocks an earlier
        prompt of this round will store goes to a later group, which then loads them."""
        groups: list[list[Sequence]] = []
        group: list[Sequence] = []
        new: list[int] = []  # the group's prompt tokens to compute
        pending: dict[bytes, int] = {}  # blocks this round's groups will store -> the group storing them
        with self._lock:
            while self._waiting and self._free:
                seq = self._waiting[0]
                if seq._cancel or (seq.deadline is not None and now > seq.deadline):
                    self._waiting.popleft()
                    self._finish(seq, seq._cancel or "timeout")
                    continue
                todo, digests, after = len(seq.prompt), [], -1
                if self.prefix is not None:
                    digests = seq._blocks = self.prefix.digests(seq.prompt, full=True)
                    n = 0
                    while n < len(digests) and (digests[n] in self.prefix.table or digests[n] in pending):
                        after = max(after, pending.get(digests[n], -1))
                        n += 1
                    todo -= min(n, (len(seq.prompt) - 1) // self.prefix.block) * self.prefix.block
                if group and (max(new + [todo]) * (len(group) + 1) > self.max_prefill_tokens
                              or after == len(groups)):
                    groups.append(group)
                    group, new = [], []
                    if len(groups) >= 4:  # bound the time before the running sequences' next token
                        break
                for d in digests:  # the blocks this group will store (a cached one holds no later prompt back)
                    if d not in self.prefix.table:
                        pending.setdefault(d, len(groups))
                new.append(todo)
                self._waiting.popleft()
                seq.slot = self._free.pop()
                self._active[seq.slot] = seq
                self._kinds[seq.kind] += 1
                group.append(seq)
        if group:
            groups.append(group)
        return groups

    def _prefill(self, seqs: list[Sequence]) -> None:
        """Read the prompts (right-padded, one forward, each from its first block not in the prefix cache),
        sample each one's first token, set its decode state, keep the prompts' blocks in the prefix cache."""
        rows, prompts = [s.slot for s in seqs], [s.prompt for s in seqs]
        starts = ([0] * len(seqs) if self.prefix is None else
                  self.prefix.load_many(self.cache, rows, prompts, [s._blocks for s in seqs]))
        T = max(len(s.prompt) - m for s, m in zip(seqs, starts))
        idx = torch.zeros(len(seqs), T, dtype=torch.long)
        lmatch = torch.full((len(seqs), T), self.cfg.vocab_size, dtype=torch.long) if self.lmatch else None
        for i, (s, m) in enumerate(zip(seqs, starts)):
            idx[i, :len(s.prompt) - m] = torch.tensor(s.prompt[m:])
            self.cache.lengths[s.slot] = m  # the prefill writes from the first position not loaded
            s._context = list(s.prompt) if self.lmatch is not None or self.drafter is not None else []
            if lmatch is not None:
                t0 = time.perf_counter()
                lmatch[i, :len(s.prompt) - m] = torch.tensor([self.lmatch.lookup(s._context[:p + 1])[0]
                                                              for p in range(m, len(s.prompt))])
                s.index_ms += 1e3 * (time.perf_counter() - t0)
        dev, st = self.device, self.state
        slots = torch.tensor([s.slot for s in seqs], device=dev)
        lengths = torch.tensor([len(s.prompt) for s in seqs], device=dev)
        st.admit(slots, seqs, dev)
        logits, hidden = forward_last(self.model, idx.to(dev), self.cache.slots([s.slot for s in seqs]),
                                      lengths - torch.tensor(starts, device=dev) - 1,
                                      None if lmatch is None else lmatch.to(dev))
        if self.prefix is not None:
            self.prefix.store_many(self.cache, rows, prompts, [s._blocks for s in seqs])
        logits = self._knn_mix(seqs, logits[:, :self.vocab_limit].float(), hidden)
        tokens = st.sample(logits, slots, lengths, self._kinds_of(seqs))
        st.tok[slots], st.pos[slots] = tokens, lengths
        self.prefilled += int(sum(len(s.prompt) - m for s, m in zip(seqs, starts)))
        self._emit(seqs, [[i] for i in range(len(seqs))], logits, tokens)

    def _decode(self, seqs: list[Sequence]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, int]:
        """Queue the next tokens of every running sequence: a step over the bucket of rows [0, n) holding
        their slots, reading the bucket of cached positions holding the longest -> (logits [n T, V], tokens,
        accepted drafts per row or None, T) on the device, row = slot (read back by `_emit_decoded`): a plain
        decode (T = 1), or with drafts a verify step (T = 1 + the drafts' bucket). Rows admitted since are
        free rows here: their prefill, queued after, overwrites what this step writes to them."""
        n = bucket_for(max(s.slot for s in seqs) + 1, self.buckets)
        K = self._draft(seqs, n) if self.drafter is not None else 0
        used = max(len(s.prompt) + len(s.tokens) for s in seqs) + K  # keys up to the last new position
        L = bucket_for(used, self.lengths)
        kinds = (self._kinds["plain"] > 0, self._kinds["cut"] > 0)
        if K:
            logits, accepted, tokens = self._verify_fn(n, K, L, kinds)
            self.verify_steps += 1
            return logits, tokens, accepted, K + 1
        if self.lmatch is not None:
            self._lookup(seqs, n)
        if self.knn is None:
            logits, tokens = self._step_fn(n, L, kinds)
        else:  # the kNN hook runs on the host between the forward and the sampling
            logits, hidden = self._step_fn(n, L, None)
            logits = self._knn_mix(seqs, logits, hidden)
            tokens = self._advance(n, logits, kinds)
        return logits, tokens, None, 1

    def _decode_rows(self, n: int, L: int, kinds: Kinds) -> tuple[torch.Tensor, torch.Tensor]:
        """The decode step of rows [0, n) reading L cached positions, from the device state alone
        (graph-capturable): the forward, then (kinds given) sampling and the state's advance -> (logits
        [n, vocab_limit] float, tokens [n]); kinds None -> (logits, hidden [n, d_model]): the caller mixes
        in the kNN hook and calls `_advance`."""
        st = self.state
        logits, hidden = forward_last(self.model, st.tok[:n, None], DecodeSlots(self.cache, st.pos[:n], 1, L),
                                      st.pos.new_zeros(n), None if self.lmatch is None else st.lm[:n, None])
        logits = logits[:, :self.vocab_limit].float()
        if kinds is None:
            return logits, hidden
        return logits, self._advance(n, logits, kinds)

    def _verify_rows(self, n: int, K: int, L: int, kinds: Kinds) -> tuple[torch.Tensor, ...]:
        """The speculative step of rows [0, n) (graph-capturable): each row's last token and K drafts (its
        first n_draft real) in one forward over L cached positions, verified (app.serve.speculative.verify);
        each row's position advances by its accepted drafts + 1 -> (logits [n (K + 1), vocab_limit] float,
        accepted [n], tokens [n, K + 1]). Rejected drafts' keys lie past the new position: overwritten later."""
        st, T = self.state, K + 1
        idx = torch.cat([st.tok[:n, None], st.drafts[:n, :K]], 1)
        lm = None if self.lmatch is None else st.lm_draft[:n, :T]
        x = self.model.trunk(idx, lm, DecodeSlots(self.cache, st.pos[:n], T, L))
        logits = self.model.lm_head(self.model.model.norm(x))[..., :self.vocab_limit].float()
        at = (st.pos[:n, None] + 1 + torch.arange(T, device=idx.device)).clamp(max=st.u.size(1) - 1)
        accepted, tokens = verify(logits, st.drafts[:n, :K], st.n_draft[:n], st.temperature[:n], st.top_k[:n],
                                  st.top_p[:n], st.u[st.rows[:n, None], at], kinds)
        st.tok[:n] = tokens.gather(1, accepted[:, None]).squeeze(1)
        st.pos[:n] += accepted + 1
        return logits.reshape(n * T, -1), accepted, tokens

    def _draft(self, seqs: list[Sequence], n: int) -> int:
        """Propose drafts for the running sequences (each at most its `draft` and what its budget leaves
        after one more token) into the device state, with their positions' lmatch ids for an lmatch model
        -> the drafts' bucket K (0: no sequence has a draft, a plain decode step)."""
        M, props = self.max_draft, {}
        for s in seqs:
            k = min(s.draft, s.budget - len(s.tokens) - 1)
            if k > 0:
                t0 = time.perf_counter()
                d = self.drafter.propose(s._context, k)
                s.index_ms += 1e3 * (time.perf_counter() - t0)
                if d:
                    props[s.slot] = d
        if not props:
            return 0
        host = self._draft_host.numpy()  # [slot]: M drafts | their count | M + 1 lmatch ids
        host[:n, M] = 0
        for slot, d in props.items():
            host[slot, :len(d)], host[slot, M] = d, len(d)
        self.drafted += sum(len(d) for d in props.values())
        if self.lmatch is not None:
            host[:n, M + 1:] = self.cfg.vocab_size
            for s in seqs:
                t0 = time.perf_counter()
                d = props.get(s.slot, [])
                host[s.slot, M + 1:M + 2 + len(d)] = [self.lmatch.lookup(s._context + d[:i])[0]
                                                      for i in range(len(d) + 1)]
                s.index_ms += 1e3 * (time.perf_counter() - t0)
        st, src = self.state, self._draft_host[:n]
        st.drafts[:n].copy_(src[:, :M], non_blocking=True)
        st.n_draft[:n].copy_(src[:, M], non_blocking=True)
        st.lm_draft[:n].copy_(src[:, M + 1:], non_blocking=True)
        return bucket_for(max(len(d) for d in props.values()), self.draft_buckets)

    def _advance(self, n: int, logits: torch.Tensor, kinds: tuple[bool, bool]) -> torch.Tensor:
        """Sample rows [0, n)'s next tokens and make them the next step's inputs."""
        st = self.state
        tokens = st.sample(logits, st.rows[:n], st.pos[:n] + 1, kinds)
        st.tok[:n] = tokens
        st.pos[:n] += 1
        return tokens

    def _lookup(self, seqs: list[Sequence], n: int) -> None:
        """The lmatch ids of the running sequences' contexts into the state (one host-to-device copy)."""
        ids = self._lm_host.numpy()
        for s in seqs:
            t0 = time.perf_counter()
            ids[s.slot] = self.lmatch.lookup(s._context)[0]
            s.index_ms += 1e3 * (time.perf_counter() - t0)
        self.state.lm[:n].copy_(self._lm_host[:n], non_blocking=True)

    def _kinds_of(self, seqs: list[Sequence]) -> tuple[bool, bool]:
        kinds = {s.kind for s in seqs}
        return "plain" in kinds, "cut" in kinds

    def _emit_decoded(self, seqs: list[Sequence], logits: torch.Tensor, tokens: torch.Tensor,
                      accepted: torch.Tensor | None, T: int) -> None:
        """Emit a decode step's tokens (`_decode`'s outputs): one per sequence, or its accepted drafts + 1."""
        if accepted is None:
            self._emit(seqs, [[s.slot] for s in seqs], logits, tokens)
            return
        n = accepted.size(0)
        host = torch.cat([accepted, tokens.flatten()]).tolist()  # the step's one read-back
        acc = host[:n]
        self.accepted += sum(acc[s.slot] for s in seqs)
        self._emit(seqs, [[s.slot * T + i for i in range(acc[s.slot] + 1)] for s in seqs], logits,
                   tokens.flatten(), host[n:])

    def _emit(self, seqs: list[Sequence], rows: list[list[int]], logits: torch.Tensor, tokens: torch.Tensor,
              host: list[int] | None = None) -> None:
        """Append each sequence's tokens (rows rows[i] of `tokens` / `logits`, in order) with their logprobs
        if asked, finish those at a stop id or their budget; wake the listeners. `host`: tokens read back."""
        want = [(i, r) for i, s in enumerate(seqs) if s.params.logprobs is not None for r in rows[i]]
        lps = self._logprobs([seqs[i] for i, _ in want], [r for _, r in want], logits, tokens) if want else []
        lp_of = dict(zip(want, lps))
        host = tokens.tolist() if host is None else host  # the step's one read-back
        now = time.monotonic()
        keep_context = self.lmatch is not None or self.drafter is not None
        for i, (s, rs) in enumerate(zip(seqs, rows)):
            for r in rs:
                t = host[r]
                if t in s.stops:
                    self._finish(s, "stop")
                    break
                if (i, r) in lp_of:
                    s.logprobs.append(lp_of[(i, r)])
                s.tokens.append(t)
                if s.t_first is None:
                    s.t_first = now
                if keep_context:
                    s._context.append(t)
                self.generated += 1
                if len(s.tokens) >= s.budget:
                    self._finish(s, "length")
                    break
            if not s.done:
                s._notify()

    @staticmethod
    def _logprobs(seqs: list[Sequence], rows: list[int], logits: torch.Tensor,
                  tokens: torch.Tensor) -> list[TokenLogprob]:
        """The chosen token's logprob and each sequence's `logprobs` most likely ids, from rows `rows`."""
        r = torch.tensor(rows, device=logits.device)
        lp = torch.log_softmax(logits[r], dim=-1)
        chosen = lp.gather(1, tokens[r][:, None]).squeeze(1).tolist()
        k = max(s.params.logprobs for s in seqs)
        top = [[] for _ in seqs]
        if k:
            v, i_ = lp.topk(min(k, lp.size(1)), dim=-1)
            top = [list(zip(ii, vv)) for ii, vv in zip(i_.tolist(), v.tolist())]
        return [TokenLogprob(c, t[:s.params.logprobs]) for s, c, t in zip(seqs, chosen, top)]

    def _knn_mix(self, seqs: list[Sequence], logits: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """log(lambda p_knn + (1 - lambda) p_lm) [n, V] from the kNN hook's neighbours of `hidden` (every
        row of the batch); the logits unchanged without a hook. The hook's time is shared by `seqs`."""
        if self.knn is None:
            return logits
        t0 = time.perf_counter()
        n = logits.size(0)
        dist, ids = self.knn(hidden)
        dist = torch.as_tensor(dist, device=logits.device, dtype=torch.float32).reshape(n, -1)
        ids = torch.as_tensor(ids, device=logits.device, dtype=torch.long).reshape(n, -1)
        valid = (ids >= 0) & (ids < logits.size(1))
        w = torch.softmax((-dist / self.knn_temperature).masked_fill(~valid, float("-inf")), dim=-1)
        w = torch.nan_to_num(w, nan=0.0)  # a row with no valid neighbour
        p_knn = torch.zeros_like(logits).scatter_add_(1, ids.clamp(0, logits.size(1) - 1), w * valid)
        lam = torch.where(valid.any(-1, keepdim=True), self.knn_lambda, 0.0)
        p = lam * p_knn + (1 - lam) * torch.softmax(logits, dim=-1)
        ms = 1e3 * (time.perf_counter() - t0) / len(seqs)
        for s in seqs:
            s.index_ms += ms
        return torch.log(p)

    def _finish(self, seq: Sequence, reason: str) -> None:
        if seq.done:
            return
        if seq.slot is not None and self._active.get(seq.slot) is seq:
            del self._active[seq.slot]
            self._kinds[seq.kind] -= 1
            with self._lock:
                self._free.append(seq.slot)
            self._busy_s = 0.9 * self._busy_s + 0.1 * (time.monotonic() - seq.t_submit)
        seq.t_done = time.monotonic()
        seq.finish_reason = reason
        seq._finished.set()
        seq._notify()
