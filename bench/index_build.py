"""Benchmark: LMatch index build throughput (tokens/s per core, scaling over Ray workers), query
latency per lookup (p50/p99) and bytes on disk per indexed token; the baseline, measured in the
same run, is the single-process one-pass build over the whole stream (`lmatch_stream`).

    python -m bench.index_build [--text ../shared/data/tinyshakespeare.txt] [--workers 1,2,4]\n\nThe one-pass baseline is the median of 3 runs after a warm-up run; the Ray builds follow one\nunmeasured warm-up build (worker start-up). Ray seconds include reading the shards, the\nsha256 check, the token histogram and writing every file.

Prints JSON. Data is read from /work/shared/data (never copied into the project); the dataset is
written to a temporary directory.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def _tokens(text_path: str, tokenizer_path: str, max_docs: int) -> tuple[np.ndarray, int, int]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(tokenizer_path)
    eot = tok.token_to_id("<|endoftext|>")
    docs = [d for d in Path(text_path).read_text().split("\n\n") if d.strip()][:max_docs]
    ids = [e.ids + [eot] for e in tok.encode_batch(docs)]
    return np.fromiter((t for d in ids for t in d), dtype=np.int64), eot, tok.get_vocab_size()


def _dataset(root: str, tokens: np.ndarray, eot: int, vocab: int, shard_tokens: int, val_tokens: int):
    from app.shards import Manifest, write_shard

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
    return tokens[:cut]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--text", default=str(SHARED / "tinyshakespeare.txt"))
    ap.add_argument("--tokenizer", default=str(SHARED / "gpt2_tokenizer" / "tokenizer.json"))
    ap.add_argument("--max_docs", type=int, default=10**9)
    ap.add_argument("--shard_tokens", type=int, default=1 << 16)
    ap.add_argument("--task_tokens", type=int, default=1 << 23)
    ap.add_argument("--workers", default="1,2,4")
    ap.add_argument("--queries", type=int, default=300)
    args = ap.parse_args()

    from app.index_build import IndexConfig, build_index
    from app.ray_env import init_ray
    from index.lmatch import LMatchIndex, lmatch_stream

    tokens, eot, vocab = _tokens(args.text, args.tokenizer, args.max_docs)
    out: dict = {"text": os.path.basename(args.text), "tokens": int(len(tokens)), "cpus": os.cpu_count(),
                 "shard_tokens": args.shard_tokens, "task_tokens": args.task_tokens}
    tmp = tempfile.mkdtemp(prefix="lmatch-bench-")
    try:
        train = _dataset(tmp, tokens, eot, vocab, args.shard_tokens, val_tokens=len(tokens) // 20)
        base = []
        for _ in range(4):  # the first run warms the allocator; the median of the other 3 counts
            t0 = time.perf_counter()
            _, ln, _ = lmatch_stream(train, eot, vocab)
            base.append(time.perf_counter() - t0)
        base_s = float(np.median(base[1:]))
        out["baseline_one_pass"] = {"train_tokens": int(len(train)), "seconds": round(base_s, 3),
                                    "tokens_per_s_per_core": round(len(train) / base_s),
                                    "matched_fraction": round(float((ln > 0).mean()), 4),
                                    "mean_length": round(float(ln.mean()), 3)}
        init_ray()
        runs = []
        for w in [int(args.workers.split(",")[0])] + [int(x) for x in args.workers.split(",")]:  # 1st: warm-up
            for f in os.listdir(tmp):
                if ".lm" in f:
                    os.remove(os.path.join(tmp, f))
            s = build_index(IndexConfig(data=tmp, workers=w, task_tokens=args.task_tokens))
            cores = min(w, os.cpu_count() or 1)
            runs.append({"workers": w, "seconds": round(s["seconds"], 3),
                         "tokens_per_s": round(s["tokens"] / s["seconds"]),
                         "tokens_per_s_per_core": round(s["tokens"] / s["seconds"] / cores),
                         "speedup_vs_one_pass": round(base_s * s["tokens"] / len(train) / s["seconds"], 3)})
            out["bytes_per_train_token"] = round(s["bytes_per_train_token"], 4)
            out["matched_fraction"] = round(s["matched_fraction"], 4)
            out["mean_length"] = round(s["mean_length"], 3)
        out["ray_build"] = runs[1:]  # runs[0] started the Ray workers
        idx = LMatchIndex.open(tmp)
        rng = np.random.default_rng(0)
        lat = []
        for _ in range(args.queries + 20):  # the first 20 warm the caches and are not counted
            a = int(rng.integers(0, len(tokens) - 64))
            c = tokens[a: a + int(rng.integers(8, 64))].tolist()
            c[-1] = int(rng.integers(0, vocab))  # new text: the last token is random
            t0 = time.perf_counter()
            idx.lookup(c)
            lat.append(time.perf_counter() - t0)
        lat_ms = np.array(lat[20:]) * 1e3
        out["query_ms"] = {"p50": round(float(np.percentile(lat_ms, 50)), 4),
                           "p99": round(float(np.percentile(lat_ms, 99)), 4), "shards": len(idx.sas)}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
