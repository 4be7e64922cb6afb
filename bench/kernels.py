"""Benchmark: the Triton kernels against their PyTorch baselines on one CUDA GPU, printed as JSON.

Fused linear + cross-entropy (bf16, and with the FP8 logits product) vs `F.cross_entropy(h @ W.T, y)` (bf16): peak
memory above the inputs and forward+backward time, with their ratios; the FP8 ReLU² feed-forward's activation
passes (`fp8_relu2`) vs the same computation compiled by Inductor as the training graph ran it before (time); the
sliding-window attention backward's one-kernel walk vs its two-kernel form (time), with cuDNN's full causal
backward for scale.

    python -m bench.kernels                      # every case (about a minute)
    python -m bench.kernels --quick              # the smaller cases only
    python -m bench.kernels --only=window_attention  # one section
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
from typing import Callable

import torch
import torch.nn.functional as F

from app.fast.compile import compile_kwargs
from app.fast.kernels import backend, fused_linear_cross_entropy, sliding_attention
from app.log import get_logger

log = get_logger(__name__)

# (tokens N, hidden D, vocabulary V): GPT-2 and Llama-3 output layers.
CE_CASES = [(8192, 768, 50304), (32768, 768, 50304), (8192, 4096, 128256), (32768, 4096, 128256)]
RELU2_CASES = [(65536, 3072), (65536, 4096)]  # hidden rows of GPT-2 124M / 350M at 64 x 1024 tokens (rows, width)
# (B, H, H_kv, T, head_dim, window): 124M at micro-batch 64 and 16, head size 128, GQA at 4k positions
WINDOW_CASES = [(64, 12, 12, 1024, 64, 64), (16, 12, 12, 1024, 64, 64), (32, 16, 16, 1024, 128, 64),
                (8, 32, 8, 4096, 128, 64)]


def _time_ms(fn: Callable[[], None], warmup: int, iters: int) -> float:
    """Median milliseconds of fn() over `iters` runs, each timed with CUDA events after `warmup` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _peak_mib(fn: Callable[[], None]) -> float:
    """MiB allocated at the peak of one fn() call, above what was allocated before it."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def _measure(fn: Callable[[], None], args: argparse.Namespace) -> dict:
    """Peak memory and median time of fn, or the out-of-memory error that stopped it."""
    try:
        return {"peak_mib": round(_peak_mib(fn), 1), "ms": round(_time_ms(fn, args.warmup, args.iters), 3)}
    except torch.cuda.OutOfMemoryError:
        return {"error": "CUDA out of memory"}
    finally:
        gc.collect()
        torch.cuda.empty_cache()


def _ratio(baseline: dict, fused: dict, key: str) -> float | None:
    if key in baseline and key in fused and fused[key] > 0:
        return round(baseline[key] / fused[key], 3)
    return None


def _add_bandwidth(moved: int, *timed: dict) -> None:
    """GB/s of `moved` bytes into each `_measure` result that has a time."""
    for t in timed:
        if "ms" in t:
            t["GB_per_s"] = round(moved / t["ms"] / 1e6)


def bench_linear_ce(N: int, D: int, V: int, args: argparse.Namespace) -> dict:
    """Fused linear + cross-entropy vs bf16 logits + F.cross_entropy, forward and backward."""
    hidden = torch.randn(N, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = (torch.randn(V, D, device="cuda") / D ** 0.5).to(torch.bfloat16).requires_grad_()
    targets = torch.randint(0, V, (N,), device="cuda")
    losses = {}

    def step(name: str, loss_fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            hidden.grad = weight.grad = None
            loss = loss_fn()
            loss.backward()
            losses[name] = loss.detach()
        return run

    fused = _measure(step("fused", lambda: fused_linear_cross_entropy(hidden, weight, targets)), args)
    fp8 = _measure(step("fused_fp8", lambda: fused_linear_cross_entropy(hidden, weight, targets, fp8=True)), args)
    baseline = _measure(step("baseline", lambda: F.cross_entropy(hidden @ weight.T, targets)), args)
    result = {"N": N, "D": D, "V": V, "fused": fused, "fused_fp8": fp8, "baseline": baseline,
              "speedup": _ratio(baseline, fused, "ms"), "memory_ratio": _ratio(baseline, fused, "peak_mib"),
              "fp8_speedup": _ratio(baseline, fp8, "ms"), "fp8_memory_ratio": _ratio(baseline, fp8, "peak_mib"),
              "logits_mib": round(N * V * 2 / 2**20, 1)}
    for name in ("fused", "fused_fp8"):
        if name in losses and "baseline" in losses:
            result[f"{name}_loss_abs_diff"] = abs(losses[name].float() - losses["baseline"].float()).item()
    return result


def _against_compiled(kernel: Callable, reference: Callable, inputs: tuple, moved: int,
                      args: argparse.Namespace) -> dict:
    """A Triton kernel against torch.compile of its reference (with one-pass wide rows, `kernels=rows`) on the same
    inputs: both timed, GB/s of the `moved` bytes, the speedup, and whether the kernel's outputs have the
    reference's bits."""
    torch._dynamo.reset()
    compiled = torch.compile(reference, **compile_kwargs(wide_rows=True))
    row = {"triton": _measure(lambda: kernel(*inputs), args), "compiled": _measure(lambda: compiled(*inputs), args)}
    _add_bandwidth(moved, row["triton"], row["compiled"])
    row["speedup_vs_compiled"] = _ratio(row["compiled"], row["triton"], "ms")
    row["exact"] = all(torch.equal(a.float(), b.float()) for a, b in zip(kernel(*inputs), reference(*inputs)))
    return row


def bench_relu2_rows(M: int, N: int, args: argparse.Namespace) -> dict:
    """The FP8 ReLU² feed-forward's two activation passes (`fp8_relu2.relu2_rows`, `relu2_rows_backward`) against
    Inductor's one-pass wide-row kernels for the same references (`kernels=rows`, what the MLP compiled to
    before), with GB/s of the bytes each must move and whether the outputs have the references' bits."""
    from app.fast.kernels import fp8_relu2

    h = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
    da = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
    passes = {"forward": (fp8_relu2.relu2_rows, fp8_relu2.relu2_rows_reference, (h,), M * N * (2 + 1)),
              "backward": (fp8_relu2.relu2_rows_backward, fp8_relu2.relu2_rows_backward_reference, (da, h),
                           M * N * (2 + 2 + 2 + 1 + 2))}  # read bf16 (x2 backward); write e4m3 (+ 2 x bf16)
    result = {"rows": M, "width": N}
    for name, (kernel, reference, inputs, moved) in passes.items():
        result[name] = _against_compiled(kernel, reference, inputs, moved, args)
    return result


def bench_window_backward(B: int, H: int, H_kv: int, T: int, hd: int, window: int, args: argparse.Namespace) -> dict:
    """The window attention backward's one-kernel walk against its two-kernel form (key/value gradients, then
    query gradients, and the delta rows before them in eager PyTorch; in a compiled step Inductor fuses those
    into a neighbouring kernel), on the same forward; cuDNN's full causal SDPA backward on the same shape says
    what the window saves."""
    def layout(h: int) -> torch.Tensor:  # as the model's projections leave them: [B, T, h, hd] memory
        return torch.randn(B, T, h, hd, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    q, k, v = layout(H), layout(H_kv), layout(H_kv)
    do = torch.randn(B, T, H, hd, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    o, lse = sliding_attention.window_forward(q, k, v, window)
    one = _measure(lambda: sliding_attention.window_backward(q, k, v, o, lse, do, window, one_pass=True), args)
    two = _measure(lambda: sliding_attention.window_backward(q, k, v, o, lse, do, window, one_pass=False), args)
    moved = (3 * B * H + 4 * B * H_kv) * T * hd * 2  # read q, o, do, k, v; write dq, dk, dv (bf16)
    _add_bandwidth(moved, one, two)
    diff = max((a.float() - b.float()).abs().max().item() for a, b in zip(
        sliding_attention.window_backward(q, k, v, o, lse, do, window, one_pass=True),
        sliding_attention.window_backward(q, k, v, o, lse, do, window, one_pass=False)))
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = F.scaled_dot_product_attention(*leaves, is_causal=True, enable_gqa=H != H_kv)
    full = _measure(lambda: torch.autograd.grad(out, leaves, do, retain_graph=True), args)
    return {"B": B, "H": H, "H_kv": H_kv, "T": T, "head_dim": hd, "window": window, "one_kernel": one,
            "two_kernels": two, "speedup_vs_two_kernels": _ratio(two, one, "ms"), "max_abs_diff": diff,
            "sdpa_full_causal_backward": full}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="only the smaller case of each kind")
    parser.add_argument("--warmup", type=int, default=3, help="untimed runs before timing")
    parser.add_argument("--iters", type=int, default=10, help="timed runs (the median is reported)")
    parser.add_argument("--only", default="", help="comma-separated sections to run (default: all)")
    args = parser.parse_args(argv)
    sections = {"linear_cross_entropy": (bench_linear_ce, CE_CASES), "relu2_rows": (bench_relu2_rows, RELU2_CASES),
                "window_attention": (bench_window_backward, WINDOW_CASES)}
    only = set(args.only.split(",")) if args.only else set(sections)
    if only - set(sections):
        sys.exit(f"bench.kernels: --only names unknown sections {sorted(only - set(sections))}; "
                 f"they are {sorted(sections)}")
    if not torch.cuda.is_available():
        sys.exit("bench.kernels needs a CUDA GPU (torch.cuda.is_available() is False); "
                 "the kernels' CPU checks are `pytest tests/test_kernels.py`")
    if backend.triton is None:
        sys.exit("bench.kernels needs Triton (pip install triton)")
    if backend.INTERPRET:
        sys.exit("bench.kernels: unset TRITON_INTERPRET / SPOTLM_TRITON_INTERPRET_TEST to time compiled kernels")
    pick = (lambda cases: cases[:1]) if args.quick else (lambda cases: cases)
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "triton": backend.triton.__version__, "dtype": "bfloat16", "warmup": args.warmup, "iters": args.iters}
    for name, (bench, cases) in sections.items():
        if name in only:
            log.info("%s: %d cases", name, len(pick(cases)))
            report[name] = [bench(*case, args) for case in pick(cases)]
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
