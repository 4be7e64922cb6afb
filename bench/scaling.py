"""Benchmark: training on several GPUs through Ray Train, each section against its baseline in the same run.

- ddp: tokens/s per GPU on 1, 2, 4 (8) GPUs, the fast path, and the scaling efficiency against the 1-GPU run;
- fsdp: FSDP2 over every GPU for the big presets: tokens/s per GPU, MFU, peak GPU memory, and the longest sequence
  that trains without CPU offload (doubling until a run fails);
- recovery: a worker SIGKILLed between two checkpoints: seconds to the next step and steps lost;
- elastic: W workers, then W/2 (a placeholder actor takes half the GPUs while a worker is killed), then W again once
  it lets go; the tokens per optimizer step must not change;
- sync: ddp vs onebit vs diloco on the same GPUs: bytes sent per step and tokens/s.

Each run is a real `jobs.train` run (`app.train.run.train`) and reads back its `progress.json`.

    python -m bench.scaling                                     # a GPU machine with 2+ GPUs: every section
    python -m bench.scaling --sections=ddp --presets=gpt2-350m  # one section
    python -m bench.scaling --smoke                             # CPU, gloo, 1-2 workers, tiny model
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from typing import Any

import torch

from app import storage
from app.config import from_dict
from app.data.corpus import TokenizeConfig, tokenize_corpus
from app.data.shards import load_manifest
from app.model.gpt import GPT
from app.ray_env import init_ray
from app.train.config import TrainConfig, model_config
from app.train.loop import PEAK_FLOPS
from app.train.run import list_checkpoints, train
from bench.recovery import _worker_pids, measure_recovery
from bench.train_speed import VARIANTS

SECTIONS = ("ddp", "fsdp", "recovery", "elastic", "sync")
FAST = "windows_graph_fp8_relu2_rows_window"  # the README's fast path (bench/train_speed.py), without the graph:
# a CUDA graph needs one worker (app/train/step.py graph_fits)


class Runner:
    """Builds each run's TrainConfig over one set of shards and runs it, returning its progress.json."""

    def __init__(self, args: argparse.Namespace, work: str, shards: str):
        self.args, self.work, self.shards, self.gpu = args, work, shards, torch.cuda.is_available()
        self.count = 0

    def config(self, workers: int, fast: bool = True, **overrides: Any) -> TrainConfig:
        """A run on `workers` workers: the bench's sizes, the fast path on GPUs (`fast`), then `overrides`."""
        a = self.args
        self.count += 1
        base: dict[str, Any] = dict(
            data=self.shards, storage=os.path.join(self.work, "runs"), name=f"run{self.count}", preset=a.preset,
            seq_len=a.seq_len, micro_batch=a.micro_batch, max_steps=a.steps, log_every=max(1, a.steps // 4),
            eval_every=0, export="none", ckpt={"every": a.steps},
            cluster={"num_workers": workers, "cpus_per_worker": a.cpus_per_worker,
                     "use_gpu": "true" if self.gpu else "false"})
        if fast and self.gpu and not a.smoke:
            fast = {k: dict(v) for k, v in VARIANTS[FAST].items()}
            fast["perf"]["cuda_graph"] = "auto"
            base.update(fast)
        return from_dict(TrainConfig, _merge(base, overrides))

    def run(self, cfg: TrainConfig) -> dict[str, Any]:
        t0 = time.perf_counter()
        result = train(cfg)
        p = progress(cfg)
        p["wall_s"] = time.perf_counter() - t0
        if result.error is not None:
            p["error"] = str(result.error).strip().splitlines()[-1][:300] if str(result.error) else repr(result.error)
        return p


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def progress(cfg: TrainConfig) -> dict[str, Any]:
    try:
        return storage.read_json(storage.join(cfg.run_dir, "progress.json"))
    except (FileNotFoundError, ValueError):
        return {}


def ddp(r: Runner, presets: list[str], counts: list[int]) -> list[dict[str, Any]]:
    """Weak scaling (the same micro-batch per GPU): per-GPU tokens/s and its ratio to the 1-GPU run."""
    rows = []
    for preset in presets:
        one = None
        for n in counts:
            p = r.run(r.config(n, preset=preset))
            tps = p.get("tokens_per_s", 0.0)
            row = {"preset": preset, "gpus": n, "tokens_per_s": tps, "tokens_per_s_per_gpu": tps / n,
                   **({"error": p["error"]} if "error" in p else {})}
            if n == 1:
                one = row["tokens_per_s_per_gpu"]
            if one:
                row["scaling_efficiency"] = row["tokens_per_s_per_gpu"] / one
            rows.append(row)
    return rows


def fsdp(r: Runner, presets: list[str], world: int, seq_lens: list[int]) -> dict[str, Any]:
    """FSDP2 over `world` GPUs: throughput, MFU and peak memory per preset; then the longest sequence of the
    last preset that trains without CPU offload, doubling from the first of `seq_lens` (one micro-batch each)."""
    rows = []
    for preset in presets:
        cfg = r.config(world, fast=False, preset=preset, micro_batch=1,
                       memory={"fsdp": True, "checkpointing": "full"})
        p = r.run(cfg)
        tps = p.get("tokens_per_s", 0.0)
        rows.append({"preset": preset, "gpus": world, "seq_len": cfg.seq_len, "tokens_per_s_per_gpu": tps / world,
                     "mfu": _mfu(cfg, tps, world), "gpu_peak_gb": p.get("gpu_peak_gb"),
                     **({"error": p["error"]} if "error" in p else {})})
    longest, tried = 0, []
    for seq in seq_lens:
        cfg = r.config(world, fast=False, preset=presets[-1], micro_batch=1, seq_len=seq, max_steps=2, log_every=1,
                       model={"max_seq_len": seq}, memory={"fsdp": True, "checkpointing": "full", "mlp_chunk": 8192})
        p = r.run(cfg)
        ok = "error" not in p and p.get("step", 0) >= 2
        tried.append({"seq_len": seq, "ok": ok, "gpu_peak_gb": p.get("gpu_peak_gb"), **({"error": p["error"]} if not ok
                                                                                       and "error" in p else {})})
        if not ok:
            break
        longest = seq
    return {"rows": rows, "longest_seq_without_offload": {"preset": presets[-1], "seq_len": longest, "tried": tried}}


def _mfu(cfg: TrainConfig, tokens_per_s: float, world: int) -> float | None:
    if not torch.cuda.is_available():
        return None
    peak = next((v for k, v in PEAK_FLOPS.items() if k in torch.cuda.get_device_name()), None)
    with torch.device("meta"):
        model = GPT(model_config(cfg, load_manifest(cfg.data).vocab_size))
    return model.flops_per_token(cfg.seq_len or model.cfg.max_seq_len) * tokens_per_s / (peak * world) if peak else None


def recovery(r: Runner, world: int) -> dict[str, Any]:
    """bench.recovery's measurement with `world` workers (one of them killed)."""
    every = max(2, r.args.steps // 6)
    cfg = r.config(world, max_steps=max(r.args.steps, 4 * every), log_every=1, ckpt={"every": every},
                   cluster={"max_failures": 3})
    return {"gpus": world, "checkpoint_every": every, **measure_recovery(cfg)}


class Placeholder:
    """An actor holding `amount` of the resource the workers need, so that a restarted group finds less room."""

    def __init__(self, gpu: bool, amount: float):
        import ray

        @ray.remote(num_cpus=0 if gpu else amount, num_gpus=amount if gpu else 0)
        class Hold:
            def ready(self) -> bool:
                return True

        self.actor = Hold.remote()

    def release(self) -> None:
        import ray

        ray.kill(self.actor)


def elastic(r: Runner, world: int) -> dict[str, Any]:
    """W → W/2 → W workers in one run: a worker is killed while a placeholder takes half the room, then the
    placeholder goes and the resize check grows the group back. Tokens per step come from batch_tokens."""
    a = r.args
    every = max(2, a.steps // 8)
    seq = a.seq_len or 64
    cfg = r.config(world, max_steps=max(a.steps, 6 * every), log_every=1, ckpt={"every": every},
                   batch_tokens=world * a.micro_batch * seq, seq_len=seq,
                   cluster={"min_workers": max(1, world // 2), "resize_check_s": 2.0, "max_failures": 5})
    import ray

    # all the room but what world - world // 2 workers need, so the restarted group fits only that many
    total = ray.cluster_resources().get("GPU" if r.gpu else "CPU", 0)
    held = total - (world - world // 2) * (1 if r.gpu else a.cpus_per_worker)
    seen: list[tuple[int, int]] = []  # (step, workers) as progress.json reports them
    events: dict[str, float] = {}

    def drive() -> None:
        hold = None
        while "released" not in events:
            p = progress(cfg)
            step, workers = p.get("step", 0), p.get("workers")
            if workers and (not seen or seen[-1] != (step, workers)):
                seen.append((step, workers))
            # a kill once a checkpoint is complete (registered with Ray once its upload is done)
            if hold is None and step >= 2 * every and list_checkpoints(cfg.run_dir) and (pids := _worker_pids()):
                hold = Placeholder(r.gpu, held)
                os.kill(pids[-1], 9)
                events["shrunk_at_step"], events["killed_at"] = step, time.time()
            shrunk = hold is not None and workers and workers < world and step >= events["shrunk_at_step"] + every
            if shrunk or hold is not None and time.time() > events["killed_at"] + a.elastic_wait_s:
                hold.release()  # also when no smaller group came up in time: the run must not hang
                events["released"] = step
            time.sleep(0.05)

    t = threading.Thread(target=drive, daemon=True)
    t.start()
    p = r.run(cfg)
    t.join(timeout=5)
    counts = [w for _, w in seen]
    events.pop("killed_at", None)
    return {"gpus": world, "worker_counts_seen": sorted(set(counts)), "shrank": min(counts, default=world) < world,
            "trace": seen[-50:], **events,
            "steps": p.get("step"), "tokens": p.get("tokens"), "tokens_per_step": (p.get("tokens") or 0) / max(1, p.get("step", 1)),
            "expected_tokens_per_step": cfg.batch_tokens, **({"error": p["error"]} if "error" in p else {})}


def sync(r: Runner, world: int, modes: list[str], inner_steps: int) -> list[dict[str, Any]]:
    """The synchronisation modes on the same workers: bytes per step, tokens/s, final loss; ratios to ddp."""
    rows, base = [], None
    for mode in modes:
        p = r.run(r.config(world, sync={"mode": mode, **({"inner_steps": inner_steps} if mode == "diloco" else {})}))
        row = {"mode": mode, "gpus": world, "comm_bytes_per_step": p.get("comm_bytes_per_step"),
               "tokens_per_s": p.get("tokens_per_s"), "train_loss": p.get("train_loss"),
               **({"error": p["error"]} if "error" in p else {})}
        if mode == "ddp":
            base = row
        elif base and base.get("comm_bytes_per_step") and row.get("comm_bytes_per_step"):
            row["bytes_ratio_ddp_over_this"] = base["comm_bytes_per_step"] / row["comm_bytes_per_step"]
            row["tokens_per_s_ratio"] = (row["tokens_per_s"] or 0) / (base["tokens_per_s"] or 1)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sections", default=",".join(SECTIONS))
    ap.add_argument("--presets", default="gpt2-124m,gpt2-350m", help="ddp section")
    ap.add_argument("--fsdp_presets", default="gpt2-1.5b,llama3-8b")
    ap.add_argument("--fsdp_seq_lens", default="8192,16384,32768,65536,131072")
    ap.add_argument("--gpus", default="", help="worker counts of the ddp section; default 1, 2, 4, 8 up to the GPUs")
    ap.add_argument("--modes", default="ddp,onebit,diloco")
    ap.add_argument("--inner_steps", type=int, default=50)
    ap.add_argument("--preset", default="gpt2-124m", help="the model of the recovery, elastic and sync sections")
    ap.add_argument("--text", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data",
                                                   "tinyshakespeare.txt"))
    ap.add_argument("--tokenizer", default=None)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--seq_len", type=int, default=1024)
    ap.add_argument("--micro_batch", type=int, default=16)
    ap.add_argument("--cpus_per_worker", type=float, default=4.0)
    ap.add_argument("--elastic_wait_s", type=float, default=300.0, help="elastic: give the room back after this")
    ap.add_argument("--smoke", action="store_true", help="CPU: tiny model, 1-2 gloo workers, a few steps")
    ap.add_argument("--output", default="")
    args = ap.parse_args(argv)
    total = torch.cuda.device_count()
    if args.smoke:
        args.presets = args.preset = "tiny"
        args.fsdp_presets, args.fsdp_seq_lens = "tiny", "64,128"
        args.steps, args.seq_len, args.micro_batch, args.cpus_per_worker, args.inner_steps = 24, 64, 2, 0.5, 4
        counts = [1, 2]
    elif not total:
        raise SystemExit("bench.scaling needs CUDA GPUs (or --smoke on CPU)")
    else:
        counts = [int(c) for c in args.gpus.split(",")] if args.gpus else [n for n in (1, 2, 4, 8) if n <= total]
    world = max(counts)
    init_ray(num_cpus=None if total else 4)
    work = tempfile.mkdtemp(prefix="spotlm-bench-scaling-")
    shards = os.path.join(work, "shards")
    tokenize_corpus(TokenizeConfig(inputs=[os.path.abspath(args.text)], output=shards, tokenizer=args.tokenizer,
                                   vocab_size=1024, text_unit="paragraph", val_fraction=0.05))
    r = Runner(args, work, shards)
    sections = args.sections.split(",")
    out: dict[str, Any] = {"device": torch.cuda.get_device_name() if total else "cpu", "gpus": total,
                           "workers": counts, "smoke": args.smoke}
    if "ddp" in sections:
        out["ddp"] = ddp(r, args.presets.split(","), counts)
    if "fsdp" in sections:
        out["fsdp"] = fsdp(r, args.fsdp_presets.split(","), world, [int(s) for s in args.fsdp_seq_lens.split(",")])
    if "recovery" in sections:
        out["recovery"] = recovery(r, world)
    if "elastic" in sections:
        out["elastic"] = elastic(r, world)
    if "sync" in sections:
        out["sync"] = sync(r, world, args.modes.split(","), args.inner_steps)
    text = json.dumps(out, indent=2)
    if args.output:
        storage.write_text(args.output, text + "\n")
    print(text)
    return out


if __name__ == "__main__":
    main()
