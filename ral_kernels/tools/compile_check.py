"""Compile every Triton kernel configuration for real GPU targets, without a GPU.

``python -m ral_kernels.tools.compile_check 80 90`` prints one line per configuration and exits
non-zero when one does not compile or needs more shared memory than the target offers.
Run it in a process where ``TRITON_INTERPRET`` is unset: this module clears it before it
imports the kernels, which must not have been imported yet.
"""

from __future__ import annotations

import os
import sys

# Opt-in maximum shared memory per block, bytes.
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}


def compile_for_target(cc: int) -> list[dict]:
    """One record per kernel configuration: label, shared bytes, and a problem or None."""
    os.environ.pop("TRITON_INTERPRET", None)
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from ..backends.triton.launch import kernel_specs

    records = []
    for label, fn, sig, const, options in kernel_specs():
        if type(fn).__name__ != "JITFunction":
            raise RuntimeError("the kernels were imported under TRITON_INTERPRET=1; run the compile check "
                               "in a fresh process")
        rec = {"label": label, "shared": None, "problem": None}
        try:
            compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const),
                                      target=GPUTarget("cuda", cc, 32), options=options)
        except Exception as exc:  # noqa: BLE001 - every compile error is reported
            rec["problem"] = f"does not compile: {str(exc).strip().splitlines()[-1][:300]}"
        else:
            rec["shared"] = compiled.metadata.shared
            if "cubin" not in compiled.asm:
                rec["problem"] = "no cubin produced"
            elif compiled.metadata.shared > SHARED_LIMIT[cc]:
                rec["problem"] = f"needs {compiled.metadata.shared} B of shared memory > {SHARED_LIMIT[cc]} B"
        records.append(rec)
    return records


def main(argv=None) -> int:
    targets = [int(a) for a in (argv if argv is not None else sys.argv[1:])] or [80, 90]
    bad = 0
    for cc in targets:
        for rec in compile_for_target(cc):
            status = rec["problem"] or f"ok, {rec['shared']} B shared"
            bad += rec["problem"] is not None
            print(f"sm_{cc} {rec['label']}: {status}", flush=True)
    print(f"{bad} problem(s)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
