"""bench.speedrun_124m: the baseline's schedule, and a smoke run, phase by phase, on a tiny python corpus."""
import json
import math

import pytest

from bench import speedrun_124m
from bench.speedrun_124m import _schedule


def test_baseline_schedule_warms_up_then_decays_to_a_tenth():
    steps, lr = 200, 6e-4
    lrs = [_schedule(i, steps, lr) for i in range(steps)]
    warm = steps // 20
    assert lrs[0] == pytest.approx(lr / warm) and lrs[warm - 1] == pytest.approx(lr)
    assert all(a >= b for a, b in zip(lrs[warm - 1:], lrs[warm:]))  # never rises after the warmup
    assert lrs[-1] == pytest.approx(lr / 10)
    assert lrs[warm + (steps - 1 - warm) // 2] == pytest.approx(lr / 10 + 0.5 * (lr - lr / 10), rel=0.02)


@pytest.mark.slow
def test_smoke_run_in_phases(ray_session, tmp_path):
    out = tmp_path / "run"
    corpus = speedrun_124m.main(["--smoke", f"--out={out}", "--phase=corpus"])
    assert corpus["train_tokens"] == corpus["corpus"]["tokens"]["train"] > 0 and not (out / "baseline.json").exists()
    shard_mtimes = {p.name: p.stat().st_mtime_ns for p in (out / "data").glob("*.bin")}
    base = speedrun_124m.main(["--smoke", f"--out={out}", "--phase=baseline"])["nanoGPT baseline"]
    assert base["steps"] == 12 and len(base["curve"]) == 3  # evaluated every 4 steps
    assert base["final_val_loss"] == round(base["curve"][-1][2], 4) < base["curve"][0][2]
    assert all(t1 < t2 for (_, t1, _), (_, t2, _) in zip(base["curve"], base["curve"][1:]))

    report = speedrun_124m.main(["--smoke", f"--out={out}", "--phase=spotlm"])
    assert {p.name: p.stat().st_mtime_ns for p in (out / "data").glob("*.bin")} == shard_mtimes  # corpus reused
    s, spot = report["summary"], report["spotlm"]
    assert s["target_val_loss"] == base["final_val_loss"] and s["baseline_time_s"] == base["train_time_s"]
    assert spot["steps"] == round(12 * 0.6) and spot["curve"] and spot["config"]["model"]["mlp"] == "relu2"
    assert spot["config"]["eval_tokens"] == s["eval_tokens"] and spot["config"]["optim"]["name"] == "muon"
    if spot["time_to_target_s"] is not None:  # a tiny CPU run may or may not get there
        assert s["ratio (spotlm / baseline time)"] == round(spot["time_to_target_s"] / base["train_time_s"], 3)
    corpus = report["corpus"]
    rows = [json.loads(x) for x in open(corpus["file_list"])]
    assert corpus["found"] == len(rows) + corpus["duplicates"] + corpus["unreadable"]
    assert corpus["tokens"]["val"] == corpus["val_tokens_total"] == sum(r["val"] for r in rows) > 0
    assert (out / "speedrun_124m.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "speedrun_124m.json").read_text())["summary"] == s
    assert not math.isnan(spot["best_val_loss"])
