"""The `spotlm` command: `spotlm <stage> [--key=value ...]`, one subcommand per job module."""
from __future__ import annotations

import importlib
import sys

STAGES = {
    "tokenize": "build tokenized shards (Ray Data)",
    "build_index": "build the LMatch exact-match index over shards (Ray tasks)",
    "train": "train a model on shards (Ray Train)",
    "build_knn": "build a kNN-LM index of a trained model's hidden states (Ray tasks, FAISS)",
    "eval": "validation loss / perplexity with and without each index",
    "serve": "serve an exported model over HTTP (Ray Serve)",
    "quickstart": "tokenize -> index -> train -> serve -> one completion, on a local Ray",
}


def usage() -> str:
    lines = "\n".join(f"  {name:<12}{text}" for name, text in STAGES.items())
    return (f"usage: spotlm <stage> [--key=value ...] [--verbose]   (spotlm <stage> --help lists its options)\n\n"
            f"stages:\n{lines}")


def main(argv: list[str] | None = None) -> int:
    """Run one stage's job; exit status 0 done, 1 failed while running, 2 refused (usage or configuration)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if not argv:
        print(usage(), file=sys.stderr)
        return 2
    if argv[0] not in STAGES:
        print(f"spotlm: unknown stage {argv[0]!r}; stages: {', '.join(STAGES)}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"jobs.{argv[0]}")
    return module.main(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
