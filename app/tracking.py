"""Run metrics a person can watch: TensorBoard event files and a loss-curve PNG in a run directory (training),
and evaluation results as TensorBoard scalars (`record_results`)."""
from __future__ import annotations

import hashlib
import math
import os
import time
from typing import Any

from app import storage

TAGS = {"train_loss": "loss/train", "val_loss": "loss/val", "lr": "optim/lr", "grad_norm": "optim/grad_norm",
        "tokens_per_s": "speed/tokens_per_s", "mfu": "speed/mfu"}  # the rest keep their own names
EVENTS_DIR = "tensorboard"
PLOT = "loss.png"
# Least seconds between redraws of the PNG (and uploads to S3) during a run: a matplotlib redraw runs in
# the loop's time and costs as much as many small-model steps, so redrawing at every evaluation of a short
# run (the speedrun evaluates every 25 steps) slowed it by half (bench/RESULTS.md, speedrun).
REDRAW_EVERY_S = 60.0


class RunTracker:
    """Writes `<run_dir>/tensorboard/` (event files: one scalar per numeric metric of each logged step)
    and `<run_dir>/loss.png` (train and validation loss against step). The events are written out at each
    step that carries a validation loss; the PNG is redrawn at such a step once `redraw_every_s` have passed
    since the last redraw (or the start), and at `close()`. An s3:// run_dir is written locally first, under
    the cache, and uploaded when the PNG is redrawn. `history` seeds the curves of a resumed run:
    `{"train_loss": {step: loss}, "val_loss": {step: loss}}`."""

    def __init__(self, run_dir: str, title: str = "", history: dict[str, dict[Any, float]] | None = None,
                 redraw_every_s: float = REDRAW_EVERY_S):
        from torch.utils.tensorboard import SummaryWriter  # needs the `tensorboard` package

        self.run_dir, self.title = run_dir, title or os.path.basename(run_dir.rstrip("/"))
        self.local = _local_dir(run_dir)
        self.writer = SummaryWriter(log_dir=os.path.join(self.local, EVENTS_DIR))
        self.curves: dict[str, dict[int, float]] = {k: {int(s): float(v) for s, v in (history or {}).get(k, {}).items()}
                                                    for k in ("train_loss", "val_loss")}
        self.redraw_every_s, self.drawn_at = redraw_every_s, time.monotonic()

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """Record the numeric metrics of a step (bools and `step` itself are skipped)."""
        for key, value in metrics.items():
            if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            self.writer.add_scalar(TAGS.get(key, key), value, step)
            if key in self.curves and math.isfinite(value):
                self.curves[key][step] = float(value)
        if "val_loss" in metrics:
            if time.monotonic() - self.drawn_at >= self.redraw_every_s:
                self.flush()
            else:
                self.writer.flush()

    def flush(self) -> None:
        """Write out the events, redraw the PNG (once there is a loss to draw), and upload both when the run
        lives on S3."""
        self.writer.flush()
        self.drawn_at = time.monotonic()
        if any(self.curves.values()):
            draw_curves(self.curves, os.path.join(self.local, PLOT), self.title)
        if storage.is_s3(self.run_dir):
            storage.upload_dir(self.local, self.run_dir)

    def close(self) -> None:
        self.flush()
        self.writer.close()


def _local_dir(run_dir: str) -> str:
    """Where the files are written: the run directory itself, or for S3 a stable directory in the cache."""
    if not storage.is_s3(run_dir):
        return storage.absolute(run_dir)
    return os.path.join(storage.cache_dir(), "tracking", hashlib.sha256(run_dir.encode()).hexdigest()[:16])


def draw_curves(curves: dict[str, dict[float, float]], path: str, title: str, xlabel: str = "step",
                target: float | None = None) -> None:
    """A PNG of each named curve (x -> loss), with an optional target line; no pyplot, so no global
    backend is chosen."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for name, curve in curves.items():
        if curve:
            steps = sorted(curve)
            ax.plot(steps, [curve[s] for s in steps], marker="." if len(steps) < 50 else None,
                    label=name.replace("_", " "))
    if target is not None:
        ax.axhline(target, color="gray", linestyle="--", label=f"target {target:.4f}")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("loss")
    ax.set_title(title)
    if any(curves.values()) or target is not None:
        ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp"
    fig.savefig(tmp, dpi=110, format="png")
    os.replace(tmp, path)


def record_results(result: dict[str, Any], directory: str, step: int = 0) -> int:
    """Every finite number of a (nested) result dict, but its "model" description, as a TensorBoard scalar under
    `directory`, tagged by its path ("hellaswag/acc_norm"), at `step` (e.g. the evaluated model's training
    step); returns how many."""
    tracker = RunTracker(directory)
    flat = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}/{k}" if prefix else str(k), v)
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            flat[prefix] = value

    walk("", {k: v for k, v in result.items() if k != "model"})
    tracker.log(step, flat)
    tracker.close()
    return len(flat)
