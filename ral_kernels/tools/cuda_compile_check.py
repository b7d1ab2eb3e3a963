"""Compile every ``csrc/*.cu`` with plain nvcc for real GPU targets, without a GPU, and
fail on compile errors and register spills.

``python -m ral_kernels.tools.cuda_compile_check 80 90`` prints registers, static shared memory
and spills per kernel and arch (from ptxas ``-v``) and exits non-zero when a file does not
compile or a function spills: spills to local memory are a silent slowdown that only shows
up in ptxas' report.
"""

from __future__ import annotations

import concurrent.futures
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

from ..backends.cuda.build import CSRC, NVCC_FLAGS, default_max_jobs, parse_archs

_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\w+)'")
_PROPS = re.compile(r"Function properties for (\S+)")
_SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")


def find_nvcc() -> Optional[str]:
    """nvcc on PATH, else under CUDA_HOME / CUDA_PATH / /usr/local/cuda; None if absent."""
    found = shutil.which("nvcc")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    return None


def kernel_files(csrc: Path = CSRC) -> list[Path]:
    """The ``.cu`` files directly in ``csrc`` (not ``emu/``), sorted."""
    return sorted(csrc.glob("*.cu"))


def parse_ptxas(text: str) -> list[dict]:
    """One record per function in ptxas ``-v`` output: name (mangled), registers, static
    shared bytes, stack frame and spill bytes (also for non-inlined device functions)."""
    funcs: dict[str, dict] = {}
    entry = props = None
    for line in text.splitlines():
        if m := _ENTRY.search(line):
            entry = props = m.group(1)
        elif m := _PROPS.search(line):
            props = m.group(1)
        elif (m := _SPILLS.search(line)) and props:
            rec = funcs.setdefault(props, {"name": props, "registers": None, "smem": 0})
            rec.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        elif (m := _USED.search(line)) and entry:
            rec = funcs.setdefault(entry, {"name": entry, "stack": 0, "spill_stores": 0, "spill_loads": 0})
            rec.update(registers=int(m.group(1)), smem=int(m.group(2) or 0))
    return list(funcs.values())


def demangle(names: list[str]) -> dict[str, str]:
    """Mangled -> readable names via c++filt (identity if it is missing)."""
    if not names or shutil.which("c++filt") is None:
        return {n: n for n in names}
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


def compile_one(src: Path, arch: str, nvcc: str, csrc: Path = CSRC) -> dict:
    """Compile ``src`` for ``sm_<arch>``: {file, arch, error (compiler text or None), functions}."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [nvcc, "-c", *NVCC_FLAGS, f"-arch=sm_{arch}", "-Xptxas", "-v", "-I", str(csrc), str(src),
               "-o", str(Path(tmp) / "out.o")]
        proc = subprocess.run(cmd, capture_output=True, text=True)
    text = proc.stdout + proc.stderr
    error = None
    if proc.returncode != 0:
        lines = [ln for ln in text.splitlines() if not ln.startswith("ptxas info")]
        error = "\n".join(lines[-60:]) or f"nvcc exited with {proc.returncode}"
    funcs = parse_ptxas(text)
    names = demangle([f["name"] for f in funcs])
    for f in funcs:
        f["name"] = names[f["name"]]
    return {"file": src.name, "arch": arch, "error": error, "functions": funcs}


def compile_all(jobs: list[tuple[Path, str]], nvcc: str, csrc: Path = CSRC,
                workers: Optional[int] = None) -> list[dict]:
    """:func:`compile_one` for each (file, arch), in parallel (as many as fit in memory)."""
    workers = workers or min(len(jobs), default_max_jobs()) or 1
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda job: compile_one(job[0], job[1], nvcc, csrc), jobs))


def problems(result: dict) -> list[str]:
    """What is wrong with one compile: its error, or each function that spills."""
    where = f"{result['file']} sm_{result['arch']}"
    if result["error"] is not None:
        return [f"{where}: does not compile:\n{result['error']}"]
    return [f"{where}: {f['name']} spills: {f['spill_stores']} B stores, {f['spill_loads']} B loads "
            f"({f['registers'] or '?'} registers, {f['stack']} B stack frame)"
            for f in result["functions"] if f["spill_stores"] or f["spill_loads"]]


def table(results: list[dict], width: int = 110) -> str:
    """regs / static smem / stack / spills per function and arch, one line each."""
    lines = [f"{'arch':<7}{'regs':>5}{'smem B':>8}{'stack B':>8}{'spill st/ld B':>15}  file: function (smem: static only)"]
    for r in results:
        if r["error"] is not None:
            lines.append(f"sm_{r['arch']:<4}{'does not compile':>36}  {r['file']}")
        for f in sorted(r["functions"], key=lambda f: f["name"]):
            name = f"{r['file']}: {f['name']}".replace("(anonymous namespace)::", "")
            name = name if len(name) <= width else name[: width - 3] + "..."
            spills = f"{f['spill_stores']}/{f['spill_loads']}"
            lines.append(f"sm_{r['arch']:<4}{f['registers'] or '-':>5}{f['smem']:>8}{f['stack']:>8}{spills:>15}  {name}")
    return "\n".join(lines)


def main(argv=None, csrc: Path = CSRC) -> int:
    archs = parse_archs(" ".join(argv if argv is not None else sys.argv[1:]) or "80 90")
    nvcc = find_nvcc()
    if nvcc is None:
        print("nvcc not found (PATH, CUDA_HOME, /usr/local/cuda)")
        return 1
    files = kernel_files(csrc)
    if not files:
        print(f"no .cu files in {csrc}")
        return 1
    results = compile_all([(f, a) for f in files for a in archs], nvcc, csrc)
    print(table(results))
    bad = [p for r in results for p in problems(r)]
    for p in bad:
        print(p)
    print(f"{len(bad)} problem(s)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
