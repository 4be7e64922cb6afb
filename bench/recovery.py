"""Benchmark: recovery from a killed training worker, and the step stall a checkpoint causes.

Prints JSON: seconds from a SIGKILL of the training worker to the next completed training step,
steps lost (done since the last checkpoint), and the training-loop stall per checkpoint with
asynchronous upload next to synchronous upload (the baseline), measured in the same run.

    python -m bench.recovery --preset=tiny                     # CPU
    python -m bench.recovery --preset=gpt2-124m --tokenizer=gpt2/tokenizer.json   # GPU
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import tempfile
import threading
import time

from app import storage
from app.config import from_dict
from app.data.corpus import TokenizeConfig, tokenize_corpus
from app.ray_env import init_ray
from app.train.config import TrainConfig
from app.train.run import list_checkpoints, train


def _progress(cfg: TrainConfig) -> dict:
    try:
        return storage.read_json(storage.join(cfg.run_dir, "progress.json"))
    except (FileNotFoundError, ValueError):
        return {}


def _worker_pids() -> list[int]:
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if b"RayTrainWorker" in open(f"/proc/{pid}/cmdline", "rb").read():
                pids.append(int(pid))
        except OSError:
            pass
    return pids


def measure_recovery(cfg: TrainConfig) -> dict:
    """Kill the worker half-way between two checkpoints; time until the next step completes."""
    out: dict = {}

    def killer():
        every = cfg.ckpt.every
        while True:
            p = _progress(cfg)
            # Half-way through the interval after the second checkpoint (the first is surely registered).
            if p.get("step", 0) >= 2 * every + every // 2 and list_checkpoints(cfg.run_dir) and (pids := _worker_pids()):
                out["step_at_kill"], out["kill_time"] = p["step"], time.time()
                os.kill(pids[0], signal.SIGKILL)
                break
            time.sleep(0.01)
        while True:
            p = _progress(cfg)
            if p.get("resumes", 0) >= 1 and p["step"] > p["resumed_from_step"]:
                out["recovery_s"] = p["time"] - out["kill_time"]
                out["resumed_from_step"] = p["resumed_from_step"]
                out["steps_lost"] = out["step_at_kill"] - p["resumed_from_step"]
                return
            time.sleep(0.05)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    result = train(cfg)
    t.join(timeout=5)
    assert result.error is None, result.error
    out.pop("kill_time", None)
    return out


def measure_stall(cfg: TrainConfig) -> float:
    """Median seconds the loop is held per checkpoint (read back from each checkpoint's successor)."""
    stalls = []

    def sample():
        seen = set()
        while len(stalls) < 100:
            p = _progress(cfg)
            if p.get("step", 0) in seen:
                time.sleep(0.02)
                continue
            seen.add(p.get("step", 0))
            if p.get("checkpoint_stall_s") and p["checkpoint_stall_s"] not in stalls:
                stalls.append(p["checkpoint_stall_s"])
            if p.get("step", 0) >= cfg.max_steps:
                return
            time.sleep(0.02)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    assert train(cfg).error is None
    t.join(timeout=5)
    return statistics.median(stalls) if stalls else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--text", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data",
                                                   "tinyshakespeare.txt"))
    ap.add_argument("--tokenizer", default=None)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--checkpoint_every", type=int, default=10)
    ap.add_argument("--seq_len", type=int, default=0)
    ap.add_argument("--micro_batch", type=int, default=8)
    args = ap.parse_args()
    init_ray()
    work = tempfile.mkdtemp(prefix="spotlm-bench-recovery-")
    shards = os.path.join(work, "shards")
    tokenize_corpus(TokenizeConfig(inputs=[os.path.abspath(args.text)], output=shards, tokenizer=args.tokenizer,
                                   vocab_size=1024, text_unit="paragraph", val_fraction=0.05))

    def cfg(name: str, async_upload: bool = True) -> TrainConfig:
        return from_dict(TrainConfig, dict(
            data=shards, storage=os.path.join(work, "runs"), name=name, preset=args.preset, seq_len=args.seq_len,
            micro_batch=args.micro_batch, max_steps=args.steps, log_every=1, eval_every=0, export="none",
            ckpt={"every": args.checkpoint_every, "async_upload": async_upload},
            cluster={"cpus_per_worker": 1, "max_failures": 3}))

    recovery = measure_recovery(cfg("recovery"))
    stall_async = measure_stall(cfg("stall-async", async_upload=True))
    stall_sync = measure_stall(cfg("stall-sync", async_upload=False))
    ckpt = list_checkpoints(os.path.join(work, "runs", "stall-sync"))[-1]
    size = sum(os.path.getsize(os.path.join(ckpt, f)) for f in os.listdir(ckpt))
    import torch

    print(json.dumps({
        "preset": args.preset, "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "checkpoint_every": args.checkpoint_every, "checkpoint_mb": round(size / 2**20, 1), **recovery,
        "checkpoint_stall_s": {"async_upload": stall_async, "sync_upload_baseline": stall_sync,
                               "ratio_async_over_sync": stall_async / stall_sync if stall_sync else None},
    }, indent=2))


if __name__ == "__main__":
    main()
