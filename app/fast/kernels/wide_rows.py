"""An Inductor code-generation choice: one-pass ("persistent") reductions over rows up to `WIDE_ROW_LIMIT` wide.

Inductor keeps a whole row in registers only for rows of at most 1024 elements; wider rows loop over the
row twice (once for the reduction, once more for what uses its result). FP8 rowwise casts (`fp8_linear`)
reduce each row of the MLP's hidden activations and gradients (2816-4096 wide at GPT-2 350M) to its amax
before casting it, so under the default those kernels read their inputs twice. `triton.multi_kernel` lifts
the limit too but compiles both forms and times them, which failed on some graphs (torch 2.11).
The choice is scoped to the compiles that ask for it (`wide_row_inductor`, their torch.compile backend), never
set for the process. Imported only where it is used, since it imports Inductor.
"""
from __future__ import annotations

from typing import Any

import torch
from torch._inductor import config
from torch._inductor.choices import InductorChoices
from torch._inductor.runtime.hints import ReductionHint
from torch._inductor.virtualized import V

WIDE_ROW_LIMIT = 8192


class WideRowChoices(InductorChoices):
    """Inductor's choices, with inner (row) reductions of a static width <= WIDE_ROW_LIMIT persistent.
    (A module-level class: Inductor pickles it by name into its cache keys, or from torch 2.13 takes `uuid()`.)"""

    def uuid(self) -> str:
        """What Inductor's compile cache keys on for this choice (torch 2.13 refuses a choices class without it)."""
        return f"{__name__}.{type(self).__name__}:{WIDE_ROW_LIMIT}"

    @staticmethod
    def should_use_persistent_reduction(features, cooperative_reduction) -> bool:
        n = features.reduction_numel
        if (config.triton.persistent_reductions and not cooperative_reduction
                and features.get_reduction_hint() == ReductionHint.INNER and getattr(n, "is_number", False)):
            return int(n) <= WIDE_ROW_LIMIT
        return InductorChoices.should_use_persistent_reduction(features, cooperative_reduction)


def wide_row_inductor(gm: torch.fx.GraphModule, example_inputs: list[Any], mode: str | None = None,
                      options: dict[str, Any] | None = None) -> Any:
    """torch.compile's Inductor backend (with its `mode` / `options`) deciding with `WideRowChoices` in every graph
    it compiles from `gm`, the backward's too (compiled at the first backward): `torch.compile(fn,
    backend=wide_row_inductor)`. Other compiles in the process keep Inductor's own choices."""
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx, compile_fx_inner

    outside = config.inductor_choices_class  # the process's own choice

    def inner(*args: Any, **kwargs: Any) -> Any:
        # Inductor keeps one choices handler per thread, made from the config at its first use (the backward may
        # compile in autograd's thread): make this thread's from the process's config, not from the patch below,
        # then swap ours in for this compile only
        with config.patch(inductor_choices_class=outside):
            _ = V.choices  # made (and kept) by Inductor at its first read
        with V.set_choices_handler(WideRowChoices()):
            return compile_fx_inner(*args, **kwargs)

    patches = {**(list_mode_options(mode) if mode else {}), **(options or {}), "inductor_choices_class": WideRowChoices}
    return compile_fx(gm, example_inputs, inner_compile=inner, config_patches=patches)
