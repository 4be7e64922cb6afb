"""bench/memory.py reports every probe: a child killed by SIGKILL (as by the host's OOM killer) or raising is
a failure row with its reason and length, never an empty result."""
import json

import pytest

from bench import memory

TINY = {"preset": "tiny", "device": "cpu", "overrides": {"n_layer": 2, "d_model": 64, "n_head": 4, "vocab_size": 512}}


@pytest.mark.parametrize("kind,reason,error", [("sigkill", "killed", "SIGKILL"),
                                               ("raise", "error", "ValueError: deliberate failure")])
def test_a_failing_probe_is_a_row_with_its_reason_and_length(kind, reason, error):
    spec = {**TINY, "option": "full_offload_opt_fp8", "seqs": [128, 256], "fault": {"seq_len": 256, "kind": kind},
            "profile": True}
    rows = memory._run("probe", spec, timeout=120)
    assert [r["seq_len"] for r in rows] == [128, 256]
    good, bad = rows
    assert good["ok"] and good["finite"] and good["tokens_per_s"] > 0 and good["host_peak_gb"] > 0
    assert {"predicted_peak_gb", "predicted_host_gb", "forward_s", "backward_s", "optimizer_s",
            "recompute_s_est", "attention_backend", "offloaded_gb"} <= set(good)
    assert good["profile"]["attention_ms"] > 0 and good["profile"]["matmul_ms"] > 0
    assert not bad["ok"] and bad["reason"] == reason and error in bad["error"]
    if kind == "sigkill":
        assert bad["exit_code"] == -9 and "MemAvailable" in bad["error"]  # the host memory seen, for the OOM guess


def test_death_reasons():
    seen = {"rss_gb": 120.0, "avail_min_gb": 1.0, "total_gb": 137.0}
    assert memory._death(-9, "", seen)[0] == "host_oom"  # SIGKILL with the host nearly out of memory
    assert memory._death(-9, "", {**seen, "avail_min_gb": 90.0})[0] == "killed"
    assert memory._death(None, "", seen)[0] == "timeout"
    assert memory._death(1, "x\ntorch.OutOfMemoryError: CUDA out of memory.", seen) == (
        "cuda_oom", "torch.OutOfMemoryError: CUDA out of memory.")
    assert memory._death(1, "Traceback\nKeyError: 'a'", seen) == ("error", "KeyError: 'a'")


@pytest.mark.slow
def test_smoke_lists_every_probe(capsys):
    assert memory.main(["--smoke", "--no_loss_bench", "--options", "none"]) == 0  # + the two failing runs
    out = json.loads(capsys.readouterr().out)
    faults = [r for r in out["results"] if r.get("deliberate_fault")]
    assert {r["failure_reason"] for r in faults} == {"killed", "error"}
    for r in out["results"]:
        assert r["probes"] and all("ok" in p and p["seq_len"] for p in r["probes"])
        assert r["max_seq_len"] > 0 and r["tokens_per_s"] > 0
    assert all(r["first_failure"] == 512 for r in faults)


def test_auto_probes_run_the_planners_choice_or_report_its_refusal():
    spec = {**TINY, "option": "auto", "seqs": [128], "gpu_gb": 80.0, "host_gb": 100.0}
    (row,) = memory._run("probe", spec, timeout=120)
    assert row["ok"] and row["memory"] == {}  # a tiny model needs no option
    (row,) = memory._run("probe", {**spec, "host_gb": 1.0}, timeout=120)
    assert not row["ok"] and row["reason"] == "planner_refused" and "host short by" in row["error"]
