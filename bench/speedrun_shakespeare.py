"""Benchmark: the nanoGPT shakespeare_char task, to validation loss 1.47, as fast as possible.

Character-level vocabulary of tinyshakespeare; the first 90% of the characters train, the last 10%
validate (nanoGPT's split). spotlm trains through its own code path (tokenize stage with the char
tokenizer, then `app.train.run.train` on Ray Train with `bench/configs/shakespeare_char.yaml`),
evaluating on the whole validation split and stopping at the target. The baseline, in the same
run on the same GPU and tokens: nanoGPT's model and `train_shakespeare_char` config (6 x 384,
dropout 0.2, lr 1e-3, batch 64 x 256, compiled, bf16), evaluated on the whole validation split
every 250 iterations as nanoGPT does. Training time excludes compilation (each side's first
step) and evaluation, both reported apart. Prints JSON and writes the loss curves as a PNG.

    python -m bench.speedrun_shakespeare --out=/tmp/speedrun            # GPU
    python -m bench.speedrun_shakespeare --quick                          # CPU smoke run (no target)
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from app import storage
from app.config import parse_config, to_dict
from app.data.corpus import TokenizeConfig, tokenize_corpus
from app.ray_env import init_ray
from app.data.shards import load_manifest, read_shard
from app.train.config import TrainConfig
from app.train.run import train
from bench.train_speed import BaselineGPT, baseline_optimizer

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"
CONFIG = Path(__file__).resolve().parent / "configs" / "shakespeare_char.yaml"


def tokenize(text_file: str, out: str):
    return tokenize_corpus(TokenizeConfig(inputs=[text_file], output=out, tokenizer="char", split="tail",
                                          val_fraction=0.1, text_unit="file", shard_tokens=1 << 24))


def run_spotlm(data: str, work: str, target: float, overrides: list[str]) -> dict:
    cfg = parse_config(TrainConfig, ["--config", str(CONFIG), *overrides])
    cfg.data, cfg.storage, cfg.name, cfg.target_val_loss = data, work, f"speedrun-{int(time.time())}", target
    t0 = time.perf_counter()
    result = train(cfg)
    wall = time.perf_counter() - t0
    if result.error:
        raise RuntimeError(f"spotlm training failed: {result.error}")
    progress = storage.read_json(storage.join(cfg.run_dir, "progress.json"))
    curve = sorted((int(s), t, v) for s, (t, v) in progress["val_curve"].items())
    hit = next(((s, t, v) for s, t, v in curve if v <= target), None)
    return {"steps": progress["step"], "train_time_s": round(progress["train_time_s"], 3),
            "compile_s (first step)": round(progress.get("first_step_s", 0.0), 2),
            "job_wall_s (Ray start, compile, eval, checkpoint included)": round(wall, 1),
            "time_to_target_s": round(hit[1], 3) if hit else None, "step_at_target": hit[0] if hit else None,
            "best_val_loss": round(min(v for _, _, v in curve), 4), "curve": curve,
            "config": {k: v for k, v in to_dict(cfg).items() if k not in ("data", "storage", "name")}}


@torch.no_grad()
def _full_val_loss(model, val: torch.Tensor, seq_len: int, batch: int, device, autocast) -> float:
    model.eval()
    n = (len(val) - 1) // seq_len
    total = 0.0
    for i in range(0, n, batch):
        idx = torch.arange(i, min(n, i + batch)) * seq_len
        x = torch.stack([val[j:j + seq_len] for j in idx]).to(device)
        y = torch.stack([val[j + 1:j + 1 + seq_len] for j in idx]).to(device)
        with autocast():
            _, loss = model(x, y)
        total += loss.item() * y.numel()
    model.train()
    return total / (n * seq_len)


NANOGPT = dict(n_layer=6, n_head=6, d=384, T=256, B=64)  # nanoGPT's train_shakespeare_char shape
QUICK = dict(n_layer=1, n_head=2, d=64, T=64, B=8)  # CPU smoke runs


def run_baseline(data: str, target: float, max_iters: int, eval_every: int, shape: dict = NANOGPT) -> dict:
    """nanoGPT's train_shakespeare_char recipe on the same tokens (random windows, as its get_batch)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else contextlib.nullcontext
    m = load_manifest(data)
    train_ids = torch.from_numpy(np.concatenate([read_shard(p) for p in m.shard_paths("train")]).astype(np.int64))
    val_ids = torch.from_numpy(np.concatenate([read_shard(p) for p in m.shard_paths("val")]).astype(np.int64))
    T, B, lr, min_lr, warmup = shape["T"], shape["B"], 1e-3, 1e-4, 100
    torch.manual_seed(1337)
    model = BaselineGPT(128 * math.ceil(m.vocab_size / 128), shape["n_layer"], shape["n_head"], shape["d"], T,
                        dropout=0.2, bias=False).to(device)
    opt = baseline_optimizer(model, lr, device)
    opt.param_groups[0]["betas"] = opt.param_groups[1]["betas"] = (0.9, 0.99)
    fwd = torch.compile(model) if device.type == "cuda" else model
    g = torch.Generator().manual_seed(1337)
    train_time, compile_s, eval_s, curve = 0.0, 0.0, 0.0, []
    for it in range(1, max_iters + 1):
        t = time.perf_counter()
        for group in opt.param_groups:  # nanoGPT: linear warmup, cosine to min_lr over 5000 iterations
            decay = min(1.0, max(0.0, (it - warmup) / (5000 - warmup)))
            group["lr"] = lr * it / warmup if it < warmup else min_lr + 0.5 * (1 + math.cos(math.pi * decay)) * (lr - min_lr)
        ix = torch.randint(len(train_ids) - T - 1, (B,), generator=g)
        x = torch.stack([train_ids[i:i + T] for i in ix]).to(device, non_blocking=True)
        y = torch.stack([train_ids[i + 1:i + 1 + T] for i in ix]).to(device, non_blocking=True)
        with autocast():
            _, loss = fwd(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t
        if it == 1:
            compile_s = dt
        else:
            train_time += dt
        if it % eval_every == 0:
            t = time.perf_counter()
            v = _full_val_loss(fwd, val_ids, T, B, device, autocast)
            eval_s += time.perf_counter() - t
            curve.append((it, train_time, v))
            if v <= target:
                break
    hit = next(((s, t, v) for s, t, v in curve if v <= target), None)
    return {"iters": it, "train_time_s": round(train_time, 3), "compile_s (first iter)": round(compile_s, 2),
            "eval_s": round(eval_s, 2), "time_to_target_s": round(hit[1], 3) if hit else None,
            "iter_at_target": hit[0] if hit else None,
            "best_val_loss": round(min(v for _, _, v in curve), 4) if curve else None, "curve": curve}


def plot(results: dict, target: float, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, r in results.items():
        if r.get("curve"):
            ax.plot([t for _, t, _ in r["curve"]], [v for _, _, v in r["curve"]], marker=".", label=name)
    ax.axhline(target, color="gray", linestyle="--", label=f"target {target}")
    ax.set_xlabel("training seconds (compilation and evaluation excluded)")
    ax.set_ylabel("validation loss (whole split)")
    ax.set_ylim(top=min(3.0, ax.get_ylim()[1]))
    ax.set_title("shakespeare_char speedrun")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--text", default=str(DATA))
    p.add_argument("--out", default="", help="directory for the data, runs, JSON and PNG (default: a temp dir)")
    p.add_argument("--target", type=float, default=1.47)
    p.add_argument("--baseline_iters", type=int, default=3000, help="the baseline stops at the target or here")
    p.add_argument("--no_baseline", action="store_true")
    p.add_argument("--quick", action="store_true", help="CPU smoke run: a tiny model, 20 steps, no target")
    args, overrides = p.parse_known_args()  # the rest: spotlm TrainConfig overrides, e.g. --optim.lr=3e-3
    out = args.out or tempfile.mkdtemp(prefix="speedrun-")
    os.makedirs(out, exist_ok=True)
    init_ray()
    data = os.path.join(out, "data")
    tokenize(args.text, data)
    if args.quick:
        overrides += ["--model.n_layer=1", "--model.d_model=64", "--model.n_head=2", "--micro_batch=8",
                      "--max_steps=20", "--eval_every=10", "--eval_tokens=4096", "--seq_len=64"]
    results = {"spotlm": run_spotlm(data, os.path.join(out, "runs"), args.target, overrides)}
    if not args.no_baseline:
        results["nanoGPT baseline"] = run_baseline(data, args.target, 20 if args.quick else args.baseline_iters,
                                                   10 if args.quick else 250, QUICK if args.quick else NANOGPT)
    a, b = results["spotlm"].get("time_to_target_s"), results.get("nanoGPT baseline", {}).get("time_to_target_s")
    summary = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "target": args.target,
               "spotlm_time_to_target_s": a, "baseline_time_to_target_s": b,
               "speedup": round(b / a, 2) if a and b else None}
    plot(results, args.target, os.path.join(out, "speedrun_shakespeare.png"))
    report = {"summary": summary, **results}
    storage.write_json(os.path.join(out, "speedrun_shakespeare.json"), report)
    print(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    main()
