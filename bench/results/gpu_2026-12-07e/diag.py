"""Where does a prefix-reuse round spend its time: per-step phases (host, unsynced), profiler, micro forwards."""
import json, os, sys, time
import torch
import app.serve.engine as E
import app.serve.kvcache as KV
from app.model.gpt import GPT, ModelConfig
from app.serve.generate import forward_last
from bench.serve_load import PREFIX_OWN, make_prompts, run_engine

OUT = os.environ["OUT"]
print("torch", torch.__version__, torch.cuda.get_device_name(), "switchinterval", sys.getswitchinterval(), flush=True)
dev = "cuda"
cfg = ModelConfig.preset("gpt2-124m", max_seq_len=1024 + PREFIX_OWN + 4)
torch.manual_seed(0)
model = GPT(cfg); model.init_weights(); model = model.to(dev, torch.bfloat16).eval()
n, new = 32, 4
head = make_prompts(1, 1024, cfg.vocab_size, seed=11)[0]
prompts = [head + own for own in make_prompts(n, PREFIX_OWN, cfg.vocab_size, seed=12)]
warm = make_prompts(1, 1024, cfg.vocab_size, seed=13)[0]
other = [warm + p[1024:] for p in prompts[:2]]

log = []
T0 = [0.0]
def wrap(cls, name, tag, info=None):
    f = getattr(cls, name)
    def g(*a, **k):
        t = time.perf_counter(); r = f(*a, **k); d = time.perf_counter() - t
        log.append((tag, round(1e3 * (t - T0[0]), 3), round(1e3 * d, 3), info(a, r) if info else None))
        return r
    setattr(cls, name, g)

wrap(E.Engine, "_step", "step")
wrap(E.Engine, "_admit", "admit", lambda a, r: [len(g) for g in r])
wrap(E.Engine, "_decode", "decode", lambda a, r: len(a[1]))
wrap(E.Engine, "_prefill", "prefill", lambda a, r: len(a[1]))
wrap(E.Engine, "_emit_decoded", "emit_dec")
wrap(KV.PrefixCache, "load_many", "load", lambda a, r: sum(r))
wrap(KV.PrefixCache, "store_many", "store")
fl = E.forward_last
def fl2(*a, **k):
    t = time.perf_counter(); r = fl(*a, **k); d = time.perf_counter() - t
    log.append(("fwd", round(1e3 * (t - T0[0]), 3), round(1e3 * d, 3), tuple(a[1].shape))); return r
E.forward_last = fl2
wrap(E.DecodeState, "sample", "sample")
wrap(E.Engine, "_emit", "emit")

res = {}
for rep in range(2):
    for name, tokens in (("without", 0), ("with", 1024 + 2 * PREFIX_OWN)):
        eng = E.Engine(model, eot_id=None, max_batch=n, max_queue=n, max_len=len(prompts[0]) + new,
                       kv_bucket=64, prefix_cache_tokens=tokens).start()
        run_engine(eng, other, 2, new)
        torch.cuda.synchronize(); log.clear(); T0[0] = time.perf_counter()
        prof = None
        if False:
            from torch.profiler import ProfilerActivity, profile
            prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]); prof.__enter__()
            T0[0] = time.perf_counter()
        r = run_engine(eng, prompts, n, new)
        if prof is not None:
            prof.__exit__(None, None, None)
            pass
            t = prof.key_averages()
            print(t.table(sort_by="self_cpu_time_total", row_limit=30), flush=True)
            print(t.table(sort_by="self_cuda_time_total", row_limit=25), flush=True)
        eng.close()
        print(f"== {name} rep {rep}", json.dumps(r), flush=True)
        for row in log:
            print("  ", row)
        res[f"{name}_{rep}"] = dict(r, log=log[:])

# micro: forward host vs gpu time, no other threads
from app.serve.kvcache import KVCache
def micro(B, T, start, reps=5):
    cache = KVCache(cfg, 32, 1044, dev, torch.bfloat16)
    idx = torch.randint(0, 1000, (B, T), device=dev)
    out = []
    for _ in range(reps):
        for r in range(B): cache.lengths[r] = start
        torch.cuda.synchronize()
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t = time.perf_counter(); e0.record()
        forward_last(model, idx, cache.slots(list(range(B))), torch.full((B,), T - 1, device=dev))
        e1.record(); h = time.perf_counter() - t
        torch.cuda.synchronize(); w = time.perf_counter() - t
        out.append((round(1e3 * h, 2), round(e0.elapsed_time(e1), 2), round(1e3 * w, 2)))
    return out
with torch.inference_mode(), E.no_cudnn_attention():
    for B, T, s in ((1, 16, 1024), (30, 16, 1024), (32, 16, 1024), (1, 1040, 0), (3, 1040, 0), (1, 16, 0)):
        m = micro(B, T, s); res[f"micro_{B}x{T}@{s}"] = m
        print("micro host_ms/gpu_ms/wall_ms", B, T, s, m, flush=True)
    # which SDPA backend takes the masked reuse attention
    for name, flags in (("no_eff", dict(enable_mem_efficient=False)), ("no_math", dict(enable_math=False))):
        from torch.nn.attention import SDPBackend, sdpa_kernel
        allowed = {"no_eff": [SDPBackend.FLASH_ATTENTION, SDPBackend.MATH], "no_math": [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]}[name]
        try:
            with sdpa_kernel(allowed):
                m = micro(30, 16, 1024, 3)
            print("sdpa", name, "ok", m, flush=True)
        except Exception as e:
            print("sdpa", name, "FAILS", type(e).__name__, str(e)[:200], flush=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as p2:
        micro(30, 16, 1024, 2)
    print(p2.key_averages().table(sort_by="self_cpu_time_total", row_limit=25), flush=True)
json.dump(res, open(f"{OUT}/diag.json", "w"), indent=0)
