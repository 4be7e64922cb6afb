"""Ray job: build a model's kNN-LM index (keys = final hidden states over the train split, values = next
tokens) as `<out>/knn/`; rerunning it finishes an interrupted build.

    python -m jobs.build_knn --model=runs/my-run/export --data=runs/shards [--out=runs/my-run] [--max_tokens=1000000]
"""
from __future__ import annotations

import json
import sys

from app.config import ConfigError, parse_config
from app.indexing.knn_build import KnnBuildConfig, build_knn
from app.ray_env import init_ray
from app.data.shards import ShardFormatError


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(KnnBuildConfig, argv)
    init_ray()
    try:
        meta = build_knn(cfg)
    except (ConfigError, ShardFormatError, FileNotFoundError, ValueError) as e:
        print(f"build_knn: {e}", file=sys.stderr)
        return 1
    print(json.dumps({"index": cfg.knn_dir(), **{k: meta.get(k) for k in
                      ("n", "d", "kind", "metric", "nlist", "m", "exact", "seconds")}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
