"""Benchmark of ``fused_attn_kl``: every provider (eager, eager_compiled, the ral_kernels
backends, SDPA, flash-attn) side by side in forward / backward / full mode.

The op's script on the shared harness (``ral_kernels.bench``): it takes the arguments of
the ``ral-bench`` command, and without any it runs the CPU quick preset (one thread) into
``benchmarks/results/cpu-quick`` (or, with CUDA, the GPU sweep into
``benchmarks/results/gpu-sweep``), PNGs included.

    python benchmarks/bench_fused_attn_kl.py   # = ral-bench --quick --threads 1 --out benchmarks/results/cpu-quick --plot
    python benchmarks/bench_fused_attn_kl.py --preset shape-A --out benchmarks/results/h100
    python benchmarks/bench_fused_attn_kl.py table benchmarks/results/cpu-quick/fused_attn_kl.csv
"""

from __future__ import annotations

import os
import sys

from ral_kernels.bench.cli import main

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

if __name__ == "__main__":
    argv = sys.argv[1:]
    if not argv:
        import torch

        preset = "gpu-sweep" if torch.cuda.is_available() else "cpu-quick"
        argv = ["--preset", preset, "--out", os.path.join(RESULTS, preset), "--plot"]
        if preset == "cpu-quick":
            argv += ["--threads", "1"]  # how results/cpu-quick was measured (see README.md)
    sys.exit(main(argv))
