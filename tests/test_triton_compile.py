"""Every Triton kernel configuration the dispatcher can pick compiles for real GPU targets
(sm_80 and sm_90) without a GPU, within each target's shared memory per block."""

import concurrent.futures
import multiprocessing

import pytest

pytest.importorskip("triton", reason="the Triton backend is optional: triton is not installed")


def test_every_kernel_compiles_for_sm80_and_sm90():
    from ral_kernels.tools.compile_check import compile_for_target

    # Fresh processes (one per target, in parallel): the kernels must be compiled by
    # triton's compiler, not wrapped by the interpreter this test session runs under.
    with concurrent.futures.ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        results = dict(zip((80, 90), pool.map(compile_for_target, (80, 90))))
    for cc, records in results.items():
        assert len(records) >= 80, f"sm_{cc}: only {len(records)} configurations"
    problems = [f"sm_{cc}: {r['label']}: {r['problem']}" for cc, recs in results.items() for r in recs if r["problem"]]
    assert not problems, "\n".join(problems)
