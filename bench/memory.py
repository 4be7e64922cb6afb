"""Benchmark: the longest sequence (batch 1) each memory option set trains on one GPU, printed as JSON.

For each preset and option set: probes sequence lengths in fresh subprocesses (an OOM cannot poison the next
probe): doubling from --min_seq up to --max_seq inside one process until the first failure, then bisecting
(multiples of --granularity) between the longest success and the first failure, one fresh process per probe.
A probe is one full training step (forward, backward, clip, optimizer step; --steps on one batch) on random
tokens, bf16 autocast, fused loss on CUDA, attention restricted to SDPA's non-quadratic backends. Every probe is
a row: the planner's predicted GPU and host peaks (app.train.memory_plan.estimate) beside the measured ones
(torch.cuda.max_memory_allocated; the child's VmHWM + the pinned host allocator's peak), tokens/s, the time by
phase (forward, backward, optimizer; recompute ~ one forward under full checkpointing), one layer's attention
time and backend, the offloaded bytes and what moving them would cost in series (pinned bandwidth measured),
and with --profile the device time by kind. A failed probe is a row too, with the length and its reason:
cuda_oom, error (the exception), host_oom / killed (SIGKILL: the driver watched the child's RSS and the host's
MemAvailable), timeout. Plus the fused linear+CE against F.cross_entropy on full logits, side by side.

    python -m bench.memory                                   # GPU: gpt2-1.5b and llama3-8b (minutes)
    python -m bench.memory --presets gpt2-1.5b --options none,full --max_seq 65536
    python -m bench.memory --presets llama3-8b --options auto --min_seq 262144 --max_seq 262144   # the planner's plan
    python -m bench.memory --smoke                           # CPU: tiny shapes, the same machinery + 2 failing probes
"""
from __future__ import annotations

import argparse
import contextlib
import json
from dataclasses import asdict
import os
import signal
import subprocess
import sys
import tempfile
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
    # the 256K recipe: the same, with the offloaded layer inputs stored as FP8 + a scale per token (half the host bytes)
    "full_offload_opt_fp8": {"checkpointing": "full", "mlp_chunk": 16384, "offload_activations": True,
                             "offload_dtype": "fp8", "offload_optimizer": True, "optimizer_state_dtype": "bf16"},
    "auto": None,  # the planner's choice for each length (app.train.memory_plan.resolve), one child per length
    "full_offload_opt_overlap": {"checkpointing": "full", "mlp_chunk": 16384, "offload_activations": True,
                                 "offload_optimizer": True, "optimizer_state_dtype": "bf16",
                                 "optimizer_mode": "overlap"},
}
DEFAULT_OPTIONS = {"gpt2-1.5b": "none,selective,full,full_offload", "llama3-8b": "full_offload_opt,full_offload_opt_fp8"}
# Where the doubling starts (the longest lengths are what matters; short probes only cost time).
DEFAULT_MIN_SEQ = {"gpt2-1.5b": 8192, "llama3-8b": 131072}  # 8B: straight to the target (bisects down on failure)


# --------------------------------------------------------------------------------------------------------
# one probe process
# --------------------------------------------------------------------------------------------------------
def _host_rss() -> dict[str, float]:
    """This process's VmRSS and VmHWM (peak RSS since the last `_reset_hwm`), in GB (empty off Linux)."""
    out = {}
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    out[line.split(":")[0]] = int(line.split()[1]) * 1024 / 1e9
    except OSError:
        pass
    return out


def _reset_hwm() -> bool:
    """Reset VmHWM to the current RSS (Linux: clear_refs 5); False where not allowed (then it is the peak
    since the process started: an upper bound, as lengths ascend)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _attention_time(cfg, T: int, dev) -> dict:
    """One layer's causal attention at T tokens, forward and forward + backward, under the first
    non-quadratic SDPA backend that accepts the model's shapes (flash, then cuDNN, then memory-efficient):
    which one the training step can use (it runs with the math backend, the quadratic one, disabled)."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    H, Hkv, D = cfg.n_head, cfg.n_kv_head, cfg.head_dim
    dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    q = torch.randn(1, H, T, D, device=dev, dtype=dt, requires_grad=True)
    k, v = (torch.randn(1, Hkv, T, D, device=dev, dtype=dt, requires_grad=True) for _ in range(2))
    backends = ([SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
                if dev.type == "cuda" else [SDPBackend.FLASH_ATTENTION])
    for b in backends:
        try:
            with sdpa_kernel([b]):
                times = []
                for backward in (False, True):
                    _sync(dev)
                    t = time.perf_counter()
                    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=Hkv != H)
                    if backward:
                        out.sum().backward()
                    _sync(dev)
                    times.append(time.perf_counter() - t)
                    del out
            return {"attention_backend": b.name.lower(), "attention_fwd_s": round(times[0], 4),
                    "attention_bwd_s": round(max(times[1] - times[0], 0.0), 4)}
        except RuntimeError:
            continue
    return {"attention_backend": "none of flash / cudnn / efficient"}


def _sync(dev) -> None:
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _pcie_gbps(dev) -> dict:
    """Pinned copy bandwidth each way (256 MB), GB/s: what the offloaded bytes cost if not overlapped; and
    whether pinned pages count in this process's RSS (drivers differ), so host peaks count them once."""
    import torch

    n = 256 * 2**20
    rss0 = _host_rss().get("VmRSS", 0.0)
    host = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    gpu = torch.empty(n, dtype=torch.uint8, device=dev)
    out = {}
    for name, dst, src in (("d2h_gbps", host, gpu), ("h2d_gbps", gpu, host)):
        dst.copy_(src, non_blocking=True)
        _sync(dev)
        t = time.perf_counter()
        for _ in range(4):
            dst.copy_(src, non_blocking=True)
        _sync(dev)
        out[name] = round(4 * n / (time.perf_counter() - t) / 1e9, 1)
    out["pinned_in_rss"] = _host_rss().get("VmRSS", 0.0) - rss0 > 0.5 * n / 1e9
    del host, gpu
    if hasattr(torch.accelerator, "empty_host_cache"):
        torch.accelerator.empty_host_cache()
    return out


def _profile_split(prof, wall_s: float, cuda: bool) -> dict:
    """Device time (CPU: operator self time) of one profiled step by kind: attention kernels, matmuls, copies
    each way, the rest. The copies run on side streams, so kinds may sum to more than the wall time (that is
    the overlap)."""
    kinds = {"attention_ms": ("flash", "fmha", "attention", "cudnn"), "memcpy_d2h_ms": ("memcpy dtoh",),
             "memcpy_h2d_ms": ("memcpy htod",),
             "matmul_ms": ("gemm", "cutlass", "xmma", "nvjet", "matmul", "aten::mm", "aten::addmm", "aten::bmm")}
    out = dict.fromkeys([*kinds, "other_ms"], 0.0)
    for e in prof.key_averages():
        us = getattr(e, "self_device_time_total", 0) if cuda else e.self_cpu_time_total
        if not us:
            continue
        name = e.key.lower()
        kind = next((k for k, pats in kinds.items() if any(p in name for p in pats)), "other_ms")
        out[kind] += us / 1e3
    out = {k: round(v, 1) for k, v in out.items()}
    out["wall_ms"] = round(wall_s * 1e3, 1)
    return out


def _probe(spec: dict) -> None:
    """Run ascending sequence lengths in this process; one JSON line each (a failure row included); stop
    at the first failure. spec["fault"] = {"seq_len", "kind": sigkill | raise} fails one length on purpose
    (--smoke checks that such probes are reported)."""
    import torch

    from app.fast.accelerate import accelerate
    from app.fast.config import PerfConfig
    from app.model.gpt import GPT, ModelConfig
    from app.config import ConfigError
    from app.train.memory_plan import MemoryConfig, estimate, resolve
    from app.train.parallel import make_offload_optimizer, parallelize

    dev = torch.device(spec["device"])
    cuda = dev.type == "cuda"
    seqs, fault = spec["seqs"], spec.get("fault") or {}
    cfg = ModelConfig.preset(spec["preset"], max_seq_len=max(seqs), **spec.get("overrides", {}))
    if OPTION_SETS[spec["option"]] is None:  # auto: one length per child (the options depend on it)
        try:
            mem = resolve(MemoryConfig(auto=True), cfg, seqs[0], 1, spec["gpu_gb"], host_gb=spec["host_gb"],
                          fused_loss=cuda)
        except ConfigError as err:
            print(json.dumps({"preset": spec["preset"], "option": "auto", "seq_len": seqs[0], "ok": False,
                              "reason": "planner_refused", "error": str(err)}), flush=True)
            return
    else:
        mem = MemoryConfig(**OPTION_SETS[spec["option"]])
    chosen = {k: v for k, v in asdict(mem).items() if v != getattr(MemoryConfig(), k)}
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
    if cuda:  # the math backend materialises [T, T] scores: a probe must not fall back to it silently
        from torch.nn.attention import SDPBackend, sdpa_kernel

        attention = sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                                 SDPBackend.EFFICIENT_ATTENTION])
    else:
        attention = contextlib.nullcontext()
    pcie = _pcie_gbps(dev) if cuda else {}
    for i, T in enumerate(seqs):
        e = estimate(cfg, T, 1, mem, fused_loss=cuda)
        out = {"preset": spec["preset"], "option": spec["option"], "memory": chosen, "seq_len": T,
               "setup_s": round(setup_s, 1),
               "warm": i > 0, "predicted_peak_gb": round(e.peak / 1e9, 2),
               "predicted_host_gb": round(e.host / 1e9, 2)}
        try:
            hwm_reset = _reset_hwm()
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                if hasattr(torch.cuda, "reset_peak_host_memory_stats"):
                    torch.cuda.reset_peak_host_memory_stats()
            x = torch.randint(0, cfg.vocab_size, (1, T), device=dev)
            y = torch.randint(0, cfg.vocab_size, (1, T), device=dev)
            losses, phases = [], {}
            for step in range(spec.get("steps", 1)):
                prof = None
                if spec.get("profile") and step == spec.get("steps", 1) - 1:
                    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]
                                                  + ([torch.profiler.ProfilerActivity.CUDA] if cuda else []))
                with prof or contextlib.nullcontext():
                    phases = _one_step(model, opt, x, y, autocast, attention, dev, fault if T == fault.get("seq_len")
                                       else {})
                losses.append(phases.pop("loss"))
                if prof is not None:
                    out["profile"] = _profile_split(prof, phases["step_s"], cuda)
            out.update(ok=True, loss=round(losses[0], 4), losses=[round(v, 4) for v in losses], **phases,
                       tokens_per_s=round(T / phases["step_s"], 1))
            out["finite"] = all(v == v and abs(v) != float("inf") for v in losses)
            off = getattr(model, "spotlm_offloader", None)
            if off is not None:
                out["offloaded_gb"] = round(off.packed_bytes / 1e9, 3)
                if pcie:  # what the copies would cost in series with compute; they run on side streams
                    out["transfer_s_if_serial"] = round(off.packed_bytes / 1e9 * (1 / pcie["d2h_gbps"]
                                                                                  + 1 / pcie["h2d_gbps"]), 2)
            if mem.checkpointing == "full":  # backward re-runs each block's forward once
                out["recompute_s_est"] = out["forward_s"]
            rss = _host_rss()
            out["host_rss_peak_gb"] = round(rss.get("VmHWM", 0.0), 2)
            out["host_hwm_reset"] = hwm_reset
            pinned = 0.0
            if cuda:
                out["peak_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
                out["reserved_gb"] = round(torch.cuda.max_memory_reserved() / 1e9, 2)
                if hasattr(torch.cuda, "host_memory_stats"):
                    pinned = torch.cuda.host_memory_stats().get("allocated_bytes.peak", 0) / 1e9
                out.update(pcie)
            out["pinned_peak_gb"] = round(pinned, 2)
            in_rss = pcie.get("pinned_in_rss", True)
            out["host_peak_gb"] = round(rss.get("VmHWM", 0.0) + (0.0 if in_rss else pinned), 2)
            del x, y
            out.update(_attention_time(cfg, T, dev))
            if cuda and hasattr(torch.accelerator, "empty_host_cache"):
                torch.accelerator.empty_host_cache()  # pinned copies of this length: not reusable by the next
        except Exception as err:  # noqa: BLE001 - every failure is a row: its reason and this length
            oom = isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()
            out.update(ok=False, oom=oom, reason="cuda_oom" if oom else "error",
                       error=f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}")
            print(json.dumps(out), flush=True)
            return
        print(json.dumps(out), flush=True)


def _one_step(model, opt, x, y, autocast, attention, dev, fault: dict) -> dict:
    """One training step, timed by phase (forward with the loss, backward, clip + optimizer step)."""
    import torch

    _sync(dev)
    t0 = time.perf_counter()
    with attention:
        with autocast:
            _, loss = model(x, y)
        _sync(dev)
        t1 = time.perf_counter()
        if fault.get("kind") == "sigkill":  # as the kernel's OOM killer would: no exception, no output
            os.kill(os.getpid(), signal.SIGKILL)
        if fault.get("kind") == "raise":
            raise ValueError("deliberate failure (bench.memory --smoke)")
        loss.backward()
    _sync(dev)
    t2 = time.perf_counter()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    if hasattr(opt, "synchronize"):
        opt.synchronize()
    _sync(dev)
    t3 = time.perf_counter()
    return {"loss": loss.item(), "forward_s": round(t1 - t0, 3), "backward_s": round(t2 - t1, 3),
            "optimizer_s": round(t3 - t2, 3), "step_s": round(t3 - t0, 3)}


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
def _meminfo() -> dict[str, float]:
    """MemTotal and MemAvailable of this machine, GB (empty off Linux)."""
    out = {}
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith(("MemTotal:", "MemAvailable:")):
                    out[line.split(":")[0]] = int(line.split()[1]) * 1024 / 1e9
    except OSError:
        pass
    return out


def _child_rss(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as fh:
            return next((int(line.split()[1]) * 1024 / 1e9 for line in fh if line.startswith("VmRSS:")), 0.0)
    except OSError:
        return 0.0


def _death(rc: int | None, stderr: str, seen: dict) -> tuple[str, str]:
    """(reason, detail) of a child that ended without reporting every length: killed by SIGKILL (with
    little host memory left or a large RSS: the kernel's OOM killer; dmesg is not readable here), another
    signal, a timeout, or an error (its last stderr line)."""
    last = stderr.strip().splitlines()[-1][:300] if stderr.strip() else ""
    host = (f"child RSS up to {seen['rss_gb']:.1f} GB; host MemAvailable fell to {seen['avail_min_gb']:.1f} "
            f"of {seen['total_gb']:.1f} GB") if seen.get("total_gb") else ""
    if rc is None:
        return "timeout", host
    if rc == -signal.SIGKILL:
        low = seen.get("total_gb") and seen["avail_min_gb"] < 0.1 * seen["total_gb"]
        return ("host_oom" if low else "killed"), f"SIGKILL; {host}" if host else "SIGKILL"
    if rc < 0:
        return "killed", f"signal {signal.Signals(-rc).name}; {host}"
    if "out of memory" in stderr.lower():
        return "cuda_oom", last
    return "error", last or f"exit code {rc}"


def _run(kind: str, spec: dict, timeout: float) -> list[dict]:
    """Run one child (`--_probe` / `--_loss`), watching its RSS and the host's available memory; returns
    its JSON rows. A probe child that ends before reporting every length adds a failure row (reason,
    detail, that length) for the first length it did not report."""
    env = {**os.environ, "PYTORCH_CUDA_ALLOC_CONF": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")}
    out_f, err_f = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")  # files: a chatty child cannot block
    p = subprocess.Popen([sys.executable, "-m", "bench.memory", f"--_{kind}", json.dumps(spec)], env=env,
                         stdout=out_f, stderr=err_f, text=True)
    info = _meminfo()
    seen = {"rss_gb": 0.0, "avail_min_gb": info.get("MemAvailable", 0.0), "total_gb": info.get("MemTotal", 0.0)}
    end = time.time() + max(timeout, 1)
    rc = None
    while time.time() < end:
        try:
            p.wait(timeout=0.5)
        except subprocess.TimeoutExpired:
            seen["rss_gb"] = max(seen["rss_gb"], _child_rss(p.pid))
            seen["avail_min_gb"] = min(seen["avail_min_gb"], _meminfo().get("MemAvailable", float("inf")))
            continue
        rc = p.returncode
        break
    if rc is None:
        p.kill()
        p.wait()
    stdout, stderr = (f.seek(0) or f.read() for f in (out_f, err_f))
    out_f.close()
    err_f.close()
    rows = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    if kind == "probe":
        done = {r["seq_len"] for r in rows}
        missing = [s for s in spec["seqs"] if s not in done]
        if missing and not any(not r.get("ok") for r in rows):
            reason, detail = _death(rc, stderr, seen)
            rows.append({"preset": spec["preset"], "option": spec["option"], "seq_len": missing[0], "ok": False,
                         "oom": reason in ("host_oom", "cuda_oom"), "reason": reason, "error": detail,
                         "exit_code": rc})
        for r in rows:
            r["child_rss_max_gb"] = round(seen["rss_gb"], 2)  # the driver's view, polled twice a second
    return rows


def search(preset: str, option: str, a, deadline: float, fault: dict | None = None) -> dict:
    """Longest length that trains: doubling in one process, then bisection in fresh processes. Every probe
    is a row, failed ones with their reason."""
    base = {"preset": preset, "option": option, "device": a.device, "overrides": a.overrides, "steps": a.steps,
            "profile": a.profile, "fault": fault, "gpu_gb": a.gpu_gb, "host_gb": a.host_gb}
    lo_seq = a.min_seq or DEFAULT_MIN_SEQ.get(preset, 1024)
    seqs = []
    s = lo_seq
    while s <= a.max_seq:
        seqs.append(s)
        s *= 2
    if seqs and seqs[-1] != a.max_seq and a.max_seq > lo_seq:
        seqs.append(a.max_seq)
    if OPTION_SETS[option] is None:  # auto: a child per length, up to the first failure
        probes = []
        for s in seqs:
            probes += _run("probe", {**base, "seqs": [s]}, deadline - time.time())
            if not probes[-1].get("ok") or time.time() > deadline:
                break
    else:
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
    first_bad = next((r for r in probes if not r.get("ok") and r["seq_len"] == hi), None)
    keys = ("peak_gb", "predicted_peak_gb", "host_peak_gb", "predicted_host_gb", "tokens_per_s", "step_s")
    return {"preset": preset, "option": option, "memory": best["memory"] if best else OPTION_SETS[option],
            "max_seq_len": lo,
            "first_failure": hi, "failure_reason": first_bad and first_bad.get("reason"),
            "reached_max_seq": hi is None and lo == a.max_seq, **{k: best and best.get(k) for k in keys},
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
    ap.add_argument("--gpu_gb", type=float, default=0.0, help="auto: the GPU budget (0: this GPU's memory)")
    ap.add_argument("--host_gb", type=float, default=0.0, help="auto: the host budget (0: the planner's, from this machine)")
    ap.add_argument("--steps", type=int, default=1, help="steps per length on one batch (the last one timed)")
    ap.add_argument("--profile", action="store_true", help="torch.profiler on each length's last step: time by kind")
    ap.add_argument("--smoke", action="store_true",
                    help="CPU, tiny shapes: the probe loop, with one probe killed by SIGKILL and one raising")
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

    a.device = "cuda" if torch.cuda.is_available() and not a.smoke else "cpu"
    a.overrides = {"vocab_size": a.vocab_size} if a.vocab_size else {}
    from app.train.memory_plan import MemoryConfig, host_budget_gb

    a.gpu_gb = a.gpu_gb or (torch.cuda.get_device_properties(0).total_memory / 1e9 if a.device == "cuda" else 80.0)
    a.host_gb = a.host_gb or host_budget_gb(MemoryConfig())
    loss_case = {"tokens": 32768, "dim": 4096, "vocab": 128256}
    faults: list[tuple[str, dict]] = []
    if a.smoke:
        a.presets = "tiny"
        a.options = a.options or "none,full_offload_opt_fp8,auto"
        a.min_seq, a.max_seq, a.granularity, a.bisect_steps = a.min_seq or 256, min(a.max_seq, 512), 128, 1
        a.overrides = {"n_layer": 2, "d_model": 64, "n_head": 4, "vocab_size": 512}
        loss_case = {"tokens": 512, "dim": 64, "vocab": 1024}
        faults = [("full", {"seq_len": a.max_seq, "kind": kind}) for kind in ("sigkill", "raise")]
    deadline = time.time() + a.budget_s
    host = _meminfo()
    out = {"device": torch.cuda.get_device_name() if a.device == "cuda" else "cpu",
           "gpu_total_gb": round(torch.cuda.get_device_properties(0).total_memory / 1e9, 2) if a.device == "cuda"
           else None, "host_total_gb": round(host.get("MemTotal", 0.0), 2),
           "host_available_gb": round(host.get("MemAvailable", 0.0), 2),
           "gpu_budget_gb": round(a.gpu_gb, 2), "host_budget_gb": round(a.host_gb, 2),
           "allocator": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True"), "results": []}
    runs = [(preset, option, None) for preset in a.presets.split(",")
            for option in (a.options or DEFAULT_OPTIONS.get(preset, "none,full")).split(",")]
    runs += [(a.presets.split(",")[0], option, fault) for option, fault in faults]
    for preset, option, fault in runs:
        if time.time() > deadline:
            out["results"].append({"preset": preset, "option": option, "skipped": "budget"})
            continue
        r = search(preset, option, a, deadline, fault)
        if fault:
            r["deliberate_fault"] = fault
        print(json.dumps({k: v for k, v in r.items() if k != "probes"}), file=sys.stderr, flush=True)
        out["results"].append(r)
    if not a.no_loss_bench:
        rows = _run("loss", {**loss_case, "device": a.device}, 300)
        out["fused_loss_vs_plain"] = rows[0] if rows else {"error": "no result"}
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
