"""Triton backend: ``launch`` (launchers, tile configurations) and ``kernels`` (the
``@triton.jit`` kernels, with the math at the top of the file)."""

from .launch import MAX_HEAD_DIM, SUPPORTED_DTYPES, bwd, fwd

__all__ = ["MAX_HEAD_DIM", "SUPPORTED_DTYPES", "bwd", "fwd"]
