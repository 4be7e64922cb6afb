"""Summarise a speedrun JSON: time to target, ms/step per 25-step window, mean ms/step after step 50."""
import json, sys
d = json.load(open(sys.argv[1]))
s = d["spotlm"]
c = s["curve"]
prev = (0, 0.0)
per = []
for step, t, v in c:
    per.append(round((t - prev[1]) / (step - prev[0]) * 1e3, 2)); prev = (step, t)
after50 = [(st, t) for st, t, _ in c if st >= 50]
ms50 = (after50[-1][1] - after50[0][1]) / (after50[-1][0] - after50[0][0]) * 1e3 if len(after50) > 1 else None
print(sys.argv[2], "| target_s", s["time_to_target_s"], "step", s["step_at_target"], "best", s["best_val_loss"],
      "| compile_s", s.get("compile_s (first step)"), "| job_wall", s.get("job_wall_s (Ray start, compile, eval, checkpoint included)"),
      "| ms/step after 50: %.2f" % ms50 if ms50 else "")
print("   per-window ms/step:", per)
b = d.get("nanoGPT baseline")
if b: print("   nanoGPT", b["time_to_target_s"], "iter", b["iter_at_target"], "best", b["best_val_loss"], "speedup", d["summary"]["speedup"])
