"""Speed and peak memory of ``fused_attn_kl`` backends against the dense reference.

Each (backend, sequence length) runs in fresh processes: one that times forward+backward
(median and 20/80 percentiles after a warm-up) and one that reads the peak extra memory
(see ``ral_kernels._measure``). Rows are appended to a CSV with device, versions, commit
and time; a markdown table is printed.

    python benchmarks/bench_fused_attn_kl.py                       # the core issue's CPU check
    python benchmarks/bench_fused_attn_kl.py --seq-lens 1024 2048 --backends torch reference
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import subprocess
import sys

import torch

import ral_kernels
from ral_kernels._measure import in_fresh_process, peak_memory_mb, pin_cpu_allocator, time_ms

# Dense paths hold ~10 [B, H, T, T] float32 tensors at once in forward+backward.
DENSE_BYTES_PER_SCORE = 10 * 4


def make_problem(cfg: dict):
    g = torch.Generator().manual_seed(0)
    b, hq, hk, t, d = cfg["batch"], cfg["heads"], cfg["kv_heads"], cfg["seq_len"], cfg["head_dim"]
    rows = cfg["div_rows"] or t
    dev = cfg["device"]
    rnd = lambda *s: torch.randn(*s, generator=g).to(dev)  # noqa: E731
    q, k, v = rnd(b, hq, t, d), rnd(b, hk, t, d), rnd(b, hk, t, d)
    return q, k, v, (q + 0.3 * rnd(b, hq, t, d))[:, :, t - rows:].contiguous(), k + 0.3 * rnd(b, hk, t, d)


def step(backend: str, cfg: dict, q, k, v, q_old, k_old):
    q, k, v = (x.clone().requires_grad_() for x in (q, k, v))
    out, div = ral_kernels.fused_attn_kl(q, k, v, q_old, k_old, divergence=cfg["divergence"],
                                         head_reduction=cfg["head_reduction"], causal=True, backend=backend)
    (out.sum() + div.sum()).backward()


def _time_child(backend: str, cfg: dict, repeats: int):
    x = make_problem(cfg)
    return time_ms(lambda: step(backend, cfg, *x), cfg["device"], warmup=1, repeats=repeats)


def _memory_child(backend: str, cfg: dict):
    pin_cpu_allocator()
    step(backend, dict(cfg, seq_len=64, div_rows=None), *make_problem(dict(cfg, seq_len=64, div_rows=None)))
    x = make_problem(cfg)
    return peak_memory_mb(lambda: step(backend, cfg, *x), cfg["device"])


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.machine()
    return f"{model} ({os.cpu_count()} cores)"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq-lens", type=int, nargs="+", default=[4096, 16384])
    p.add_argument("--backends", nargs="+", default=["torch", "reference"])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--div-rows", type=int, default=None, help="rows carrying a divergence (default: all)")
    p.add_argument("--divergence", default="jsd")
    p.add_argument("--head-reduction", default="mean")
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-dense-gb", type=float, default=16.0,
                   help="skip the dense reference where it would need more than this")
    p.add_argument("--csv", default=os.path.join(os.path.dirname(__file__), "results", "fused_attn_kl_cpu.csv"))
    args = p.parse_args(argv)
    for name in args.backends:
        if name not in ("torch", "reference", "triton", "cuda"):
            p.error(f"unknown backend {name!r}; valid: torch, reference, triton, cuda")

    device_name = _cpu_name()
    if args.device == "cuda":
        device_name = torch.cuda.get_device_name()
    meta = dict(device=device_name, torch=torch.__version__, python=platform.python_version(), commit=_commit(),
                time=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    rows = []
    for t in args.seq_lens:
        cfg = dict(batch=args.batch, heads=args.heads, kv_heads=args.kv_heads, seq_len=t, head_dim=args.head_dim,
                   div_rows=args.div_rows, divergence=args.divergence, head_reduction=args.head_reduction,
                   device=args.device)
        for backend in args.backends:
            row = dict(provider=backend, mode="fwd+bwd", seq_len=t, batch=args.batch, heads=args.heads,
                       kv_heads=args.kv_heads, head_dim=args.head_dim, div_rows=args.div_rows or t,
                       divergence=args.divergence, head_reduction=args.head_reduction, **meta)
            dense_gb = DENSE_BYTES_PER_SCORE * args.batch * args.heads * t * t / 2**30
            if backend == "reference" and dense_gb > args.max_dense_gb:
                row.update(median_ms="", p20_ms="", p80_ms="", peak_memory_mb="",
                           note=f"skipped: dense path needs ~{dense_gb:.0f} GB")
            else:
                med, p20, p80 = in_fresh_process(_time_child, backend, cfg, args.repeats)
                mem = in_fresh_process(_memory_child, backend, cfg)
                row.update(median_ms=f"{med:.1f}", p20_ms=f"{p20:.1f}", p80_ms=f"{p80:.1f}",
                           peak_memory_mb="" if mem is None else f"{mem:.1f}", note="")
            rows.append(row)
            print(f"T={t:6d} {backend:10s} {row['median_ms'] or '-':>10} ms  {row['peak_memory_mb'] or '-':>10} MiB "
                  f"{row['note']}", flush=True)

    os.makedirs(os.path.dirname(os.path.abspath(args.csv)), exist_ok=True)
    new = not os.path.exists(args.csv)
    with open(args.csv, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        if new:
            w.writeheader()
        w.writerows(rows)

    print(f"\n{meta['device']}, torch {meta['torch']}, commit {meta['commit']}, {meta['time']}")
    print("| T | provider | fwd+bwd ms (median [p20, p80]) | peak extra MiB | time vs reference | memory vs reference |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        ref = next((r for r in rows if r["seq_len"] == row["seq_len"] and r["provider"] == "reference"
                    and r["median_ms"]), None)
        ratio_t = ratio_m = "-"
        if ref and row["median_ms"]:
            ratio_t = f"{float(row['median_ms']) / float(ref['median_ms']):.2f}x"
            if row["peak_memory_mb"] and ref["peak_memory_mb"]:
                ratio_m = f"{float(row['peak_memory_mb']) / float(ref['peak_memory_mb']):.3f}x"
        timing = f"{row['median_ms']} [{row['p20_ms']}, {row['p80_ms']}]" if row["median_ms"] else row["note"]
        print(f"| {row['seq_len']} | {row['provider']} | {timing} | {row['peak_memory_mb'] or '-'} | {ratio_t} | {ratio_m} |")


if __name__ == "__main__":
    sys.exit(main())
