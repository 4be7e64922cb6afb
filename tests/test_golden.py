"""A stored loss curve of a tiny deterministic CPU run: any numeric drift in the model, the data order,
the optimizer or the schedule changes it. Regenerate (only for an intended change, saying why in the commit):
    SPOTLM_WRITE_GOLDEN=1 python -m pytest tests/test_golden.py
"""
import json
import os
from pathlib import Path

import pytest

from app import storage
from app.train.run import list_checkpoints, train
from tests.conftest import train_config

GOLDEN = Path(__file__).parent / "assets" / "golden_loss_tiny.json"


def test_golden_loss_curve(shakespeare_shards, tmp_path):
    cfg = train_config(data=shakespeare_shards, storage=str(tmp_path), name="golden", preset="tiny", seq_len=64,
                       micro_batch=4, batch_tokens=512, max_steps=30, log_every=1, eval_every=15, eval_tokens=2048,
                       export="none", optim={"lr": 3e-3}, schedule={"warmup_steps": 5}, ckpt={"every": 30},
                       cluster={"cpus_per_worker": 0.5}, perf={"deterministic": True})
    result = train(cfg)
    assert result.error is None
    state = storage.read_json(storage.join(list_checkpoints(cfg.run_dir)[-1], "state.json"))
    curve = {"train": state["loss_curve"], "val": {k: v[1] for k, v in state["val_curve"].items()}}
    if os.environ.get("SPOTLM_WRITE_GOLDEN"):
        GOLDEN.write_text(json.dumps(curve, indent=1, sort_keys=True) + "\n")
    golden = json.loads(GOLDEN.read_text())
    assert sorted(curve["train"], key=int) == sorted(golden["train"], key=int)
    for part in ("train", "val"):
        for step, loss in golden[part].items():
            assert curve[part][step] == pytest.approx(loss, rel=1e-5, abs=1e-6), (part, step)
