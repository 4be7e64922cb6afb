"""KV-cached sampling from a GPT: greedy, temperature, top-k, top-p, seeded, streaming."""
from __future__ import annotations

from typing import Iterator, Sequence

import torch

from app.model import GPT, KVCache


def sample_next(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                generator: torch.Generator | None) -> int:
    """One token id from a [V] logits row."""
    if temperature == 0:
        return int(logits.argmax())
    logits = logits.float() / temperature
    if top_k and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < top_p  # always keeps the most likely token
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.inference_mode()
def generate(model: GPT, prompt_ids: list[int], max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, seed: int | None = None, stop_ids: Sequence[int] = (),
             vocab_limit: int | None = None) -> Iterator[int]:
    """Yield up to `max_new_tokens` new ids, one at a time; stops early at a stop id (not yielded)
    or at the model's context length. The same seed gives the same tokens."""
    cfg = model.cfg
    if not prompt_ids:
        raise ValueError("the prompt is empty")
    if len(prompt_ids) >= cfg.max_seq_len:
        raise ValueError(f"the prompt has {len(prompt_ids)} tokens; this model reads at most {cfg.max_seq_len - 1}")
    device = next(model.parameters()).device
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
    limit = vocab_limit or cfg.vocab_size
    budget = min(max_new_tokens, cfg.max_seq_len - len(prompt_ids))
    cache = KVCache(cfg, 1, len(prompt_ids) + budget, device, next(model.parameters()).dtype)
    x = torch.tensor([prompt_ids], device=device)
    for _ in range(budget):
        logits, _ = model(x, kv_cache=cache)
        token = sample_next(logits[0, -1, :limit], temperature, top_k, top_p, generator)
        if token in stop_ids:
            return
        yield token
        x = torch.tensor([[token]], device=device)
