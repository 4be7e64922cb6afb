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


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in STAGES:
        lines = "\n".join(f"  {name:<12}{text}" for name, text in STAGES.items())
        print(f"usage: spotlm <stage> [--key=value ...]   (spotlm <stage> --help for its options)\n\nstages:\n{lines}")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(f"jobs.{argv[0]}")
    return module.main(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
