"""benchmarks/gpu_check.py's row check, on the CPU: a stage that times a provider without
SDPA (the CUDA stage runs apart from the others) still checks its output against SDPA."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("gpu_check", gpu_check)
_spec.loader.exec_module(gpu_check)


def test_row_check_without_an_sdpa_row_in_the_stage():
    shape = (1, 4, 2, 40, 16, 12, "jsd", "mean")
    tensors = gpu_check._inputs(*shape[:6], torch.device("cpu"), torch.float32)[:5]
    verdict = gpu_check.check_row("eager", shape, tensors, None, {})
    assert verdict.startswith("ok (out vs SDPA"), verdict
    assert "nan" not in verdict
