"""Speculative decoding without a draft model: drafts from the LMatch index and from the context itself,
and the verification of a batch of drafts (one forward's logits) by speculative sampling.

Drafting (`Drafter.propose`): the tokens that followed the longest earlier occurrence of the context's end,
either in the training corpus (the LMatch index's `continuation`: what followed the longest earliest match
of the context) or in the prompt + generated text itself (prompt lookup: the most recent earlier
occurrence of its last n-gram, n from `ngram` down to 1); the longer match wins.

Verification (`verify`): the model reads each row's last token and its k drafts in one forward (k + 1
positions); position i's distribution p_i decides draft i + 1. A draft is a deterministic proposal (q is
one-hot), so standard speculative sampling (Leviathan et al. 2023, Chen et al. 2023) accepts draft d with
probability p_i(d) and on rejection draws from normalize(max(p_i - q, 0)) = p_i without d: every emitted
token has exactly the plain sampling distribution. Greedy rows accept d exactly when it is the argmax, so
their tokens are plain greedy decoding's. One uniform per position does both: u < p(d) accepts, else
(u - p(d)) / (1 - p(d)) is a fresh uniform for the residual draw. The row emits its accepted drafts and one
token more: the residual draw at the first rejection, or a plain draw after the last draft (a bonus).
"""
from __future__ import annotations

from typing import Protocol, Sequence

import numpy as np
import torch

from app.serve.generate import _draw, sample_tokens


class ContinuationIndex(Protocol):
    def continuation(self, context_ids: Sequence[int], k: int) -> tuple[list[int], int]: ...


class Drafter:
    """Proposes up to k next tokens of a context from `index` (None = none) and/or the context itself."""

    def __init__(self, index: ContinuationIndex | None = None, prompt_lookup: bool = True, ngram: int = 3,
                 min_match: int = 1):
        """`ngram`: the longest context n-gram prompt lookup searches for; `min_match`: the shortest match
        (tokens) worth a draft (short matches propose often-wrong drafts that cost verify compute)."""
        if index is None and not prompt_lookup:
            raise ValueError("a Drafter needs an index or prompt_lookup")
        if ngram < 1 or min_match < 1:
            raise ValueError(f"ngram={ngram} and min_match={min_match} must be >= 1")
        self.index, self.prompt_lookup, self.ngram, self.min_match = index, prompt_lookup, ngram, min_match

    def propose(self, context: Sequence[int], k: int) -> list[int]:
        """Up to k draft tokens to follow `context` (the longer of the two matches; [] when none is
        at least `min_match` long)."""
        if k < 1 or not context:
            return []
        best, best_len = [], self.min_match - 1
        if self.prompt_lookup:
            best, best_len = self._from_context(context, k, best, best_len)
        if self.index is not None:
            draft, L = self.index.continuation(context, k)
            if L > best_len and draft:
                best = draft
        return best[:k]

    def _from_context(self, context: Sequence[int], k: int, best: list[int], best_len: int
                      ) -> tuple[list[int], int]:
        """The tokens after the most recent earlier occurrence of the context's last n-gram (longest n first)."""
        ctx = np.asarray(context, dtype=np.int64)
        for n in range(min(self.ngram, len(ctx) - 1), best_len, -1):
            tail = ctx[-n:]
            # starts s < len - n whose n tokens equal the tail: one vectorised compare per offset
            hits = np.ones(len(ctx) - n, bool)
            for o in range(n):
                hits &= ctx[o:len(ctx) - n + o] == tail[o]
            found = np.flatnonzero(hits)
            if found.size:
                s = int(found[-1]) + n
                return ctx[s:s + k].tolist(), n
        return best, best_len


def target_probs(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                 top_p: torch.Tensor) -> torch.Tensor:
    """[n, V] the distribution `sample_tokens` draws from per row (sampled rows; greedy rows: temperature 1),
    in id order: temperature-scaled, cut to top_k, then to the smallest set reaching top_p."""
    n, V = logits.shape
    t = torch.where(temperature > 0, temperature, torch.ones_like(temperature))
    values, order = (logits.float() / t[:, None]).sort(dim=-1, descending=True, stable=True)
    k = torch.where((top_k > 0) & (top_k < V), top_k, torch.full_like(top_k, V))
    keep = torch.arange(V, device=logits.device)[None, :] < k[:, None]
    probs = torch.softmax(values.masked_fill(~keep, float("-inf")), dim=-1)
    keep &= (probs.cumsum(-1) - probs) < top_p[:, None]
    probs = probs * keep
    probs = probs / probs.sum(-1, keepdim=True)
    return torch.zeros_like(probs).scatter_(1, order, probs)


def verify(logits: torch.Tensor, drafts: torch.Tensor, n_draft: torch.Tensor, temperature: torch.Tensor,
           top_k: torch.Tensor, top_p: torch.Tensor, u: torch.Tensor,
           kinds: tuple[bool, bool] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Speculative sampling of a batch: logits [n, K + 1, V] of each row's last token and K drafts,
    drafts [n, K] (row r's first n_draft[r] are real), per-row sampling parameters [n], uniforms
    u [n, K + 1] float64 (u[r, i]: position i's). Returns (accepted [n]: how many drafts each row accepts,
    tokens [n, K + 1]: row r emits tokens[r, :accepted[r] + 1], its accepted drafts then one drawn token).
    `kinds` as in `sample_tokens` (None: found from the tensors). No host read-back (graph-capturable)."""
    n, T, V = logits.shape
    flat = logits.reshape(n * T, V)
    rep = lambda x: x[:, None].expand(n, T).reshape(-1)  # noqa: E731 - per row -> per position (no sync)
    temp, tk, tp, uf = rep(temperature), rep(top_k), rep(top_p), u.reshape(-1)
    plain = sample_tokens(flat, temp, tk, tp, uf, kinds).view(n, T)  # greedy rows: the argmax
    d = torch.cat([drafts, drafts.new_zeros(n, 1)], 1)  # the draft position i decides (none at K)
    real = torch.arange(T, device=logits.device)[None, :] < n_draft[:, None]
    sampled = (temperature > 0)[:, None]
    any_sampled = kinds is None or any(kinds)
    if any_sampled:
        p = target_probs(flat, temp, tk, tp)
        pd = p.gather(1, d.reshape(-1, 1)).view(n, T).double()
        ok = torch.where(sampled, u < pd, plain == d)
        resid = p.scatter(1, d.reshape(-1, 1), 0.0)
        u2 = ((u - pd) / (1 - pd).clamp(min=1e-12)).clamp(0, 1 - 1e-12).reshape(-1)
        redrawn = _draw(resid, u2).view(n, T)
    else:
        ok = plain == d
    ok &= real
    accepted = ok.long().cumprod(1).sum(1)  # the longest accepted prefix
    at = accepted[:, None]
    last = plain.gather(1, at)  # after every draft accepted: a plain draw (the bonus token)
    if any_sampled:  # after a rejected draft of a sampled row: the residual draw
        rejected = (at < n_draft[:, None]) & sampled
        last = torch.where(rejected, redrawn.gather(1, at), last)
    pos = torch.arange(T, device=logits.device)[None, :]
    tokens = torch.where(pos < at, d, 0).scatter(1, at, last)
    return accepted, tokens
