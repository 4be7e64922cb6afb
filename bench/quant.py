"""Weight-only quantized serving, none vs int8 vs fp8 side by side: decode tokens/s and the perplexity cost.

    python -m bench.quant --preset=gpt2-1.5b                    # GPU: speed of the preset's shape (random init)
    python -m bench.quant --preset=gpt2-1.5b --model=<export>   # speed and perplexity of trained weights
    python -m bench.quant --smoke                               # tiny sizes on CPU (what tests run)

Speed: the same weights, quantized per mode (`app.fast.quant.quantize`), served by the batching engine (CUDA graphs
on CUDA) at each stream count (greedy, exactly max_tokens new tokens per request, random prompts); ratios are
mode / none at the same count, in the same run. Quality: perplexity on the held-out text of --data for each mode,
its change relative to none, and the relative logit error ||logits_q - logits|| / ||logits||. A randomly initialised
model's perplexity means nothing, so without --model the quality section uses a model of --train_preset's shape
trained here for --train_steps on the text's first 90% with the GPT-2 tokenizer (perplexity on the last 10%, in the
serving dtype); the speed model's logit error is reported beside it. Prints one JSON object.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch

from app.data.tokenizer import load_tokenizer
from app.fast.kernels.fp8_linear import on_fp8_gpu
from app.fast.kernels.int8_linear import quantize_weight, weight_only_linear
from app.fast.quant import STORAGE, QuantLinear, quantize
from app.model.export import load_exported
from app.model.gpt import GPT, ModelConfig
from app.serve.engine import Engine
from bench.report import emit
from bench.serve_load import make_prompts, run_engine

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def weight_mb(model: GPT) -> float:
    """MB of the weights a decode step reads: every matmul weight (and its scales) and the head."""
    linears = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, QuantLinear))]
    return round(sum(t.numel() * t.element_size() for m in linears for t in m.state_dict().values()) / 1e6, 1)


def text_tokens(path: str, tokenizer, max_chars: int = 0) -> torch.Tensor:
    """The ids of the text file (its first max_chars characters; 0 = all), no special tokens."""
    text = Path(path).read_text(encoding="utf-8")
    return torch.tensor(tokenizer.encode(text[:max_chars] if max_chars else text).ids, dtype=torch.long)


@torch.no_grad()
def perplexity(model: GPT, tokens: torch.Tensor, seq_len: int, batch: int, max_windows: int) -> float:
    """exp(mean next-token cross-entropy) over consecutive windows of seq_len + 1 tokens (at most max_windows)."""
    device = model.model.embed_tokens.weight.device
    n = min(max_windows, (tokens.numel() - 1) // seq_len)
    windows = tokens[:n * seq_len + 1].unfold(0, seq_len + 1, seq_len)  # [n, seq_len + 1]
    total = 0.0
    for s in range(0, n, batch):
        w = windows[s:s + batch].to(device)
        total += model(w[:, :-1], w[:, 1:])[1].float().item() * w.size(0)
    return math.exp(total / n)


@torch.no_grad()
def logit_error(ref: GPT, other: GPT, idx: torch.Tensor) -> float:
    """||other(idx) - ref(idx)|| / ||ref(idx)|| over the real vocabulary's logits."""
    v = ref.cfg.vocab_size
    a, b = ref(idx)[0][..., :v].double(), other(idx)[0][..., :v].double()
    return round(((b - a).norm() / a.norm()).item(), 6)


def train_small(tokens: torch.Tensor, vocab: int, a, device: str) -> GPT:
    """The --train_preset shape over `vocab`, trained --train_steps AdamW steps (fp32) on random windows of
    `tokens`."""
    torch.manual_seed(0)
    cfg = ModelConfig.preset(a.train_preset, vocab_size=vocab, max_seq_len=a.seq_len, tie_embeddings=True)
    model = GPT(cfg).to(device)
    model.init_weights()
    opt = torch.optim.AdamW(model.parameters(), lr=a.train_lr, weight_decay=0.0, foreach=True)
    seq_len, batch = a.seq_len, a.train_batch
    g = torch.Generator().manual_seed(0)
    for _ in range(a.train_steps):
        starts = torch.randint(0, tokens.numel() - seq_len - 1, (batch,), generator=g)
        w = torch.stack([tokens[s:s + seq_len + 1] for s in starts.tolist()]).to(device)
        opt.zero_grad(set_to_none=True)
        model(w[:, :-1], w[:, 1:])[1].backward()
        opt.step()
    return model.eval()


def speed(base: GPT, modes: list[str], levels: list[int], requests: list[int], a) -> dict:
    """Engine tokens/s per mode and stream count, the same prompts for every mode; ratios to none."""
    out: dict = {}
    for mode in modes:
        model = quantize(copy.deepcopy(base), mode, head=a.head, group_size=a.group_size)
        engine = Engine(model, eot_id=None, max_batch=max(levels), max_queue=max(requests),
                        max_len=a.prompt_len + a.max_tokens).start()
        vocab = model.cfg.vocab_size
        run_engine(engine, make_prompts(2, a.prompt_len, vocab, 99), 2, 4)  # warm-up
        out[mode] = {"weight_mb": weight_mb(model)}
        for c, n in zip(levels, requests):
            out[mode][str(c)] = run_engine(engine, make_prompts(n, a.prompt_len, vocab, seed=c), c, a.max_tokens)
            print(json.dumps({mode: {str(c): out[mode][str(c)]}}), flush=True)
        engine.close()
        del model, engine
        for c in levels:
            none, this = out["none"][str(c)]["tokens_per_s"], out[mode][str(c)]["tokens_per_s"]
            out[mode][f"ratio_vs_none_{c}"] = round(this / none, 3) if none and this else None
    return out


def kernel_times(cfg: ModelConfig, modes: list[str], rows_list: list[int], device: str, dtype: torch.dtype,
                 reps: int) -> dict:
    """Per-product time (us) of the model's three linear shapes alone: `F.linear` on the dtype weight (none) vs
    `weight_only_linear` per mode, for each row count, and the weight bytes per second each reaches. On CUDA the
    `reps` products run as one CUDA graph (no launch overhead, as in the engine) over enough weight copies that
    each product reads from memory, not from L2."""
    shapes = {"qkvo": (cfg.d_model, cfg.d_model), "up": (cfg.ffn_hidden, cfg.d_model),
              "down": (cfg.d_model, cfg.ffn_hidden)}
    out: dict = {}
    for name, (N, K) in shapes.items():
        copies = max(2, -(-400_000_000 // (N * K * 2))) if device == "cuda" else 2  # 400 MB: several times L2
        ws = [torch.randn(N, K, device=device, dtype=dtype) / K ** 0.5 for _ in range(copies)]
        packed = {m: [quantize_weight(w, STORAGE[m]) for w in ws] for m in modes if m != "none"}
        for rows in rows_list:
            x = torch.randn(rows, K, device=device, dtype=dtype)
            entry: dict = {}
            for mode in modes:
                calls = [(lambda w=w: torch.nn.functional.linear(x, w)) for w in ws] if mode == "none" else \
                    [(lambda q=q, sc=sc: weight_only_linear(x, q, sc)) for q, sc in packed[mode]]
                nbytes = (ws[0].numel() * ws[0].element_size() if mode == "none"
                          else sum(t.numel() * t.element_size() for t in packed[mode][0]))
                us = _time_us(calls, reps, device)
                entry[mode] = {"us": round(us, 2), "gb_per_s": round(nbytes / us / 1e3, 1)}
            for mode in modes[1:]:
                entry[f"ratio_{mode}_vs_none"] = round(entry["none"]["us"] / entry[mode]["us"], 3)
            out[f"{name} {N}x{K} rows={rows}"] = entry
            print(json.dumps({"kernel": {f"{name} rows={rows}": entry}}), flush=True)
        del ws, packed
    return out


@torch.no_grad()
def _time_us(calls: list, reps: int, device: str) -> float:
    """Mean microseconds per call over `reps` calls cycling through `calls` (after each ran once: tuning)."""
    for c in calls:
        c()
    seq = [calls[i % len(calls)] for i in range(reps)]
    if device != "cuda":
        t0 = time.perf_counter()
        for c in seq:
            c()
        return (time.perf_counter() - t0) / reps * 1e6
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for c in seq:
            c()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps * 1e3


def quality(model: GPT, tokens: torch.Tensor, modes: list[str], a) -> dict:
    """Perplexity of `model` per mode on `tokens`, its change relative to none, and the relative logit error."""
    out: dict = {}
    device = model.model.embed_tokens.weight.device
    probe = tokens[:a.seq_len].view(1, -1).to(device)
    for mode in modes:
        q = quantize(copy.deepcopy(model), mode, head=a.head, group_size=a.group_size)
        ppl = perplexity(q, tokens, a.seq_len, a.eval_batch, a.eval_windows)
        out[mode] = {"perplexity": round(ppl, 4)}
        if mode != "none":
            out[mode]["perplexity_change"] = round(ppl / out["none"]["perplexity"] - 1, 6)
            out[mode]["relative_logit_error"] = logit_error(model, q, probe)
        del q
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="gpt2-1.5b", help="the speed model's shape (random init) without --model")
    p.add_argument("--model", default=None, help="an export dir: its weights for speed and perplexity")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, on CPU unless --device says otherwise")
    p.add_argument("--modes", default="", help="comma list of none,int8,fp8 (default: all the device runs)")
    p.add_argument("--head", action="store_true", help="quantize the output layer too")
    p.add_argument("--group_size", type=int, default=0, help="input channels per scale (0 = per output channel)")
    p.add_argument("--streams", default="1,8")
    p.add_argument("--kernel_rows", default="1,8,32", help="row counts of the products timed alone (none: skip)")
    p.add_argument("--kernel_reps", type=int, default=200, help="products per timing")
    p.add_argument("--requests", default="", help="requests per stream count, comma list (default 16 x streams)")
    p.add_argument("--prompt_len", type=int, default=128)
    p.add_argument("--max_tokens", type=int, default=128)
    p.add_argument("--data", default=str(SHARED / "wikitext103_valid.tokens"), help="text for perplexity")
    p.add_argument("--tokenizer", default=str(SHARED / "gpt2_tokenizer" / "tokenizer.json"),
                   help="tokenizer.json of the model trained here (an export brings its own)")
    p.add_argument("--train_steps", type=int, default=600, help="steps of the small model trained without --model")
    p.add_argument("--train_preset", default="tiny", help="shape of the model trained without --model")
    p.add_argument("--train_lr", type=float, default=3e-3, help="its AdamW learning rate")
    p.add_argument("--train_batch", type=int, default=16, help="its windows per step")
    p.add_argument("--seq_len", type=int, default=256, help="perplexity window (and the small model's context)")
    p.add_argument("--eval_windows", type=int, default=200, help="held-out windows scored per mode")
    p.add_argument("--eval_batch", type=int, default=8)
    p.add_argument("--max_chars", type=int, default=0, help="read only this much of --data (0 = all)")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=None, help="also write the JSON here")
    a = p.parse_args(argv)
    if a.smoke:
        a.preset, a.prompt_len, a.max_tokens, a.seq_len, a.eval_windows = "tiny", 16, 16, 32, 8
        a.train_steps, a.train_batch, a.max_chars, a.kernel_reps = 10, 4, a.max_chars or 100_000, 5
        a.requests = a.requests or "4,8"
        a.data = a.data if a.data != p.get_default("data") else str(SHARED / "tinyshakespeare.txt")
    device = a.device if a.device != "auto" else ("cuda" if torch.cuda.is_available() and not a.smoke else "cpu")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    levels = [int(c) for c in a.streams.split(",")]
    requests = [int(r) for r in a.requests.split(",")] if a.requests else [16 * c for c in levels]
    fp8_ok = device != "cuda" or on_fp8_gpu(torch.empty(0, device=device))
    modes = a.modes.split(",") if a.modes else ["none", "int8"] + (["fp8"] if fp8_ok else [])
    if modes[0] != "none":
        modes = ["none"] + [m for m in modes if m != "none"]  # the baseline, in the same run
    result: dict = {"device": torch.cuda.get_device_name() if device == "cuda" else device,
                    "dtype": str(dtype).removeprefix("torch."), "modes": modes, "head": a.head,
                    "group_size": a.group_size, "prompt_len": a.prompt_len, "max_tokens": a.max_tokens}
    t0 = time.perf_counter()
    if a.model:
        ex = load_exported(a.model, device=device, dtype=dtype)
        base, tokenizer, result["model"] = ex.model, ex.tokenizer, a.model
    else:
        torch.manual_seed(0)
        with torch.device(device):
            base = GPT(ModelConfig.preset(a.preset, max_seq_len=max(1024, a.prompt_len + a.max_tokens)))
        base.init_weights()
        base.to(dtype).eval()
        tokenizer, result["model"] = load_tokenizer(a.tokenizer), f"{a.preset} (random init)"
    tokens = text_tokens(a.data, tokenizer, a.max_chars)
    result["data"] = {"file": Path(a.data).name, "tokens": tokens.numel()}
    if a.kernel_rows != "none":
        rows = [int(r) for r in a.kernel_rows.split(",")]
        result["kernel"] = kernel_times(base.cfg, modes, rows, device, dtype, a.kernel_reps)
    result["speed"] = speed(base, modes, levels, requests, a)
    if a.model:
        result["quality"] = quality(base, tokens[int(0.9 * tokens.numel()):], modes, a)
    else:
        probe = tokens[:min(a.seq_len, base.cfg.max_seq_len)].clamp(max=base.cfg.vocab_size - 1)[None].to(device)
        result["speed_model_logit_error"] = {m: logit_error(base, quantize(copy.deepcopy(base), m, head=a.head,
                                                                           group_size=a.group_size), probe)
                                             for m in modes if m != "none"}
        del base
        split = int(0.9 * tokens.numel())
        small = train_small(tokens[:split], tokenizer.get_vocab_size(), a, device).to(dtype)  # served in dtype
        result["quality"] = {"model": f"{a.train_preset} trained {a.train_steps} steps on {Path(a.data).name}",
                             **quality(small, tokens[split:], modes, a)}
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    emit(result, a.out)
    return result


if __name__ == "__main__":
    main()
