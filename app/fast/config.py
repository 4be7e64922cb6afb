"""`PerfConfig`: how a training run is made fast (TrainConfig's `perf` section, `--perf.<field>=...`).

Plain data: parsing or validating it changes nothing; `app.fast.accelerate` applies it to a model, the trainer
to torch.compile and the step. It changes speed and memory; FP8 also changes the rounding, never the model.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from app.config import ConfigError, check_choices

KERNEL_NAMES = ("loss", "rows", "window", "mlp")
AUTO_KERNEL_SET = ("loss", "window")  # kernels=auto: the fastest set bench/train_speed.py measured
# ... under fp8=all: also one-pass casts of the MLP's hidden rows, and the ReLU² feed-forward's row kernels
AUTO_KERNEL_SET_FP8 = ("loss", "rows", "window", "mlp")
CompileMode = Literal["default", "tuned", "max-autotune-no-cudagraphs", "max-autotune", "reduce-overhead"]
GRAPHING_COMPILE_MODES = ("max-autotune", "reduce-overhead")  # torch.compile modes that capture CUDA graphs themselves


@dataclass
class PerfConfig:
    """Speed options of a training run: Triton kernels, FP8 matmuls, torch.compile, the whole-step CUDA graph."""

    kernels: str = "auto"  # fast paths on GPU: auto (the fastest measured) | none | all | a list of loss,rows,window,mlp
    fp8: Literal["off", "head", "all"] = "off"  # FP8 training matmuls (sm89+): head = the lm_head's, all = blocks + head
    compile: Literal["auto", "true", "false"] = "auto"  # torch.compile the model: auto = on GPU
    compile_mode: CompileMode = "default"  # torch.compile mode; tuned = default + Inductor's coordinate-descent tuning
    cuda_graph: Literal["auto", "true", "false"] = "auto"  # the whole step as one CUDA graph: auto = wherever it fits
    deterministic: bool = False  # deterministic algorithms only (slower): bitwise-repeatable runs (CPU)

    def validate(self) -> None:
        """ConfigError (one line) for a value outside its choices, an unknown kernel or an impossible mix."""
        check_choices(self, "perf.")
        unknown = self.kernel_set() - set(KERNEL_NAMES)
        if unknown:
            raise ConfigError(f"perf.kernels: unknown {sorted(unknown)}; use auto, none, all, or a comma list of "
                              f"{','.join(KERNEL_NAMES)}")
        if self.cuda_graph == "true" and self.compile_mode in GRAPHING_COMPILE_MODES:
            raise ConfigError(f"perf.cuda_graph=true captures the whole step itself: perf.compile_mode="
                              f"{self.compile_mode} (which graphs the model on its own) does not nest in it")

    def kernel_set(self) -> frozenset[str]:
        """The kernels `kernels` names, auto resolved (AUTO_KERNEL_SET, or AUTO_KERNEL_SET_FP8 under fp8=all)."""
        if self.kernels == "auto":
            return frozenset(AUTO_KERNEL_SET_FP8 if self.fp8 == "all" else AUTO_KERNEL_SET)
        named = {"none": (), "all": KERNEL_NAMES}.get(self.kernels, self.kernels.split(","))
        return frozenset(filter(None, named))

    def compiles(self, device: torch.device) -> bool:
        """Whether the model runs under torch.compile on `device` (auto: on CUDA)."""
        return device.type == "cuda" if self.compile == "auto" else self.compile == "true"
