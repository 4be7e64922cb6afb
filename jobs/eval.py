"""Job: validation loss / perplexity of an exported model, plain and with its retrieval indexes (LMatch
ids, kNN-LM interpolation over a lambda grid, both); or, with --tasks, HellaSwag / LAMBADA scored as
lm-evaluation-harness scores them; prints JSON.

    python -m jobs.eval --model=runs/my-run/export --data=runs/shards [--knn=runs/my-run/export/knn] \
        [--max_tokens=65536] [--lambdas=0.1,0.2,0.3] [--output=eval.json]
    python -m jobs.eval --model=runs/my-run/export --tasks=hellaswag,lambada \
        --hellaswag=hellaswag_val_full.txt.bz2 --lambada=lambada_test.jsonl [--limit=1000] [--batch=64]

Runs in this process (on its GPU when it has one); Ray is not needed.
"""
from __future__ import annotations

import json
import sys

from app import storage
from app.config import parse_config, refuse
from app.data.shards import ShardFormatError, load_manifest
from app.indexing.evaluate import EvalConfig, evaluate, evaluate_tasks, resolve_knn, resolve_model
from app.tracking import record_results


def preflight(cfg: EvalConfig) -> None:
    """Before any work: the dataset has the split, a kNN index named explicitly is there, and so is the model;
    with tasks, their data files and the model."""
    if cfg.tasks:
        for task in cfg.tasks:
            if not storage.exists(getattr(cfg, task)):
                raise FileNotFoundError(f"--{task}={getattr(cfg, task)}: no such file")
        resolve_model(cfg.model)
        return
    m = load_manifest(cfg.data)
    if not m.shards.get(cfg.split):
        raise ShardFormatError(f"{m.root}: split {cfg.split!r} has no shards")
    knn_dir = resolve_knn(cfg.knn, cfg.model) if cfg.knn != "auto" else None
    if knn_dir is not None:
        from index import knn

        knn.read_meta(knn_dir)
    resolve_model(cfg.model)


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(EvalConfig, argv, prog="eval")
    try:
        preflight(cfg)
    except (ValueError, FileNotFoundError) as e:  # ShardFormatError, KnnFormatError; no model there
        return refuse("eval", e)
    try:
        result = evaluate_tasks(cfg) if cfg.tasks else evaluate(cfg)
    except (ValueError, FileNotFoundError) as e:  # e.g. seq_len beyond the model's context
        print(f"eval: {e}", file=sys.stderr)
        return 1
    text = json.dumps(result, indent=2, allow_nan=False)
    if cfg.output:
        storage.write_text(cfg.output, text + "\n")
    if cfg.tensorboard:
        record_results(result, cfg.tensorboard, step=result["model"].get("step") or 0)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
