"""An Inductor code-generation choice: one-pass ("persistent") reductions over rows up to `WIDE_ROW_LIMIT` wide.

Inductor keeps a whole row in registers only for rows of at most 1024 elements; wider rows loop over the
row twice (once for the reduction, once more for what uses its result). FP8 rowwise casts (`fp8_linear`)
reduce each row of the MLP's hidden activations and gradients (2816-4096 wide at GPT-2 350M) to its amax
before casting it, so under the default those kernels read their inputs twice. `triton.multi_kernel` lifts
the limit too but compiles both forms and times them, which failed on some graphs (torch 2.11).
Imported only when the choice is made (`model.use_kernels`), since it imports Inductor.
"""
from __future__ import annotations

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


def use_wide_rows(enabled: bool) -> None:
    """Make the graphs compiled from now on in this process use (or not) one-pass reductions over wide rows.
    Leaves a choices class someone else installed alone."""
    if enabled and config.inductor_choices_class is None:
        config.inductor_choices_class = WideRowChoices
    elif not enabled and config.inductor_choices_class is WideRowChoices:
        config.inductor_choices_class = None
    # Inductor caches its choices per thread on first use: replace this thread's copy too
    V.set_choices_handler((config.inductor_choices_class or InductorChoices)())
