"""The training driver: checks a run's configuration before any Ray work (`preflight`), then runs the
per-worker loop on a Ray Train `TorchTrainer` (`train`), with Ray's failure and preemption budgets."""
from __future__ import annotations

import functools
import os
import time
from typing import Any

import torch

from app import storage
from app.config import ConfigError, to_dict
from app.data.shards import load_manifest
from app.log import get_logger
from app.ray_env import relay_worker_logs
from app.train import checkpoint
from app.train.config import TrainConfig, batch_plan, model_config
from app.train.loop import index_stream, train_loop

log = get_logger(__name__)


def preflight(cfg: TrainConfig) -> None:
    """Check in the driver, before any Ray work, what the workers would otherwise fail on (spending the
    failure budget): the dataset (and its LMatch ids with `index`), a model the preset and `--model.*`
    overrides can build over the dataset's vocabulary, sequences it can take, a global batch that splits
    over the workers, a storage that reads back what it writes, and checkpoints that agree with `resume`.
    Raises a ValueError (ConfigError, ShardFormatError) of one line; checks only, so it may run twice."""
    manifest = load_manifest(cfg.data)
    if cfg.index:
        index_stream(manifest, "train")
    mcfg = model_config(cfg, manifest.vocab_size)
    if cfg.seq_len > mcfg.max_seq_len:
        raise ConfigError(f"seq_len={cfg.seq_len} exceeds the model's max_seq_len={mcfg.max_seq_len} "
                          "(--model.max_seq_len raises it)")
    batch_plan(cfg, cfg.seq_len or mcfg.max_seq_len, cfg.cluster.num_workers)
    check_storage(cfg.run_dir)
    existing = list_checkpoints(cfg.run_dir)
    if existing and not cfg.resume:
        raise ConfigError(f"run {cfg.name!r} already has checkpoints in {cfg.run_dir}: pass --resume to "
                          "continue it, or choose another --name")
    if cfg.resume and not existing:
        raise ConfigError(f"--resume: run {cfg.name!r} has no checkpoint in {cfg.run_dir}")


def check_storage(path: str) -> None:
    """Fail fast, with one clear line, when the run's storage cannot be written and read back."""
    probe = storage.join(path, ".spotlm-storage-probe")
    try:
        storage.write_text(probe, "ok")
        ok = storage.read_text(probe) == "ok"
        storage.remove(probe)
    except OSError as e:
        raise ConfigError(f"storage {path} is unreachable: {e}") from None
    if not ok:
        raise ConfigError(f"storage {path} did not read back what was written")


def list_checkpoints(run_dir: str) -> list[str]:
    """Complete checkpoint directories of a run, oldest first."""
    dirs = [f.rsplit("/", 1)[0] for f in storage.list_files(run_dir) if f.endswith("/" + checkpoint.DONE)]
    return sorted(d for d in dirs if d.rsplit("/", 1)[1].startswith("checkpoint_"))


def train(cfg: TrainConfig):
    """Run (or continue) a training run on Ray Train; returns Ray's `Result`.

    Errors restart the worker group up to `cluster.max_failures` times, lost nodes (Ray's preemptions) up to
    `cluster.max_preemptions` times: both Ray's budgets. A worker that saw a notice Ray does not see (SIGTERM, the
    AWS spot notice) checkpoints and returns; Ray counts a worker that returns as a finished run, so the run is
    started again here, within the same `cluster.max_preemptions`."""
    preflight(cfg)
    use_gpu = _cluster_has_gpus() if cfg.cluster.use_gpu == "auto" else cfg.cluster.use_gpu == "true"
    # Ray Train's controller polls workers every 2 s by default, which stalls every report().
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    t0 = time.perf_counter()
    with relay_worker_logs() as log_sink:
        for _ in range(cfg.cluster.max_preemptions + 1):
            result = _trainer(cfg, use_gpu, log_sink).fit()
            # The loop only returns unfinished after one of our own notices (and a checkpoint).
            metrics = result.metrics or {}
            if result.error or metrics.get("done") or metrics.get("step", 0) >= cfg.max_steps:
                break
            log.warning("run %s stopped for a preemption notice at step %d; starting it again from that checkpoint",
                        cfg.name, result.metrics["step"])
    if not result.error:
        _log_summary(cfg, result.metrics or {}, time.perf_counter() - t0)
    return result


def _log_summary(cfg: TrainConfig, metrics: dict[str, Any], seconds: float) -> None:
    """One line for the end of a run: steps, the last validation loss, time, where the model went."""
    val = f", val loss {metrics['val_loss']:.4f}" if "val_loss" in metrics else ""
    export = f"; model in {cfg.export_dir}" if cfg.export_dir else ""
    log.info("trained %s: %d steps%s in %.0f s%s", cfg.name, metrics.get("step", 0), val, seconds, export)


def _cluster_has_gpus() -> bool:
    """Whether the Ray cluster (not this driver's machine: a head is often CPU-only) has GPUs."""
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0 if ray.is_initialized() else torch.cuda.is_available()


def _trainer(cfg: TrainConfig, use_gpu: bool, log_sink: Any = None):
    """Ray Train's TorchTrainer for the run: its workers (elastic with `cluster.min_workers`), failure
    budget, storage and the checkpoints it keeps."""
    import ray.train
    from ray.train.torch import TorchTrainer

    c = cfg.cluster
    return TorchTrainer(
        functools.partial(train_loop, log_sink=log_sink),
        train_loop_config=to_dict(cfg),
        scaling_config=ray.train.ScalingConfig(
            num_workers=(c.min_workers, c.num_workers) if c.min_workers else c.num_workers,
            use_gpu=use_gpu, resources_per_worker={"CPU": c.cpus_per_worker},
            elastic_resize_monitor_interval_s=c.resize_check_s),
        run_config=ray.train.RunConfig(
            name=cfg.name, storage_path=storage.absolute(cfg.storage),
            # A drained node's workers may be gone before a just-in-time checkpoint's collectives end: the others
            # finish them without it, and keep running `preemption_grace_s` past its deadline to upload.
            failure_config=ray.train.FailureConfig(
                max_failures=c.max_failures, max_preemption_failures=c.max_preemptions,
                relax_collectives_on_preemption=True, preemption_grace_s=c.preemption_grace_s),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.ckpt.keep)),
    )
