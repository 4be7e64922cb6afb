"""Speculative decoding benchmark: plain decoding vs drafts from the LMatch index and from the prompt itself,
the same engine, prompts and weights, side by side in one run.

    python -m bench.speculative --model=<export dir> --data=<dataset dir>    # GPU: held-out completions
    python -m bench.speculative --smoke                                       # tiny CPU run (tinyshakespeare)

Prompts are `--prompts` windows of `--prompt_len` tokens of the held-out split (`--split`, default val) of
`--data`; the drafts' index is the LMatch index of `--index` (default `--data`: built on its train split,
so the completions are of text the index has not seen). Each variant completes every prompt greedily
(`--max_tokens` tokens, stopping at the end-of-text id) at each stream count of `--streams` (client
threads submitting back to back): `plain` (no drafter), `index` (the index's continuation only),
`prompt` (prompt lookup only) and `index+prompt` (the longer match of both), `--draft` drafts per step.
Reported per variant and level: tokens/s, the ratio to plain, the acceptance rate (accepted / drafted),
tokens per engine step, and whether every completion equals plain decoding's (greedy: it must).
`--smoke`: tokenizes the first 300 KB of ../shared/data/tinyshakespeare.txt (unless `--data` is given),
builds its index, and serves a randomly initialised tiny model: a test of the code path, not of speed
(a random model's text rarely agrees with the corpus). Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from app.data.shards import load_manifest
from app.model.gpt import GPT, ModelConfig
from app.serve.engine import Engine, SamplingParams
from app.serve.speculative import Drafter
from bench.report import emit
from index.lmatch import LMatchIndex, SplitStream

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
VARIANTS = ("plain", "index", "prompt", "index+prompt")


def held_out_prompts(data: str, split: str, n: int, length: int, seed: int = 0) -> list[list[int]]:
    """n windows of `length` tokens of `split` with no end-of-text inside (each within one document)."""
    m = load_manifest(data)
    tokens = np.asarray(SplitStream(m, split).tokens(), dtype=np.int64)
    eot = int(m.eot_id)
    if len(tokens) <= length:
        raise ValueError(f"{data}: the {split} split has {len(tokens)} tokens, fewer than --prompt_len={length}")
    ends = np.flatnonzero(tokens == eot)
    rng = np.random.default_rng(seed)
    out: list[list[int]] = []
    for start in rng.permutation(len(tokens) - length):
        i = np.searchsorted(ends, start)  # the first EOT at or after start
        if i == len(ends) or ends[i] >= start + length:
            out.append(tokens[start:start + length].tolist())
            if len(out) == n:
                return out
    raise ValueError(f"{data}: fewer than {n} windows of {length} tokens inside one {split} document")


def complete(engine: Engine, prompts: list[list[int]], streams: int, max_tokens: int, draft: int) -> dict:
    """Every prompt completed greedily by `streams` client threads -> tokens/s, the completions and the
    engine's drafting counts over the run."""
    before = engine.stats()

    def one(p: list[int]) -> list[int]:
        seq = engine.submit(p, SamplingParams(max_tokens=max_tokens, temperature=0.0, draft_tokens=draft,
                                              timeout_s=3600))
        seq.wait(3600)
        if seq.finish_reason not in ("stop", "length"):
            raise RuntimeError(f"a completion ended with {seq.finish_reason}: {seq.error}")
        return seq.tokens

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=streams) as pool:
        outs = list(pool.map(one, prompts))
    wall = time.perf_counter() - t0
    after = engine.stats()
    d = {k: after[k] - before[k] for k in ("steps", "generated_tokens", "drafted_tokens", "accepted_tokens")}
    tokens = sum(len(o) for o in outs)
    return {"tokens": tokens, "wall_s": round(wall, 3), "tokens_per_s": round(tokens / wall, 1),
            "tokens_per_step": round(d["generated_tokens"] / d["steps"], 3) if d["steps"] else None,
            "drafted": d["drafted_tokens"], "accepted": d["accepted_tokens"],
            "acceptance_rate": round(d["accepted_tokens"] / d["drafted_tokens"], 4) if d["drafted_tokens"] else None,
            "outputs": outs}


def drafter_of(variant: str, index: LMatchIndex, ngram: int, min_match: int) -> Drafter | None:
    if variant == "plain":
        return None
    return Drafter(index if "index" in variant else None, prompt_lookup="prompt" in variant, ngram=ngram,
                   min_match=min_match)


def smoke_data(out: str) -> str:
    """Shards of the first 300 KB of tinyshakespeare (speeches as documents, a 1024-token BPE)."""
    from app.data.corpus import TokenizeConfig, tokenize_corpus
    from app.ray_env import init_ray

    init_ray()
    text = Path(out) / "in.txt"
    text.write_text((SHARED / "tinyshakespeare.txt").read_text()[:300_000])
    data = str(Path(out) / "shards")
    tokenize_corpus(TokenizeConfig(inputs=[str(text)], output=data, vocab_size=1024, text_unit="paragraph",
                                   val_fraction=0.1))
    return data


def load_model(a, vocab: int, device: str, dtype: torch.dtype) -> tuple[GPT, int | None]:
    """(model, eot id): the export of --model, or for --smoke a random tiny model over `vocab` ids."""
    if a.model:
        from app.model.export import load_exported

        ex = load_exported(a.model, device=device, dtype=dtype)
        return ex.model, ex.eot_id
    torch.manual_seed(0)
    m = GPT(ModelConfig.preset("tiny", vocab_size=vocab))
    m.init_weights()
    return m.to(device=device, dtype=dtype).eval(), None


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="exported model directory (required unless --smoke)")
    p.add_argument("--data", default=None, help="dataset dir (shards + manifest) the prompts come from")
    p.add_argument("--index", default=None, help="dataset dir with the LMatch index (default: --data)")
    p.add_argument("--split", default="val", help="the held-out split prompts are cut from")
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--prompt_len", type=int, default=128)
    p.add_argument("--max_tokens", type=int, default=128)
    p.add_argument("--streams", default="1,8")
    p.add_argument("--draft", type=int, default=8, help="drafts per step")
    p.add_argument("--ngram", type=int, default=3, help="prompt lookup's longest n-gram")
    p.add_argument("--min_match", type=int, default=2, help="the shortest match that drafts")
    p.add_argument("--device", default="auto")
    p.add_argument("--eager", action="store_true", help="no CUDA graphs")
    p.add_argument("--smoke", action="store_true", help="tiny CPU run on tinyshakespeare (a random model)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--out", default=None, help="also write the JSON here")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if not a.smoke and not (a.model and a.data):
        p.error("--model and --data are needed (or --smoke)")
    if a.smoke and a.streams == "1,8":
        a.prompts, a.prompt_len, a.max_tokens, a.streams = 8, 32, 24, "1,4"
    device = a.device if a.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with tempfile.TemporaryDirectory() as tmp:
        data = a.data or smoke_data(tmp)
        index_dir = a.index or data
        if not load_manifest(index_dir).extras.get("lmatch"):
            from app.indexing.lmatch_build import IndexConfig, build_index

            build_index(IndexConfig(data=index_dir), use_ray=False)
        index = LMatchIndex.open(index_dir)
        prompts = held_out_prompts(data, a.split, a.prompts, a.prompt_len)
        model, eot = load_model(a, int(load_manifest(data).vocab_size), device, dtype)
        lmatch = index if model.cfg.lmatch_vocab else None
        result: dict = {"device": device, "dtype": str(dtype).removeprefix("torch."), "smoke": a.smoke,
                        "model": a.model, "data": data if a.data else "tinyshakespeare (smoke)",
                        "prompts": len(prompts), "prompt_len": a.prompt_len, "max_tokens": a.max_tokens,
                        "draft": a.draft, "levels": {}}
        for streams in [int(s) for s in a.streams.split(",")]:
            level: dict = {}
            for variant in VARIANTS:
                engine = Engine(model, eot_id=eot, max_batch=streams, max_queue=len(prompts), lmatch=lmatch,
                                max_len=a.prompt_len + a.max_tokens, cuda_graphs=False if a.eager else None,
                                drafter=drafter_of(variant, index, a.ngram, a.min_match),
                                draft_tokens=a.draft if variant != "plain" else 0, max_draft=max(a.draft, 1)).start()
                complete(engine, prompts[:streams], streams, a.max_tokens, a.draft)  # warm-up: graph captures
                level[variant] = complete(engine, prompts, streams, a.max_tokens, a.draft)
                engine.close()
            plain = level["plain"]
            for variant in VARIANTS[1:]:
                v = level[variant]
                v["ratio_tokens_per_s_vs_plain"] = round(v["tokens_per_s"] / plain["tokens_per_s"], 3)
                v["outputs_identical"] = v["outputs"] == plain["outputs"]
            for v in level.values():
                del v["outputs"]
            result["levels"][str(streams)] = level
            print(json.dumps({str(streams): level}), flush=True)
        result["all_identical"] = all(v.get("outputs_identical", True) for lv in result["levels"].values()
                                      for v in lv.values())
    emit(result, a.out)
    return result


if __name__ == "__main__":
    main()
