"""Benchmark: time to the nanoGPT baseline's validation loss at GPT-2 124M, on this machine's Python sources.

The corpus is made on the spot by the tokenize stage (`corpus=python`: the `.py` files of the standard
library and site-packages, de-duplicated by content hash, split train/val by file; the GPT-2 tokenizer
of `../shared/data`), or reused when `<out>/data` already holds it. The baseline is the nanoGPT-style
GPT-2 124M of `bench/train_speed.py` (compiled, bf16, fused AdamW at 6e-4, betas 0.9/0.95, weight
decay 0.1, clip 1.0, linear warmup over the first 5% of steps then cosine to 10% over the budget):
it trains for a fixed budget of tokens and its final validation loss is the target. spotlm's fastest
configuration (`FAST`: the window mix, ReLU², FP8, Muon; through `app.train.run.train`, the trainer
`jobs/train.py` runs) then trains until a validation pass reaches that loss. Both read the same
training windows in the same order (`TrainLoader`, same seed) and are evaluated on the same first
`eval_tokens` of the validation split (`eval_batches`). Times exclude the first step (compilation)
and evaluation, reported apart. Prints JSON (written to `<out>/speedrun_124m.json`) and draws the
curves against training seconds in `<out>/speedrun_124m.png`.

    python -m bench.speedrun_124m --out=runs/speedrun124m                    # GPU: corpus, baseline, spotlm
    python -m bench.speedrun_124m --out=runs/speedrun124m --phase=corpus     # or step by step: the corpus
    python -m bench.speedrun_124m --out=runs/speedrun124m --phase=baseline   # and the baseline's target
    python -m bench.speedrun_124m --out=runs/speedrun124m --phase=spotlm     # are kept in <out>
    python -m bench.speedrun_124m --smoke                                    # CPU: tiny corpus and model
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from app import storage
from app.config import parse_config, to_dict
from app.data.corpus import TokenizeConfig, tokenize_corpus
from app.data.loader import BatchPlan, TokenStream, TrainLoader, eval_batches
from app.data.shards import Manifest, load_manifest
from app.ray_env import init_ray
from app.train.config import TrainConfig
from app.train.loop import evaluate, synced_seconds
from app.tracking import draw_curves
from bench.train_speed import BaselineGPT, baseline_optimizer, baseline_step

GPT2_TOKENIZER = Path(__file__).resolve().parents[2] / "shared" / "data" / "gpt2_tokenizer" / "tokenizer.json"
# spotlm's fastest configuration: the README's fast GPT-2 recipe (window mix, ReLU², FP8 blocks and head,
# kernels and CUDA graph at auto) with Muon on the blocks' matrices
FAST = ["--preset=gpt2-124m", "--model.attn_windows=1,64,0", "--model.mlp=relu2", "--perf.fp8=all",
        "--optim.name=muon", "--optim.lr=0.001", "--optim.muon_lr=0.02"]
# The shapes: GPT-2 124M at 1024 tokens, 32 x 4 sequences a step; the smoke run's tiny model on CPU
FULL = dict(n_layer=12, n_head=12, d=768, seq_len=1024, micro_batch=32, accum=4)
SMOKE = dict(n_layer=2, n_head=2, d=64, seq_len=64, micro_batch=4, accum=2)
SMOKE_SPOTLM = ["--preset=tiny", "--model.n_layer=2", "--model.n_head=2", "--model.d_model=64", "--perf.fp8=off"]
SEED = 1337


def smoke_roots() -> list[str]:
    """A small real corpus for CPU runs: the standard library's `email` package."""
    return [os.path.join(sysconfig.get_paths()["stdlib"], "email")]


def build_corpus(out: str, roots: list[str], tokenizer: str | None, val_fraction: float) -> tuple[Manifest, dict]:
    """Tokenize (or reuse) the python corpus under `<out>/data` (tokenizer None: a 512-token BPE trained
    on it, for CPU runs); its manifest and `corpus.json`."""
    data = os.path.join(out, "data")
    actors = max(1, (os.cpu_count() or 2) - 1)  # all cores but the driver's
    tokenize_corpus(TokenizeConfig(corpus="python", inputs=roots, output=data, tokenizer=tokenizer, vocab_size=512,
                                   val_fraction=val_fraction, num_actors=actors, actor_cpus=1.0))
    return load_manifest(data), storage.read_json(os.path.join(data, "corpus.json"))


def _schedule(it: int, steps: int, lr: float) -> float:
    """nanoGPT's: linear warmup over the first 5% of steps, then cosine to lr / 10 at the last step."""
    warmup = max(1, steps // 20)
    if it < warmup:
        return lr * (it + 1) / warmup
    decay = (it - warmup) / max(1, steps - 1 - warmup)
    return lr / 10 + 0.5 * (1 + math.cos(math.pi * min(1.0, decay))) * (lr - lr / 10)


def run_baseline(m: Manifest, shape: dict, steps: int, eval_every: int, eval_tokens: int, lr: float) -> dict:
    """The nanoGPT-style GPT-2 for `steps` steps; its validation curve `[(step, train_s, loss)]` and final loss."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else contextlib.nullcontext
    T = shape["seq_len"]
    plan = BatchPlan(shape["micro_batch"] * shape["accum"], shape["micro_batch"], 1)
    loader = TrainLoader(TokenStream(m, "train"), T, plan, 0, SEED)
    val = eval_batches(TokenStream(m, "val"), T, shape["micro_batch"], eval_tokens, 0, 1)
    torch.manual_seed(SEED)
    model = BaselineGPT(128 * math.ceil(m.vocab_size / 128), shape["n_layer"], shape["n_head"], shape["d"], T).to(device)
    opt = baseline_optimizer(model, lr, device)
    fwd = torch.compile(model) if device.type == "cuda" else model
    train_s, compile_s, eval_s, curve = 0.0, 0.0, 0.0, []
    for it in range(steps):
        t = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = _schedule(it, steps, lr)
        baseline_step(fwd, model, opt, loader.micro_batches(it), device, autocast)
        dt = synced_seconds(t, device)
        compile_s, train_s = (dt, train_s) if it == 0 else (compile_s, train_s + dt)
        if (it + 1) % eval_every == 0 or it + 1 == steps:
            t = time.perf_counter()
            curve.append((it + 1, round(train_s, 3), evaluate(fwd, val, device, autocast)))
            eval_s += time.perf_counter() - t
    return {"steps": steps, "tokens": steps * plan.global_batch * T, "train_time_s": round(train_s, 3),
            "compile_s (first step)": round(compile_s, 2), "eval_s": round(eval_s, 2),
            "final_val_loss": round(curve[-1][2], 4), "curve": curve}


def run_spotlm(data: str, work: str, shape: dict, steps: int, eval_every: int, eval_tokens: int, target: float,
               overrides: list[str]) -> dict:
    """spotlm's trainer on the same data until a validation pass reaches `target` (or `steps` run out)."""
    batch_tokens = shape["micro_batch"] * shape["accum"] * shape["seq_len"]
    cfg = parse_config(TrainConfig, [
        *overrides, f"--seq_len={shape['seq_len']}", f"--micro_batch={shape['micro_batch']}",
        f"--batch_tokens={batch_tokens}", f"--max_steps={steps}", f"--eval_every={eval_every}",
        f"--eval_tokens={eval_tokens}", f"--log_every={eval_every}", f"--schedule.warmup_steps={max(1, steps // 20)}",
        f"--seed={SEED}", "--export=none", "--ckpt.every=1000000000"])
    cfg.data, cfg.storage, cfg.name, cfg.target_val_loss = data, work, f"speedrun124m-{int(time.time())}", target
    t0 = time.perf_counter()
    result = train_run(cfg)
    wall = time.perf_counter() - t0
    if result.error:
        raise RuntimeError(f"spotlm training failed: {result.error}")
    progress = storage.read_json(storage.join(cfg.run_dir, "progress.json"))
    curve = sorted((int(s), round(t, 3), v) for s, (t, v) in progress["val_curve"].items())
    hit = next(((s, t, v) for s, t, v in curve if v <= target), None)
    return {"steps": progress["step"], "tokens": progress["step"] * batch_tokens,
            "train_time_s": round(progress["train_time_s"], 3),
            "compile_s (first step)": round(progress.get("first_step_s", 0.0), 2),
            "job_wall_s (Ray start, compile, eval, checkpoint included)": round(wall, 1),
            "time_to_target_s": hit[1] if hit else None, "step_at_target": hit[0] if hit else None,
            "best_val_loss": round(min(v for _, _, v in curve), 4), "curve": curve,
            "config": {k: v for k, v in to_dict(cfg).items() if k not in ("data", "storage", "name")}}


def train_run(cfg: TrainConfig):
    """`app.train.run.train` (imported here: it pulls in Ray Train)."""
    from app.train.run import train

    return train(cfg)


def corpus_summary(corpus: dict, m: Manifest, data: str) -> dict[str, Any]:
    """What the JSON says of the corpus: how it was found, files and tokens per split, where the list is."""
    return {**corpus, "tokenizer_vocab": m.vocab_size, "val_tokens_total": m.num_tokens("val"),
            "file_list": os.path.join(data, "files.jsonl")}


def plot(results: dict[str, dict], target: float, path: str) -> None:
    curves = {name: {t: v for _, t, v in r["curve"]} for name, r in results.items() if r.get("curve")}
    draw_curves(curves, path, "GPT-2 124M on Python sources: time to the baseline's loss",
                xlabel="training seconds (compilation and evaluation excluded)", target=target)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="", help="directory for the corpus, runs, JSON and PNG (default: a temp dir)")
    p.add_argument("--phase", choices=("all", "corpus", "baseline", "spotlm"), default="all",
                   help="corpus: only build it; baseline: and train the baseline (its target kept in <out>); "
                        "spotlm: train spotlm to the kept target")
    p.add_argument("--roots", default="", help="directories of .py files, comma-separated (default: stdlib, site-packages)")
    p.add_argument("--tokenizer", default="", help="tokenizer.json (default: GPT-2's; the smoke run trains a small BPE)")
    p.add_argument("--val_fraction", type=float, default=0.01, help="share of files held out for validation")
    p.add_argument("--budget_tokens", type=int, default=2**27, help="the baseline's training tokens")
    p.add_argument("--spotlm_fraction", type=float, default=0.6,
                   help="spotlm's schedule length as a share of the baseline's steps (it stops at the target)")
    p.add_argument("--eval_every", type=int, default=32, help="steps between validation passes")
    p.add_argument("--eval_tokens", type=int, default=2**20, help="validation tokens per pass, the same for both")
    p.add_argument("--lr", type=float, default=6e-4, help="the baseline's peak learning rate")
    p.add_argument("--target", type=float, default=0.0, help="skip the baseline: train spotlm to this loss")
    p.add_argument("--smoke", action="store_true", help="CPU: a tiny model on the stdlib's email package")
    args, overrides = p.parse_known_args(argv)  # the rest: spotlm TrainConfig overrides, e.g. --optim.muon_lr=0.03
    out = args.out or tempfile.mkdtemp(prefix="speedrun124m-")
    os.makedirs(out, exist_ok=True)
    shape = SMOKE if args.smoke else FULL
    if args.smoke:
        torch.set_num_threads(1)  # as Ray's workers run: on a busy small machine more threads only wait
        roots = args.roots.split(",") if args.roots else smoke_roots()
        args.budget_tokens, args.eval_every, args.eval_tokens = 12 * 512, 4, 2048
        args.val_fraction = max(args.val_fraction, 0.2)
        overrides = [*FAST, *SMOKE_SPOTLM, *overrides]
    else:
        roots = args.roots.split(",") if args.roots else []
        overrides = [*FAST, *overrides]
    steps = max(1, args.budget_tokens // (shape["micro_batch"] * shape["accum"] * shape["seq_len"]))
    init_ray()
    tokenizer = args.tokenizer or (None if args.smoke else str(GPT2_TOKENIZER))
    m, corpus = build_corpus(out, roots, tokenizer, args.val_fraction)
    if args.phase == "corpus":
        report = {"corpus": corpus_summary(corpus, m, m.root), "train_tokens": m.num_tokens("train")}
        print(json.dumps(report, indent=1))
        return report
    results: dict[str, dict] = {}
    kept = os.path.join(out, "baseline.json")
    if args.target:
        target = args.target
    elif args.phase == "spotlm":
        results["nanoGPT baseline"] = storage.read_json(kept)
        target = results["nanoGPT baseline"]["final_val_loss"]
    else:
        results["nanoGPT baseline"] = run_baseline(m, shape, steps, args.eval_every, args.eval_tokens, args.lr)
        storage.write_json(kept, results["nanoGPT baseline"])
        target = results["nanoGPT baseline"]["final_val_loss"]
    if args.phase != "baseline":
        spot_steps = max(1, round(steps * args.spotlm_fraction))
        results["spotlm"] = run_spotlm(m.root, os.path.join(out, "runs"), shape, spot_steps, args.eval_every,
                                       args.eval_tokens, target, overrides)
    base_s = results.get("nanoGPT baseline", {}).get("train_time_s")
    tokens_per_step = shape["micro_batch"] * shape["accum"] * shape["seq_len"]
    spot_s = results.get("spotlm", {}).get("time_to_target_s")
    report = {"summary": {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                          "target_val_loss": target, "baseline_time_s": base_s, "spotlm_time_to_target_s": spot_s,
                          "ratio (spotlm / baseline time)": round(spot_s / base_s, 3) if spot_s and base_s else None,
                          "eval_tokens": args.eval_tokens, "tokens_per_step": tokens_per_step},
              "corpus": corpus_summary(corpus, m, m.root), **results}
    plot(results, target, os.path.join(out, "speedrun_124m.png"))
    storage.write_json(os.path.join(out, "speedrun_124m.json"), report)
    print(json.dumps(report, indent=1, default=str))
    return report


if __name__ == "__main__":
    main()
