"""benchmarks/gpu_cuda_checks.py: the GPU steps' CPU stand-ins and the reading of their results.

- The layout step's stand-in (tests/cuda_emu/layout_check.cu against the CPU emulator) passes,
  and a swapped ldmatrix half -- which no end-to-end test sees: both operands of S = Q Kᵀ get
  the same k permutation, so results change only by fp32 rounding -- fails it (one of issue
  17's mutation tests).
- The sanitizer step's workload runs every CUDA kernel in the emulator.
- compute-sanitizer's reports are read into pass / fail / error, and a step that cannot run
  becomes a record, not an exception.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import pytest
import torch

from conftest import mutant_csrc
from ral_kernels.backends import unavailable_reason

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("gpu_cuda_checks", REPO / "benchmarks" / "gpu_cuda_checks.py")
checks = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(checks)

needs_gxx = pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not found: the stand-in compiles C++")


@needs_gxx
def test_layout_stand_in_passes():
    record = checks.layout_step(dry_run=True)
    assert record["status"] == "pass", record
    assert record["mismatches"] == 0 and len(record["checks"]) == 4, record


@needs_gxx
def test_swapped_ldmatrix_halves_fail_the_layout_check(tmp_path):
    csrc = mutant_csrc(tmp_path, "emu/cuda_emu.h",
                       "lo = TRANS ? at(2 * c, g) : at(g, 2 * c), hi = TRANS ? at(2 * c + 1, g) : at(g, 2 * c + 1);",
                       "lo = TRANS ? at(2 * c, g) : at(g, 2 * c + 1), hi = TRANS ? at(2 * c + 1, g) : at(g, 2 * c);")
    record = checks.layout_step(dry_run=True, csrc=csrc)
    assert record["status"] == "fail" and record["mismatches"] == 128, record
    assert "ldmatrix_x4: 128 mismatches in 32 lanes x 4 matrices" in record["checks"], record
    assert "ldmatrix_x4.trans: 0 mismatches in 32 lanes x 4 matrices" in record["checks"], record


@needs_gxx
def test_layout_step_failure_is_a_record(tmp_path):
    csrc = mutant_csrc(tmp_path, "kernel_utils.cuh", "namespace ral {", "namespace ral { syntax error")
    record = checks.layout_step(dry_run=True, csrc=csrc)
    assert record["status"] == "error" and "error" in record["output"], record


def test_sanitizer_step_without_a_gpu_is_skipped(monkeypatch):
    monkeypatch.setattr(checks, "_device", lambda dry_run: "no CUDA device")
    assert checks.sanitizer_step()["status"] == "skipped"
    assert checks.layout_step()["status"] == "skipped"


CLEAN = """========= COMPUTE-SANITIZER
workload: cuda mean-jsd-d64-fp16-masks: ok (0.4 s)
========= ERROR SUMMARY: 0 errors
"""
RACE = """========= COMPUTE-SANITIZER
========= Error: Race reported between Write access at void ral::(anonymous namespace)::attn_fwd_kernel<__half, (int)64, (bool)1>(ral::FwdParams)+0x1a30 in attn_fwd.cu:71
=========     and Read access at void ral::(anonymous namespace)::attn_fwd_kernel<__half, (int)64, (bool)1>(ral::FwdParams)+0x2b10 in kernel_utils.cuh:140 [512 hazards]
workload: cuda mean-jsd-d64-fp16-masks: ok (3.1 s)
========= RACECHECK SUMMARY: 1 hazard displayed (1 error, 0 warnings)
"""
INVALID = """========= Invalid __global__ read of size 16 bytes
=========     at void ral::(anonymous namespace)::attn_bwd_dq_kernel<__nv_bfloat16, (int)128>(ral::BwdParams)+0x8f0 in kernel_utils.cuh:208
workload: cuda none-kl-d128-bf16-lse_old: ok (1.0 s)
========= ERROR SUMMARY: 3 errors
"""


@pytest.mark.parametrize("tool, run, status, errors", [
    ("memcheck", dict(rc=0, output=CLEAN, seconds=9.0), "pass", 0),
    ("racecheck", dict(rc=0, output=RACE, seconds=20.0), "fail", 1),
    ("memcheck", dict(rc=0, output=INVALID, seconds=9.0), "fail", 3),
    ("initcheck", dict(rc=None, output="workload: cuda x: ok\ntimed out after 100 s", seconds=100.0), "error", None),
    ("synccheck", dict(rc=3, output=CLEAN.replace("ok", "FAILED"), seconds=9.0), "error", 0),
], ids=["clean", "race", "invalid-read", "timeout", "workload-failed"])
def test_sanitizer_reports_are_read(tool, run, status, errors):
    got = checks.parse_sanitizer(tool, run)
    assert (got["status"], got["errors"]) == (status, errors), got
    if status == "fail":
        assert got["findings"] and any("attn" in k for k in got["kernels"]), got


FAKE_SANITIZER = """#!/bin/sh
tool=$2
shift 4  # --tool TOOL --print-limit N
"$@"
if [ "$tool" = racecheck ]; then
  echo "========= Error: Race reported between Write access at void k(int)+0x10 in a.cu:1"
  echo "========= RACECHECK SUMMARY: 1 hazard displayed (1 error, 0 warnings)"
else
  echo "========= ERROR SUMMARY: 0 errors"
fi
"""


def test_sanitizer_step_runs_every_tool_after_a_warm_up(monkeypatch, tmp_path):
    """The GPU path with a stand-in compute-sanitizer: a warm-up run, then each tool, read."""
    fake = tmp_path / "compute-sanitizer"
    fake.write_text(FAKE_SANITIZER)
    fake.chmod(0o755)
    monkeypatch.setattr(checks, "_device", lambda dry_run: "fake GPU")
    monkeypatch.setattr(checks, "find_compute_sanitizer", lambda: str(fake))
    monkeypatch.setattr(checks, "_workload_cmd", lambda dry_run: [sys.executable, "-c", "print('workload: cuda x: ok')"])
    record = checks.sanitizer_step()
    assert record["status"] == "fail", record
    assert {t: r["status"] for t, r in record["tools"].items()} == {
        "memcheck": "pass", "racecheck": "fail", "synccheck": "pass", "initcheck": "pass"}
    assert record["tools"]["racecheck"]["kernels"] == ["k(int)"]
    assert "racecheck: fail, 1 errors (first: Error: Race reported" in checks.markdown([record])


@pytest.mark.skipif(unavailable_reason("cuda", torch.device("cpu")) is not None, reason="the CUDA emulator cannot run here")
def test_workload_runs_every_cuda_kernel_in_the_emulator(capsys):
    assert checks.run_workload(backends=("cuda",), dry_run=True) == 0
    lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("workload: cuda")]
    assert len(lines) == len(checks.WORKLOAD) and all(": ok" in l for l in lines), lines
