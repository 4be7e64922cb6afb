"""Benchmark: what the retrieval indexes do to perplexity, with the plain model as the baseline in the same run.

For each text: tokenize (a BPE trained on it; the first 90% of the text trains, the last 10%
validates), build the LMatch index, train two models of the same shape for the same steps (one
plain, one reading the LMatch id of every token: `--index`), build a kNN-LM datastore of each
model's hidden states over the training split, and evaluate both on the validation split with
and without kNN interpolation (`app.indexing.evaluate`). Prints JSON: loss and perplexity per variant.

    python -m bench.index_quality                    # tinyshakespeare and wikitext-103 valid, CPU-sized
    python -m bench.index_quality --steps=100 --texts=tinyshakespeare.txt
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from app.config import from_dict
from app.data.corpus import TokenizeConfig, tokenize_corpus
from app.indexing.evaluate import EvalConfig, evaluate
from app.indexing.lmatch_build import IndexConfig, build_index
from app.indexing.knn_build import KnnBuildConfig, build_knn
from app.ray_env import init_ray
from app.train.config import TrainConfig
from app.train.run import train

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def run_text(text: str, out: str, args) -> dict:
    data = os.path.join(out, "data")
    t0 = time.perf_counter()
    m = tokenize_corpus(TokenizeConfig(inputs=[text], output=data, vocab_size=args.vocab, split="tail",
                                       val_fraction=0.1, text_unit="file", train_sample_bytes=args.max_bytes))
    summary = build_index(IndexConfig(data=data))
    report: dict = {"train_tokens": m.num_tokens("train"), "val_tokens": m.num_tokens("val"),
                    "lmatch": {k: summary[k] for k in ("matched_fraction", "mean_length", "bytes_per_train_token", "seconds")},
                    "models": {}}
    for name, index in (("plain", False), ("lmatch", True)):
        cfg = from_dict(TrainConfig, dict(
            data=data, storage=os.path.join(out, "runs"), name=name, index=index, preset="tiny",
            model={"d_model": args.d_model, "n_layer": args.n_layer, "n_head": 4, "max_seq_len": 128},
            seq_len=128, micro_batch=16, max_steps=args.steps, eval_every=0, eval_tokens=0, log_every=50,
            optim={"lr": 3e-3}, schedule={"warmup_steps": 20}, ckpt={"every": args.steps}))
        result = train(cfg)
        if result.error:
            raise RuntimeError(f"training {name} failed: {result.error}")
        build_knn(KnnBuildConfig(model=cfg.export_dir, data=data, cpus_per_task=1.0))
        ev = evaluate(EvalConfig(model=cfg.export_dir, data=data, split="val", device="cpu"))
        report["models"][name] = {k: {f: v.get(f) for f in ("loss", "ppl", "lambda", "tokens")}
                                  for k, v in ev["results"].items() if isinstance(v, dict)}
    report["seconds"] = round(time.perf_counter() - t0, 1)
    return report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--texts", default="tinyshakespeare.txt,wikitext103_valid.tokens", help="files in ../shared/data")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--d_model", type=int, default=128)
    p.add_argument("--n_layer", type=int, default=3)
    p.add_argument("--max_bytes", type=int, default=2_000_000, help="text the BPE trains on")
    p.add_argument("--out", default="")
    args = p.parse_args()
    out = args.out or tempfile.mkdtemp(prefix="index-quality-")
    init_ray()
    results = {}
    for name in args.texts.split(","):
        path = name if os.path.exists(name) else str(SHARED / name)
        results[Path(name).name] = run_text(path, os.path.join(out, Path(name).stem), args)
        print(json.dumps({Path(name).name: results[Path(name).name]}), flush=True)
    print(json.dumps({"config": vars(args), "results": results}, indent=1))


if __name__ == "__main__":
    main()
