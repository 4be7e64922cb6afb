"""Ray job: train (or continue) a GPT on tokenized shards with Ray Train; exports the model at the end.

    python -m jobs.train --data=runs/shards --name=my-run --preset=tiny --max_steps=300

Across slow links (`--sync.*`, app/train/sync.py): 1-bit Adam, or DiLoCo rounds of local steps after a warm start:
    python -m jobs.train ... --cluster.num_workers=4 --sync.mode=onebit
    python -m jobs.train ... --cluster.num_workers=4 --sync.mode=diloco --sync.inner_steps=50 --sync.warmup_steps=50 \
        --sync.compress=int8
"""
from __future__ import annotations

import sys

from app.config import parse_config, refuse
from app.ray_env import init_ray
from app.train.config import TrainConfig
from app.train.run import preflight, train


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(TrainConfig, argv, prog="train")
    try:
        preflight(cfg)  # configuration errors stop here, before Ray, without spending the failure budget
    except (ValueError, OSError) as e:  # ConfigError, ShardFormatError, an unreadable dataset
        return refuse("train", e)
    init_ray()
    try:
        result = train(cfg)
    except (ValueError, OSError) as e:  # what changed since the preflight (storage, checkpoints)
        print(f"train: {e}", file=sys.stderr)
        return 1
    if result.error:
        print(f"train: failed: {result.error}", file=sys.stderr)
        return 1
    return 0  # train() logged the run's summary (steps, val loss, time, export)


if __name__ == "__main__":
    sys.exit(main())
