"""Benchmark: the longest sequence (batch 1) each memory option set trains on one GPU, printed as JSON.

For each preset and option set: probes sequence lengths in fresh subprocesses (an OOM cannot poison the next
probe): doubling from --min_seq up to --max_seq inside one process until the first OOM, then bisecting
(multiples of --granularity) between the longest success and the first failure, one fresh process per probe.
A probe is one full training step (forward, backward, clip, optimizer step) on random tokens, bf16 autocast,
fused loss on CUDA; it reports torch.cuda.max_memory_allocated, the planner's prediction
(app.train.memory_plan.estimate) and tokens/s of that step. Plus the fused linear+CE against F.cross_entropy on
full logits (peak memory above the inputs and time), side by side.

    python -m bench.memory                                   # GPU: gpt2-1.5b and llama3-8b (minutes)
    python -m bench.memory --presets gpt2-1.5b --options none,full --max_seq 65536
    python -m bench.memory --quick                           # CPU: tiny shapes, the same machinery
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

OPTION_SETS = {
    "none": {},
    "selective": {"checkpointing": "selective"},
    "full": {"checkpointing": "full"},
    "full_offload": {"checkpointing": "full", "offload_activations": True},
    "full_opt": {"checkpointing": "full", "offload_optimizer": True, "optimizer_state_dtype": "bf16"},
    # the llama3-8b at 128K recipe: layer inputs and optimizer on the CPU, MLP in token tiles
    "full_offload_opt": {"checkpointing": "full", "mlp_chunk": 16384, "offload_activations": True,
                         "offload_optimizer": True, "optimizer_state_dtype": "bf16"},
    "full_offload_opt_overlap": {"checkpointing": "full", "mlp_chunk": 16384, "offload_activations": True,
                                 "offload_optimizer": True, "optimizer_state_dtype": "bf16",
                                 "optimizer_mode": "overlap"},
}
DEFAULT_OPTIONS = {"gpt2-1.5b": "none,selective,full,full_offload", "llama3-8b": "full_offload_opt"}
# Where the doubling starts (the longest lengths are what matters; short probes only cost time).
DEFAULT_MIN_SEQ = {"gpt2-1.5b": 8192, "llama3-8b": 131072}  # 8B: straight to the target (bisects down on failure)


# --------------------------------------------------------------------------------------------------------
# one probe process
# --------------------------------------------------------------------------------------------------------
def _probe(spec: dict) -> None:
    """Run ascending sequence lengths in this process; one JSON line each; stop at the first OOM."""
    import torch

    from app.fast.accelerate import accelerate
    from app.fast.config import PerfConfig
    from app.model.gpt import GPT, ModelConfig
    from app.train.memory_plan import MemoryConfig, estimate
    from app.train.parallel import make_offload_optimizer, parallelize

    dev = torch.device(spec["device"])
    cuda = dev.type == "cuda"
    mem = MemoryConfig(**OPTION_SETS[spec["option"]])
    seqs = spec["seqs"]
    cfg = ModelConfig.preset(spec["preset"], max_seq_len=max(seqs), **spec.get("overrides", {}))
    t0 = time.perf_counter()
    with torch.device("meta"):
        model = GPT(cfg)
    model.to_empty(device=dev)
    torch.manual_seed(0)
    model.init_weights()
    accelerate(model, PerfConfig(kernels="loss" if cuda else "none"))  # the fused loss: no [T, vocab] logits
    decay = [p for p in model.parameters() if p.dim() >= 2]
    groups = [{"params": decay, "weight_decay": 0.1},
              {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0}]
    parallelize(model, mem, device=dev)
    if mem.offload_optimizer:
        opt = make_offload_optimizer(model, groups, mem, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    else:
        opt = torch.optim.AdamW(groups, lr=1e-4, betas=(0.9, 0.95), fused=cuda)
    setup_s = time.perf_counter() - t0
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cuda)
    for i, T in enumerate(seqs):
        out = {"preset": spec["preset"], "option": spec["option"], "seq_len": T, "setup_s": round(setup_s, 1),
               "warm": i > 0, "predicted_peak_gb": round(estimate(cfg, T, 1, mem, fused_loss=cuda).peak / 1e9, 2)}
        try:
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            x = torch.randint(0, cfg.vocab_size, (1, T), device=dev)
            y = torch.randint(0, cfg.vocab_size, (1, T), device=dev)
            t = time.perf_counter()
            with autocast:
                _, loss = model(x, y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if hasattr(opt, "synchronize"):
                opt.synchronize()
            if cuda:
                torch.cuda.synchronize()
            dt = time.perf_counter() - t
            out.update(ok=True, loss=round(loss.item(), 4), step_s=round(dt, 3), tokens_per_s=round(T / dt, 1))
            if cuda:
                out["peak_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
                out["reserved_gb"] = round(torch.cuda.max_memory_reserved() / 1e9, 2)
            off = getattr(model, "spotlm_offloader", None)
            if off is not None:
                out["offloaded_gb"] = round(off.packed_bytes / 1e9, 3)
            del x, y, loss
            if cuda and hasattr(torch.accelerator, "empty_host_cache"):
                torch.accelerator.empty_host_cache()  # pinned copies of this length: not reusable by the next
        except (torch.OutOfMemoryError, RuntimeError) as e:  # cuBLAS / cuDNN report OOM as RuntimeError
            if not isinstance(e, torch.OutOfMemoryError) and "out of memory" not in str(e).lower():
                raise
            out.update(ok=False, oom=True, error=str(e).split("\n")[0][:200])
            print(json.dumps(out), flush=True)
            return
        print(json.dumps(out), flush=True)


def _fused_loss(spec: dict) -> None:
    """Fused linear+CE vs F.cross_entropy on full logits: peak above the inputs and fwd+bwd time."""
    import torch
    import torch.nn.functional as F

    from app.fast.kernels import fused_linear_cross_entropy

    dev = torch.device(spec["device"])
    cuda = dev.type == "cuda"
    N, D, V = spec["tokens"], spec["dim"], spec["vocab"]
    dt = torch.bfloat16 if cuda else torch.float32
    torch.manual_seed(0)
    h = (torch.randn(N, D, device=dev, dtype=dt) * 0.1).requires_grad_()
    w = (torch.randn(V, D, device=dev, dtype=dt) * 0.02).requires_grad_()
    y = torch.randint(0, V, (N,), device=dev)

    def plain():
        return F.cross_entropy((h @ w.T).float(), y)

    def fused():
        return fused_linear_cross_entropy(h, w, y)

    res = {"tokens": N, "dim": D, "vocab": V}
    for name, fn in (("fused", fused), ("plain", plain)):
        try:
            for rep in range(3):
                h.grad = w.grad = None
                if cuda:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    base = torch.cuda.memory_allocated()
                t = time.perf_counter()
                fn().backward()
                if cuda:
                    torch.cuda.synchronize()
                el = time.perf_counter() - t
            res[name] = {"ms": round(el * 1e3, 1)}
            if cuda:
                res[name]["peak_above_inputs_gb"] = round((torch.cuda.max_memory_allocated() - base) / 1e9, 2)
        except torch.OutOfMemoryError:
            res[name] = {"oom": True}
        h.grad = w.grad = None
    if "ms" in res.get("plain", {}) and "ms" in res.get("fused", {}):
        res["time_ratio_fused_over_plain"] = round(res["fused"]["ms"] / res["plain"]["ms"], 3)
        if cuda:
            res["memory_ratio_fused_over_plain"] = round(res["fused"]["peak_above_inputs_gb"]
                                                         / max(res["plain"]["peak_above_inputs_gb"], 1e-9), 3)
    print(json.dumps(res), flush=True)


# --------------------------------------------------------------------------------------------------------
# the driver
# --------------------------------------------------------------------------------------------------------
def _run(kind: str, spec: dict, timeout: float) -> list[dict]:
    env = {**os.environ, "PYTORCH_CUDA_ALLOC_CONF": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")}
    try:
        p = subprocess.run([sys.executable, "-m", "bench.memory", f"--_{kind}", json.dumps(spec)], env=env,
                           capture_output=True, text=True, timeout=max(timeout, 1))
        stdout, err = p.stdout, (p.stderr[-600:] if p.returncode else "")
    except subprocess.TimeoutExpired as e:
        stdout = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        err = "timeout"
    rows = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    if err and kind == "probe":
        done = {r["seq_len"] for r in rows}
        rows += [{"seq_len": s, "ok": False, "error": err.strip().splitlines()[-1] if err.strip() else err}
                 for s in spec["seqs"] if s not in done][:1]
    return rows


def search(preset: str, option: str, a, deadline: float) -> dict:
    """Longest length that trains: doubling in one process, then bisection in fresh processes."""
    base = {"preset": preset, "option": option, "device": a.device, "overrides": a.overrides}
    lo_seq = a.min_seq or DEFAULT_MIN_SEQ.get(preset, 1024)
    seqs = []
    s = lo_seq
    while s <= a.max_seq:
        seqs.append(s)
        s *= 2
    if seqs and seqs[-1] != a.max_seq and a.max_seq > lo_seq:
        seqs.append(a.max_seq)
    probes = _run("probe", {**base, "seqs": seqs}, deadline - time.time())
    ok = [r for r in probes if r.get("ok")]
    bad = [r for r in probes if not r.get("ok")]
    lo = max((r["seq_len"] for r in ok), default=0)
    hi = min((r["seq_len"] for r in bad), default=None)
    for _ in range(a.bisect_steps):
        if hi is None or time.time() > deadline:
            break
        mid = (lo + hi) // 2 // a.granularity * a.granularity
        if mid <= lo or mid >= hi:
            break
        r = _run("probe", {**base, "seqs": [mid]}, deadline - time.time())
        probes += r
        if r and r[0].get("ok"):
            lo = mid
        else:
            hi = mid
    best = next((r for r in probes if r.get("ok") and r["seq_len"] == lo), None)
    return {"preset": preset, "option": option, "memory": OPTION_SETS[option], "max_seq_len": lo,
            "first_failure": hi, "reached_max_seq": hi is None and lo == a.max_seq,
            "peak_gb": best and best.get("peak_gb"), "predicted_peak_gb": best and best.get("predicted_peak_gb"),
            "tokens_per_s": best and best.get("tokens_per_s"), "step_s": best and best.get("step_s"),
            "probes": probes}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--presets", default="gpt2-1.5b,llama3-8b")
    ap.add_argument("--options", default="", help=f"comma list of {','.join(OPTION_SETS)} (default: per preset)")
    ap.add_argument("--min_seq", type=int, default=0, help="first length of the doubling (default: per preset)")
    ap.add_argument("--max_seq", type=int, default=131072)
    ap.add_argument("--granularity", type=int, default=4096, help="bisection step")
    ap.add_argument("--bisect_steps", type=int, default=2)
    ap.add_argument("--vocab_size", type=int, default=0, help="override the presets' vocabulary (0 = theirs)")
    ap.add_argument("--budget_s", type=float, default=480, help="stop starting probes after this many seconds")
    ap.add_argument("--no_loss_bench", action="store_true")
    ap.add_argument("--quick", action="store_true", help="CPU, tiny shapes: checks the machinery")
    ap.add_argument("--_probe", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_loss", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a._probe:
        _probe(json.loads(a._probe))
        return 0
    if a._loss:
        _fused_loss(json.loads(a._loss))
        return 0
    import torch

    a.device = "cuda" if torch.cuda.is_available() and not a.quick else "cpu"
    a.overrides = {"vocab_size": a.vocab_size} if a.vocab_size else {}
    loss_case = {"tokens": 32768, "dim": 4096, "vocab": 128256}
    if a.quick:
        a.presets = "tiny"
        a.options = a.options or ",".join(k for k in OPTION_SETS if k != "full_offload_opt_overlap")
        a.min_seq, a.max_seq, a.granularity = a.min_seq or 256, min(a.max_seq, 1024), 128
        a.overrides = {"n_layer": 4, "d_model": 128, "n_head": 4, "vocab_size": 2048}
        loss_case = {"tokens": 1024, "dim": 128, "vocab": 4096}
    deadline = time.time() + a.budget_s
    out = {"device": torch.cuda.get_device_name() if a.device == "cuda" else "cpu",
           "allocator": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True"), "results": []}
    for preset in a.presets.split(","):
        for option in (a.options or DEFAULT_OPTIONS.get(preset, "none,full")).split(","):
            if time.time() > deadline:
                out["results"].append({"preset": preset, "option": option, "skipped": "budget"})
                continue
            r = search(preset, option, a, deadline)
            print(json.dumps({k: v for k, v in r.items() if k != "probes"}), file=sys.stderr, flush=True)
            out["results"].append(r)
    if not a.no_loss_bench:
        rows = _run("loss", {**loss_case, "device": a.device}, 300)
        out["fused_loss_vs_plain"] = rows[0] if rows else {"error": "no result"}
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
