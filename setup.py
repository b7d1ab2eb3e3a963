"""Build hook for the optional CUDA extension (``ral_kernels._C``).

Metadata lives in pyproject.toml. Nothing here probes hardware or downloads anything; the
package imports and works without the extension. The CUDA sources in ``csrc/`` and their
``CUDAExtension`` are added by the CUDA backend; until then this builds a pure-Python
package on every machine.
"""

from setuptools import setup

setup()
