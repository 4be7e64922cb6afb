"""1-bit Adam's update (`OneBitState.update`, the onebit DDP hook's work) per optimizer step for GPT-2 124M's
gradients cut into DDP-like 25 MiB buckets, on one GPU (a world of 1: the codec and the optimizer, no wire):
app/train/sync.py before (per-piece scales, the file given) and after (this tree), the same gradients, side by side."""
import importlib.util, json, os, sys, time
import torch
import torch.distributed as dist
from app.model.gpt import GPT, ModelConfig
from app.train import sync as after

before_path, out, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
spec = importlib.util.spec_from_file_location("sync_before", before_path)
before = importlib.util.module_from_spec(spec); spec.loader.exec_module(before)
os.environ.setdefault("MASTER_ADDR", "127.0.0.1"); os.environ.setdefault("MASTER_PORT", "29541")
dist.init_process_group("nccl", rank=0, world_size=1)
dev = torch.device("cuda")
sizes = [p.numel() for p in GPT(ModelConfig.preset("gpt2-124m")).parameters()][::-1]  # DDP buckets from the end
buckets, cur = [], []
for n in sizes:
    if cur and 4 * (sum(cur) + n) > 25 * 2**20:
        buckets.append(cur); cur = []
    cur.append(n)
buckets.append(cur)
gen = torch.Generator(device=dev).manual_seed(0)
grads = [[torch.randn(sum(b), device=dev, generator=gen) * 1e-2 for b in buckets] for _ in range(4)]
res = {"device": torch.cuda.get_device_name(), "params": sum(sizes), "buckets": len(buckets), "steps": steps}
outs = {}
for name, mod in (("after", after), ("before", before)):
    st = mod.OneBitState(mod.CommCounter())
    times, last = [], None
    for s in range(steps):
        torch.cuda.synchronize(); t = time.perf_counter()
        last = [st.update(k, grads[s % 4][k], b) for k, b in enumerate(buckets)]
        torch.cuda.synchronize(); times.append(time.perf_counter() - t)
    outs[name] = torch.cat(last)
    onebit = sorted(t for s, t in enumerate(times) if s > 2 and not mod.refreshes(s, 64))  # 1-bit steps, warm
    res[name] = {"ms_per_step": [round(x * 1e3, 2) for x in times],
                 "onebit_step_ms_median": round(onebit[len(onebit) // 2] * 1e3, 2)}
    print(name, res[name], flush=True)
res["max_abs_diff"] = (outs["after"] - outs["before"]).abs().max().item()
res["equal"] = bool(torch.equal(outs["after"], outs["before"]))
res["speedup"] = round(res["before"]["onebit_step_ms_median"] / res["after"]["onebit_step_ms_median"], 2)
print(json.dumps({k: v for k, v in res.items() if k not in ("before", "after")}))
json.dump(res, open(out, "w"), indent=1)
dist.destroy_process_group()
