"""Save and load all resumable training state in a checkpoint directory, with a completion marker.

A checkpoint directory holds `model.pt`, `optimizer.pt`, `scheduler.pt`, `rng.pt` and
`state.json` (step, data position, config), `ema.pt` when the run averages its weights, `sync.pt` (DiLoCo's outer
momentum) under sync.mode=diloco, then `DONE`, written last: a directory without it is incomplete and is never loaded.
Each rank with state of its own (1-bit residuals, a DiLoCo worker's optimizer) writes `rank_<r>.pt` before rank 0
writes `DONE`. When the optimizer keeps fp32 master weights of bf16 ones (app/train/master.py,
app/train/offload.py), `model.pt` holds the masters, so a run resumed without them continues from the exact weights.
"""
from __future__ import annotations

import json
import os
import random
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from app import storage
from app.train.ema import WeightEMA
from app.log import get_logger

log = get_logger(__name__)

DONE = "DONE"
FILES = ("model.pt", "optimizer.pt", "scheduler.pt", "rng.pt", "state.json")
EMA = "ema.pt"  # the weight average, in checkpoints of runs that keep one (app/train/ema.py)
SYNC = "sync.pt"  # DiLoCo's outer state shared by the ranks (app/train/sync.py)


class CheckpointError(RuntimeError):
    """A checkpoint that is incomplete, corrupt, or does not fit the run."""


@dataclass
class TrainState:
    """The scalar part of training state (everything that is not a tensor)."""

    step: int = 0  # optimizer steps done
    samples: int = 0  # global sequences consumed (the data position)
    tokens: int = 0  # training tokens consumed
    best_val_loss: float | None = None
    resumes: int = 0  # how many times the run was resumed from a checkpoint
    preemptions: int = 0  # how many preemption notices it checkpointed and stopped for
    loss_curve: dict[str, float] = field(default_factory=dict)  # step -> train loss, at every logged step
    val_curve: dict[str, list[float]] = field(default_factory=dict)  # step -> [train seconds so far, val loss]
    train_time_s: float = 0.0  # wall time in training steps (not eval, checkpoints or each start's first step)
    comm_bytes: float = 0.0  # bytes rank 0 sent to synchronise gradients or DiLoCo deltas (app/train/sync.py)
    sync_rounds: int = 0  # DiLoCo outer steps done
    config: dict[str, Any] = field(default_factory=dict)


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_cpu(obj: Any) -> Any:
    """A deep copy with every tensor copied to CPU memory (training may change the originals)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def keeps_masters(optimizer: torch.optim.Optimizer | None) -> bool:
    """Whether the optimizer keeps fp32 master weights of the model's bf16 ones (app/train/master.py, app/train/offload.py)."""
    return hasattr(optimizer, "master_state_dict")


def model_weights(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, torch.Tensor]:
    """The model's state dict, with the optimizer's fp32 master weights in place of bf16 ones where it keeps
    them (`keeps_masters`)."""
    if keeps_masters(optimizer):
        return optimizer.master_state_dict(model)
    return model.state_dict()


def snapshot(model: torch.nn.Module | dict, optimizer: torch.optim.Optimizer | dict,
             scheduler: torch.optim.lr_scheduler.LRScheduler, state: TrainState,
             ema: WeightEMA | None = None, sync: dict[str, Any] | None = None) -> dict[str, Any]:
    """All resumable state, copied to CPU now: cheap next to writing it, so training can go on
    while `write` puts it on disk. Model and optimizer may be given as their (full) state dicts; `sync`:
    the synchronisation's shared state (`SYNC`)."""
    model_sd = model if isinstance(model, dict) else model_weights(model, optimizer)
    optim_sd = optimizer if isinstance(optimizer, dict) else optimizer.state_dict()
    snap = {"model.pt": _to_cpu(model_sd), "optimizer.pt": _to_cpu(optim_sd),
            "scheduler.pt": scheduler.state_dict(), "rng.pt": rng_state(),
            "state.json": json.loads(json.dumps(state.__dict__))}
    if ema is not None:
        snap[EMA] = _to_cpu(ema.state_dict())
    if sync is not None:
        snap[SYNC] = _to_cpu(sync)
    return snap


def write(directory: str, snap: dict[str, Any]) -> None:
    """Write a snapshot as a complete checkpoint directory; `DONE` is written last."""
    os.makedirs(directory, exist_ok=True)
    for name, obj in snap.items():
        if name.endswith(".json"):
            with open(os.path.join(directory, name), "w") as f:
                json.dump(obj, f, indent=2, sort_keys=True)
        else:
            torch.save(obj, os.path.join(directory, name))
    with open(os.path.join(directory, DONE), "w") as f:
        f.write("ok\n")


def is_complete(directory: str) -> bool:
    return all(os.path.exists(os.path.join(directory, f)) for f in (*FILES, DONE))


def load(directory: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
         scheduler: torch.optim.lr_scheduler.LRScheduler | None = None, restore_rng: bool = True,
         set_state: Callable[[dict, dict], None] | None = None, ema: WeightEMA | None = None) -> TrainState:
    """Restore what is given from a complete checkpoint; returns its TrainState. `set_state(model_sd,
    optim_sd)` replaces the plain `load_state_dict` calls (sharded models load their full dicts so).
    With `ema`, the checkpoint must hold one (a CheckpointError names the mismatch otherwise)."""
    if not is_complete(directory):
        missing = [f for f in (*FILES, DONE) if not os.path.exists(os.path.join(directory, f))]
        raise CheckpointError(f"checkpoint {directory} is incomplete (missing {', '.join(missing)})")
    if ema is not None and not os.path.exists(os.path.join(directory, EMA)):
        raise CheckpointError(f"checkpoint {directory} has no weight average ({EMA}): its run was trained "
                              "without optim.ema_decay; resume it with optim.ema_decay=0")
    try:
        model_sd = torch.load(os.path.join(directory, "model.pt"), map_location="cpu")
        optim_sd = torch.load(os.path.join(directory, "optimizer.pt"), map_location="cpu") if optimizer is not None else {}
        if set_state is not None:
            set_state(model_sd, optim_sd)
        else:
            model.load_state_dict(model_sd)
            if optimizer is not None:
                if not keeps_masters(optimizer):  # model.pt already gave it the masters
                    for st in optim_sd.get("state", {}).values():
                        st.pop("master", None)
                optimizer.load_state_dict(optim_sd)
        if scheduler is not None:
            scheduler.load_state_dict(torch.load(os.path.join(directory, "scheduler.pt")))
        if ema is not None:
            ema.load_state_dict(torch.load(os.path.join(directory, EMA)))
        if restore_rng:
            set_rng_state(torch.load(os.path.join(directory, "rng.pt"), weights_only=False))
        with open(os.path.join(directory, "state.json")) as f:
            return TrainState(**json.load(f))
    except (RuntimeError, ValueError, KeyError, EOFError) as e:
        raise CheckpointError(f"checkpoint {directory} cannot be loaded: {e}") from e


def rank_file(rank: int) -> str:
    return f"rank_{rank}.pt"


def save_rank_state(dest: str, rank: int, obj: dict[str, Any]) -> None:
    """Write this rank's own state into the checkpoint directory `dest` (local or S3)."""
    with tempfile.TemporaryDirectory(prefix="spotlm-rank-") as d:
        path = os.path.join(d, rank_file(rank))
        torch.save(_to_cpu(obj), path)
        storage.upload_file(path, storage.join(dest, rank_file(rank)))


def load_rank_state(directory: str, rank: int) -> dict[str, Any] | None:
    """This rank's own state from a checkpoint directory; None when it has none (a rank the run did not have)."""
    return _load_if_there(os.path.join(directory, rank_file(rank)))


def load_sync_state(directory: str) -> dict[str, Any] | None:
    """The synchronisation's shared state (`SYNC`); None in checkpoints of runs without one."""
    return _load_if_there(os.path.join(directory, SYNC))


def _load_if_there(path: str) -> dict[str, Any] | None:
    return torch.load(path, map_location="cpu") if os.path.exists(path) else None


def upload(local_dir: str, dest: str, retries: int = 5, backoff_s: float = 1.0) -> None:
    """Copy a complete checkpoint directory to `dest` (local or S3), `DONE` last, retrying
    transient storage errors with exponential backoff (1, 2, 4, ... s)."""
    names = sorted(os.listdir(local_dir))
    for name in [n for n in names if n != DONE] + [DONE]:
        for attempt in range(retries + 1):
            try:
                storage.upload_file(os.path.join(local_dir, name), storage.join(dest, name))
                break
            except OSError as e:
                if attempt == retries:
                    raise
                wait = backoff_s * 2**attempt
                log.warning("upload of %s failed (%s); retrying in %.0f s", name, e, wait)
                time.sleep(wait)
