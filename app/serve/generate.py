"""KV-cached sampling from a GPT: greedy, temperature, top-k, top-p, seeded, streaming one token at a time.

The two pieces here are shared with the batching engine (app/serve/engine.py), so one sequence generated
alone and the same sequence generated in a batch go through the same code:
- `forward_last`: a forward through a KV cache (or a slot view of one) that returns the logits and
  final hidden state of one position per row only (the [B, T, vocab] logits of a prefill are never made);
- `sample_tokens`: one token per row from its own uniform number u in [0, 1) (inverse-CDF sampling), so
  a seeded sequence draws the same numbers whatever else is in the batch.
"""
from __future__ import annotations

import math
from typing import Callable, Iterator, Sequence

import torch

from app.model.gpt import GPT
from app.serve.kvcache import KVCache, KVSlots

LmatchFn = Callable[[Sequence[int]], int]  # tokens so far (ending at a position) -> that position's lmatch id


def uniforms(seed: int | None, n: int) -> torch.Tensor:
    """The n float64 uniforms a sequence with `seed` samples its tokens with (None: a fresh random seed)."""
    g = torch.Generator()
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return torch.rand(max(n, 1), generator=g, dtype=torch.float64)


def sampling_kind(temperature: float, top_k: int, top_p: float, vocab: int) -> str:
    """How `sample_tokens` treats a row with these parameters over `vocab` ids: "greedy" (argmax),
    "plain" (a draw from the whole distribution) or "cut" (a draw after a top-k / top-p cut)."""
    if temperature <= 0:
        return "greedy"
    return "cut" if 0 < top_k < vocab or top_p < 1.0 else "plain"


def sample_tokens(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                  u: torch.Tensor, kinds: tuple[bool, bool] | None = None) -> torch.Tensor:
    """One token id per row of `logits` [n, V]: argmax where temperature is 0, else a draw from the
    temperature-scaled distribution cut to the top_k ids (0 = all), then to the smallest set whose
    probability reaches top_p (the most likely id always kept), using the row's uniform u [n].
    temperature/top_p [n] float, top_k [n] long, u [n] float64, all on the logits' device.
    `kinds` = (some row is "plain", some row is "cut") in `sampling_kind`'s terms when the caller knows it:
    then nothing is read back from the device (CUDA-graph safe); None = found from the tensors.
    Every row goes through the same whole-batch ops, so a row's token does not depend on the other rows."""
    n, V = logits.shape
    out = logits.argmax(-1)
    sampled = temperature > 0
    cut = sampled & (((top_k > 0) & (top_k < V)) | (top_p < 1.0))
    plain = sampled & ~cut
    any_plain, any_cut = kinds if kinds is not None else (bool(plain.any()), bool(cut.any()))
    if not (any_plain or any_cut):
        return out
    x = logits.float() / torch.where(sampled, temperature, torch.ones_like(temperature))[:, None]
    # Rows with a cut sort their ids; rows without draw in id order (the same way alone or batched).
    if any_plain:
        out = torch.where(plain, _draw(torch.softmax(x, dim=-1), u), out)
    if any_cut:
        values, order = x.sort(dim=-1, descending=True, stable=True)
        k = torch.where((top_k > 0) & (top_k < V), top_k, torch.full_like(top_k, V))
        keep = torch.arange(V, device=logits.device)[None, :] < k[:, None]
        probs = torch.softmax(values.masked_fill(~keep, float("-inf")), dim=-1)
        keep &= (probs.cumsum(-1) - probs) < top_p[:, None]  # mass before this id is still short of top_p
        out = torch.where(cut, order.gather(1, _draw(probs * keep, u)[:, None]).squeeze(1), out)
    return out


def _draw(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw per row of (unnormalised) probs [n, V] with uniforms u [n]; zero-probability ids
    are never drawn (the first id whose cumulative mass exceeds u x total)."""
    cdf = probs.double().cumsum(-1)
    target = (u.to(cdf.device) * cdf[:, -1])[:, None]
    idx = torch.searchsorted(cdf, target, right=True).squeeze(1)
    last = probs.size(1) - 1 - (probs.flip(-1) > 0).double().argmax(-1)  # the last id with mass (u x total rounding)
    return torch.minimum(idx, last)


def forward_last(model: GPT, idx: torch.Tensor, cache: KVCache | KVSlots, last: torch.Tensor,
                 lmatch: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """idx [B, T] through the model, appending to `cache`; returns (logits [B, padded_vocab], hidden
    [B, d_model]) of position last[b] of each row: the final norm's output (the lm_head input), which
    the kNN index keys on. The caller checks the inputs (GPT.forward's checks are not repeated here)."""
    x = model.trunk(idx, lmatch, cache)
    h = model.model.norm(x[torch.arange(idx.size(0), device=idx.device), last])  # [B, d_model]
    return model.lm_head(h), h


def sample_next(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                generator: torch.Generator | None) -> int:
    """One token id from a [V] logits row (see `sample_tokens`), its uniform drawn from `generator`
    (a CPU generator; None = the global one)."""
    u = torch.rand(1, generator=generator, dtype=torch.float64)
    dev = logits.device
    return int(sample_tokens(logits[None], torch.tensor([float(temperature)], device=dev),
                             torch.tensor([int(top_k)], device=dev), torch.tensor([float(top_p)], device=dev), u)[0])


def generate(model: GPT, prompt_ids: list[int], max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, seed: int | None = None, stop_ids: Sequence[int] = (),
             vocab_limit: int | None = None, lmatch_fn: LmatchFn | None = None) -> Iterator[int]:
    """Yield up to `max_new_tokens` new token ids, one per step (the prompt is read once, then each
    step feeds one token through the KV cache). Stops early at a stop id (not yielded) or when the
    context reaches the model's max_seq_len. Ids >= `vocab_limit` (default: the tokenizer vocabulary,
    i.e. the padding rows) are never sampled. The same `seed` gives the same tokens, and the same
    tokens as the batching engine gives that request. `lmatch_fn` gives the retrieval-match id of each
    position; required exactly for models with an lmatch table.
    Bad arguments raise ValueError here, at the call, before any token is computed."""
    cfg = model.cfg
    check_args(model, prompt_ids, max_new_tokens, temperature, top_k, top_p, vocab_limit, lmatch_fn)
    # The last yielded token is never fed back, so a context of max_seq_len allows this many new ones:
    budget = min(max_new_tokens, cfg.max_seq_len - len(prompt_ids) + 1)
    return _stream(model, list(prompt_ids), budget, temperature, top_k, top_p, seed, frozenset(stop_ids),
                   vocab_limit or cfg.vocab_size, lmatch_fn)


def check_args(model: GPT, prompt_ids: Sequence[int], max_new_tokens: int, temperature: float, top_k: int,
               top_p: float, vocab_limit: int | None, lmatch_fn: object | None) -> None:
    """ValueError naming the first bad generation argument."""
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
    u = uniforms(seed, budget).to(device)
    params = (torch.tensor([float(temperature)], device=device), torch.tensor([int(top_k)], device=device),
              torch.tensor([float(top_p)], device=device))
    cache = KVCache(model.cfg, 1, len(ids) + budget - 1, device, weight.dtype)
    x = torch.tensor([ids], device=device)
    lmatch = _lmatch_ids(lmatch_fn, ids, range(len(ids)), device)
    for step in range(budget):
        logits, _ = forward_last(model, x, cache, torch.tensor([x.size(1) - 1], device=device), lmatch)
        token = int(sample_tokens(logits[:, :vocab_limit], *params, u[step:step + 1])[0])
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
