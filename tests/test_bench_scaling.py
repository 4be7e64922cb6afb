"""bench.scaling's CPU smoke run (gloo, 1-2 workers): the DDP scaling rows and the sync modes' byte ratios."""
import pytest

from bench import scaling


@pytest.mark.slow
def test_scaling_smoke_ddp_and_sync(ray_session, tmp_path):
    out = scaling.main(["--smoke", "--sections=ddp,sync", f"--output={tmp_path / 's.json'}"])
    assert [(r["gpus"], "error" in r) for r in out["ddp"]] == [(1, False), (2, False)]
    assert out["ddp"][0]["scaling_efficiency"] == 1.0 and out["ddp"][1]["tokens_per_s"] > 0
    rows = {r["mode"]: r for r in out["sync"]}
    assert set(rows) == {"ddp", "onebit", "diloco"} and not any("error" in r for r in rows.values())
    # 24 steps: 6 refresh the second moment in int8 (4x fewer bytes than fp32), 18 send 1 bit (32x): 11.6x
    assert rows["onebit"]["bytes_ratio_ddp_over_this"] == pytest.approx(24 / (6 / 4 + 18 / 32), rel=0.05)
    assert rows["diloco"]["bytes_ratio_ddp_over_this"] > 2  # one exchange per round of 4 inner steps
    assert (tmp_path / "s.json").exists()
