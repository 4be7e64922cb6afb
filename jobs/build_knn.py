"""Ray job: build a model's kNN-LM index (keys = final hidden states over the train split, values = next
tokens) as `<out>/knn/`; rerunning it finishes an interrupted build.

    python -m jobs.build_knn --model=runs/my-run/export --data=runs/shards [--out=runs/my-run] [--max_tokens=1000000]
"""
from __future__ import annotations

import json
import sys

from app.config import parse_config, refuse
from app.data.shards import ShardFormatError, load_manifest
from app.indexing.evaluate import resolve_model
from app.indexing.knn_build import KnnBuildConfig, build_knn
from app.ray_env import init_ray


def preflight(cfg: KnnBuildConfig) -> None:
    """Before Ray: the dataset has the split to store, and the model is there."""
    m = load_manifest(cfg.data)
    if not m.shards.get(cfg.split):
        raise ShardFormatError(f"{m.root}: split {cfg.split!r} has no shards")
    resolve_model(cfg.model)


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(KnnBuildConfig, argv, prog="build_knn")
    try:
        preflight(cfg)
    except (ValueError, FileNotFoundError) as e:  # ShardFormatError; no model there
        return refuse("build_knn", e)
    init_ray()
    try:
        meta = build_knn(cfg)
    except (ValueError, FileNotFoundError) as e:  # ConfigError (seq_len, an index of other weights), a bad shard
        print(f"build_knn: {e}", file=sys.stderr)
        return 1
    print(json.dumps({"index": cfg.knn_dir(), **{k: meta.get(k) for k in
                      ("n", "d", "kind", "metric", "nlist", "m", "exact", "seconds")}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
