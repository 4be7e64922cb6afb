"""Which path a kernel call takes: Triton (CUDA, or CPU under Triton's interpreter) or the PyTorch reference."""
from __future__ import annotations

import functools
import os

import torch

_TRUE = {"1", "true", "yes", "on", "y"}  # the spellings Triton itself accepts for TRITON_INTERPRET


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in _TRUE


# The test switch turns on Triton's interpreter; it must be set before the kernels are decorated,
# which is why this happens at import, before `triton.jit` runs in the kernel modules.
if _env_flag("SPOTLM_TRITON_INTERPRET_TEST"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs without Triton: every call takes the PyTorch reference
    triton = tl = None

# Whether the kernels defined after this import are interpreted (run on CPU tensors).
INTERPRET = triton is not None and _env_flag("TRITON_INTERPRET")


def jit(fn):
    """`triton.jit`, or the plain function where Triton is not installed (it is then never launched)."""
    return triton.jit(fn) if triton is not None else fn


def use_triton(*tensors: torch.Tensor) -> bool:
    """True when the Triton kernels can run on these tensors: all on CUDA, or all on CPU under the interpreter."""
    if triton is None:
        return False
    if all(t.is_cuda for t in tensors):
        return True
    return INTERPRET and all(t.device.type == "cpu" for t in tensors)


def unit_last(*ts: torch.Tensor) -> list[torch.Tensor]:
    """Each of ts as is where its last stride is 1 (what the kernels' row addressing needs), else a contiguous copy."""
    return [t if t.stride(-1) == 1 else t.contiguous() for t in ts]


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (n >= 1)."""
    return 1 << (max(n, 1) - 1).bit_length()


def num_warps_for(block: int) -> int:
    """Warps per program for a one-row program over `block` elements (Liger-Kernel's settings)."""
    if block >= 32768:
        return 32
    if block >= 8192:
        return 16
    if block >= 2048:
        return 8
    return 4


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_programs(device: torch.device, rows: int, per_sm: int = 4) -> int:
    """How many programs a persistent row loop launches: a few per SM on CUDA, a few in the interpreter."""
    if device.type == "cuda":
        return max(1, min(rows, per_sm * _sm_count(device.index if device.index is not None else torch.cuda.current_device())))
    return max(1, min(rows, 4))
