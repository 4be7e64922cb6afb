"""Job: validation loss / perplexity of an exported model, plain and with its retrieval indexes (LMatch
ids, kNN-LM interpolation over a lambda grid, both); prints JSON.

    python -m jobs.eval --model=runs/my-run/export --data=runs/shards [--knn=runs/my-run/export/knn] \
        [--max_tokens=65536] [--lambdas=0.1,0.2,0.3] [--output=eval.json]

Runs in this process (on its GPU when it has one); Ray is not needed.
"""
from __future__ import annotations

import json
import sys

from app import storage
from app.config import ConfigError, parse_config
from app.indexing.evaluate import EvalConfig, evaluate
from app.data.shards import ShardFormatError


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(EvalConfig, argv)
    try:
        result = evaluate(cfg)
    except (ConfigError, ShardFormatError, FileNotFoundError, ValueError) as e:
        print(f"eval: {e}", file=sys.stderr)
        return 1
    text = json.dumps(result, indent=2, allow_nan=False)
    if cfg.output:
        storage.write_text(cfg.output, text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
