"""The 1-bit codec before (.gpu/sync_before.py: app/train/sync.py at c318906) and after on one GPU: the encoded bits,
the scales (row-wise against one-piece-at-a-time means), the decode, and 1-bit Adam's first updates; output: check.txt."""
import importlib.util, os, torch, torch.distributed as dist
from app.train import sync as after
spec = importlib.util.spec_from_file_location("b", ".gpu/sync_before.py"); before = importlib.util.module_from_spec(spec); spec.loader.exec_module(before)
os.environ.setdefault("MASTER_ADDR", "127.0.0.1"); os.environ.setdefault("MASTER_PORT", "29542")
dist.init_process_group("nccl", rank=0, world_size=1)
torch.manual_seed(0)
sizes = [5000, 300, 2048 * 7 + 3, 999, 4096 * 3]
for world in (1, 4):
    lay = after.BucketLayout.of(sizes, world)
    x = torch.randn(lay.chunk, device="cuda")
    a, b = after.SignCodec(lay), before.SignCodec(lay)
    ma, mb = a.encode(x, 0), b.encode(x, 0)
    cb = lay.chunk // 8
    sa, sb = ma[cb:].clone().view(torch.float32), mb[cb:].clone().view(torch.float32)
    print(world, "bits equal", torch.equal(ma[:cb], mb[:cb]), "scale max rel diff", ((sa - sb).abs() / sb).max().item(),
          "decode equal given same msg", torch.equal(a.decode(mb, 0), b.decode(mb, 0)))
sa, sb = after.OneBitState(after.CommCounter()), before.OneBitState(before.CommCounter())
n = sum(sizes)
for s in range(6):
    g = torch.randn(n, device="cuda")
    ua, ub = sa.update(0, g, sizes), sb.update(0, g, sizes)
    d = (ua - ub).abs()
    print("step", s, "refresh" if after.refreshes(s, 64) else "1-bit", "max abs diff", d.max().item(), "rel", (d / ub.abs().clamp(min=1e-12)).max().item(), "sign flips", int((ua.sign() != ub.sign()).sum()))
dist.destroy_process_group()
