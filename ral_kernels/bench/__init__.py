"""Benchmark harness for ``fused_attn_kl``: the ``ral-bench`` command.

One shared harness (Liger's ``benchmark/`` layout): providers (``providers.py``) run one
problem (``config.py``) in the modes forward / backward / full; ``harness.py`` times them
(``triton.testing.do_bench`` on CUDA, a wall-clock loop on the CPU), reads their peak
memory, counts FLOPs and appends rows to a CSV; ``report.py`` turns the CSV into a
markdown table and PNGs; ``cli.py`` is the command line.

Importing this package (or ``ral_kernels``) never imports matplotlib or tqdm; only the
``plot`` command and the progress bar do, when they run.
"""
