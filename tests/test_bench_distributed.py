"""bench.distributed: its smoke run through the namespace cluster, and its ratios and target checks."""
from __future__ import annotations

import json

import pytest

from bench.distributed import check_targets, main, ratios
from bench.netns import available


def _row(hook_per_step: float, wire_per_step: float, vals: dict[int, float], tps: float) -> dict:
    """A mode's row as `compare` leaves it: bytes and speed of the first seed's run, every seed's loss."""
    return {"hook_bytes_per_step": hook_per_step, "wire_bytes_per_node_step": wire_per_step,
            "val_loss": next(iter(vals.values())), "val_loss_seeds": vals, "tokens_per_s": tps}


def test_ratios_against_ddp_and_the_targets():
    rows = {"ddp": _row(3200.0, 4000.0, {1337: 2.00}, 100.0), "onebit": _row(100.0, 400.0, {1337: 2.03}, 150.0),
            "diloco_h50": _row(50.0, 80.0, {1337: 2.02}, 600.0)}
    r = ratios(rows)
    assert r["onebit"] == {"bytes_ratio_hook": 32.0, "bytes_ratio_wire": 10.0, "loss_ratio": 1.015,
                           "loss_ratio_seeds": {1337: 1.015}, "tokens_per_s_ratio": 1.5}
    assert r["diloco_h50"]["bytes_ratio_hook"] == 64.0 and r["diloco_h50"]["tokens_per_s_ratio"] == 6.0
    met = check_targets(r)
    assert met["onebit"] == {"bytes": True, "loss": True}
    assert met["diloco_h50"] == {"bytes": True, "loss": True, "tokens_per_s": True}
    rows["diloco_h50"]["val_loss_seeds"] = {1337: 2.1}  # 5% worse than DDP: over the 3% target
    assert check_targets(ratios(rows))["diloco_h50"]["loss"] is False


def test_loss_ratio_pairs_the_runs_of_each_seed():
    # Seed 1 is a harder run for both modes: paired, onebit is 1% and 3% worse (mean 2%), whatever the seeds' spread.
    rows = {"ddp": _row(3200.0, 4000.0, {1337: 2.00, 1: 2.20}, 100.0),
            "onebit": _row(100.0, 400.0, {1337: 2.02, 1: 2.266}, 150.0)}
    r = ratios(rows)["onebit"]
    assert r["loss_ratio_seeds"] == {1337: 1.01, 1: 1.03} and r["loss_ratio"] == 1.02
    assert check_targets({"onebit": r})["onebit"]["loss"] is True


@pytest.mark.slow  # a namespace cluster (~40 s) and one Ray Train job (~60 s on 2 loaded cores)
@pytest.mark.skipif(bool(available()), reason=f"no namespace cluster here: {available()}")
def test_smoke_run_reports_bytes_time_and_loss(tmp_path):
    out = tmp_path / "smoke.json"
    assert main(["--smoke", "--modes=ddp", f"--out={out}", f"--data_dir={tmp_path / 'shards'}"]) == 0
    result = json.loads(out.read_text())
    assert out.with_suffix(".png").stat().st_size > 0
    assert 80 <= result["link_mbit_measured"] <= 120
    ddp = result["modes"]["ddp"]
    assert ddp["steps"] == result["shape"]["steps"] and ddp["tokens"] == ddp["steps"] * result["tokens_per_step"]
    # two workers: a ring all-reduce sends 2(W-1)/W = 1 gradient per step
    assert ddp["hook_bytes_per_step"] == result["gradient_bytes_fp32"]
    assert ddp["wire_bytes_per_node_step"] >= ddp["hook_bytes_per_step"]  # the wire carries at least the hook's
    assert len(ddp["wire_bytes_sent_per_node"]) == 2 and ddp["s_per_step"] > 0 and ddp["tokens_per_s"] > 0
    assert ddp["val_loss"] > 0 and [s for s, _, _ in ddp["val_curve"]] == [2, 4]
