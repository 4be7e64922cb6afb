"""The quickstart pipeline: tokenize -> index -> train -> serve -> one completion, on a local Ray and CPU."""
from __future__ import annotations

import sysconfig
import time
from dataclasses import dataclass, field

from app import storage
from app.data.corpus import TokenizeConfig, tokenize_corpus
from app.indexing.lmatch_build import IndexConfig, build_index
from app.log import get_logger
from app.train.trainer import TrainConfig, list_checkpoints, train

log = get_logger(__name__)


def stdlib_corpus() -> list[str]:
    """A corpus every machine has: the `.py` files of the running Python's standard library."""
    return [storage.join(sysconfig.get_paths()["stdlib"], "*.py")]


@dataclass
class QuickstartConfig:
    """The whole pipeline at a size that finishes in minutes on a 2-core CPU."""

    workdir: str = "runs/quickstart"  # shards, checkpoints and the export go here
    inputs: list[str] = field(default_factory=stdlib_corpus)  # text to train on (default: Python's stdlib)
    vocab_size: int = 4096  # byte-level BPE trained on the corpus
    max_steps: int = 400  # training steps (about 3 minutes on 2 cores)
    prompt: str = "def main(argv):\n    "  # completion printed at the end
    max_tokens: int = 48
    name: str = "quickstart"  # run name; running the quickstart again reuses finished stages


def run_quickstart(cfg: QuickstartConfig) -> str:
    """Run every stage; returns the completion text."""
    t0 = time.perf_counter()
    shards = storage.join(storage.absolute(cfg.workdir), "shards")
    log.info("[1/4] tokenize %s -> %s", cfg.inputs, shards)
    manifest = tokenize_corpus(TokenizeConfig(inputs=cfg.inputs, output=shards, vocab_size=cfg.vocab_size,
                                              val_fraction=0.05))
    log.info("      %d train / %d val tokens", manifest.num_tokens("train"), manifest.num_tokens("val"))

    log.info("[2/4] build the LMatch retrieval index over the shards")
    summary = build_index(IndexConfig(data=shards))
    log.info("      %s", summary)

    log.info("[3/4] train %d steps, reading the index's match of every token", cfg.max_steps)
    tcfg = TrainConfig(data=shards, index=True, storage=storage.join(storage.absolute(cfg.workdir), "runs"), name=cfg.name,
                       preset="tiny", model={"d_model": 128, "n_layer": 3}, max_steps=cfg.max_steps,
                       micro_batch=16, lr=3e-3, warmup_steps=30,
                       eval_every=100, checkpoint_every=100, log_every=25, cpus_per_worker=1.0)
    tcfg.resume = bool(list_checkpoints(tcfg.run_dir))
    result = train(tcfg)
    if result.error:
        raise RuntimeError(f"training failed: {result.error}")

    log.info("[4/4] serve %s with the index and complete a prompt", tcfg.export_dir)
    from app.serve.deployment import serve_and_complete

    text = serve_and_complete(tcfg.export_dir, cfg.prompt, max_tokens=cfg.max_tokens, index=shards)
    log.info("quickstart finished in %.0f s", time.perf_counter() - t0)
    return text
