"""Benchmark: what the retrieval indexes are worth at GPT-2 124M on this machine's Python sources.

The corpus of `bench.speedrun_124m` (built, or reused from `<out>/data`) gets its LMatch index; two
models of spotlm's fast recipe train for the same time, one plain and one reading the LMatch id of
every token (`--index`): the LMatch model first trains as many steps as the plain one, and trains
again with its steps scaled to the plain model's training time when the two differ by more than
`--time_tolerance`. Each gets a kNN-LM datastore of its hidden states over the first `--knn_tokens`
training positions. Both are evaluated (`app.indexing.evaluate`: plain, LMatch ids, kNN, both) on the
first `--eval_tokens` of the validation split, and again on the validation files that share no
64-token window with the training split (found with a sorted array of hashes of every training
window): code repeats itself, and the second column says how much of the gain is that duplication.
That subset is a dataset of its own (`<out>/data_novel`: the training shards linked, the novel files'
tokens as its validation split) with its own LMatch ids. Prints JSON, written to `<out>/index_124m.json`.

    python -m bench.index_124m --out=runs/speedrun124m       # GPU: reuses the speedrun's corpus there
    python -m bench.index_124m --smoke                       # CPU: tiny corpus and model
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time
from typing import Any

import numpy as np
import torch

from app import storage
from app.config import parse_config
from app.data.shards import Manifest, read_shard, write_shard
from app.indexing.evaluate import EvalConfig, evaluate
from app.indexing.knn_build import KnnBuildConfig, build_knn
from app.indexing.lmatch_build import IndexConfig, build_index
from app.ray_env import init_ray
from app.train.config import TrainConfig
from bench.speedrun_124m import FAST, FULL, SMOKE, SMOKE_SPOTLM, GPT2_TOKENIZER, build_corpus, smoke_roots, train_run

WINDOW = 64  # tokens of the exact overlap that makes a validation file "seen"
HASH_BASE = 0x9E3779B97F4A7C15  # an odd 64-bit multiplier


# ---------------------------------------------------------------- overlap with the training split

def window_hashes(tokens: np.ndarray, w: int = WINDOW) -> np.ndarray:
    """A 64-bit polynomial hash of every `w`-token window (`len - w + 1` of them; `w` a power of two),
    built by doubling: h_2s[i] = h_s[i] * B^s + h_s[i + s], arithmetic modulo 2^64."""
    if w & (w - 1):
        raise ValueError(f"window must be a power of two, got {w}")
    h, span, mult = tokens.astype(np.uint64), 1, HASH_BASE
    while span < w:
        h = h[:-span] * np.uint64(mult) + h[span:]
        mult, span = mult * mult % 2**64, span * 2
    return h


def val_file_ranges(file_list: str) -> list[tuple[str, int, int]]:
    """(path, start, end) of each file's tokens in the validation split, from the tokenize stage's
    `files.jsonl` (files are packed in its order)."""
    ranges, at = [], 0
    with open(storage.local_path(file_list)) as f:
        for line in f:
            row = json.loads(line)
            if row["val"]:
                ranges.append((row["path"], at, at + row["val"]))
                at += row["val"]
    return ranges


def novel_files(train: np.ndarray, val: np.ndarray, ranges: list[tuple[str, int, int]],
                w: int = WINDOW) -> list[tuple[str, int, int]]:
    """The validation files none of whose `w`-token windows occurs anywhere in `train`."""
    seen = np.sort(window_hashes(train, w))
    vh = window_hashes(val, w)
    pos = np.minimum(np.searchsorted(seen, vh), len(seen) - 1)
    hit = np.concatenate([[0], np.cumsum(seen[pos] == vh)]) if len(seen) else np.zeros(len(vh) + 1, np.int64)
    # windows starting at s .. e - w lie inside the file [s, e)
    return [(p, s, e) for p, s, e in ranges if e - s < w or hit[e - w + 1] == hit[s]]


def split_tokens(m: Manifest, split: str) -> np.ndarray:
    return np.concatenate([read_shard(p) for p in m.shard_paths(split)]) if m.shards.get(split) else np.zeros(0, np.uint16)


def novel_dataset(m: Manifest, out: str) -> tuple[Manifest | None, dict[str, Any]]:
    """`out`: the training shards of `m` (linked) with the validation files that share no window with them
    as the validation split; None when there is no such file. Returns it and the counts."""
    ranges = val_file_ranges(storage.join(m.root, "files.jsonl"))
    val = split_tokens(m, "val")
    keep = novel_files(split_tokens(m, "train"), val, ranges)
    info = {"val_files": len(ranges), "novel_files": len(keep), "val_tokens": int(len(val)),
            "novel_tokens": sum(e - s for _, s, e in keep), "window": WINDOW}
    if not keep:
        return None, info
    os.makedirs(out, exist_ok=True)
    for name in [s["file"] for s in m.shards["train"]] + [m.tokenizer_file]:
        link = os.path.join(out, name)
        if not os.path.lexists(link):
            os.symlink(os.path.join(m.root, name), link)
    tokens = np.concatenate([val[s:e] for _, s, e in keep])
    shard = {"file": "val_000000.bin", **write_shard(os.path.join(out, "val_000000.bin"), tokens)}
    novel = dataclasses.replace(m, shards={"train": m.shards["train"], "val": [shard]},
                                docs={**m.docs, "val": len(keep)}, extras={})
    novel.root = out
    novel.save()
    return novel, info


# ---------------------------------------------------------------- models

def train_model(data: str, work: str, name: str, index: bool, steps: int, shape: dict, overrides: list[str],
                eval_tokens: int) -> dict:
    """One spotlm run (evaluated once, at the end); its export dir, training seconds and final loss."""
    batch_tokens = shape["micro_batch"] * shape["accum"] * shape["seq_len"]
    cfg = parse_config(TrainConfig, [
        *overrides, f"--seq_len={shape['seq_len']}", f"--micro_batch={shape['micro_batch']}",
        f"--batch_tokens={batch_tokens}", f"--max_steps={steps}", "--eval_every=0", f"--eval_tokens={eval_tokens}",
        f"--schedule.warmup_steps={max(1, steps // 20)}", f"--log_every={max(1, steps // 10)}",
        "--ckpt.every=1000000000", f"--index={str(index).lower()}"])
    cfg.data, cfg.storage, cfg.name = data, work, f"{name}-{int(time.time())}"
    result = train_run(cfg)
    if result.error:
        raise RuntimeError(f"training {name} failed: {result.error}")
    progress = storage.read_json(storage.join(cfg.run_dir, "progress.json"))
    return {"export": cfg.export_dir, "steps": progress["step"], "train_time_s": round(progress["train_time_s"], 3),
            "compile_s (first step)": round(progress.get("first_step_s", 0.0), 2),
            "final_val_loss": progress.get("val_loss")}


def equal_time_models(data: str, work: str, steps: int, shape: dict, overrides: list[str], tolerance: float,
                      eval_tokens: int) -> dict[str, dict]:
    """The plain and the LMatch model trained for the same time (within `tolerance`)."""
    plain = train_model(data, work, "plain", False, steps, shape, overrides, eval_tokens)
    lmatch = train_model(data, work, "lmatch", True, steps, shape, overrides, eval_tokens)
    ratio = lmatch["train_time_s"] / max(plain["train_time_s"], 1e-9)
    if abs(ratio - 1) > tolerance:
        lmatch = train_model(data, work, "lmatch-equal-time", True, max(1, round(steps / ratio)), shape, overrides,
                             eval_tokens)
    return {"plain": plain, "lmatch": lmatch}


# ---------------------------------------------------------------- evaluation

def scores(model: str, knn: str, data: str, eval_tokens: int, seq_len: int, device: str) -> dict[str, dict]:
    """Loss and perplexity of each variant (plain, lmatch, knn, lmatch+knn) of a model on a dataset's val split."""
    ev = evaluate(EvalConfig(model=model, data=data, split="val", max_tokens=eval_tokens, seq_len=seq_len, knn=knn,
                             device=device))
    return {k: {f: v.get(f) for f in ("loss", "ppl", "lambda", "tokens")} for k, v in ev["results"].items()}


def table(models: dict[str, dict], data: str, novel: Manifest | None, eval_tokens: int, seq_len: int,
          device: str) -> dict:
    """`{row: {"val": ..., "novel_val": ...}}` for plain, plain+kNN, LMatch (and its all-"none" reading), LMatch+kNN."""
    names = {("plain", "lm"): "plain", ("plain", "knn"): "plain + kNN", ("lmatch", "lm"): "LMatch model, ids off",
             ("lmatch", "lmatch"): "LMatch", ("lmatch", "knn"): "LMatch model, ids off + kNN",
             ("lmatch", "lmatch+knn"): "LMatch + kNN"}
    rows: dict[str, dict] = {}
    for column, ds in (("val", data), ("novel_val", novel.root if novel else None)):
        for model, r in models.items():
            if ds is None:
                continue
            got = scores(r["export"], storage.join(r["export"], "knn"), ds, eval_tokens, seq_len, device)
            for variant, v in got.items():
                rows.setdefault(names.get((model, variant), f"{model} {variant}"), {})[column] = v
    return rows


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="", help="directory for the corpus, runs and JSON (default: a temp dir)")
    p.add_argument("--roots", default="", help="directories of .py files, comma-separated (default: stdlib, site-packages)")
    p.add_argument("--tokenizer", default="", help="tokenizer.json (default: GPT-2's; the smoke run trains a small BPE)")
    p.add_argument("--val_fraction", type=float, default=0.01, help="share of files held out for validation")
    p.add_argument("--train_tokens", type=int, default=2**26, help="the plain model's training tokens")
    p.add_argument("--time_tolerance", type=float, default=0.05, help="retrain the LMatch model beyond this time gap")
    p.add_argument("--knn_tokens", type=int, default=2**22, help="training positions in each kNN datastore")
    p.add_argument("--eval_tokens", type=int, default=2**20, help="validation tokens scored per column")
    p.add_argument("--smoke", action="store_true", help="CPU: a tiny model on the stdlib's email package")
    args, overrides = p.parse_known_args(argv)  # the rest: spotlm TrainConfig overrides
    out = args.out or tempfile.mkdtemp(prefix="index124m-")
    shape, overrides = (SMOKE, [*FAST, *SMOKE_SPOTLM, *overrides]) if args.smoke else (FULL, [*FAST, *overrides])
    if args.smoke:
        torch.set_num_threads(1)  # as Ray's workers run: on a busy small machine more threads only wait
        args.train_tokens, args.knn_tokens, args.eval_tokens = 12 * 512, 4096, 16384
        args.val_fraction, args.time_tolerance = max(args.val_fraction, 0.2), float("inf")
    roots = args.roots.split(",") if args.roots else (smoke_roots() if args.smoke else [])
    steps = max(1, args.train_tokens // (shape["micro_batch"] * shape["accum"] * shape["seq_len"]))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    t0 = time.perf_counter()
    init_ray()
    m, corpus = build_corpus(out, roots, args.tokenizer or (None if args.smoke else str(GPT2_TOKENIZER)),
                             args.val_fraction)
    lmatch = build_index(IndexConfig(data=m.root))
    novel, overlap = novel_dataset(m, os.path.join(out, "data_novel"))
    if novel is not None:
        build_index(IndexConfig(data=novel.root))
    models = equal_time_models(m.root, os.path.join(out, "index_runs"), steps, shape, overrides, args.time_tolerance,
                               args.eval_tokens)
    for r in models.values():
        build_knn(KnnBuildConfig(model=r["export"], data=m.root, max_tokens=args.knn_tokens,
                                 seq_len=shape["seq_len"]))
    report = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              "corpus": {k: corpus[k] for k in ("files", "tokens", "found", "duplicates")},
              "lmatch": {k: lmatch.get(k) for k in ("matched_fraction", "mean_length", "seconds")},
              "overlap": overlap, "eval_tokens": args.eval_tokens, "knn_tokens": args.knn_tokens,
              "models": models, "table": table(models, m.root, novel, args.eval_tokens, shape["seq_len"], device),
              "seconds": round(time.perf_counter() - t0, 1)}
    storage.write_json(os.path.join(out, "index_124m.json"), report)
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
