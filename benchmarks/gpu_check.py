"""The one command a session runs on a lent GPU machine (no network there).

    bash benchmarks/gpu_check.sh            # on the GPU: install, CUDA tests, benchmark
    python benchmarks/gpu_check.py --dry-run  # here: the same code path, tiny shapes, CPU
    python -m ral_kernels.tools.compile_check 80 90  # here: every kernel compiled for sm_80 / sm_90

Steps: record the environment (and how long ``gpu_check.sh`` took to build the CUDA
extension); run the test suite on CUDA (every backend against the reference, bfloat16
included, the CUDA C++ kernels too); time SDPA attention alone, the fused Triton op, the
fused CUDA C++ op and eager materialized attention + divergence, forward and forward+backward, on shapes A and B of the
Triton issue (and a T=32768 run where eager cannot fit); write ``gpu_check.json`` and
``gpu_check.md`` to ``--out`` (default ``$OUT``) and print the table.

Every ratio is against a baseline measured in the same run. An out-of-memory is recorded as
``OOM``, not a crash. Budget: at most 6 minutes on an H100.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name: (B, Hq, Hk, T, D, divergence rows, divergence, head_reduction)
SHAPES = {
    "A": (4, 28, 4, 8192, 128, 1024, "jsd", "mean"),
    "B-kl-none": (1, 32, 8, 8192, 128, 8192, "kl", "none"),
    "B-jsd-mean": (1, 32, 8, 8192, 128, 8192, "jsd", "mean"),
    "32k-jsd-mean": (1, 32, 8, 32768, 128, 4096, "jsd", "mean"),
}
DRY_SHAPES = {name: (b, 4, 2, 96, 32, max(16, rows * 96 // t), dv, hr)
              for name, (b, _, _, t, _, rows, dv, hr) in SHAPES.items()}


def attn_flops(shape, mode):
    """Attention-only FLOPs of one call, in ral-bench's convention (causal visible pairs;
    2 matmuls forward, 5 backward)."""
    from ral_kernels.bench.config import Shape
    from ral_kernels.bench.harness import flops

    b, hq, hk, t, d, rows, divergence, head_reduction = shape
    bench_shape = Shape(batch=b, heads=hq, kv_heads=hk, seq_len=t, head_dim=d, div_rows=rows)
    return flops(bench_shape, {"fwd": "forward", "fwd+bwd": "full"}[mode], with_divergence=False)


def make(shape, device, dtype):
    b, hq, hk, t, d, rows, _, _ = shape
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*s):
        return torch.randn(*s, generator=g, dtype=torch.float32).to(device=device, dtype=dtype)

    q, k, v = rnd(b, hq, t, d), rnd(b, hk, t, d), rnd(b, hk, t, d)
    q_old = (q[:, :, t - rows:].float() + 0.1 * rnd(b, hq, rows, d).float()).to(dtype)
    k_old = (k.float() + 0.1 * rnd(b, hk, t, d).float()).to(dtype)
    return q, k, v, q_old, k_old


def provider_fn(name, shape, tensors, mode):
    """A closure running ``mode`` for ``name`` ("sdpa", "triton", "cuda", "eager")."""
    import ral_kernels

    b, hq, hk, t, d, rows, div_name, hr = shape
    q, k, v, q_old, k_old = tensors
    q, k, v = (x.detach().requires_grad_(mode != "fwd") for x in (q, k, v))

    def forward():
        if name == "sdpa":
            return (F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),)
        backend = name if name in ("triton", "cuda") else "reference"
        return ral_kernels.fused_attn_kl(q, k, v, q_old, k_old, divergence=div_name, head_reduction=hr,
                                         causal=True, backend=backend)

    if mode == "fwd":
        def run():
            with torch.no_grad():
                forward()
        return run

    def run():
        outs = forward()
        loss = outs[0].float().sum() + (outs[1].sum() if len(outs) > 1 else 0.0)
        loss.backward()
        q.grad = k.grad = v.grad = None
    return run


def bench(fn, device):
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=10, rep=40, quantiles=[0.5, 0.2, 0.8])
    fn()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[1], times[0], times[2]


def run_benchmarks(shapes, device, dtype, providers):
    rows = []
    for shape_name, shape in shapes.items():
        tensors = make(shape, device, dtype)
        for mode in ("fwd", "fwd+bwd"):
            for prov in providers:
                if shape_name.startswith("32k") and prov == "sdpa":
                    continue
                row = dict(shape=shape_name, mode=mode, provider=prov)
                try:
                    fn = provider_fn(prov, shape, tensors, mode)
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                        torch.cuda.reset_peak_memory_stats()
                    med, p20, p80 = bench(fn, device)
                    row.update(median_ms=med, p20_ms=p20, p80_ms=p80)
                    row["tflops"] = attn_flops(shape, mode) / (med * 1e-3) / 1e12
                    if device.type == "cuda":
                        row["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
                except torch.OutOfMemoryError:
                    row["status"] = "OOM"
                except RuntimeError as exc:  # e.g. cuBLAS allocation failures
                    row["status"] = "OOM" if "out of memory" in str(exc).lower() else f"error: {str(exc)[:200]}"
                rows.append(row)
                print(json.dumps(row), flush=True)
        del tensors
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def table(rows):
    base = {(r["shape"], r["mode"]): r for r in rows if r["provider"] == "sdpa" and "median_ms" in r}
    eager = {(r["shape"], r["mode"]): r for r in rows if r["provider"] == "eager" and "median_ms" in r}
    lines = ["| shape | mode | provider | median ms [p20, p80] | TFLOP/s (attention) | peak GB | vs SDPA | eager / this |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "median_ms" not in r:
            lines.append(f"| {r['shape']} | {r['mode']} | {r['provider']} | {r.get('status')} | | | | |")
            continue
        key = (r["shape"], r["mode"])
        vs = f"{r['median_ms'] / base[key]['median_ms']:.2f}x" if key in base else "-"
        ve = f"{eager[key]['median_ms'] / r['median_ms']:.1f}x" if key in eager else "-"
        mem = f"{r['peak_memory_gb']:.1f}" if "peak_memory_gb" in r else "-"
        lines.append(f"| {r['shape']} | {r['mode']} | {r['provider']} | {r['median_ms']:.2f} "
                     f"[{r['p20_ms']:.2f}, {r['p80_ms']:.2f}] | {r['tflops']:.1f} | {mem} | {vs} | {ve} |")
    return "\n".join(lines)


def cuda_extension_status() -> str:
    """How ``backend="cuda"`` gets its kernels here: prebuilt (and the build time that
    gpu_check.sh recorded), built just in time, or why it cannot run."""
    import importlib.util

    from ral_kernels.backends.cuda import build as _cuda_build

    if importlib.util.find_spec("ral_kernels._C") is not None:
        return f"prebuilt ral_kernels._C ({os.environ.get('RAL_BUILD_SECONDS', '?')} s to build with pip)"
    return _cuda_build.unavailable_reason() or "ral_kernels._C not prebuilt: built just in time on first use"


def environment():
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=REPO).stdout.strip() or "unknown"
    env = dict(time=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), commit=commit,
               python=platform.python_version(), torch=torch.__version__,
               cuda=torch.version.cuda, device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")
    env["cuda_extension"] = cuda_extension_status()
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    return env


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="CPU: tiny shapes, Triton interpreter, CUDA emulator")
    p.add_argument("--out", default=os.environ.get("OUT", os.path.join(REPO, "gpu_check_out")))
    p.add_argument("--skip-tests", action="store_true")
    p.add_argument("--test-timeout", type=int, default=150)
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"
        os.environ["RAL_CUDA_EMULATION"] = "1"
        device, dtype, shapes = torch.device("cpu"), torch.float16, DRY_SHAPES
    else:
        if not torch.cuda.is_available():
            p.error("no CUDA device: use --dry-run on a CPU machine")
        device, dtype, shapes = torch.device("cuda"), torch.bfloat16, SHAPES
    env = environment()
    print(json.dumps(env), flush=True)

    result = dict(env=env, dry_run=args.dry_run, tests=None, rows=[])
    if not args.skip_tests:
        tests = ["tests/test_fused_attn_kl.py", "tests/test_cuda_backend.py", "tests/test_varlen.py",
                 "tests/test_api.py"]
        if args.dry_run:
            tests = ["tests/test_fused_attn_kl.py::test_zero_at_old_policy"]
        t0 = time.time()
        try:
            proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", *tests], cwd=REPO,
                                  capture_output=True, text=True, timeout=args.test_timeout)
            summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-500:]
            result["tests"] = dict(rc=proc.returncode, summary=summary, seconds=round(time.time() - t0, 1))
            if proc.returncode:
                print(proc.stdout[-6000:], flush=True)
        except subprocess.TimeoutExpired:
            result["tests"] = dict(rc=None, summary=f"timed out after {args.test_timeout}s")
        print("tests:", result["tests"], flush=True)

    result["rows"] = run_benchmarks(shapes, device, dtype, ["sdpa", "triton", "cuda", "eager"])
    from gpu_cuda_checks import markdown as cuda_checks_markdown, run_steps  # layout kernel, compute-sanitizer
    result["cuda_checks"] = run_steps(args.dry_run)
    md = (f"GPU check: {env['device']}, torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, "
          f"commit {env['commit']}, {env['time']}{' (DRY RUN: CPU, tiny shapes)' if args.dry_run else ''}\n\n"
          f"CUDA extension: {env['cuda_extension']}\n\nTests: {result['tests']}\n\n" + table(result["rows"]) + "\n\n"
          + cuda_checks_markdown(result["cuda_checks"]))
    with open(os.path.join(args.out, "gpu_check.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(args.out, "gpu_check.md"), "w") as f:
        f.write(md)
    print("\n" + md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
