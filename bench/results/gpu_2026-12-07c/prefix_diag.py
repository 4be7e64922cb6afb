"""Issue: prefix reuse slower than none on GPU. Modes: time (component timings), sdpa (first-call costs), prof."""
import argparse
import json
import time

import torch
import torch.nn.functional as F

import app.serve.engine as E
from app.model.gpt import GPT, ModelConfig
from bench.serve_load import PREFIX_OWN, make_prompts, run_engine

p = argparse.ArgumentParser()
p.add_argument("--mode", default="time")
p.add_argument("--out", default="/tmp/diag.json")
a = p.parse_args()
import os
if os.environ.get("NOCUDNN"):
    torch.backends.cuda.enable_cudnn_sdp(False)
print("torch", torch.__version__, torch.cuda.get_device_name(), "cudnn_sdp", torch.backends.cuda.cudnn_sdp_enabled(),
      "flash", torch.backends.cuda.flash_sdp_enabled(), "eff", torch.backends.cuda.mem_efficient_sdp_enabled(), flush=True)
dev = "cuda"


def sync_ms(fn):
    torch.cuda.synchronize()
    t = time.perf_counter()
    r = fn()
    torch.cuda.synchronize()
    return r, 1e3 * (time.perf_counter() - t)


if a.mode == "sdpa":
    out = {}
    for name, T, L, mask in (("prefill_causal", 1040, 1040, False), ("reuse_masked", 16, 1040, True),
                             ("reuse_masked_b7", 16, 1040, True), ("reuse_masked_T32", 32, 1056, True)):
        B = 7 if name.endswith("b7") else 31
        q = torch.randn(B, 12, T, 64, device=dev, dtype=torch.bfloat16)
        big = torch.randn(B + 1, 12, L + 4, 64, device=dev, dtype=torch.bfloat16)
        k = v = big[:B, :, :L]
        m = (torch.arange(L, device=dev) <= (L - T + torch.arange(T, device=dev))[:, None])[None, None].expand(B, 1, T, L).contiguous() if mask else None
        times = []
        for _ in range(4):
            _, ms = sync_ms(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=m, is_causal=m is None))
            times.append(round(ms, 3))
        out[name] = times
        print(name, times, flush=True)
    json.dump(out, open(a.out, "w"), indent=1)
    raise SystemExit

cfg = ModelConfig.preset("gpt2-124m", max_seq_len=1024 + PREFIX_OWN + 4)
torch.manual_seed(0)
model = GPT(cfg)
model.init_weights()
model = model.to(dev, torch.bfloat16).eval()
vocab = cfg.vocab_size
n, new = 32, 4
head = make_prompts(1, 1024, vocab, seed=11)[0]
prompts = [head + own for own in make_prompts(n, PREFIX_OWN, vocab, seed=12)]
other = [p[::-1] for p in prompts[:2]]

log = []
if a.mode == "time":  # sync-timed components of every prefill
    orig_prefill, orig_fl = E.Engine._prefill, E.forward_last

    inside = [False]

    def prefill(self, seqs):
        inside[0] = True
        _, ms = sync_ms(lambda: orig_prefill(self, seqs))
        inside[0] = False
        log.append(("prefill", len(seqs), round(ms, 3)))

    def fl(*args, **kw):
        if not inside[0]:
            return orig_fl(*args, **kw)
        r, ms = sync_ms(lambda: orig_fl(*args, **kw))
        log.append(("forward", tuple(args[1].shape), round(ms, 3)))
        return r

    from app.serve.kvcache import PrefixCache
    many = hasattr(PrefixCache, "load_many")
    ln, sn = ("load_many", "store_many") if many else ("load", "store")
    ol, os_ = getattr(PrefixCache, ln), getattr(PrefixCache, sn)

    def load(self, *args):
        r, ms = sync_ms(lambda: ol(self, *args))
        log.append(("load", r if not many else sum(r), round(ms, 3)))
        return r

    def store(self, *args):
        r, ms = sync_ms(lambda: os_(self, *args))
        log.append(("store", len(args[2]), round(ms, 3)))  # prompt length, or prompts
        return r

    E.Engine._prefill, E.forward_last = prefill, fl
    setattr(PrefixCache, ln, load)
    setattr(PrefixCache, sn, store)

res = {}
for name, tokens in (("without", 0), ("with", 1024 + 2 * PREFIX_OWN), ("with_again", 1024 + 2 * PREFIX_OWN)):
    engine = E.Engine(model, eot_id=None, max_batch=n, max_queue=n, max_len=len(prompts[0]) + new,
                      kv_bucket=64, prefix_cache_tokens=tokens).start()
    run_engine(engine, other, 2, new)
    log.clear()
    if a.mode == "prof" and name == "with":
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            res[name] = run_engine(engine, prompts, n, new)
        t = prof.key_averages()
        print(t.table(sort_by="self_cuda_time_total", row_limit=20), flush=True)
        print(t.table(sort_by="self_cpu_time_total", row_limit=25), flush=True)
        print(t.table(sort_by="cpu_time_total", row_limit=25), flush=True)
    else:
        res[name] = run_engine(engine, prompts, n, new)
    res[name]["steps"] = engine.stats()["steps"]
    res[name]["log"] = log[:]
    engine.close()
    print(name, json.dumps({k: v for k, v in res[name].items() if k != "log"}), flush=True)
    for row in log:
        if row[0] != "load" or row[2] > 2:
            print("  ", row)
    if log:
        loads = [r[2] for r in log if r[0] == "load"]
        stores = [r[2] for r in log if r[0] == "store"]
        print("   loads n=%d sum=%.1f ms; stores n=%d sum=%.1f ms" % (len(loads), sum(loads), len(stores), sum(stores)))
json.dump(res, open(a.out, "w"), indent=1)
