"""``--version`` of the command-line tools (``ral-bench``, ``ral-train``, ``ral-demo``): the
version, where the package is installed, and what can run here (the CUDA extension,
Triton, flash-attn), which is what a bug report needs."""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import sys
from pathlib import Path

from .. import __version__


def _dist_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def version_text(prog: str) -> str:
    """Four lines: ``PROG VERSION (ral_kernels at PATH)``; the versions of python, torch,
    triton and flash-attn; how ``backend="cuda"`` gets its extension here, or why it cannot
    (and the CPU emulator's state when ``RAL_CUDA_EMULATION=1``); where the kernel sources are."""
    import torch

    from ..backends.cuda import build, emulation_enabled

    cuda = build.unavailable_reason()
    if cuda is None:
        cuda = ("prebuilt ral_kernels._C" if importlib.util.find_spec("ral_kernels._C") is not None
                else "built just in time on first use")
    if emulation_enabled():
        cuda += f"; CPU emulator (RAL_CUDA_EMULATION=1): {build.emulator_unavailable_reason() or 'available'}"
    return (f"{prog} {__version__} (ral_kernels at {Path(__file__).resolve().parents[1]})\n"
            f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda or 'none'}), "
            f"triton {_dist_version('triton')}, flash-attn {_dist_version('flash-attn')}\n"
            f"backend='cuda': {cuda}\n"
            f"kernel sources: {build.CSRC}")


class _VersionAction(argparse.Action):
    """argparse's ``version`` action, with the text formed only when asked for."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(version_text(parser.prog))
        parser.exit()


def add_version_option(parser: argparse.ArgumentParser) -> None:
    """Add ``--version`` to ``parser``."""
    parser.add_argument("--version", action=_VersionAction,
                        help="print the version, the install location and what can run here, then exit")
