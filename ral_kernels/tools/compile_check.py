"""Compile every Triton kernel configuration for real GPU targets, without a GPU, as the
runtime JIT specializes it, and fail on register spills or too much shared memory.

``python -m ral_kernels.tools.compile_check 80 90`` prints one line per configuration
(registers, spill bytes, shared memory) and exits non-zero on any problem. The kernels are
compiled with the divisibility hints the JIT attaches for aligned tensors and lengths
(``tt.divisibility=16``): without them the compiler sees a different kernel than a GPU
runs. Registers and spills come from ``ptxas -v`` on the generated PTX (Triton's own
ptxas). Run it in a process where ``TRITON_INTERPRET`` is unset: this module clears it
before it imports the kernels, which must not have been imported yet.
"""

from __future__ import annotations

import concurrent.futures
import os
import subprocess
import sys
import tempfile

# Opt-in maximum shared memory per block, bytes.
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}


def _ptxas_report(ptx: str, cc: int) -> dict:
    """Registers and spill bytes of the (single) kernel in ``ptx`` (``ptxas -v``)."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    from .cuda_compile_check import parse_ptxas

    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        proc = subprocess.run([get_ptxas(cc).path, "-v", f"--gpu-name={sm_arch_from_capability(cc)}", src,
                               "-o", os.path.join(tmp, "k.o")], capture_output=True, text=True)
    funcs = parse_ptxas(proc.stdout + proc.stderr)
    kernels = [f for f in funcs if f.get("registers") is not None] or funcs
    if proc.returncode != 0 or not kernels:
        return {"error": (proc.stderr or proc.stdout)[-500:] or "no ptxas report"}
    f = kernels[0]
    return {"registers": f.get("registers"), "spill": f.get("spill_stores", 0) + f.get("spill_loads", 0)}


def compile_for_target(cc: int, aligned: bool = True) -> list[dict]:
    """One record per kernel configuration: label, registers, spill bytes, shared bytes,
    and a problem or None."""
    os.environ.pop("TRITON_INTERPRET", None)
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from ..backends.triton.launch import kernel_specs

    records = []
    for label, fn, sig, const, attrs, options in kernel_specs(cc, aligned):
        if type(fn).__name__ != "JITFunction":
            raise RuntimeError("the kernels were imported under TRITON_INTERPRET=1; run the compile check "
                               "in a fresh process")
        rec = {"label": label, "shared": None, "registers": None, "spill": None, "problem": None}
        try:
            compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs),
                                      target=GPUTarget("cuda", cc, 32), options=options)
        except Exception as exc:  # noqa: BLE001 - every compile error is reported
            lines = str(exc).strip().splitlines() or [type(exc).__name__]
            rec["problem"] = f"does not compile: {lines[-1][:300]}"
            records.append(rec)
            continue
        rec["shared"] = compiled.metadata.shared
        report = _ptxas_report(compiled.asm["ptx"], cc)
        rec.update({k: v for k, v in report.items() if k != "error"})
        if "cubin" not in compiled.asm:
            rec["problem"] = "no cubin produced"
        elif "error" in report:
            rec["problem"] = f"ptxas -v: {report['error']}"
        elif compiled.metadata.shared > SHARED_LIMIT[cc]:
            rec["problem"] = f"needs {compiled.metadata.shared} B of shared memory > {SHARED_LIMIT[cc]} B"
        elif report["spill"]:
            rec["problem"] = f"spills {report['spill']} B ({report['registers']} registers)"
        records.append(rec)
    return records


def check(targets, processes: int = 2) -> list[tuple[int, dict]]:
    """:func:`compile_for_target` for each target, in fresh processes (the kernels must be
    compiled by triton's compiler, not wrapped by an interpreter a caller may run under)."""
    import multiprocessing

    # The children must start without TRITON_INTERPRET: importing ral_kernels imports torch's
    # dynamo, which imports triton, which reads the variable once, before any code of ours runs.
    saved = os.environ.pop("TRITON_INTERPRET", None)
    try:
        with concurrent.futures.ProcessPoolExecutor(processes,
                                                    mp_context=multiprocessing.get_context("spawn")) as pool:
            results = list(pool.map(compile_for_target, targets))
    finally:
        if saved is not None:
            os.environ["TRITON_INTERPRET"] = saved
    return [(cc, rec) for cc, recs in zip(targets, results) for rec in recs]


def main(argv=None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    targets = [int(a) for a in args] or [80, 90]
    bad = 0
    for cc, rec in check(targets):
        status = rec["problem"] or (f"ok, {rec['registers']} registers, {rec['spill']} B spills, "
                                    f"{rec['shared']} B shared")
        bad += rec["problem"] is not None
        print(f"sm_{cc} {rec['label']}: {status}", flush=True)
    print(f"{bad} problem(s)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
