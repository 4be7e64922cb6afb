"""The quickstart pipeline: tokenize -> index -> train -> serve -> one completion, on a local Ray and CPU."""
from __future__ import annotations

import posixpath
import sysconfig
import time
from dataclasses import dataclass, field

from app import storage
from app.data.corpus import TokenizeConfig, tokenize_corpus
from app.indexing.lmatch_build import IndexConfig, build_index
from app.log import get_logger
from app.train.config import CheckpointConfig, ClusterConfig, OptimConfig, ScheduleConfig, TrainConfig
from app.train.run import list_checkpoints, train

log = get_logger(__name__)


def stdlib_corpus() -> list[str]:
    """A corpus every machine has: the `.py` files of the running Python's standard library."""
    return [storage.join(sysconfig.get_paths()["stdlib"], "*.py")]


@dataclass
class QuickstartConfig:
    """The whole pipeline at a size that finishes in minutes on a 2-core CPU."""

    workdir: str = "runs/quickstart"  # the run: shards/ and export/ in it, checkpoints beside them; reruns reuse it
    inputs: list[str] = field(default_factory=stdlib_corpus)  # text to train on (default: Python's stdlib)
    vocab_size: int = 4096  # byte-level BPE trained on the corpus
    max_steps: int = 400  # training steps (a few minutes on 2 cores)
    prompt: str = "def main(argv):\n    "  # completion printed at the end
    max_tokens: int = 48  # tokens of that completion

    def train_config(self) -> TrainConfig:
        """The training run: `workdir` is its run directory (storage = its parent, name = its last part)."""
        run_dir = storage.absolute(self.workdir)
        return TrainConfig(data=storage.join(run_dir, "shards"), index=True, storage=posixpath.dirname(run_dir),
                           name=posixpath.basename(run_dir), preset="tiny", model={"d_model": 128, "n_layer": 3},
                           max_steps=self.max_steps, micro_batch=16, eval_every=100, log_every=50,
                           optim=OptimConfig(lr=3e-3), schedule=ScheduleConfig(warmup_steps=30),
                           ckpt=CheckpointConfig(every=100), cluster=ClusterConfig(cpus_per_worker=1.0))


def run_quickstart(cfg: QuickstartConfig) -> str:
    """Run every stage (reusing finished ones); returns the completion text."""
    t0 = time.perf_counter()
    tcfg = cfg.train_config()
    log.info("[1/4] tokenize %s", ", ".join(cfg.inputs))
    tokenize_corpus(TokenizeConfig(inputs=cfg.inputs, output=tcfg.data, vocab_size=cfg.vocab_size,
                                   val_fraction=0.05))

    log.info("[2/4] build the LMatch retrieval index over the shards")
    s = build_index(IndexConfig(data=tcfg.data))
    log.info("indexed %d tokens in %.0f s: %.0f%% match earlier text, %.1f tokens long on average", s["tokens"],
             s["seconds"], 100 * s["matched_fraction"], s["mean_length_matched"])

    log.info("[3/4] train %d steps, reading the index's match of every token", cfg.max_steps)
    tcfg.resume = bool(list_checkpoints(tcfg.run_dir))
    result = train(tcfg)
    if result.error:
        raise RuntimeError(f"training failed: {result.error}")

    log.info("[4/4] serve the model with the index and complete a prompt")
    from app.serve.deployment import serve_and_complete

    text = serve_and_complete(tcfg.export_dir, cfg.prompt, max_tokens=cfg.max_tokens, index=tcfg.data)
    log.info("quickstart finished in %.0f s: shards, checkpoints and export in %s", time.perf_counter() - t0,
             tcfg.run_dir)
    return text
