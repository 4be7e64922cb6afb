"""Standard zero-shot evals, scored exactly as lm-evaluation-harness (`lm_eval`, tasks `hellaswag` and
`lambada_openai`) scores them: HellaSwag acc / acc_norm over 4 endings, LAMBADA last-word accuracy and perplexity.

Each item becomes loglikelihood requests (context, continuation), tokenized as lm_eval's `_encode_pair` does
(the context's trailing spaces move to the continuation; the continuation's tokens are those of
`encode(context + continuation)` after the context's), truncated from the left to the model's window as its
Hugging Face model does, and scored many per forward, right-padded, on the model's device. A model with an
lmatch table is scored with all-"no match" ids (the perplexity eval's "lm" variant): free text has no LMatch
ids, so the retrieval table takes no part.
"""
from __future__ import annotations

import bz2
import json
import math
import re
import time
from dataclasses import dataclass
from typing import Any

import torch
from tokenizers import Tokenizer

from app import storage
from app.model.gpt import GPT

TASKS = ("hellaswag", "lambada")
HELLASWAG_LINES = 6  # per item: "activity_label: ctx", the gold label, 4 endings


@dataclass
class Request:
    """One loglikelihood request: the tokens of log p(continuation | context)."""

    context: list[int]
    continuation: list[int]


# ---------------------------------------------------------------- reading the files


def _read_text(path: str) -> str:
    data = storage.read_bytes(path)  # Arrow's filesystems may already undo a .bz2 by its name: check the bytes
    return (bz2.decompress(data) if data.startswith(b"BZh") else data).decode("utf-8")


def split_ctx(ctx: str) -> tuple[str, str]:
    """(ctx_a, ctx_b) of a HellaSwag context given whole: ctx_b is the unfinished lower-case sentence after the
    last full stop (ActivityNet items, whose ctx_b is such a start: "the lady"), else "" (WikiHow items)."""
    m = re.fullmatch(r"(.*[.!?])\s+([a-z][^.!?]*)", ctx, flags=re.S)
    return (m[1], m[2]) if m else (ctx, "")


def read_hellaswag(path: str, limit: int = 0) -> list[dict[str, Any]]:
    """The first `limit` items (0 = all) of a HellaSwag file of 6 lines per item (`activity_label: ctx`, the
    gold label 0-3, the 4 endings; .bz2 read as such) as the Hugging Face dataset's fields: activity_label,
    ctx_a, ctx_b, endings, label. ValueError naming the line for a malformed item."""
    lines = _read_text(path).split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) % HELLASWAG_LINES:
        raise ValueError(f"{path}: {len(lines)} lines, not a multiple of {HELLASWAG_LINES} (one HellaSwag item each)")
    docs = []
    for i in range(0, len(lines), HELLASWAG_LINES):
        head, label, *endings = lines[i:i + HELLASWAG_LINES]
        if ": " not in head or label not in ("0", "1", "2", "3"):
            raise ValueError(f"{path}: line {i + 1}: not a HellaSwag item ('activity_label: ctx', then a label 0-3)")
        activity, ctx = head.split(": ", 1)
        ctx_a, ctx_b = split_ctx(ctx)
        docs.append({"activity_label": activity, "ctx_a": ctx_a, "ctx_b": ctx_b, "endings": endings,
                     "label": label})
        if limit and len(docs) == limit:
            break
    if not docs:
        raise ValueError(f"{path}: no HellaSwag items")
    return docs


def read_lambada(path: str, limit: int = 0) -> list[str]:
    """The first `limit` texts (0 = all) of a LAMBADA file of JSON lines `{"text": ...}`."""
    texts = []
    for n, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            texts.append(json.loads(line)["text"])
        except (ValueError, KeyError, TypeError):
            raise ValueError(f'{path}: line {n}: not a JSON object with a "text"') from None
        if limit and len(texts) == limit:
            break
    if not texts:
        raise ValueError(f"{path}: no LAMBADA texts")
    return texts


# ---------------------------------------------------------------- lm_eval's task definitions


def hellaswag_preprocess(text: str) -> str:
    """lm_eval's hellaswag `preprocess`: WikiHow's " [title]" as a full stop, other brackets dropped, double spaces."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def hellaswag_doc(doc: dict[str, Any]) -> tuple[str, list[str], int]:
    """(query, choices, gold) as lm_eval's hellaswag `process_docs` makes them."""
    ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    return (hellaswag_preprocess(doc["activity_label"] + ": " + ctx),
            [hellaswag_preprocess(e) for e in doc["endings"]], int(doc["label"]))


def lambada_doc(text: str) -> tuple[str, str]:
    """(context, target) as lambada_openai splits a text: the target is " " + the last space-separated word."""
    words = text.split(" ")
    return " ".join(words[:-1]), " " + words[-1]


def encode_pair(tok: Tokenizer, context: str, continuation: str) -> Request:
    """lm_eval's `_encode_pair` for a causal model (no special tokens added)."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = tok.encode(context + continuation, add_special_tokens=False).ids
    ctx = tok.encode(context, add_special_tokens=False).ids
    return Request(ctx, whole[len(ctx):])


# ---------------------------------------------------------------- scoring


@torch.no_grad()
def loglikelihoods(model: GPT, requests: list[Request], batch: int, device: str) -> list[tuple[float, bool]]:
    """(sum of log p(continuation token), whether greedy decoding gives exactly the continuation) per request, in
    order. Inputs are (context + continuation)[-(max_seq_len + 1):][:-1] as lm_eval's HF model makes them; longest
    first, `batch` per forward, right-padded (causal attention: padding after a row changes nothing before it).
    Only the continuations' positions go through the output layer. ValueError for a continuation longer than
    the model's window."""
    window = model.cfg.max_seq_len
    too_long = max((len(r.continuation) for r in requests), default=0)
    if too_long > window:
        raise ValueError(f"a continuation of {too_long} tokens is longer than the model's window ({window})")
    inputs = [(r.context + r.continuation)[-(window + 1):][:-1] for r in requests]
    order = sorted(range(len(requests)), key=lambda i: -len(inputs[i]))
    out: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
    for start in range(0, len(order), batch):
        rows = order[start:start + batch]
        x = torch.zeros(len(rows), len(inputs[rows[0]]), dtype=torch.long)
        at_row, at_col, targets = [], [], []
        for j, i in enumerate(rows):
            n, cont = len(inputs[i]), requests[i].continuation
            x[j, :n] = torch.tensor(inputs[i])
            at_row += [j] * len(cont)
            at_col += range(n - len(cont), n)
            targets += cont
        x = x.to(device)
        lmatch = torch.full_like(x, model.cfg.vocab_size) if model.cfg.lmatch_vocab else None
        h = model.model.norm(model.trunk(x, lmatch))  # GPT.forward, less the head's rows never read
        logits = model.lm_head(h[torch.tensor(at_row, device=device), torch.tensor(at_col, device=device)]).float()
        target = torch.tensor(targets, device=device)
        logp = (logits.gather(1, target[:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)).cpu()
        greedy = (logits.argmax(dim=-1) == target).cpu()
        k = 0
        for i in rows:
            n = len(requests[i].continuation)
            out[i] = (logp[k:k + n].sum().item(), bool(greedy[k:k + n].all()))
            k += n
    return out


def mean_stderr(xs: list[float]) -> float | None:
    """lm_eval's `mean_stderr`: the sample standard deviation over sqrt(n); None for fewer than 2 items."""
    n = len(xs)
    if n < 2:
        return None
    mu = sum(xs) / n
    return math.sqrt(sum((x - mu) ** 2 for x in xs) / (n - 1) / n)


def _argmax(xs: list[float]) -> int:
    return max(range(len(xs)), key=lambda i: (xs[i], -i))  # the first of equals, as np.argmax


def score_hellaswag(model: GPT, tok: Tokenizer, docs: list[dict[str, Any]], batch: int, device: str
                    ) -> dict[str, Any]:
    """acc (argmax of the endings' summed log-probabilities), acc_norm (the same over each ending's length in
    characters, as lm_eval divides by len(choice)) and their standard errors."""
    parsed = [hellaswag_doc(d) for d in docs]
    reqs = [encode_pair(tok, query, " " + c) for query, choices, _ in parsed for c in choices]
    lls = loglikelihoods(model, reqs, batch, device)
    acc, acc_norm, k = [], [], 0
    for _, choices, gold in parsed:
        ll = [lp for lp, _ in lls[k:k + len(choices)]]
        k += len(choices)
        acc.append(float(_argmax(ll) == gold))
        acc_norm.append(float(_argmax([lp / len(c) for lp, c in zip(ll, choices)]) == gold))
    return {"acc": sum(acc) / len(acc), "acc_stderr": mean_stderr(acc), "acc_norm": sum(acc_norm) / len(acc_norm),
            "acc_norm_stderr": mean_stderr(acc_norm), "n": len(docs)}


def score_lambada(model: GPT, tok: Tokenizer, texts: list[str], batch: int, device: str) -> dict[str, Any]:
    """acc (greedy decoding gives the last word exactly) and perplexity = exp(-mean over items of the last
    word's log-likelihood), lm_eval's `perplexity` aggregation."""
    lls = loglikelihoods(model, [encode_pair(tok, *lambada_doc(t)) for t in texts], batch, device)
    acc = [float(greedy) for _, greedy in lls]
    mean_ll = sum(lp for lp, _ in lls) / len(lls)
    return {"acc": sum(acc) / len(acc), "acc_stderr": mean_stderr(acc),
            "perplexity": math.exp(-mean_ll) if -mean_ll < 700 else None, "n": len(texts)}


def run_tasks(model: GPT, tok: Tokenizer, tasks: list[str], paths: dict[str, str], limit: int, batch: int,
              device: str) -> dict[str, Any]:
    """{task: its metrics} for each of `tasks` read from `paths[task]` (first `limit` items; 0 = all)."""
    results: dict[str, Any] = {}
    for task in tasks:
        t0 = time.perf_counter()
        if task == "hellaswag":
            results[task] = score_hellaswag(model, tok, read_hellaswag(paths[task], limit), batch, device)
        else:
            results[task] = score_lambada(model, tok, read_lambada(paths[task], limit), batch, device)
        results[task]["seconds"] = round(time.perf_counter() - t0, 3)
    return results
