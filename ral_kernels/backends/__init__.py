"""The backend registry: one table that :mod:`ral_kernels.api` (resolution, availability)
and :mod:`ral_kernels.ops` (dispatch of the registered op) both read.

Each backend is a module exposing ``fwd`` and ``bwd`` with the signatures of
:mod:`ral_kernels.backends.torch`; GPU backends are imported on first use, never at import
time, and nothing here queries a device when the package is imported.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:  # at run time the name ``torch`` here is the submodule backends.torch
    import torch

# The order "auto" tries on CUDA tensors (then "torch", which always runs).
AUTO_ORDER = ("triton", "cuda")
# Every backend that can run the op (``"reference"`` is the dense oracle, run by the API).
NAMES = ("triton", "cuda", "torch", "reference")
_MODULES = {"torch": "ral_kernels.backends.torch", "triton": "ral_kernels.backends.triton",
            "cuda": "ral_kernels.backends.cuda"}


def implementation(name: str):
    """The module (``fwd`` / ``bwd``) behind ``backend=name``."""
    if name not in _MODULES:
        raise ValueError(f"no implementation registered for backend {name!r}")
    return importlib.import_module(_MODULES[name])


# Where each backend keeps its kernel set (the pipeline's passes, ``KERNELS``).
_KERNEL_SETS = {"torch": "ral_kernels.backends.torch", "triton": "ral_kernels.backends.triton.launch",
                "cuda": "ral_kernels.backends.cuda.launch"}


def kernel_set(name: str):
    """The kernel set (a :class:`~ral_kernels.backends.pipeline.Kernels`) behind
    ``backend=name``, for callers that string the passes together themselves (e.g.
    :mod:`ral_kernels.sequence_parallel`)."""
    if name not in _KERNEL_SETS:
        raise ValueError(f"no kernel set registered for backend {name!r}")
    return importlib.import_module(_KERNEL_SETS[name]).KERNELS


def _triton_reason(device: torch.device, dtype, head_dim: int) -> Optional[str]:
    if importlib.util.find_spec("triton") is None:
        return "the `triton` package is not installed (pip install triton)"
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return (f"Triton kernels need CUDA tensors (got {device.type}; set TRITON_INTERPRET=1 before "
                "importing triton to interpret them on the CPU)")
    from .triton import MAX_HEAD_DIM, SUPPORTED_DTYPES
    from .triton.launch import gpu_head_dim_limit

    if dtype is not None and dtype not in SUPPORTED_DTYPES:
        return f"the Triton kernels take float16, bfloat16 or float32 inputs, got {dtype}"
    if head_dim > MAX_HEAD_DIM:
        return f"the Triton kernels take head dims up to {MAX_HEAD_DIM}, got {head_dim}"
    if device.type == "cuda" and dtype is not None and head_dim > gpu_head_dim_limit(dtype):
        return (f"on a GPU the Triton kernels take head dims up to {gpu_head_dim_limit(dtype)} in {dtype} "
                f"(larger tiles spill registers), got {head_dim}")
    return None


def _cuda_reason(device: torch.device, dtype, head_dim: int) -> Optional[str]:
    from .cuda import MAX_HEAD_DIM, SUPPORTED_DTYPES, build, emulation_enabled

    if device.type != "cuda" and not emulation_enabled():
        return (f"the CUDA kernels need CUDA tensors (got {device.type}; set RAL_CUDA_EMULATION=1 to run "
                "them in the CPU emulator)")
    if dtype is not None and dtype not in SUPPORTED_DTYPES:
        return f"the CUDA kernels take float16 or bfloat16 inputs, got {dtype}"
    if head_dim > MAX_HEAD_DIM:
        return f"the CUDA kernels take head dims up to {MAX_HEAD_DIM}, got {head_dim}"
    if device.type != "cuda":
        return build.emulator_unavailable_reason()
    return build.unavailable_reason()


def unavailable_reason(name: str, device: torch.device, dtype: Optional[torch.dtype] = None,
                       head_dim: int = 0) -> Optional[str]:
    """``None`` if backend ``name`` can run on ``device`` (for inputs of ``dtype`` and
    largest head dim ``head_dim``), else a sentence saying why not."""
    if name in ("torch", "reference"):
        return None
    if name == "triton":
        return _triton_reason(device, dtype, head_dim)
    if name == "cuda":
        return _cuda_reason(device, dtype, head_dim)
    return f"unknown backend {name!r}"
