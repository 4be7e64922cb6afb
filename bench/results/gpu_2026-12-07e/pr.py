"""bench.serve_load.prefix_reuse (the bench's own round: 32 prompts, 1,024 shared + 16 own tokens, 4 new) x N on one model."""
import json, sys
from types import SimpleNamespace
import torch
from app.model.gpt import GPT, ModelConfig
from bench.serve_load import PREFIX_OWN, prefix_reuse
side, reps, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
cfg = ModelConfig.preset("gpt2-124m", max_seq_len=1024 + PREFIX_OWN + 4)
torch.manual_seed(0)
model = GPT(cfg); model.init_weights(); model = model.to("cuda", torch.bfloat16).eval()
a = SimpleNamespace(prefix_requests=32, prefix_tokens=1024, eager=False, kv_bucket=64)
res = []
for r in range(reps):
    p = prefix_reuse(a, model, cfg.vocab_size); res.append(p)
    print(side, r, {k: (v if not isinstance(v, dict) else {x: v[x] for x in ("ttft_ms_p50", "ttft_ms_p99", "step_ms", "prefilled_tokens", "wall_s")}) for k, v in p.items()}, flush=True)
json.dump({"side": side, "device": torch.cuda.get_device_name(), "rounds": res}, open(out, "w"), indent=1)
