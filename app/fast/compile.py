"""torch.compile's arguments for a `PerfConfig`: its compile mode, and the wide-row choice scoped to that compile."""
from __future__ import annotations

from typing import Any


def compile_kwargs(mode: str = "default", wide_rows: bool = False) -> dict[str, Any]:
    """Keyword arguments of torch.compile for `PerfConfig.compile_mode`: a torch.compile mode, or "tuned", the
    default mode with Inductor's coordinate-descent tuning (modded-nanogpt's setting: each generated kernel's
    block sizes and warps timed on the GPU at compile time; no GEMM autotuning, no CUDA graphs of its own).
    `wide_rows` (kernels=rows): Inductor with one-pass reductions over rows up to 8192 wide (`kernels.wide_rows`)."""
    kwargs: dict[str, Any] = {}
    if mode == "tuned":
        kwargs["options"] = {"coordinate_descent_tuning": True}
    elif mode != "default":
        kwargs["mode"] = mode
    if wide_rows:
        from app.fast.kernels.wide_rows import wide_row_inductor

        kwargs["backend"] = wide_row_inductor
    return kwargs
