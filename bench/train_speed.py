"""Benchmark: spotlm's training step against a tuned nanoGPT-style GPT-2 step, side by side in one run.

The baseline is written here: GPT-2 (LayerNorm, GELU MLP, learned positions, biases, tied embeddings,
SDPA flash attention), fused AdamW, `torch.compile`, bf16 autocast. spotlm's side is the trainer's
own step (`build_model`, `compiled`, `make_optimizer`, `step_function`: what
`jobs/train.py` runs) at the same parameter count, sequence length and tokens per step, once per
variant (`VARIANTS`: TrainConfig overrides, the `perf` section and model options; the rows the README's results
table reports). Each measurement runs in a fresh child
process (same data, same GPU), so compile caches and allocator state never leak between them. With
`--jobs N` up to N children run at once and take turns on a file lock (`Turns`): setup, the gradient
check and the first (compiling) step hold it shared, so children compile side by side; the rest of the
warmup, the timed steps and the profile hold it exclusively, so no other child's compilation (which
takes every CPU) or GPU work overlaps them (timed steps beside another child's compilation read slower).
Prints JSON: tokens/s, MFU (6N + attention FLOPs per token), peak memory, and each variant's
ratio to the baseline. Before timing, at the initial weights, every row checks its compiled gradients against
the eager model's on one micro-batch (`grad_check`); a row whose gradients disagree gets an "error" and no
ratio. (Not after timing: the timed steps train on random tokens, and at 350M the deepest layers' k_proj
gradients then get so small that the compiled and eager rounding orders alone put them far apart, while at the
initial weights both agree with an fp32 reference.)
The compiled forward's compilation then happens in the check, outside `compile_and_warmup_s`.
`--profile_dir` also writes a torch.profiler table of one step per row.

    python -m bench.train_speed                                   # GPU: gpt2-124m and gpt2-350m, both rows
    python -m bench.train_speed --presets=tiny --steps=2 --seq_len=64 --micro_batch=2 --accum=1  # CPU smoke run
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import fcntl
import gc
import os
import json
import math
import statistics
import subprocess
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from app.config import from_dict
from app.data.loader import Batch
from app.model.gpt import ModelConfig
from app.train.config import TrainConfig
from app.train.loop import PEAK_FLOPS, synced_seconds
from app.train.optim import CosineSchedule, make_optimizer
from app.train.step import build_model, compiled, forward_backward, step_function
from bench.report import emit

# ------------------------------------------------------------------ the baseline (nanoGPT / llm.c style)


class BaselineBlock(nn.Module):
    def __init__(self, d: int, n_head: int, dropout: float, bias: bool):
        super().__init__()
        self.n_head, self.dropout = n_head, dropout
        self.ln_1, self.ln_2 = nn.LayerNorm(d, bias=bias), nn.LayerNorm(d, bias=bias)
        self.c_attn, self.c_proj = nn.Linear(d, 3 * d, bias=bias), nn.Linear(d, d, bias=bias)
        self.c_fc, self.mlp_proj = nn.Linear(d, 4 * d, bias=bias), nn.Linear(4 * d, d, bias=bias)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        x = x + self.drop(self.c_proj(y.transpose(1, 2).reshape(B, T, C)))
        return x + self.drop(self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh")))


class BaselineGPT(nn.Module):
    """GPT-2 as nanoGPT / llm.c's train_gpt2.py write it (vocab padded to 50304, tied embeddings)."""

    def __init__(self, vocab: int, n_layer: int, n_head: int, d: int, seq_len: int, dropout: float = 0.0,
                 bias: bool = True):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(seq_len, d)
        self.drop = nn.Dropout(dropout)
        self.h = nn.ModuleList(BaselineBlock(d, n_head, dropout, bias) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d, bias=bias)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.wte.weight
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                std = 0.02 / math.sqrt(2 * n_layer) if name.endswith(("c_proj.weight", "mlp_proj.weight")) else 0.02
                nn.init.normal_(p, 0.0, std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor, lmatch=None) -> tuple[None, torch.Tensor]:
        x = self.drop(self.wte(idx) + self.wpe(torch.arange(idx.size(1), device=idx.device)))
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return None, F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-1)

    def flops_per_token(self, seq_len: int) -> float:
        matmul = sum(p.numel() for n, p in self.named_parameters() if p.dim() >= 2 and not n.startswith("wpe"))
        return 6.0 * matmul + 12.0 * len(self.h) * self.wte.weight.shape[1] * seq_len


def baseline_optimizer(model: nn.Module, lr: float, device: torch.device) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.95), fused=device.type == "cuda")


# ------------------------------------------------------------------ measurement


def _batches(vocab: int, micro: int, seq_len: int, accum: int, seed: int) -> list[Batch]:
    g = torch.Generator().manual_seed(seed)
    data = torch.randint(0, vocab, (accum * micro, seq_len + 1), generator=g)
    return [Batch(data[i:i + micro, :-1].pin_memory() if torch.cuda.is_available() else data[i:i + micro, :-1],
                  data[i:i + micro, 1:].clone()) for i in range(0, accum * micro, micro)]


def _peak_flops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


class Turns:
    """The children of one run share a lock file: a child holds it shared from its setup through its first
    (compiling) step and exclusively for its timed steps, so timed steps never run beside another child's
    compilation or GPU work. No path: no lock (a single process)."""

    def __init__(self, path: str):
        self.file = open(path, "a") if path else None

    def take(self, op: int) -> None:
        """flock `op` (LOCK_SH, LOCK_EX, LOCK_UN); converting a held lock may release it first."""
        if self.file:
            fcntl.flock(self.file, op)


def _time_steps(step, device: torch.device, args) -> tuple[float, float, list[float]]:
    """(compile + warmup seconds, median step seconds, losses) of `step()` run warmup + steps times; the
    first step (compilation) under the shared turn, the rest and the optional profile under the exclusive one
    (`args.turns`). Peak memory spans all of it: a CUDA graph's pool is allocated while capturing, in the
    first step."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    step()
    first = synced_seconds(t0, device)
    args.turns.take(fcntl.LOCK_EX)
    t0 = time.perf_counter()
    for _ in range(args.warmup - 1):
        step()
    warm = first + synced_seconds(t0, device)  # without the wait for the turn
    times, losses = [], []
    for _ in range(args.steps):
        t = time.perf_counter()
        loss = step()
        times.append(synced_seconds(t, device))
        losses.append(float(loss))
    if args.profile_dir:
        _profile(step, device, args)
    args.turns.take(fcntl.LOCK_UN)
    return warm, statistics.median(times), losses


KERNEL_KINDS = (("matmul", ("gemm", "xmma", "cutlass", "nvjet", "cublas", "_mm_")), ("attention", ("flash", "fmha", "cudnn", "attention")),
                ("optimizer", ("multi_tensor", "adam", "foreach")), ("triton", ("triton",)))


def _kind(name: str) -> str:
    low = name.lower()
    return next((kind for kind, keys in KERNEL_KINDS if any(k in low for k in keys)), "other")


def _profile(step, device: torch.device, args) -> None:
    """One profiled step: `<profile_dir>/<preset>.<variant>.txt` (top kernels) and `.json` (GPU ms by kind)."""
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    os.makedirs(args.profile_dir, exist_ok=True)  # also for a single `--one` row
    stem = os.path.join(args.profile_dir, f"{args.presets}.{args.one}")
    sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    with open(stem + ".txt", "w") as f:
        f.write(prof.key_averages().table(sort_by=sort, row_limit=45, max_name_column_width=110))
    kernels = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    by_kind: dict[str, float] = {}
    for e in kernels:
        by_kind[_kind(e.key)] = by_kind.get(_kind(e.key), 0.0) + e.self_device_time_total / 1e3
    top = sorted(kernels, key=lambda e: -e.self_device_time_total)[:60]
    # The span from the first kernel's start to the last one's end, against the kernels' summed time: the
    # difference is the GPU idle between kernels (launch gaps, host waits) within the step.
    spans = [e.time_range for e in prof.events() if e.device_type.name == "CUDA"]
    span_ms = (max(r.end for r in spans) - min(r.start for r in spans)) / 1e3 if spans else 0.0
    with open(stem + ".json", "w") as f:
        json.dump({"gpu_ms_by_kind": {k: round(v, 2) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
                   "gpu_busy_ms": round(sum(by_kind.values()), 2), "gpu_span_ms": round(span_ms, 2),
                   "kernel_launches": sum(e.count for e in kernels),
                   "top_kernels": [{"name": e.key[:160], "ms": round(e.self_device_time_total / 1e3, 3),
                                    "calls": e.count, "kind": _kind(e.key)} for e in top]}, f, indent=1)


# bf16 rounding keeps honest rows above 0.999; a lost gradient is 0. With FP8 blocks (e4m3: ~2^-4 per element)
# compiled and eager round differently enough to read below 0.99 apart on the smallest gradients (a q_proj at
# 124M, bf16 weights), so their floor is lower, still far above a dropped or garbled gradient.
GRAD_CHECK_MIN_COS = 0.99
GRAD_CHECK_MIN_COS_FP8 = 0.95


def grad_check(fwd, model: nn.Module, batch: Batch, device: torch.device, autocast) -> dict:
    """The lowest per-parameter cosine similarity between the gradients of `batch` through `fwd` (the row's
    compiled model) and through the eager `model`, and its parameter. A compiler bug that drops gradients
    makes a step look fast (a first FP8 version measured 1.5x with a backward that returned zeros), so
    every row is checked; parameters whose eager gradient is zero (by design) are skipped."""
    def gradients(f) -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        forward_backward(f, [batch], device, autocast)
        out = {n: p.grad.detach().float().flatten() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        return out

    got, want = gradients(fwd), gradients(model)
    worst = (1.0, "")
    for name, w in want.items():
        w, g = w.double(), got.get(name, torch.zeros_like(w)).double()
        if w.norm() > 0:  # zero by design (a window-1 layer's q/k) in both
            worst = min(worst, (float(torch.dot(g, w) / (g.norm() * w.norm()).clamp(min=1e-300)), name))
    return {"min_cos": round(worst[0], 5), "param": worst[1]}


def _checked(row: dict, check: dict, fp8_blocks: bool = False) -> dict:
    """`row` with its gradient check; an "error" when the compiled gradients disagree with eager."""
    row["grad_check"] = check
    floor = GRAD_CHECK_MIN_COS_FP8 if fp8_blocks else GRAD_CHECK_MIN_COS
    if check["min_cos"] < floor:
        row["error"] = (f"compiled gradients disagree with eager: {check['param']} cosine {check['min_cos']} "
                        f"< {floor}; the timing is not a training step's")
    return row


def _result(name: str, tokens_per_step: int, warm: float, dt: float, losses: list[float], fpt: float,
            n_params: int, device: torch.device) -> dict:
    tps = tokens_per_step / dt
    peak = _peak_flops()
    return {"name": name, "params_M": round(n_params / 1e6, 2), "tokens_per_s": round(tps),
            "step_ms": round(dt * 1e3, 2), "mfu": round(fpt * tps / peak, 4) if peak else None,
            "peak_mem_GiB": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None,
            "compile_and_warmup_s": round(warm, 1), "loss_first": round(losses[0], 4), "loss_last": round(losses[-1], 4)}


def _reset() -> None:
    torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def baseline_step(fwd, model: nn.Module, opt: torch.optim.Optimizer, batches: list[Batch], device: torch.device,
                  autocast) -> torch.Tensor:
    """One nanoGPT-style optimizer step over `batches` (accumulated, clipped at 1.0); the last micro-batch's loss."""
    for b in batches:
        with autocast():
            _, loss = fwd(b.inputs.to(device, non_blocking=True), b.targets.to(device, non_blocking=True))
        (loss / len(batches)).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


def run_baseline(mcfg: ModelConfig, batches: list[Batch], args, device: torch.device, autocast) -> dict:
    torch.manual_seed(0)
    model = BaselineGPT(mcfg.padded_vocab_size, mcfg.n_layer, mcfg.n_head, mcfg.d_model, args.seq_len).to(device)
    opt = baseline_optimizer(model, args.lr, device)
    fwd = torch.compile(model) if device.type == "cuda" or args.compile_cpu else model

    def step():
        return baseline_step(fwd, model, opt, batches, device, autocast)

    check = grad_check(fwd, model, batches[0], device, autocast)
    warm, dt, losses = _time_steps(step, device, args)
    n = sum(p.numel() for p in model.parameters())
    out = _result("baseline", args.tokens_per_step, warm, dt, losses, model.flops_per_token(args.seq_len), n, device)
    out = _checked(out, check)
    del model, opt, fwd
    _reset()
    return out


def run_spotlm(preset: str, variant: dict, batches: list[Batch], args, device: torch.device, autocast) -> dict:
    perf = {"compile": "true" if device.type == "cuda" or args.compile_cpu else "false",
            "cuda_graph": "false", **variant.get("perf", {})}  # rows graph the step only where they say so
    cfg = from_dict(TrainConfig, {"preset": preset, "optim": {"lr": args.lr}, "seq_len": args.seq_len,
                                  "micro_batch": args.micro_batch, **variant, "perf": perf})
    mcfg = ModelConfig.preset(preset, max_seq_len=max(args.seq_len, ModelConfig.preset(preset).max_seq_len),
                              **cfg.model)
    model = build_model(cfg, mcfg, device)
    opt = make_optimizer(model, cfg, device)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, CosineSchedule(0, 10**6, 1.0))
    fwd = compiled(model, cfg, device)
    train_step = step_function(cfg, fwd, model, model, opt, device, autocast, world=1)

    def step():
        loss, _ = train_step(batches)
        sched.step()
        return loss  # read before the next step overwrites it (a CUDA graph's output)

    check = grad_check(fwd, model, batches[0], device, autocast)
    warm, dt, losses = _time_steps(step, device, args)
    name = "spotlm " + args.one
    out = _result(name, args.tokens_per_step, warm, dt, losses, model.flops_per_token(args.seq_len),
                  model.num_params(), device)
    out = _checked(out, check, fp8_blocks=cfg.perf.fp8 == "all")
    del model, opt, fwd
    _reset()
    return out


# TScale's attention-window mix (layers cycle window 1 / 64 / full) with a ReLU² MLP (the baseline's own MLP shape)
FAST_MODEL = {"attn_windows": [1, 64, 0], "mlp": "relu2"}
VARIANTS = {  # TrainConfig overrides: `perf` (app/fast/config.py), `model` (ModelConfig overrides)
    # FP8 blocks and head, the whole step as one CUDA graph, the fused loss, one-pass wide-row casts, the window kernel
    "windows_graph_fp8_relu2_rows_window": {"perf": {"kernels": "loss,rows,window", "fp8": "all", "cuda_graph": "true"},
                                            "model": FAST_MODEL},
    # ... and the FP8 ReLU² feed-forward as one function with Triton row kernels: kernels=auto under fp8=all
    "windows_graph_fp8_relu2_rows_window_mlp": {"perf": {"kernels": "loss,rows,window,mlp", "fp8": "all",
                                                         "cuda_graph": "true"}, "model": FAST_MODEL},
}


def _child(preset: str, variant: str, argv: list[str]) -> dict:
    """One measurement in a fresh interpreter; its last stdout line is the result row."""
    cmd = [sys.executable, "-m", "bench.train_speed", *argv, f"--presets={preset}", f"--one={variant}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not proc.stdout.strip():
        return {"name": variant, "error": (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _merge_profiles(profile_dir: str, preset: str, variants: list[str]) -> None:
    """The rows' profiles of `preset` as one `<preset>.profile.json` and one `<preset>.profile.txt`."""
    merged, tables = {}, []
    for v in variants:
        stem = os.path.join(profile_dir, f"{preset}.{v}")
        if not os.path.exists(stem + ".json"):
            continue
        with open(stem + ".json") as f:
            merged[v] = json.load(f)
        with open(stem + ".txt") as f:
            tables.append(f"===== {preset} {v}\n{f.read()}")
        os.remove(stem + ".json")
        os.remove(stem + ".txt")
    with open(os.path.join(profile_dir, f"{preset}.profile.json"), "w") as f:
        json.dump(merged, f, indent=1)
    with open(os.path.join(profile_dir, f"{preset}.profile.txt"), "w") as f:
        f.write("\n".join(tables))


def _rows(preset: str, variants: list[str], argv: list[str], jobs: int) -> list[dict]:
    """The rows of `variants` in order, measured by up to `jobs` children at once."""
    with concurrent.futures.ThreadPoolExecutor(max(1, jobs)) as pool:
        return list(pool.map(lambda v: _child(preset, v, argv), variants))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--presets", default="gpt2-124m,gpt2-350m")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"of {', '.join(VARIANTS)}")
    p.add_argument("--seq_len", type=int, default=1024)
    p.add_argument("--micro_batch", type=int, default=16)
    p.add_argument("--accum", type=int, default=4, help="micro-batches per step (tokens/step = micro x seq x accum)")
    p.add_argument("--steps", type=int, default=10, help="timed steps (the median is reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation)")
    p.add_argument("--lr", type=float, default=6e-4)
    p.add_argument("--compile_cpu", action="store_true", help="compile on CPU too (slow; default off there)")
    p.add_argument("--jobs", default="1", help="children compiling at once, one number or one per preset (timed steps still run alone)")
    p.add_argument("--profile_dir", default="", help="write one profiled step per row here")
    p.add_argument("--out", default="", help="also write the JSON report to this file")
    p.add_argument("--lock", default="", help=argparse.SUPPRESS)  # internal: the timing lock file
    p.add_argument("--one", default="", help=argparse.SUPPRESS)  # internal: measure one row in this process
    args = p.parse_args()
    args.tokens_per_step = args.micro_batch * args.seq_len * args.accum
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else contextlib.nullcontext
    report = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "seq_len": args.seq_len, "tokens_per_step": args.tokens_per_step,
              "micro_batch": args.micro_batch, "accum": args.accum, "jobs": args.jobs, "results": {}}
    args.turns = Turns(args.lock)
    if args.one:
        args.turns.take(fcntl.LOCK_SH)
        mcfg = ModelConfig.preset(args.presets)
        batches = _batches(mcfg.vocab_size, args.micro_batch, args.seq_len, args.accum, seed=0)
        row = run_baseline(mcfg, batches, args, device, autocast) if args.one == "baseline" else \
            run_spotlm(args.presets, VARIANTS[args.one], batches, args, device, autocast)
        print(json.dumps(row))
        return
    if args.profile_dir:
        os.makedirs(args.profile_dir, exist_ok=True)
    lock = os.path.join(args.profile_dir or ".", f".train_speed.{os.getpid()}.lock")
    passthrough = [f"--seq_len={args.seq_len}", f"--micro_batch={args.micro_batch}", f"--accum={args.accum}",
                   f"--steps={args.steps}", f"--warmup={args.warmup}", f"--lr={args.lr}", f"--lock={lock}",
                   f"--profile_dir={args.profile_dir}"] + (["--compile_cpu"] if args.compile_cpu else [])
    presets = args.presets.split(",")
    jobs = [int(j) for j in args.jobs.split(",")]
    for i, preset in enumerate(presets):
        variants = ["baseline", *args.variants.split(",")]
        rows = _rows(preset, variants, passthrough, jobs[min(i, len(jobs) - 1)])
        if args.profile_dir:
            _merge_profiles(args.profile_dir, preset, variants)
        if "tokens_per_s" not in rows[0] or "error" in rows[0]:
            report["results"][preset] = rows
            continue
        base = rows[0]["tokens_per_s"]
        for r in rows[1:]:
            if "tokens_per_s" in r and "error" not in r:
                r["speedup_vs_baseline"] = round(r["tokens_per_s"] / base, 3)
                if r["peak_mem_GiB"] is not None:
                    r["mem_ratio_vs_baseline"] = round(r["peak_mem_GiB"] / rows[0]["peak_mem_GiB"], 3)
        report["results"][preset] = rows
        print(json.dumps({preset: rows}), flush=True)
    if os.path.exists(lock):
        os.remove(lock)
    emit(report, args.out)


if __name__ == "__main__":
    main()
