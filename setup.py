"""Build hook (metadata: pyproject.toml): the kernel sources as package data, and the
optional CUDA extension ``ral_kernels._C``.

``csrc/`` is copied into the package as ``ral_kernels/csrc`` (not in editable installs,
which read ``csrc/`` itself), so that an installed package can build the extension just in
time or the CPU emulator (see ral_kernels/backends/cuda/build.py).

The package works without the extension, so this builds it only where it can:
RAL_SKIP_CUDA_BUILD unset, torch importable and a CUDA build, nvcc found. pip's default
build isolation hides torch, so ``pip install .`` skips it; ``pip install
--no-build-isolation .`` builds it. RAL_CUDA_ARCHS picks the GPU archs (default "80;90").
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
# By path: importing the ral_kernels package would import torch.
_spec = importlib.util.spec_from_file_location("_ral_cuda_build", ROOT / "ral_kernels" / "backends" / "cuda" / "build.py")
build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build)


class BuildPyWithKernelSources(build_py):
    """build_py that also copies the kernel sources into the package."""

    def _kernel_sources(self) -> list[tuple[str, str]]:
        dest = Path(self.build_lib) / "ral_kernels" / build.PACKAGED_CSRC
        return [(str(dest / rel), str(build.CSRC / rel)) for rel in build.source_files()]

    def run(self):
        super().run()
        if not self.editable_mode:
            for dst, src in self._kernel_sources():
                self.mkpath(os.path.dirname(dst))
                self.copy_file(src, dst)

    def get_outputs(self, include_bytecode=True):
        extra = [] if self.editable_mode else [dst for dst, _ in self._kernel_sources()]
        return super().get_outputs(include_bytecode) + extra


def cuda_extension() -> dict:
    why = build.build_skip_reason()
    if why is not None:
        print(f"ral_kernels: skipping the CUDA extension ral_kernels._C ({why}); building the package without it "
              "(backend='cuda' builds it just in time)",
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


def record_commit() -> None:
    """``ral_kernels/_commit.txt``: the commit being installed, written from git when the
    checkout has one, so that a copy without ``.git`` (a lent GPU machine) still knows it."""
    if not (ROOT / ".git").exists():
        return
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return
    if out.returncode == 0 and out.stdout.strip():
        (ROOT / "ral_kernels" / "_commit.txt").write_text(out.stdout.strip() + "\n")


record_commit()
kwargs = cuda_extension()
kwargs["cmdclass"] = {"build_py": BuildPyWithKernelSources, **kwargs.get("cmdclass", {})}
setup(**kwargs)
