"""The training function every Ray Train worker runs: data, model, resume, the steps (log, evaluate,
checkpoint, stop on preemption), export. It starts over from the newest checkpoint after any restart."""
from __future__ import annotations

import contextlib
import functools
import logging
import math
import tempfile
import time
from typing import Any, Callable

import torch
import torch.distributed as dist

from app import storage
from app.config import ConfigError, from_dict, to_dict
from app.data.loader import Batch, BatchPlan, TokenStream, TrainLoader, eval_batches, match_stream
from app.data.shards import Manifest, load_manifest
from app.log import forward_logs, get_logger
from app.model.gpt import GPT, ModelConfig
from app.train import checkpoint
from app.train.config import TrainConfig, batch_plan, model_config
from app.train.ema import WeightEMA
from app.train.memory_plan import MemoryConfig
from app.train.optim import make_optimizer, make_scheduler, uses_bf16_weights
from app.train.parallel import compiles_per_block, full_state_dicts, parallelize, resolve_memory, set_full_state_dicts
from app.train.preemption import PreemptionWatcher, install_sigterm_handler
from app.train.step import build_model, compile_args, compiled, step_function
from app.train.sync import Sync
from app.tracking import RunTracker

log = get_logger(__name__)

# Dense bf16 peak FLOP/s per GPU, for MFU (H100/H200 SXM; A100).
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}
DRAIN_CHECK_EVERY = 10  # steps between queries of Ray's node-drain notice (a barrier over the workers)


def train_loop(config: dict[str, Any], log_sink: Any = None) -> None:
    """The training function each Ray Train worker runs (also resumes after any restart); its log
    lines (rank 0's, and every rank's warnings) also go to `log_sink` (`app.ray_env.relay_worker_logs`)."""
    import ray.train
    import ray.train.torch

    # ---- this worker: rank, device, log lines ----
    cfg = from_dict(TrainConfig, config)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if log_sink is not None:
        forward_logs(log_sink, logging.INFO if rank == 0 else logging.WARNING)
    device = ray.train.torch.get_device()
    if cfg.perf.deterministic:
        torch.use_deterministic_algorithms(True)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else contextlib.nullcontext

    # ---- data ----
    manifest = load_manifest(cfg.data)
    mcfg = model_config(cfg, manifest.vocab_size)
    seq_len = cfg.seq_len or mcfg.max_seq_len
    plan = batch_plan(cfg, seq_len, world)
    loader, val = _batches(cfg, manifest, seq_len, plan, rank, world)

    # ---- model, memory options, optimizer, schedule, weight average ----
    raw = build_model(cfg, mcfg, device)
    cfg.memory = resolve_memory(cfg.memory, mcfg, seq_len, cfg.micro_batch, device, world,
                                master_weights=uses_bf16_weights(cfg, device, MemoryConfig()))
    per_block = compiles_per_block(cfg.memory)  # before the optimizer: FSDP2 replaces the parameters
    parallelize(raw, cfg.memory, device=device, world_size=world,
                compile=compile_args(cfg, device) if per_block else None)
    optimizer = make_optimizer(raw, cfg, device)
    scheduler = make_scheduler(optimizer, cfg)
    ema = WeightEMA(raw, cfg.optim.ema_decay) if cfg.optim.ema_decay else None

    # ---- resume from the latest complete checkpoint, if any; watch for preemption notices ----
    sync = Sync(cfg.sync, raw, world, beta1=cfg.optim.beta1)
    state = _resume(cfg, raw, optimizer, scheduler, ema, sync, rank)
    watcher = _watch_preemption(cfg)
    model = raw
    if sync.wraps() and not cfg.memory.fsdp:
        model = sync.register(ray.train.torch.prepare_model(raw, move_to_device=False,
                                                            parallel_strategy_kwargs=sync.ddp_kwargs()))
    fwd = model if per_block else compiled(model, cfg, device)
    if rank == 0:
        log.info("model %s: %.2fM params, seq %d, global batch %d seqs (%d tokens), %d accum x %d micro x %d workers, "
                 "sync %s", cfg.preset, raw.num_params() / 1e6, seq_len, plan.global_batch,
                 plan.global_batch * seq_len, plan.accum_steps, plan.micro_batch, world, cfg.sync.mode)
    tracker = RunTracker(cfg.run_dir, title=cfg.name, history={
        "train_loss": state.loss_curve, "val_loss": {s: v for s, (_, v) in state.val_curve.items()}}) if rank == 0 else None

    step = step_function(cfg, fwd, model, raw, optimizer, device, autocast, world)
    warm_step = step_function(cfg, fwd, model, raw, optimizer, device, autocast, world,
                              apply=lambda: sync.diloco.warmup_step(optimizer)) \
        if sync.diloco is not None and sync.diloco.warm is not None else None
    first_end: list[float] = []  # when this start's first step ended: it compiles, so it is timed apart
    step, warm_step = (_marks_first_end(f, first_end, device) if f else None for f in (step, warm_step))
    flops_per_token = raw.flops_per_token(seq_len)
    t_last, steps_since, last_stall, resumed_from, first_step_s = time.perf_counter(), 0, 0.0, state.step, 0.0
    start_step, metrics, sent_before, drain_saved = state.step, {}, state.comm_bytes, False
    while state.step < cfg.max_steps:
        # ---- one optimizer step (forward/backward with gradient accumulation), or one DiLoCo round ----
        prev = state.step
        if sync.diloco is None:
            mean_loss, grad_norm = step(loader.micro_batches(state.step))
            scheduler.step()
            if ema is not None:
                ema.update()
            done = [1] * world
        else:
            mean_loss, grad_norm, done = _diloco_round(cfg, sync, step if sync.diloco.warm is None else warm_step,
                                                       loader, scheduler, ema, state, bool(val), rank)
        if state.step == start_step:  # the rest of a DiLoCo round that began with it is timed as usual
            first_step_s, t_last, steps_since = first_end[0] - t_last, first_end[0], -1
        state.step += max(done)
        state.samples += plan.per_rank * sum(done)
        state.tokens += plan.per_rank * sum(done) * seq_len
        state.comm_bytes = sent_before + sync.counter.sent
        steps_since += max(done)
        last = state.step == cfg.max_steps

        # ---- log ----
        metrics: dict[str, Any] = {"step": state.step, "tokens": state.tokens, "resumes": state.resumes,
                                   "preemptions": state.preemptions, "comm_bytes": state.comm_bytes,
                                   "comm_bytes_per_step": state.comm_bytes / state.step,
                                   "sync_rounds": state.sync_rounds}
        progress_from = None  # set when this step logs
        if _due(cfg.log_every, prev, state.step) or last or (val and _due(cfg.eval_every, prev, state.step)):
            dt = synced_seconds(t_last, device)
            state.train_time_s += dt
            (train_loss,) = _all_reduce_mean([mean_loss.item()], device)
            tps = steps_since * plan.global_batch * seq_len / dt if steps_since > 0 else 0.0
            mfu = _mfu(flops_per_token, tps, world)
            state.loss_curve[str(state.step)] = train_loss
            metrics.update(train_loss=train_loss, tokens_per_s=tps, lr=scheduler.get_last_lr()[0],
                           checkpoint_stall_s=last_stall, train_time_s=state.train_time_s,
                           first_step_s=first_step_s,
                           grad_norm=float(grad_norm), epoch=loader.epoch_of(state.step))
            if mfu is not None:
                metrics["mfu"] = mfu
            progress_from = resumed_from  # progress.json is written once, after this step's evaluation
            t_last, steps_since, last_stall, resumed_from = time.perf_counter(), 0, 0.0, state.step

        # ---- evaluate ----
        if val and (_due(cfg.eval_every, prev, state.step) or last):
            last = _validate(cfg, fwd, val, device, autocast, ema, state, metrics) or last
            t_last = time.perf_counter()
        if rank == 0 and progress_from is not None:
            _log_step(cfg, metrics)
            _write_progress(cfg.run_dir, state, metrics, progress_from, world, device)
            tracker.log(state.step, metrics)
        metrics["done"] = last

        # ---- preemption notices Ray does not see (SIGTERM, the AWS spot notice): checkpoint and hand back to
        # the driver. Ray's node-drain notice: a just-in-time checkpoint, and training goes on (Ray restarts the
        # group from it once the node is gone). ----
        preempted = _any_rank(watcher.should_stop(), device)
        drained = (not drain_saved and _due(DRAIN_CHECK_EVERY, prev, state.step)
                   and ray.train.get_preemption_info() is not None)
        if preempted or drained:
            state.preemptions += 1
            metrics["preemptions"] = state.preemptions
            drain_saved = drain_saved or drained
            if rank == 0:
                log.warning("preempted (%s) at step %d: checkpointing%s", watcher.reason or
                            ("ray node drain" if drained else "another rank"), state.step,
                            " and stopping" if preempted else ", training on until the node goes")

        # ---- checkpoint ----
        if preempted or drained or _due(cfg.ckpt.every, prev, state.step) or last:
            last_stall = _report(metrics, state, raw, optimizer, scheduler, rank, cfg, ema, sync)
            t_last = time.perf_counter()
        if preempted or last:
            break
    watcher.close()
    if tracker is not None:
        tracker.close()
    if state.step < cfg.max_steps and not metrics.get("done"):
        return  # preempted: the driver starts the run again

    # ---- export ----
    if cfg.export_dir:
        _export(cfg, raw, optimizer, ema, mcfg, manifest, state, rank)


# ---------------------------------------------------------------- the phases of the loop

def _diloco_round(cfg: TrainConfig, sync: Sync, step, loader: TrainLoader, scheduler, ema: WeightEMA | None,
                  state: checkpoint.TrainState, evaluates: bool,
                  rank: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """One DiLoCo round from `state.step`: inner steps on this worker's slice of each global batch, up to
    `sync.inner_steps` (or, with `sync.round_s`, until the first step boundary past the round's deadline), never
    past the next checkpoint, evaluation or the end; then the outer step. Returns the last inner step's loss and
    grad norm, and every worker's inner steps (the schedule moves on by the most, as the global step does).
    During the warm start (`sync.warmup_steps`) the steps are synchronous 1-bit Adam steps instead, and no round
    ends; the last of them hands its moments to AdamW.

    The deadline is this worker's clock `round_s` after the round began: the rounds begin together (each ends in
    the outer step's collectives), so no collective per step and no clocks agreed between machines are needed."""
    c, diloco = cfg.sync, sync.diloco
    warming = diloco.warm is not None
    ends = [cfg.max_steps, c.warmup_steps if warming else
            state.step + (cfg.max_steps if c.round_s else c.inner_steps)]
    ends += [_next_multiple(state.step, every) for every in (cfg.ckpt.every, cfg.eval_every if evaluates else 0)
             if every]
    end, deadline = min(ends), time.monotonic() + c.round_s
    n = 0
    while state.step + n < end and (warming or n == 0 or not c.round_s or time.monotonic() < deadline):
        mean_loss, grad_norm = step(loader.micro_batches(state.step + n))
        scheduler.step()
        if ema is not None:
            ema.update()
        n += 1
    if warming:
        if state.step + n == c.warmup_steps:
            diloco.end_warmup(scheduler.optimizer)
        return mean_loss, grad_norm, [n] * (dist.get_world_size() if dist.is_initialized() else 1)
    result = diloco.outer_step(n)
    for _ in range(max(result.inner_steps) - n):  # a slower worker's schedule catches up with the global step
        scheduler.step()
    state.sync_rounds += 1
    if rank == 0:
        log.info("diloco round %d: inner steps per worker %s, %.0f bytes sent", state.sync_rounds,
                 result.inner_steps, result.sent)
    return mean_loss, grad_norm, result.inner_steps


def _next_multiple(step: int, every: int) -> int:
    return (step // every + 1) * every


def _due(every: int, prev: int, step: int) -> bool:
    """Whether the steps after `prev` up to `step` reach a multiple of `every` (0: never)."""
    return bool(every) and prev // every != step // every


def index_stream(manifest: Manifest, split: str) -> TokenStream:
    """`--index`: the split's LMatch ids (app.data.loader.match_stream); a ConfigError when they were not built."""
    stream = match_stream(manifest, split)
    if stream is None:
        raise ConfigError(f"--index: {manifest.root} has no LMatch index for {split!r}; run "
                          f"`python -m jobs.build_index --data={manifest.root}` first")
    return stream


def _batches(cfg: TrainConfig, manifest: Manifest, seq_len: int, plan: BatchPlan, rank: int,
             world: int) -> tuple[TrainLoader, list[Batch]]:
    """This rank's training loader and its share of the validation batches (none without a val split)."""
    loader = TrainLoader(TokenStream(manifest, "train"), seq_len, plan, rank, cfg.seed,
                         index_stream(manifest, "train") if cfg.index else None)
    if not manifest.shards.get("val"):
        return loader, []
    val = eval_batches(TokenStream(manifest, "val"), seq_len, cfg.micro_batch, cfg.eval_tokens, rank, world,
                       index_stream(manifest, "val") if cfg.index else None)
    return loader, val


def _resume(cfg: TrainConfig, raw: GPT, optimizer, scheduler, ema: WeightEMA | None, sync: Sync,
            rank: int) -> checkpoint.TrainState:
    """The run's state: loaded (with the weights, optimizer, schedule, average, and the synchronisation's state,
    shared and this rank's own) from Ray Train's latest checkpoint, else a fresh one."""
    import ray.train

    state = checkpoint.TrainState(config=to_dict(cfg))
    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return state
    with ckpt.as_directory() as d:
        state = checkpoint.load(d, raw, optimizer, scheduler, set_state=functools.partial(
            set_full_state_dicts, raw, optimizer) if cfg.memory.fsdp else None, ema=ema)
        sync.load(checkpoint.load_sync_state(d), checkpoint.load_rank_state(d, rank), optimizer, rank)
    state.resumes += 1
    if rank == 0:
        log.info("resumed %s at step %d (%d tokens seen)", cfg.name, state.step, state.tokens)
    return state


def _watch_preemption(cfg: TrainConfig) -> PreemptionWatcher:
    """A watcher of the preemption notices Ray does not see: the AWS spot notice (`cluster.spot_notice`) and
    SIGTERM (`cluster.catch_sigterm`). (The loop asks Ray itself about node drains.)"""
    notice = cfg.cluster.spot_notice
    watcher = PreemptionWatcher(aws_endpoint=None if notice in ("auto", "off") else notice, aws_auto=notice == "auto")
    if cfg.cluster.catch_sigterm:
        install_sigterm_handler(watcher)
    return watcher


def _validate(cfg: TrainConfig, fwd: torch.nn.Module, val: list[Batch], device: torch.device, autocast,
              ema: WeightEMA | None, state: checkpoint.TrainState, metrics: dict[str, Any]) -> bool:
    """A validation pass (on the weight average, if kept) into `metrics` and `state`; whether it reached
    `target_val_loss` (the run then finishes: checkpoint and export)."""
    t_eval = time.perf_counter()
    with ema.swapped() if ema is not None else contextlib.nullcontext():
        metrics["val_loss"] = evaluate(fwd, val, device, autocast)
    state.best_val_loss = min(metrics["val_loss"], state.best_val_loss or math.inf)
    state.val_curve[str(state.step)] = [state.train_time_s, metrics["val_loss"]]
    metrics["eval_s"] = time.perf_counter() - t_eval
    return bool(cfg.target_val_loss) and metrics["val_loss"] <= cfg.target_val_loss


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches, device: torch.device, autocast) -> float:
    """Mean validation loss over this rank's batches, averaged over all ranks."""
    model.eval()
    total, count = 0.0, 0
    for b in batches:
        lmatch = b.lmatch.to(device) if b.lmatch is not None else None
        with autocast():
            _, loss = model(b.inputs.to(device), b.targets.to(device), lmatch=lmatch)
        total, count = total + loss.item() * b.targets.numel(), count + b.targets.numel()
    model.train()
    loss_sum, n = _all_reduce_mean([total, float(count)], device)
    return loss_sum / max(n, 1.0)


def _export(cfg: TrainConfig, raw: GPT, optimizer: torch.optim.Optimizer, ema: WeightEMA | None, mcfg: ModelConfig,
            manifest: Manifest, state: checkpoint.TrainState, rank: int) -> None:
    """Rank 0 exports the final weights (the average, if kept) with the tokenizer; every rank takes part in
    gathering them under FSDP."""
    with ema.swapped() if ema is not None else contextlib.nullcontext():
        weights = _final_weights(raw, optimizer, cfg)  # a collective under FSDP: every rank calls it
    if rank != 0:
        return
    from app.model.export import export_model

    final = GPT(mcfg)
    final.load_state_dict(weights)
    export_model(final, cfg.export_dir, manifest.tokenizer_path,
                 meta={"run": cfg.name, "step": state.step, "val_loss": state.best_val_loss, "eot_id": manifest.eot_id})


def _final_weights(model: GPT, optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> dict[str, torch.Tensor]:
    """The trained weights as a full fp32 CPU state dict: gathered from the shards under FSDP, the fp32
    master copy when the optimizer keeps one (offloaded, or `optim.bf16_weights`: the model's copy is bf16)."""
    sd = full_state_dicts(model, optimizer)[0] if cfg.memory.fsdp else checkpoint.model_weights(model, optimizer)
    # A copy even on CPU: the live parameters change after this (the weight average swaps back out).
    return {k: v.detach().to("cpu", torch.float32, copy=True) for k, v in sd.items()}


# ---------------------------------------------------------------- checkpoints through Ray Train

def _report(metrics: dict[str, Any], state: checkpoint.TrainState, model, optimizer, scheduler, rank: int,
            cfg: TrainConfig, ema: WeightEMA | None, sync: Sync) -> float:
    """Checkpoint through Ray Train: each rank with state of its own writes it first (then a barrier, so that
    rank 0's `DONE` comes after every rank's file); rank 0 writes the rest, every rank calls report (a barrier).
    Returns the seconds the training loop was held up."""
    import ray.train

    t0 = time.perf_counter()
    dir_name = f"checkpoint_{state.step:08d}"
    own = sync.rank_state(optimizer, rank)
    if own is not None:
        checkpoint.save_rank_state(storage.join(cfg.run_dir, dir_name), rank, own)
        if dist.is_initialized():
            dist.barrier()
    if cfg.memory.fsdp:  # gathering the shards is a collective: every rank takes part
        model, optimizer = full_state_dicts(model, optimizer)
    if rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return time.perf_counter() - t0
    # Training stalls only for the copy to CPU memory: writing the files and uploading them happen
    # in Ray's upload hook, in the background when ckpt.async_upload is on. The directory is not a
    # context manager: Ray deletes it once uploaded.
    snap = checkpoint.snapshot(model, optimizer, scheduler, state, ema, sync.shared_state())
    d = tempfile.mkdtemp(prefix=f"spotlm-ckpt-{cfg.name}-")
    mode = ray.train.CheckpointUploadMode.ASYNC if cfg.ckpt.async_upload else ray.train.CheckpointUploadMode.SYNC
    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d),
                     checkpoint_dir_name=dir_name, checkpoint_upload_mode=mode,
                     checkpoint_upload_fn=functools.partial(_write_and_upload, snap, cfg.run_dir,
                                                            cfg.ckpt.upload_retries),
                     delete_local_checkpoint_after_upload=True)
    return time.perf_counter() - t0


def _write_and_upload(snap: dict[str, Any], run_dir: str, retries: int, ckpt, dir_name: str):
    """Ray Train's checkpoint upload hook: write the snapshot, then our retrying, DONE-last upload."""
    import ray.train

    checkpoint.write(ckpt.path, snap)
    checkpoint.upload(ckpt.path, storage.join(run_dir, dir_name), retries=retries)
    # The same place, named through Ray's own filesystem object (Ray checks it is under its storage).
    st = ray.train.get_context().get_storage()
    return ray.train.Checkpoint(path=f"{st.experiment_fs_path}/{dir_name}", filesystem=st.storage_filesystem)


# ---------------------------------------------------------------- logging and progress

def _log_step(cfg: TrainConfig, m: dict[str, Any]) -> None:
    """Rank 0's line for a logged step: loss, learning rate, speed, epoch, and the validation loss if evaluated."""
    mfu = f" | mfu {m['mfu']:.1%}" if "mfu" in m else ""
    val = f" | val loss {m['val_loss']:.4f}" if "val_loss" in m else ""
    log.info("step %d/%d | loss %.4f | lr %.2e | %s tok/s%s | epoch %.2f%s", m["step"], cfg.max_steps, m["train_loss"],
             m["lr"], f"{m['tokens_per_s']:,.0f}", mfu, m["epoch"], val)


def _write_progress(run_dir: str, state: checkpoint.TrainState, metrics: dict[str, Any], resumed_from: int,
                    world: int, device: torch.device) -> None:
    """`<run>/progress.json`: where the run is now (for people, dashboards and benchmarks): also the workers now
    in the group, the tokens seen and (on CUDA) rank 0's peak GPU memory since this start."""
    peak = {"gpu_peak_gb": torch.cuda.max_memory_allocated(device) / 1e9} if device.type == "cuda" else {}
    storage.write_json(storage.join(run_dir, "progress.json"), {
        "step": state.step, "time": time.time(), "resumes": state.resumes, "resumed_from_step": resumed_from,
        "train_time_s": state.train_time_s, "val_curve": state.val_curve, "workers": world, "tokens": state.tokens,
        **peak,
        **{k: metrics[k] for k in ("train_loss", "tokens_per_s", "checkpoint_stall_s", "first_step_s", "val_loss",
                                   "comm_bytes", "comm_bytes_per_step", "sync_rounds") if k in metrics}})


def _mfu(flops_per_token: float, tokens_per_s: float, world: int) -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_FLOPS.items() if k in name), None)
    return flops_per_token * tokens_per_s / (peak * world) if peak else None


def _marks_first_end(step: Callable, marks: list[float], device: torch.device) -> Callable:
    """`step`, appending to `marks` the clock at the end of the first step (of this or another marked
    function) once its queued GPU work has finished."""
    def run(batches):
        out = step(batches)
        if not marks:
            marks.append(synced_seconds(0.0, device))
        return out
    return run


def synced_seconds(since: float, device: torch.device) -> float:
    """Seconds since `since`, after the queued GPU work has finished."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - since


# ---------------------------------------------------------------- agreement between the ranks

def _all_reduce_mean(values: list[float], device: torch.device) -> list[float]:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return (t / dist.get_world_size()).tolist()


def _any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if `flag` is true on any rank (so all ranks stop at the same step)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())
