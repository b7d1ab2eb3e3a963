"""Build hook for the optional CUDA extension ``ral_kernels._C`` (metadata: pyproject.toml).

The package works without the extension (``backend="cuda"`` then builds it just in time,
see ral_kernels/backends/cuda/build.py), so this builds it only where it can: RAL_SKIP_CUDA_BUILD
unset, torch importable and a CUDA build, nvcc found. pip's default build isolation hides
torch, so ``pip install -e .`` skips it; ``pip install --no-deps --no-build-isolation -e .``
builds it. RAL_CUDA_ARCHS picks the GPU archs (default "80;90").
"""

import importlib.util
import os
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
# By path: importing the ral_kernels package would import torch.
_spec = importlib.util.spec_from_file_location("_ral_cuda_build", ROOT / "ral_kernels" / "backends" / "cuda" / "build.py")
build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build)


def cuda_extension() -> dict:
    why = build.build_skip_reason()
    if why is not None:
        print(f"ral_kernels: skipping the CUDA extension ral_kernels._C ({why}); building the pure-Python package",
              file=sys.stderr)
        return {}
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    os.environ.setdefault("MAX_JOBS", str(build.default_max_jobs()))  # nvcc needs GiBs per job
    rel = lambda p: str(Path(p).relative_to(ROOT))  # noqa: E731 - setuptools wants relative sources
    ext = CUDAExtension(
        "ral_kernels._C",
        sources=[rel(build.BINDINGS), *map(rel, build.KERNEL_SOURCES)],
        include_dirs=[str(build.CSRC)],
        depends=[rel(h) for h in build.HEADERS if h.is_file()],
        extra_compile_args={"cxx": build.CXX_FLAGS, "nvcc": build.nvcc_flags()},
    )
    print(f"ral_kernels: building the CUDA extension ral_kernels._C for sm_{', sm_'.join(build.parse_archs())} "
          f"with MAX_JOBS={os.environ['MAX_JOBS']}", file=sys.stderr)
    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExtension}}


setup(**cuda_extension())
