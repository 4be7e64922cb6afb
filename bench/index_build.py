"""Benchmark: LMatch index build throughput (tokens/s per core, scaling over Ray workers), query
latency per lookup (p50/p99) and bytes on disk per indexed token; the baseline, measured in the
same run, is the single-process one-pass build over the whole train stream (`lmatch_stream`).

    python -m bench.index_build [--text ../shared/data/tinyshakespeare.txt] [--large default|none|a,b,..]
                                [--workers 1,2,4] [--queries 2000]

Two corpora: `small` (--text, split into documents at blank lines, 5% held out as val; the
numbers of earlier runs) and `large` (every text of ../shared/data concatenated: wikitext-103
valid, tinyshakespeare, LAMBADA test, HellaSwag val, one item per document; tokenized by the
project's tokenize stage, `app.data.corpus.tokenize_corpus`, GPT-2 BPE, 1% tail of each document as
val), where the fixed costs of a Ray build (task start, object transfers) weigh less.

Per corpus: the one-pass baseline is the median of 3 runs after a warm-up run; the Ray builds
follow one unmeasured warm-up build with the most workers (starts every worker process); Ray
seconds include reading the shards, the sha256 check, the token histogram and writing every
file. tokens/s/core divides by min(workers, CPU cores). Query latency: `LMatchIndex.lookup` of
new text (a random stretch of the corpus whose last token is replaced by a random id), timed
one call at a time with perf_counter after 200 unmeasured warm-up lookups (warm page cache and
allocator, as a serving replica); the index is opened from the files the last build wrote.

Prints JSON. Data is read from /work/shared/data (never copied into the project); datasets are
written to temporary directories.
"""
from __future__ import annotations

import argparse
import bz2
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
LARGE = ("wikitext103_valid.tokens", "tinyshakespeare.txt", "lambada_test.jsonl", "hellaswag_val_full.txt.bz2")


def _tokens(text_path: str, tokenizer_path: str, max_docs: int) -> tuple[np.ndarray, int, int]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(tokenizer_path)
    eot = tok.token_to_id("<|endoftext|>")
    docs = [d for d in Path(text_path).read_text().split("\n\n") if d.strip()][:max_docs]
    ids = [e.ids + [eot] for e in tok.encode_batch(docs)]
    return np.fromiter((t for d in ids for t in d), dtype=np.int64), eot, tok.get_vocab_size()


def _dataset(root: str, tokens: np.ndarray, eot: int, vocab: int, shard_tokens: int, val_tokens: int):
    from app.data.shards import Manifest, write_shard

    cut = int(np.flatnonzero(tokens[: len(tokens) - val_tokens] == eot)[-1]) + 1
    shards = {}
    for split, arr in (("train", tokens[:cut]), ("val", tokens[cut:])):
        shards[split] = []
        for s in range(0, len(arr), shard_tokens):
            name = f"{split}_{s // shard_tokens:06d}.bin"
            shards[split].append({"file": name, **write_shard(os.path.join(root, name),
                                                             arr[s:s + shard_tokens].astype(np.uint16))})
    m = Manifest(dtype="uint16", vocab_size=vocab, eot_id=eot, shard_tokens=shard_tokens, shards=shards)
    m.root = root
    m.save()


def _large_dataset(root: str, names: list[str], tokenizer: str, shard_tokens: int) -> None:
    """Tokenize the shared texts with the tokenize stage into `root` (inputs staged in root/_in)."""
    from app.data.corpus import TokenizeConfig, tokenize_corpus

    stage = os.path.join(root, "_in")
    os.makedirs(stage)
    inputs = []
    for name in names:
        src = SHARED / name
        if name.endswith(".bz2"):  # HellaSwag: 6 lines per item -> one item per document
            lines = bz2.open(src, "rt").read().splitlines()
            dst = os.path.join(stage, name[:-4])
            Path(dst).write_text("\n\n".join("\n".join(lines[i:i + 6]) for i in range(0, len(lines), 6)))
        else:
            dst = os.path.join(stage, name)
            os.symlink(src, dst)
        inputs.append(dst)
    tokenize_corpus(TokenizeConfig(inputs=inputs, output=os.path.join(root, "ds"), tokenizer=tokenizer,
                                   text_unit="paragraph", split="tail", val_fraction=0.01,
                                   shard_tokens=shard_tokens))


def _measure(root: str, workers: list[int], task_tokens: int, queries: int) -> dict:
    from app.indexing.lmatch_build import IndexConfig, build_index
    from app.data.shards import load_manifest
    from index.lmatch import LMatchIndex, SplitStream, lmatch_stream

    m = load_manifest(root)
    train = SplitStream(m, "train").tokens()
    eot, vocab = int(m.eot_id), int(m.vocab_size)
    out: dict = {"train_tokens": int(len(train)), "val_tokens": int(m.num_tokens("val")),
                 "train_shards": len(m.shards["train"]), "shard_tokens": int(m.shard_tokens)}
    base = []
    for _ in range(4):  # the first run warms the allocator; the median of the other 3 counts
        t0 = time.perf_counter()
        _, ln, _ = lmatch_stream(train, eot, vocab)
        base.append(time.perf_counter() - t0)
    base_s = float(np.median(base[1:]))
    out["baseline_one_pass"] = {"seconds": round(base_s, 3), "tokens_per_s_per_core": round(len(train) / base_s),
                                "matched_fraction": round(float((ln > 0).mean()), 4),
                                "mean_length": round(float(ln.mean()), 3)}
    runs = []
    for w in [max(workers)] + workers:  # the first: warm-up, starts every worker process
        for f in os.listdir(root):
            if ".lm" in f:
                os.remove(os.path.join(root, f))
        s = build_index(IndexConfig(data=root, workers=w, task_tokens=task_tokens))
        cores = min(w, os.cpu_count() or 1)
        runs.append({"workers": w, "seconds": round(s["seconds"], 3), "tokens": s["tokens"],
                     "tokens_per_s": round(s["tokens"] / s["seconds"]),
                     "tokens_per_s_per_core": round(s["tokens"] / s["seconds"] / cores),
                     "speedup_vs_one_pass": round(base_s * s["tokens"] / len(train) / s["seconds"], 3)})
        out["bytes_per_train_token"] = round(s["bytes_per_train_token"], 4)
        out["matched_fraction"] = round(s["matched_fraction"], 4)
        out["mean_length"] = round(s["mean_length"], 3)
    out["ray_build"] = runs[1:]
    tokens = np.concatenate([train, SplitStream(m, "val").tokens()]).astype(np.int64)
    idx = LMatchIndex.open(root)
    rng = np.random.default_rng(0)
    lat, hits = [], 0
    for i in range(queries + 200):  # the first 200 warm the caches and are not counted
        a = int(rng.integers(0, len(tokens) - 64))
        c = tokens[a: a + int(rng.integers(8, 64))].tolist()
        c[-1] = int(rng.integers(0, vocab))  # new text: the last token is random
        t0 = time.perf_counter()
        _, L = idx.lookup(c)
        dt = time.perf_counter() - t0
        if i >= 200:
            lat.append(dt)
            hits += L > 0
    lat_ms = np.array(lat) * 1e3
    out["query_ms"] = {f"p{q}": round(float(np.percentile(lat_ms, q)), 4) for q in (50, 90, 99, 99.9)}
    out["query_ms"].update({"max": round(float(lat_ms.max()), 4), "mean": round(float(lat_ms.mean()), 4),
                            "queries": len(lat), "matched_fraction": round(hits / max(1, len(lat)), 3),
                            "shards": len(idx.sas), "sample_every": idx.every})
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--text", default=str(SHARED / "tinyshakespeare.txt"), help="the small corpus")
    ap.add_argument("--large", default="default",
                    help="'default' (all shared texts), 'none', or comma-separated file names in shared/data")
    ap.add_argument("--tokenizer", default=str(SHARED / "gpt2_tokenizer" / "tokenizer.json"))
    ap.add_argument("--max_docs", type=int, default=10**9)
    ap.add_argument("--shard_tokens", type=int, default=1 << 16, help="small corpus: tokens per shard")
    ap.add_argument("--large_shard_tokens", type=int, default=1 << 18, help="large corpus: tokens per shard")
    ap.add_argument("--task_tokens", type=int, default=1 << 23)
    ap.add_argument("--workers", default="1,2,4")
    ap.add_argument("--queries", type=int, default=2000)
    args = ap.parse_args()

    from app.ray_env import init_ray

    workers = [int(x) for x in args.workers.split(",")]
    out: dict = {"cpus": os.cpu_count(), "task_tokens": args.task_tokens}
    tmp = tempfile.mkdtemp(prefix="lmatch-bench-")
    try:
        init_ray()
        small = os.path.join(tmp, "small")
        os.makedirs(small)
        tokens, eot, vocab = _tokens(args.text, args.tokenizer, args.max_docs)
        _dataset(small, tokens, eot, vocab, args.shard_tokens, val_tokens=len(tokens) // 20)
        if args.large != "none":
            names = list(LARGE) if args.large == "default" else args.large.split(",")
            _large_dataset(os.path.join(tmp, "large"), names, args.tokenizer, args.large_shard_tokens)
        out["small"] = {"text": os.path.basename(args.text), **_measure(small, workers, args.task_tokens,
                                                                        args.queries)}
        if args.large != "none":
            out["large"] = {"texts": names, **_measure(os.path.join(tmp, "large", "ds"), workers,
                                                       args.task_tokens, args.queries)}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
