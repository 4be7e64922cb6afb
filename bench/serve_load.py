"""Serving load benchmark: the continuous-batching engine vs a Hugging Face `generate()` loop, same weights.

    python -m bench.serve_load                 # GPT-2-124M shape (random init), 1/8/32/128 streams, 2,000 requests
    python -m bench.serve_load --quick         # tiny model on CPU, a few requests per level
    python -m bench.serve_load --http          # also through Ray Serve over HTTP (streamed, TTFT from the first event)
    python -m bench.serve_load --prefix_tokens=1024 --no_hf   # + TTFT of 32 requests sharing a prefix, reuse on/off

Builds a model of the preset's shape (random init), exports it with app.model.export, then for each
concurrency level c runs c client threads that each submit requests back to back (fixed-length
random-token prompts, greedy, exactly `max_tokens` new tokens: no stop id) and records throughput
(generated tokens/s), time to first token and per-token latency (p50/p99) and errors. The baseline,
in the same run: `LlamaForCausalLM` loaded from the export with transformers, generating the same
prompts one request at a time (c=1) and in static batches of c (no streaming: TTFT = the time of a
1-token generate of the batch); by default on fewer requests than the engine (8 at c=1, 2 batches at
c > 1, so that the whole default run fits a 10-minute device call; the counts are in the JSON). `--lmatch` adds the per-token latency with an lmatch lookup hook (a
model of the same shape with a retrieval-match table, a dictionary lookup on the last 3 tokens) next
to the same model without the hook. Each engine level also reports its mean time per engine step
(`step_ms`: wall time / steps); with `--http` each level's HTTP numbers are set beside the engine's
(`http_overhead`: tokens/s ratio HTTP / engine, TTFT p50 difference). `--prefix_tokens=N` adds the time
to first token of `--prefix_requests` requests submitted together whose prompts share their first N
tokens (then 16 own ones), with the engine's prefix cache off and on (`prefix_reuse`, ratio off / on).
`--kv_bucket` is the engine's smallest attention read length (0 = the whole cache every step);
`--compare_kv` runs each level also on an engine reading the whole cache (`engine_full_kv`, ratio).
Prints one JSON object; ratios are engine / baseline.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from app.serve.engine import Engine, SamplingParams
from app.model.export import export_model, load_exported
from app.model.gpt import GPT, ModelConfig
from app.data.tokenizer import train_bpe
from bench.report import emit


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def summary(ttft: list[float], per_token: list[float], tokens: int, wall: float, errors: int, n: int) -> dict:
    ms = lambda x: None if x is None else round(1e3 * x, 3)  # noqa: E731
    return {"requests": n, "errors": errors, "tokens": tokens, "wall_s": round(wall, 3),
            "tokens_per_s": round(tokens / wall, 1) if wall else None,
            "ttft_ms_p50": ms(pct(ttft, 50)), "ttft_ms_p99": ms(pct(ttft, 99)),
            "per_token_ms_p50": ms(pct(per_token, 50)), "per_token_ms_p99": ms(pct(per_token, 99))}


GPT2_TOKENIZER = Path(__file__).resolve().parents[2] / "shared" / "data" / "gpt2_tokenizer" / "tokenizer.json"


def make_export(preset: str, d: Path, lmatch: bool = False, max_seq_len: int | None = None) -> str:
    """An export of the preset's shape (random init); GPT-2's tokenizer for a GPT-2-sized vocabulary (so
    that streamed tokens decode to text over HTTP), else a 300-id BPE trained here."""
    over = {"max_seq_len": max_seq_len} if max_seq_len else {}
    cfg = ModelConfig.preset(preset, **over)
    tok_file = d / "tokenizer.json"
    if cfg.vocab_size >= 50257 and GPT2_TOKENIZER.exists():
        tok_file = GPT2_TOKENIZER
    elif not tok_file.exists():
        text = " ".join(f"w{i % 997} x{i % 13}" for i in range(20000))
        train_bpe([text], vocab_size=300).save(str(tok_file))
    if lmatch:
        cfg = ModelConfig.preset(preset, lmatch_vocab=cfg.vocab_size + 1, **over)
    torch.manual_seed(0)
    model = GPT(cfg)
    model.init_weights()
    out = d / ("export_lmatch" if lmatch else "export")
    export_model(model, str(out), str(tok_file), meta={"run": f"bench-{preset}"})
    return str(out)


def make_prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, length), generator=g).tolist()


def drive(n: int, conc: int, one) -> dict:
    """`conc` client threads running `one(i)` for requests i = 0..n-1 back to back. `one` returns
    (tokens, time to first token, per-token time or None) or raises: a raise counts as an error."""
    def safe(i: int):
        try:
            return one(i)
        except Exception:  # noqa: BLE001 - counted
            return None

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=conc) as pool:
        results = list(pool.map(safe, range(n)))
    wall = time.perf_counter() - t0
    ok = [r for r in results if r is not None]
    return summary([r[1] for r in ok if r[1] is not None], [r[2] for r in ok if r[2] is not None],
                   sum(r[0] for r in ok), wall, n - len(ok), n)


def run_engine(engine: Engine, prompts: list[list[int]], conc: int, max_tokens: int) -> dict:
    """`conc` client threads submitting `prompts` back to back; per-request TTFT and per-token latency,
    the mean time in the index hooks per generated token and the mean time per engine step."""
    index_ms: list[float] = []

    def one(i: int):
        seq = engine.submit(prompts[i], SamplingParams(max_tokens=max_tokens, temperature=0.0, timeout_s=600))
        seq.wait(600)
        n = len(seq.tokens)
        if seq.finish_reason != "length" or n != max_tokens:
            raise RuntimeError(f"request {i} ended early: {seq.finish_reason}")
        index_ms.append(seq.index_ms / n)
        return n, seq.t_first - seq.t_submit, (seq.t_done - seq.t_first) / (n - 1) if n > 1 else None

    steps = engine.stats()["steps"]
    out = drive(len(prompts), conc, one)
    out["index_ms_per_token"] = round(statistics.mean(index_ms), 4) if index_ms else None
    steps = engine.stats()["steps"] - steps
    out["step_ms"] = round(1e3 * out["wall_s"] / steps, 4) if steps else None
    return out


def run_hf(export: str, prompts: list[list[int]], batch: int, max_tokens: int, device: str, dtype) -> dict:
    """transformers LlamaForCausalLM.generate on the same prompts, in static batches of `batch`."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(export, dtype=dtype).to(device).eval()
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    ttft, per_tok, tokens = [], [], 0
    with torch.inference_mode():
        x = torch.tensor(prompts[:batch], device=device)
        model.generate(x, max_new_tokens=2, min_new_tokens=2, **kw)  # warm-up
        t0 = time.perf_counter()
        for s in range(0, len(prompts) - batch + 1, batch):
            x = torch.tensor(prompts[s:s + batch], device=device)
            a = time.perf_counter()
            model.generate(x, max_new_tokens=1, min_new_tokens=1, **kw)
            b = time.perf_counter()
            out = model.generate(x, max_new_tokens=max_tokens, min_new_tokens=max_tokens, **kw)
            _sync(device)
            c = time.perf_counter()
            new = out.shape[1] - x.shape[1]
            tokens += new * x.shape[0]
            ttft += [b - a] * x.shape[0]
            per_tok += [(c - b - (b - a)) / max(1, new - 1)] * x.shape[0]
        wall = time.perf_counter() - t0 - sum(ttft) / batch  # the 1-token probes are not throughput
    return summary(ttft, per_tok, tokens, wall, 0, len(prompts) // batch * batch)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run_http(export: str, prompts: list[list[int]], conc: int, max_tokens: int, args) -> dict:
    """The same load through Ray Serve over HTTP, streamed (TTFT = first event with text). The server stops
    at the end-of-text id (a random model may emit it): such a completion counts with its tokens."""
    import urllib.request

    def one(i: int):
        body = json.dumps({"prompt": prompts[i], "max_tokens": max_tokens, "temperature": 0, "stream": True,
                           "stream_options": {"include_usage": True}}).encode()
        req = urllib.request.Request(args.url + "/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        t0, first, n, reason = time.perf_counter(), None, 0, None
        with urllib.request.urlopen(req, timeout=600) as r:
            for line in r:
                if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                    continue
                ev = json.loads(line[6:])
                if ev.get("error"):
                    raise RuntimeError(ev["error"]["message"])
                if ev.get("usage"):
                    n = ev["usage"]["completion_tokens"]
                elif ev["choices"]:
                    reason = ev["choices"][0].get("finish_reason") or reason
                    if first is None and ev["choices"][0]["text"]:
                        first = time.perf_counter()
        end = time.perf_counter()
        if not (reason == "length" and n == max_tokens or reason == "stop" and n <= max_tokens):
            raise RuntimeError(f"request {i}: {n} tokens streamed, finish_reason {reason}")
        return n, None if first is None else first - t0, None if first is None or n < 2 else (end - first) / (n - 1)

    return drive(len(prompts), conc, one)


class DictLookup:
    """A cheap stand-in for an LMatch index: the next id after the last 3 tokens, from a fixed table."""

    def __init__(self, vocab: int):
        self.vocab = vocab
        self.table: dict[tuple[int, ...], int] = {}

    def lookup(self, ctx):
        key = tuple(ctx[-3:])
        nxt = self.table.get(key)
        if nxt is None:
            nxt = self.table.setdefault(key, hash(key) % (self.vocab + 1))
        return nxt, min(3, len(ctx))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="gpt2-124m")
    p.add_argument("--quick", action="store_true", help="tiny model, small load (CPU smoke run)")
    p.add_argument("--concurrency", default="1,8,32,128")
    p.add_argument("--requests", default="", help="requests per level, comma list (default: 2,000 in all)")
    p.add_argument("--prompt_len", type=int, default=128)
    p.add_argument("--max_tokens", type=int, default=128)
    p.add_argument("--device", default="auto")
    p.add_argument("--hf_requests", type=int, default=0, help="requests per level for the HF baseline (0 = auto)")
    p.add_argument("--eager", action="store_true", help="no CUDA graphs in the engine (the reference path)")
    p.add_argument("--no_hf", action="store_true")
    p.add_argument("--http", action="store_true", help="also measure through Ray Serve over HTTP")
    p.add_argument("--lmatch", action="store_true", help="per-token latency with and without an lmatch hook")
    p.add_argument("--index", default=None, help="a real LMatch index (dataset dir) for --lmatch")
    p.add_argument("--kv_bucket", type=int, default=64, help="the engine's smallest attention read (0 = all)")
    p.add_argument("--compare_kv", action="store_true", help="also each level with whole-cache reads (kv_bucket 0)")
    p.add_argument("--prefix_tokens", type=int, default=0, help="also TTFT of requests sharing this long a prefix")
    p.add_argument("--prefix_requests", type=int, default=32, help="requests submitted together for --prefix_tokens")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default); 1 helps on a busy CPU")
    p.add_argument("--out", default=None, help="also write the JSON here")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.quick:
        a.preset, a.prompt_len, a.max_tokens = "tiny", 16, 16
        if a.concurrency == "1,8,32,128":
            a.concurrency = "1,4,16"
    levels = [int(c) for c in a.concurrency.split(",")]
    if a.requests:
        per_level = [int(r) for r in a.requests.split(",")]
    elif a.quick:
        per_level = [4 * c for c in levels]
    else:  # 2,000 in all, more where there are more streams
        w = [max(50, c * 8) for c in levels]
        per_level = [round(2000 * x / sum(w)) for x in w]
        per_level[-1] += 2000 - sum(per_level)
    if not a.no_hf and importlib.util.find_spec("transformers") is None:
        print("transformers is not installed: no HF baseline", flush=True)
        a.no_hf = True
    device = a.device if a.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    result: dict = {"preset": a.preset, "device": device, "dtype": str(dtype).removeprefix("torch."),
                    "prompt_len": a.prompt_len, "max_tokens": a.max_tokens, "hf_baseline": not a.no_hf, "levels": {}}
    with tempfile.TemporaryDirectory() as tmp:
        max_len = max(ModelConfig.preset(a.preset).max_seq_len, a.prompt_len + a.max_tokens,
                      a.prefix_tokens + PREFIX_OWN + a.max_tokens)
        export = make_export(a.preset, Path(tmp), max_seq_len=max_len)
        ex = load_exported(export, device=device, dtype=dtype)
        vocab = ex.config.vocab_size
        t0 = time.perf_counter()
        engine = Engine(ex.model, eot_id=None, max_batch=max(levels), max_queue=max(per_level),
                        max_len=a.prompt_len + a.max_tokens, cuda_graphs=False if a.eager else None,
                        kv_bucket=a.kv_bucket).start()
        result["engine_start_s"] = round(time.perf_counter() - t0, 2)  # graph captures included
        run_engine(engine, make_prompts(2, a.prompt_len, vocab, 99), 2, 4)  # warm-up
        full_kv = None
        if a.compare_kv:  # the baseline of the used-length reads: every step reads the whole cache
            full_kv = Engine(ex.model, eot_id=None, max_batch=max(levels), max_queue=max(per_level),
                             max_len=a.prompt_len + a.max_tokens, cuda_graphs=False if a.eager else None,
                             kv_bucket=0).start()
            run_engine(full_kv, make_prompts(2, a.prompt_len, vocab, 99), 2, 4)
        for c, n in zip(levels, per_level):
            prompts = make_prompts(n, a.prompt_len, vocab, seed=c)
            level = {"engine": run_engine(engine, prompts, c, a.max_tokens)}
            if a.compare_kv:
                level["engine_full_kv"] = run_engine(full_kv, prompts, c, a.max_tokens)
                level["ratio_tokens_per_s_vs_full_kv"] = round(
                    level["engine"]["tokens_per_s"] / level["engine_full_kv"]["tokens_per_s"], 3)
            if not a.no_hf:
                hf_n = max(c, a.hf_requests) if a.hf_requests else \
                    (max(c, min(n, 2 * c)) if c > 1 else min(n, 8))  # at least one full batch
                level["hf_batched"] = run_hf(export, prompts[:hf_n], c, a.max_tokens, device, dtype)
                if c > 1:  # one request at a time: the plain generate() loop
                    level["hf_sequential"] = result["levels"]["1"]["hf_batched"] if "1" in result["levels"] else \
                        run_hf(export, prompts[:min(n, 8)], 1, a.max_tokens, device, dtype)
                e, h = level["engine"], level["hf_batched"]
                if h["tokens_per_s"]:
                    level["ratio_tokens_per_s_vs_hf_batched"] = round(e["tokens_per_s"] / h["tokens_per_s"], 2)
                if level.get("hf_sequential", {}).get("tokens_per_s"):
                    level["ratio_tokens_per_s_vs_hf_sequential"] = round(
                        e["tokens_per_s"] / level["hf_sequential"]["tokens_per_s"], 2)
            result["levels"][str(c)] = level
            print(json.dumps({str(c): level}), flush=True)
        result["cuda_graphs"] = engine.stats()["cuda_graphs"]  # captured (bucket, sampling kinds) steps
        engine.close()
        if full_kv is not None:
            full_kv.close()
        result["errors"] = sum(lv["engine"]["errors"] for lv in result["levels"].values())
        result["requests"] = sum(lv["engine"]["requests"] for lv in result["levels"].values())
        if a.http:
            result["http"] = http_levels(a, export, levels, per_level, vocab)
            result["http_overhead"] = {c: http_overhead(result["levels"][c]["engine"], h)
                                       for c, h in result["http"].items()}
            result["errors"] += sum(lv["errors"] for lv in result["http"].values())
            result["requests"] += sum(lv["requests"] for lv in result["http"].values())
        if a.lmatch:
            result["lmatch"] = lmatch_overhead(a, Path(tmp), device, dtype, max_len)
        if a.prefix_tokens:
            result["prefix_reuse"] = prefix_reuse(a, ex.model, vocab)
    emit(result, a.out)
    return result


def http_overhead(engine: dict, http: dict) -> dict:
    """HTTP through Ray Serve next to the engine alone at one level."""
    ratio = http["tokens_per_s"] / engine["tokens_per_s"] if http["tokens_per_s"] and engine["tokens_per_s"] else None
    ttft = (None if http["ttft_ms_p50"] is None or engine["ttft_ms_p50"] is None
            else round(http["ttft_ms_p50"] - engine["ttft_ms_p50"], 3))
    return {"tokens_per_s_ratio_http_vs_engine": None if ratio is None else round(ratio, 3),
            "ttft_ms_p50_added": ttft}


PREFIX_OWN = 16  # each --prefix_tokens request's own tokens after the shared prefix


def prefix_reuse(a, model, vocab: int) -> dict:
    """TTFT of `prefix_requests` requests submitted together, prompts = one shared `prefix_tokens` prefix +
    16 own tokens, `max_tokens` 4: the engine without, then with a prefix cache (fresh engines)."""
    n, new = a.prefix_requests, 4
    head = make_prompts(1, a.prefix_tokens, vocab, seed=11)[0]
    prompts = [head + own for own in make_prompts(n, PREFIX_OWN, vocab, seed=12)]
    # Warm-up, the same on both engines: two prompts of the load's shape sharing another prefix (with the cache, the
    # second reads the first one's blocks: the reuse path runs once before the timing too), nothing shared with the load
    warm = make_prompts(1, a.prefix_tokens, vocab, seed=13)[0]
    other = [warm + p[a.prefix_tokens:] for p in prompts[:2]]
    out = {"requests": n, "prefix_tokens": a.prefix_tokens, "own_tokens": PREFIX_OWN}
    for name, tokens in (("without", 0), ("with", a.prefix_tokens + 2 * PREFIX_OWN)):
        engine = Engine(model, eot_id=None, max_batch=n, max_queue=n, max_len=len(prompts[0]) + new,
                        cuda_graphs=False if a.eager else None, kv_bucket=a.kv_bucket,
                        prefix_cache_tokens=tokens).start()
        run_engine(engine, other, 2, new)
        out[name] = run_engine(engine, prompts, n, new)
        out[name]["prefilled_tokens"] = engine.stats()["prefilled_tokens"]
        engine.close()
    w, wo = out["with"]["ttft_ms_p50"], out["without"]["ttft_ms_p50"]
    out["ttft_p50_ratio_without_vs_with"] = round(wo / w, 2) if w else None
    return out


def http_levels(a, export: str, levels: list[int], per_level: list[int], vocab: int) -> dict:
    import ray
    from ray import serve

    from app.serve import deployment as app_serve
    from app.serve.config import ServeConfig

    ray.init(include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    port = 18000 + int(time.time()) % 1000
    a.url = app_serve.start(ServeConfig(model=export, max_batch=max(levels), max_queue=max(per_level),
                                        max_tokens_limit=a.max_tokens, num_gpus=1 if torch.cuda.is_available() else 0),
                            port=port)
    out = {}
    try:
        run_http(export, make_prompts(2, a.prompt_len, vocab, 99), 2, 4, a)  # warm-up
        for c, n in zip(levels, per_level):
            out[str(c)] = run_http(export, make_prompts(n, a.prompt_len, vocab, seed=c), c, a.max_tokens, a)
            print(json.dumps({"http": {str(c): out[str(c)]}}), flush=True)
    finally:
        serve.shutdown()
    return out


def lmatch_overhead(a, tmp: Path, device: str, dtype, max_len: int) -> dict:
    """Per-token latency at 8 streams: the same-shape model with an lmatch hook vs the plain model."""
    n, c = (16, 4) if a.quick else (128, 8)
    out = {}
    for name, lm in (("without", False), ("with", True)):
        ex = load_exported(make_export(a.preset, tmp, lmatch=lm, max_seq_len=max_len), device=device, dtype=dtype)
        hook = None
        if lm:
            if a.index:
                from index.lmatch import LMatchIndex

                hook = LMatchIndex.open(a.index)
            else:
                hook = DictLookup(ex.config.vocab_size)
        engine = Engine(ex.model, eot_id=None, max_batch=c, max_queue=n, lmatch=hook,
                        max_len=a.prompt_len + a.max_tokens, cuda_graphs=False if a.eager else None).start()
        prompts = make_prompts(n, a.prompt_len, ex.config.vocab_size, seed=5)
        run_engine(engine, prompts[:2], 2, 4)
        out[name] = run_engine(engine, prompts, c, a.max_tokens)
        engine.close()
    out["per_token_ms_p50_ratio"] = round(out["with"]["per_token_ms_p50"] / out["without"]["per_token_ms_p50"], 3)
    return out


if __name__ == "__main__":
    main()
