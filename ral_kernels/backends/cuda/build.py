"""Build the CUDA extension: prebuilt ``ral_kernels._C``, a just-in-time build, or a CPU emulator.

One place for the flags, so that ``setup.py``, the JIT loader and the compile check
(:mod:`ral_kernels.tools.cuda_compile_check`) compile the same way. ``setup.py`` loads this file
by path, before torch may be importable, so nothing here imports torch at module level.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Optional

# Where the kernel sources are installed inside the package (setup.py copies csrc/ there).
PACKAGED_CSRC = "csrc"
# The files of csrc/ that ship: in the sdist (MANIFEST.in lists the same) and in the wheel.
SOURCE_PATTERNS = ("*.cu", "*.cuh", "*.h", "*.cpp", "*.md")


def _find_csrc() -> Path:
    """The kernel sources: ``csrc/`` at the top of a source tree (a checkout, an unpacked
    sdist, an editable install), which is the source of truth, else the copy a wheel
    installs as package data (``ral_kernels/csrc``)."""
    package = Path(__file__).resolve().parents[2]
    tree = package.parent
    if (tree / "pyproject.toml").is_file() and (tree / "csrc").is_dir():
        return tree / "csrc"
    return package / PACKAGED_CSRC


CSRC = _find_csrc()

KERNEL_NAMES = ("attn_fwd.cu", "attn_bwd.cu", "div.cu")
KERNEL_SOURCES = tuple(CSRC / n for n in KERNEL_NAMES)
BINDINGS = CSRC / "bindings.cpp"
HEADERS = (CSRC / "ral_cuda.h", CSRC / "kernel_utils.cuh", CSRC / "emu" / "cuda_emu.h")

DEFAULT_ARCHS = "80;90"
# No -std for the host compiler: torch's cpp_extension passes the standard its headers need
# (the sources are C++17 and build as C++20 too).
CXX_FLAGS = ["-O3"]
# The -U flags undo torch's -D__CUDA_NO_HALF_OPERATORS__ & co. so half/bfloat16 arithmetic works.
NVCC_FLAGS = ["-O3", "-std=c++17", "-lineinfo", "--expt-relaxed-constexpr", "-U__CUDA_NO_HALF_OPERATORS__",
              "-U__CUDA_NO_HALF_CONVERSIONS__", "-U__CUDA_NO_HALF2_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__"]
# -fsanitize=alignment: the emulator turns a misaligned load or store in a kernel into a launch
# failure (csrc/emu/cuda_emu.h defines the handler; no sanitizer runtime is linked).
EMU_FLAGS = ["-O2", "-DRAL_CPU_EMULATION", "-fsanitize=alignment"]
JIT_NAME, EMU_NAME = "ral_kernels_cuda", "ral_kernels_emu"

_log = logging.getLogger("ral_kernels")
_ARCH = re.compile(r"(?:sm_)?(\d{1,2})\.?(\d)([af]?)")


def source_files(csrc: Path = CSRC) -> list[Path]:
    """The files of ``csrc`` that ship with the package (:data:`SOURCE_PATTERNS`), relative
    to it, sorted."""
    return sorted({p.relative_to(csrc) for pat in SOURCE_PATTERNS for p in csrc.rglob(pat) if p.is_file()})


# --------------------------------------------------------------------------- flags

def parse_archs(spec: Optional[str] = None) -> list[str]:
    """Compute capabilities from ``spec`` (default: env ``RAL_CUDA_ARCHS``, else "80;90"),
    e.g. "80;90", "8.0;9.0", "80 90", "90a", as ``["80", "90"]``: sorted, unique."""
    spec = spec if spec is not None else os.environ.get("RAL_CUDA_ARCHS") or DEFAULT_ARCHS
    archs = set()
    for tok in re.split(r"[;,\s]+", spec.strip()):
        m = _ARCH.fullmatch(tok)
        if m is None:
            raise ValueError(f"RAL_CUDA_ARCHS: cannot read {tok!r} as a compute capability in {spec!r}; "
                             "expected e.g. '80;90', '8.0;9.0', '80 90' or '90a'")
        archs.add(m.group(1) + m.group(2) + m.group(3))
    return sorted(archs, key=lambda a: (int(re.sub(r"\D", "", a)), a))


def gencode_flags(spec: Optional[str] = None) -> list[str]:
    """nvcc ``-gencode`` flags: SASS for every arch in ``spec`` (see :func:`parse_archs`)
    plus PTX of the highest, so newer GPUs can JIT it (plain PTX: an ``a``/``f`` arch's PTX
    only runs on that exact GPU)."""
    archs = parse_archs(spec)
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    top = archs[-1].rstrip("af")
    return flags + [f"-gencode=arch=compute_{top},code=compute_{top}"]


def nvcc_flags(spec: Optional[str] = None) -> list[str]:
    """All nvcc flags for the archs in ``spec``; two nvcc threads when it builds several."""
    return NVCC_FLAGS + gencode_flags(spec) + (["--threads", "2"] if len(parse_archs(spec)) > 1 else [])


def default_max_jobs() -> int:
    """Parallel compile jobs that fit in memory: one per 4 GiB available (templated kernels
    make nvcc use several GiB), at most one per CPU."""
    cpus = os.cpu_count() or 1
    try:
        with open("/proc/meminfo") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return cpus
    return max(1, min(cpus, kib // (4 * 1024 * 1024)))


def _truthy(value: Optional[str]) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


# --------------------------------------------------------------------------- availability

def _missing(paths) -> list[str]:
    return [str(p) for p in paths if not Path(p).is_file()]


def _toolchain_reason(csrc: Path = CSRC) -> Optional[str]:
    """Why nvcc cannot build the extension here (no compile), or None."""
    try:
        import torch
    except ImportError:
        return "torch is not importable: pip's build isolation hides it, use --no-build-isolation"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is not a CUDA build"
    from torch.utils.cpp_extension import CUDA_HOME
    if CUDA_HOME is None or not (Path(CUDA_HOME) / "bin" / "nvcc").is_file():
        return "nvcc was not found (set CUDA_HOME to the CUDA toolkit)"
    missing = _missing([csrc / "bindings.cpp", *(csrc / n for n in KERNEL_NAMES)])
    if missing:
        return f"CUDA sources missing: {', '.join(missing)}"
    return None


def build_skip_reason() -> Optional[str]:
    """Why ``setup.py`` does not build ``ral_kernels._C``, or None to build it."""
    if _truthy(os.environ.get("RAL_SKIP_CUDA_BUILD")):
        return f"RAL_SKIP_CUDA_BUILD={os.environ['RAL_SKIP_CUDA_BUILD']} is set"
    return _toolchain_reason()


@functools.lru_cache(maxsize=None)
def unavailable_reason() -> Optional[str]:
    """None if the CUDA extension is prebuilt or can be built just in time (CUDA torch, nvcc,
    ninja and the sources are here), else why not. Compiles nothing; cached, as backend
    resolution asks on every call."""
    if importlib.util.find_spec("ral_kernels._C") is not None:
        return None
    why = _toolchain_reason()
    if why is not None:
        return f"ral_kernels._C is not built and cannot be built just in time: {why}"
    from torch.utils.cpp_extension import is_ninja_available
    if not is_ninja_available():
        return "ral_kernels._C is not built and cannot be built just in time: ninja is missing (pip install ninja)"
    return None


@functools.lru_cache(maxsize=None)
def emulator_unavailable_reason(csrc: Path = CSRC) -> Optional[str]:
    """None if the CPU emulator can be built (a C++ compiler and the sources), else why not."""
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return f"the CPU emulator needs a C++ compiler: {cxx!r} is not on PATH (apt install g++)"
    missing = _missing([csrc / "bindings.cpp", *(csrc / n for n in KERNEL_NAMES), csrc / "emu" / "cuda_emu.h"])
    if missing:
        return f"the CPU emulator cannot be built: sources missing: {', '.join(missing)}"
    return None


# --------------------------------------------------------------------------- loaders

def _extensions_root() -> Path:
    from torch.utils.cpp_extension import get_default_build_root
    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())


def _unavailable(msg: str) -> Exception:
    from ral_kernels.errors import BackendUnavailableError  # by name: setup.py loads this file by path
    return BackendUnavailableError(msg)


def _tail(exc: BaseException, lines: int = 40) -> str:
    return "\n".join(str(exc).strip().splitlines()[-lines:])


def _jit_archs() -> Optional[str]:
    """Archs for a JIT build: this GPU's capability (one arch compiles fastest), or None
    (RAL_CUDA_ARCHS, else the default) when RAL_CUDA_ARCHS is set or no GPU is visible."""
    import torch
    if os.environ.get("RAL_CUDA_ARCHS") or not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability()
    return f"{major}{minor}"


_FAILED: dict = {}  # name -> the error of a failed build, so a broken toolchain fails fast


def _load(what: str, hint: str = "", renamed: Optional[tuple[str, str]] = None, **kwargs):
    """``torch.utils.cpp_extension.load`` with memory-sized MAX_JOBS; failures become
    BackendUnavailableError with the tail of the compiler output (``renamed`` = (staged
    dir, source dir): name the files a developer edits), raised again (without a rebuild)
    on later calls in this process. A first build (nothing cached yet) says so before and
    after, as it takes minutes."""
    from torch.utils.cpp_extension import load
    name = kwargs["name"]
    if name in _FAILED:
        raise _FAILED[name]
    cache = _extensions_root() / name
    first = not (cache / f"{name}.so").is_file()
    if first:
        _log.warning("ral_kernels: building the %s just in time: a few minutes, once; cached under %s "
                     "(TORCH_EXTENSIONS_DIR moves it).%s", what, cache, hint)
    set_jobs = "MAX_JOBS" not in os.environ
    if set_jobs:
        os.environ["MAX_JOBS"] = str(default_max_jobs())
    t0 = time.perf_counter()
    try:
        module = load(verbose=False, **kwargs)
        if first:
            _log.warning("ral_kernels: built the %s in %.0f s", what, time.perf_counter() - t0)
        return module
    except Exception as exc:  # noqa: BLE001 - compiler, linker and import errors alike
        tail = _tail(exc) if renamed is None else _tail(exc).replace(*renamed)
        err = _unavailable(f"building the {what} failed ({type(exc).__name__}); compiler output, last lines:\n"
                           f"{tail}")
        _FAILED[name] = err
        raise err from exc
    finally:
        if set_jobs:
            os.environ.pop("MAX_JOBS", None)


@functools.lru_cache(maxsize=None)
def load_extension(csrc: Path = CSRC):
    """The CUDA extension module: prebuilt ``ral_kernels._C``, else built just in time from
    ``csrc`` (minutes, once; cached in torch's extension dir). Raises BackendUnavailableError."""
    try:
        return importlib.import_module("ral_kernels._C")
    except ImportError as exc:
        if importlib.util.find_spec("ral_kernels._C") is not None:  # e.g. built against another torch
            _log.warning("ral_kernels: the prebuilt ral_kernels._C does not import (%s); building it just in time", exc)
    why = _toolchain_reason(csrc)
    if why is not None:
        raise _unavailable(f"the CUDA extension ral_kernels._C is not built and cannot be built just in time: {why}")
    try:
        flags = nvcc_flags(_jit_archs())
    except ValueError as exc:
        raise _unavailable(str(exc)) from exc
    return _load("CUDA extension", hint=" To prebuild it, install from source with a CUDA torch and nvcc: "
                 "pip install --no-build-isolation <checkout or sdist> (README, Install).", name=JIT_NAME,
                 sources=[str(csrc / "bindings.cpp"), *(str(csrc / n) for n in KERNEL_NAMES)],
                 extra_cflags=CXX_FLAGS, extra_cuda_cflags=flags, extra_include_paths=[str(csrc)])


def _write_if_changed(path: Path, data: bytes) -> None:
    """Rewrite only on change, so ninja's timestamps stay valid; atomic for parallel tests."""
    if path.is_file() and path.read_bytes() == data:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _stage(csrc: Path, stage: Path) -> None:
    """Make ``stage`` hold a copy of the code in ``csrc`` (changed files only; files ``csrc``
    no longer has are removed, so no stale header is ever compiled)."""
    wanted = {rel for rel in source_files(csrc) if rel.suffix != ".md"}
    for rel in wanted:
        _write_if_changed(stage / rel, (csrc / rel).read_bytes())
    for path in stage.rglob("*"):
        if path.is_file() and path.relative_to(stage) not in wanted:
            path.unlink()


@contextlib.contextmanager
def _exclusive(lock_file: Path):
    """Hold an exclusive lock on ``lock_file`` between processes (the OS drops it if the
    holder dies). Without fcntl (Windows) there is no lock."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@functools.lru_cache(maxsize=None)
def load_emulator(csrc: Path = CSRC):
    """The extension compiled for the CPU (``-DRAL_CPU_EMULATION``, g++ only), for tests.

    It compiles a copy of ``csrc`` staged in the extension dir, so that the command lines,
    and with them the cached objects, do not depend on where the sources are installed: a
    checkout and an installed wheel with the same sources share one build. g++ would not
    compile ``.cu`` files, and torch hands them to nvcc, so each source gets a one-line
    ``.cpp`` wrapper that includes it. Ninja's depfiles follow the include, so an edit of any
    ``.cu`` or header rebuilds what it touches. A lock keeps processes with different
    sources from building over each other."""
    why = emulator_unavailable_reason.__wrapped__(csrc)  # uncached: say what is wrong now
    if why is not None:
        raise _unavailable(why)
    root = _extensions_root() / f"{EMU_NAME}_src"
    staged = root / "csrc"
    with _exclusive(root / "lock"):
        _stage(csrc, staged)
        wrappers = []
        for name in ("bindings.cpp", *KERNEL_NAMES):
            wrapper = root / f"{Path(name).stem}.cpp"
            _write_if_changed(wrapper, f'#include "csrc/{name}"\n'.encode())
            wrappers.append(str(wrapper))
        return _load("CPU emulator", renamed=(str(staged), str(csrc)), name=EMU_NAME, sources=wrappers,
                     extra_cflags=EMU_FLAGS, extra_include_paths=[str(staged), str(staged / "emu")],
                     with_cuda=False)
