"""CUDA C++ backend: ``launch`` (padding, per-row glue, calls into the extension) and
``build`` (prebuilt ``ral_kernels._C``, just-in-time build, CPU emulator).

Importing this package imports neither torch's extension loader nor the extension."""

from .launch import MAX_HEAD_DIM, SUPPORTED_DTYPES, bwd, emulation_enabled, fwd

__all__ = ["MAX_HEAD_DIM", "SUPPORTED_DTYPES", "bwd", "emulation_enabled", "fwd"]
