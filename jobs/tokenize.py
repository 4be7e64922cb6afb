"""Ray job: tokenize text files (.txt, .jsonl, .parquet; local or s3://) into token shards.

    python -m jobs.tokenize --inputs='data/*.jsonl' --output=runs/shards [--tokenizer=tokenizer.json]
"""
from __future__ import annotations

import sys

from app.config import parse_config
from app.data.corpus import InputError, TokenizeConfig, resolve_inputs, tokenize_corpus
from app.ray_env import init_ray


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(TokenizeConfig, argv)
    try:
        resolve_inputs(cfg.inputs)  # fail fast, before starting Ray, on inputs that cannot be read
        init_ray()
        m = tokenize_corpus(cfg)
    except (InputError, ValueError) as e:
        print(f"tokenize: {e}", file=sys.stderr)
        return 1
    rejected = sum(m.rejected.values())
    print(f"tokenized {m.inputs} files -> {m.root}: train {m.num_tokens('train'):,} tokens / {m.docs['train']:,} docs, "
          f"val {m.num_tokens('val'):,} tokens / {m.docs['val']:,} docs, rejected {rejected:,} records")
    return 0


if __name__ == "__main__":
    sys.exit(main())
