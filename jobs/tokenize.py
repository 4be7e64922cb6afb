"""Ray job: tokenize text files (.txt, .jsonl, .parquet; local or s3://) into token shards.

    python -m jobs.tokenize --inputs='data/*.jsonl' --output=runs/shards [--tokenizer=tokenizer.json]
    python -m jobs.tokenize --corpus=python --output=runs/pyshards   # this machine's Python sources
"""
from __future__ import annotations

import sys

from app.config import parse_config, refuse
from app.data.corpus import InputError, TokenizeConfig, check_roots, resolve_inputs, tokenize_corpus
from app.data.tokenizer import eot_id, load_tokenizer
from app.ray_env import init_ray


def preflight(cfg: TokenizeConfig) -> None:
    """Before Ray: every input pattern matches a file (python corpus: every root is a local directory),
    and a given tokenizer file is a usable tokenizer."""
    if cfg.corpus == "python":
        check_roots(cfg.inputs)
    else:
        resolve_inputs(cfg.inputs)
    if cfg.tokenizer not in (None, "char"):
        eot_id(load_tokenizer(cfg.tokenizer))


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(TokenizeConfig, argv, prog="tokenize")
    try:
        preflight(cfg)
    except ValueError as e:  # InputError, a missing or unusable tokenizer
        return refuse("tokenize", e)
    init_ray()
    try:
        tokenize_corpus(cfg)  # logs its progress and a summary
    except (InputError, ValueError) as e:
        print(f"tokenize: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
