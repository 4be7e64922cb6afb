"""KV-cached sampling from a GPT: greedy, temperature, top-k, top-p, seeded, streaming one token at a time."""
from __future__ import annotations

import math
from typing import Callable, Iterator, Sequence

import torch

from app.model import GPT, KVCache

LmatchFn = Callable[[Sequence[int]], int]  # tokens so far (ending at a position) -> that position's lmatch id


def sample_next(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                generator: torch.Generator | None) -> int:
    """One token id from a [V] logits row: argmax when temperature is 0, else a draw from the
    temperature-scaled distribution cut to the top_k ids (0 = all), then to the smallest set whose
    probability reaches top_p (the most likely id is always kept)."""
    if temperature == 0:
        return int(logits.argmax())
    logits = logits.float() / temperature
    if 0 < top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < top_p  # mass before this id is still short of top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


def generate(model: GPT, prompt_ids: list[int], max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, seed: int | None = None, stop_ids: Sequence[int] = (),
             vocab_limit: int | None = None, lmatch_fn: LmatchFn | None = None) -> Iterator[int]:
    """Yield up to `max_new_tokens` new token ids, one per step (the prompt is read once, then each
    step feeds one token through the KV cache). Stops early at a stop id (not yielded) or when the
    context reaches the model's max_seq_len. Ids >= `vocab_limit` (default: the tokenizer vocabulary,
    i.e. the padding rows) are never sampled. The same `seed` gives the same tokens. `lmatch_fn` gives
    the retrieval-match id of each position; required exactly for models with an lmatch table.
    Bad arguments raise ValueError here, at the call, before any token is computed."""
    cfg = model.cfg
    _check_args(model, prompt_ids, max_new_tokens, temperature, top_k, top_p, vocab_limit, lmatch_fn)
    # The last yielded token is never fed back, so a context of max_seq_len allows this many new ones:
    budget = min(max_new_tokens, cfg.max_seq_len - len(prompt_ids) + 1)
    return _stream(model, list(prompt_ids), budget, temperature, top_k, top_p, seed, frozenset(stop_ids),
                   vocab_limit or cfg.vocab_size, lmatch_fn)


def _check_args(model: GPT, prompt_ids: list[int], max_new_tokens: int, temperature: float, top_k: int,
                top_p: float, vocab_limit: int | None, lmatch_fn: LmatchFn | None) -> None:
    cfg = model.cfg
    if not prompt_ids:
        raise ValueError("the prompt is empty")
    if len(prompt_ids) > cfg.max_seq_len:
        raise ValueError(f"the prompt has {len(prompt_ids)} tokens; this model reads at most {cfg.max_seq_len}")
    bad = [t for t in prompt_ids if not 0 <= t < cfg.vocab_size]
    if bad:
        raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary [0, {cfg.vocab_size})")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 0")
    if not (temperature >= 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature={temperature} must be a finite number >= 0 (0 = greedy)")
    if top_k < 0:
        raise ValueError(f"top_k={top_k} must be >= 0 (0 = off)")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p} must be in (0, 1]")
    if vocab_limit is not None and not 1 <= vocab_limit <= cfg.padded_vocab_size:
        raise ValueError(f"vocab_limit={vocab_limit} must be in [1, {cfg.padded_vocab_size}]")
    if bool(cfg.lmatch_vocab) != (lmatch_fn is not None):
        raise ValueError("lmatch_fn is required exactly when the model has an lmatch table "
                         f"(this model: lmatch_vocab={cfg.lmatch_vocab})")


@torch.inference_mode()
def _stream(model: GPT, ids: list[int], budget: int, temperature: float, top_k: int, top_p: float,
            seed: int | None, stop_ids: frozenset[int], vocab_limit: int, lmatch_fn: LmatchFn | None) -> Iterator[int]:
    if budget <= 0:
        return
    weight = next(model.parameters())
    device = weight.device
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    cache = KVCache(model.cfg, 1, len(ids) + budget - 1, device, weight.dtype)
    x = torch.tensor([ids], device=device)
    lmatch = _lmatch_ids(lmatch_fn, ids, range(len(ids)), device)
    for step in range(budget):
        logits, _ = model(x, lmatch=lmatch, kv_cache=cache)
        token = sample_next(logits[0, -1, :vocab_limit], temperature, top_k, top_p, generator)
        if token in stop_ids:
            return
        yield token
        if step + 1 < budget:
            ids.append(token)
            x = torch.tensor([[token]], device=device)
            lmatch = _lmatch_ids(lmatch_fn, ids, [len(ids) - 1], device)


def _lmatch_ids(lmatch_fn: LmatchFn | None, ids: list[int], positions: Sequence[int],
                device: torch.device) -> torch.Tensor | None:
    """[1, len(positions)] lmatch ids of `positions` of `ids` (each from the tokens up to it), or None."""
    if lmatch_fn is None:
        return None
    return torch.tensor([[lmatch_fn(ids[:p + 1]) for p in positions]], device=device)
