"""Ray job: build the exact-match (LMatch) index of a tokenized dataset.

    python -m jobs.build_index --data=runs/shards [--workers=N] [--task_tokens=8388608]
"""
from __future__ import annotations

import sys

from app.config import parse_config, refuse
from app.data.shards import ShardFormatError, load_manifest
from app.indexing.lmatch_build import IndexConfig, build_index


def preflight(cfg: IndexConfig) -> None:
    """Before Ray: `data` is a tokenized dataset with a vocabulary and train shards to index against."""
    m = load_manifest(cfg.data)
    if m.vocab_size <= 0 or not m.shards.get("train"):
        raise ShardFormatError(f"{m.root}: the manifest lists no vocab_size or no train shards")


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(IndexConfig, argv, prog="build_index")
    try:
        preflight(cfg)
    except ValueError as e:  # ShardFormatError
        return refuse("build_index", e)
    try:
        s = build_index(cfg)
    except ValueError as e:  # ShardFormatError: a shard missing, truncated or changed
        print(f"build_index: {e}", file=sys.stderr)
        return 1
    print(f"lmatch index of {s['root']}: {s['tokens']:,} tokens indexed ({s['pieces_built']} pieces built, "
          f"{s['pieces_skipped']} done before), matched {s['matched_fraction']:.1%}, mean length "
          f"{s['mean_length']:.2f} ({s['mean_length_matched']:.2f} when matched), {s['seconds']:.1f} s, "
          f"{s['bytes_per_train_token']:.2f} bytes/train token")
    return 0


if __name__ == "__main__":
    sys.exit(main())
