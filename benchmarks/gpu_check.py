"""The one command a session runs on a lent GPU machine (no network there).

    bash benchmarks/gpu_check.sh              # on the GPU: install, build, check, time (<= 7 min)
    python benchmarks/gpu_check.py --dry-run  # here: the same code path, tiny shapes, CPU
    python -m ral_kernels.tools.compile_check 80 90  # here: every Triton kernel compiled for sm_80 / sm_90

Stages, in priority order, each bounded so that one run fits a 7-minute budget (``--budget``)
and a stage that fails is recorded as evidence, never a crash of the whole check:

1. environment: GPU, driver, torch / CUDA / nvcc / triton versions, commit (from git, or the
   ``ral_kernels/_commit.txt`` that ``setup.py`` writes at install time when ``.git`` is
   absent), and a torch-CUDA / nvcc major-version mismatch, checked before building.
2. the CUDA extension build, started in the background (``python setup.py build_ext
   --inplace`` for this GPU's arch, with a timeout): a failed build is recorded with the
   compiler's last lines, and everything that does not need it still runs.
3. correctness (<= 90 s): bf16 and fp16, head dims 128 and 64, ~1.5k tokens, GQA and key
   padding, every divergence x head reduction, Triton and (once built) CUDA: the output
   against SDPA, the divergence and dq/dk/dv against the torch backend in fp32, with the
   flash-attention idiom (within 3x of the same-dtype torch backend's own error).
4. timing: SDPA (the flash kernel forced, or the kernel that ran recorded), the fused Triton
   and CUDA ops and eager (materialized) attention + divergence, forward and forward +
   backward, on shapes A, B-kl-none, B-jsd-mean and 32k (no eager there; SDPA stays), each
   timed row also checked against SDPA's output and the torch backend's divergence.
5. a per-kernel time breakdown of one forward + backward at shape A (``torch.profiler``).
6. the CUDA kernels' layout check and compute-sanitizer (``gpu_cuda_checks.py``) if time is
   left.

Results: at most 8 files in ``--out`` (default ``$OUT``): ``gpu_check.json``,
``gpu_check.md``, ``build.log``, ``profile.txt``. Every ratio is against a baseline measured
in the same run. An out-of-memory is recorded as ``OOM``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# name: (B, Hq, Hk, T, D, divergence rows, divergence, head_reduction)
SHAPES = {
    "A": (4, 28, 4, 8192, 128, 1024, "jsd", "mean"),
    "B-kl-none": (1, 32, 8, 8192, 128, 8192, "kl", "none"),
    "B-jsd-mean": (1, 32, 8, 8192, 128, 8192, "jsd", "mean"),
    "32k-jsd-mean": (1, 32, 8, 32768, 128, 4096, "jsd", "mean"),
}
DRY_SHAPES = {name: (b, 4, 2, 96, 32, max(16, rows * 96 // t), dv, hr)
              for name, (b, _, _, t, _, rows, dv, hr) in SHAPES.items()}
NO_EAGER = ("32k",)  # eager would need [B, H, T, T]: skipped there (SDPA is not)
BUILD_TIMEOUT = 300


class Budget:
    """Seconds left of the run's budget; stages skip (and say so) when too little is left."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def allows(self, seconds: float) -> bool:
        return self.left() >= seconds


# --------------------------------------------------------------------------- environment

def _run(cmd, timeout=30, **kw) -> subprocess.CompletedProcess | None:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    except (OSError, subprocess.TimeoutExpired):
        return None


def commit_hash() -> str:
    proc = _run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO)
    if proc is not None and proc.returncode == 0 and proc.stdout.strip():
        dirty = _run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO)
        return proc.stdout.strip() + ("-dirty" if dirty is not None and dirty.stdout.strip() else "")
    path = os.path.join(REPO, "ral_kernels", "_commit.txt")
    if os.path.isfile(path):
        with open(path) as f:
            return f.read().strip() + " (from ral_kernels/_commit.txt)"
    return "unknown"


def nvcc_version() -> str | None:
    from ral_kernels.tools.cuda_compile_check import find_nvcc

    nvcc = find_nvcc()
    proc = _run([nvcc, "--version"]) if nvcc else None
    if proc is None or proc.returncode != 0:
        return None
    m = re.search(r"release (\d+\.\d+)", proc.stdout)
    return m.group(1) if m else proc.stdout.strip().splitlines()[-1]


def environment(dry_run: bool) -> dict:
    env = dict(time=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               commit=commit_hash(), python=platform.python_version(), torch=torch.__version__,
               torch_cuda=torch.version.cuda, nvcc=nvcc_version(), dry_run=dry_run,
               device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        env["capability"] = f"{major}{minor}"
        smi = _run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"])
        env["nvidia_smi"] = smi.stdout.strip() if smi is not None else None
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if env["torch_cuda"] and env["nvcc"]:
        same = env["torch_cuda"].split(".")[0] == env["nvcc"].split(".")[0]
        env["cuda_nvcc_mismatch"] = None if same else (f"torch is built for CUDA {env['torch_cuda']} but nvcc is "
                                                      f"{env['nvcc']}: torch's extension builder refuses that")
    return env


# --------------------------------------------------------------------------- CUDA extension build

def start_build(env: dict, out: str, dry_run: bool):
    """The CUDA extension build in the background, or a record of why it does not run."""
    if dry_run:
        return {"status": "skipped", "why": "dry run: the CUDA kernels run in the CPU emulator"}, None
    if env.get("cuda_nvcc_mismatch"):
        return {"status": "skipped", "why": env["cuda_nvcc_mismatch"]}, None
    if env.get("nvcc") is None:
        return {"status": "skipped", "why": "nvcc was not found"}, None
    log = open(os.path.join(out, "build.log"), "w")
    build_env = dict(os.environ, RAL_CUDA_ARCHS=os.environ.get("RAL_CUDA_ARCHS") or env.get("capability", "90"))
    proc = subprocess.Popen([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=REPO, stdout=log,
                            stderr=subprocess.STDOUT, env=build_env)
    return {"status": "running", "started": time.monotonic(), "archs": build_env["RAL_CUDA_ARCHS"]}, (proc, log)


def finish_build(record: dict, handle, out: str, wait: float) -> dict:
    if handle is None or record["status"] != "running":
        return record
    proc, log = handle
    try:
        proc.wait(timeout=max(wait, 1))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        record["status"] = f"timed out after {time.monotonic() - record['started']:.0f} s"
    log.close()
    record["seconds"] = round(time.monotonic() - record.pop("started"), 1)
    if record["status"] == "running":
        record["status"] = "built" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
    if record["status"] != "built":
        with open(os.path.join(out, "build.log")) as f:
            record["log_tail"] = f.read()[-3000:]
    return record


def cuda_ready(dry_run: bool) -> str | None:
    """None if ``backend="cuda"`` runs now, else why not."""
    from ral_kernels.backends import unavailable_reason

    dev = torch.device("cpu" if dry_run else "cuda")
    return unavailable_reason("cuda", dev, torch.float16 if dry_run else torch.bfloat16, 128)


# --------------------------------------------------------------------------- correctness

def _inputs(b, hq, hk, t, d, rows, device, dtype, seed=0, pad=0):
    g = torch.Generator(device="cpu").manual_seed(seed)

    def rnd(*s):
        return torch.randn(*s, generator=g, dtype=torch.float32).to(device=device, dtype=dtype)

    q, k, v = rnd(b, hq, t, d), rnd(b, hk, t, d), rnd(b, hk, t, d)
    q_old = (q[:, :, t - rows:].float() + 0.3 * rnd(b, hq, rows, d).float()).to(dtype)
    k_old = (k.float() + 0.3 * rnd(b, hk, t, d).float()).to(dtype)
    key_mask = None
    if pad:
        key_mask = torch.ones(b, t, dtype=torch.bool, device=device)
        key_mask[-1, :pad] = False  # a left-padded sequence
    return q, k, v, q_old, k_old, key_mask


def _sdpa(q, k, v, key_mask, causal=True):
    """SDPA's output (GQA by repetition, key padding as a boolean mask)."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    if key_mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    t = q.shape[2]
    allowed = torch.ones(t, t, dtype=torch.bool, device=q.device).tril() if causal else True
    mask = key_mask[:, None, None, :] & allowed
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return torch.nan_to_num(out)  # rows with no key: SDPA gives NaN, the op gives 0


def _run_op(backend, x, divergence, head_reduction, grads=True):
    import ral_kernels

    q, k, v, q_old, k_old, key_mask = x
    q, k, v = (t.detach().clone().requires_grad_(grads) for t in (q, k, v))
    out, div = ral_kernels.fused_attn_kl(q, k, v, q_old, k_old, key_mask=key_mask, divergence=divergence,
                                         head_reduction=head_reduction, backend=backend)
    if not grads:
        return out.detach(), div.detach()
    g = torch.Generator(device="cpu").manual_seed(1)
    w_out = torch.randn(out.shape, generator=g).to(out.device)
    w_div = torch.randn(div.shape, generator=g).to(div.device)
    ((out.float() * w_out).sum() + (div * w_div).sum()).backward()
    return out.detach(), div.detach(), q.grad, k.grad, v.grad


def _max_err(a, b) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def correctness(device, dry_run: bool, budget: Budget, backends) -> list[dict]:
    """bf16 / fp16 x head dims 128 / 64 x every divergence and head reduction, GQA, key
    padding: out vs SDPA, div and grads vs the torch backend in fp32."""
    t, rows = (48, 20) if dry_run else (1536, 384)
    dtypes = (torch.float16,) if dry_run else (torch.bfloat16, torch.float16)
    dims = (32,) if dry_run else (128, 64)
    records = []
    for dtype in dtypes:
        for d in dims:
            x = _inputs(2, 8, 2, t, d, rows, device, dtype, seed=d, pad=t // 7)
            x32 = tuple(None if a is None else (a.float() if a.is_floating_point() else a) for a in x)
            sdpa32 = _sdpa(*x32[:3], x32[5])
            sdpa_lp = _sdpa(*x[:3], x[5])
            for divergence in ("jsd", "kl", "reverse_kl"):
                for hr in ("mean", "none"):
                    ref = _run_op("torch", x32, divergence, hr)
                    plain = _run_op("torch", x, divergence, hr)  # the yardstick: same dtype, tiled torch
                    for backend in backends:
                        rec = dict(dtype=str(dtype).replace("torch.", ""), head_dim=d, divergence=divergence,
                                   head_reduction=hr, backend=backend)
                        if not budget.allows(5):
                            rec["status"] = "skipped: out of time"
                            records.append(rec)
                            continue
                        try:
                            got = _run_op(backend, x, divergence, hr)
                        except Exception as exc:  # noqa: BLE001 - recorded as evidence
                            rec["status"] = f"error: {type(exc).__name__}: {str(exc)[:300]}"
                            records.append(rec)
                            continue
                        # The yardsticks: SDPA's own error in this dtype for the output; for the
                        # rest the tiled torch backend's (fp32 math on rounded inputs) or the
                        # dtype's rounding of the quantity, whichever is larger.
                        ulp = 2.0 ** (-8 if dtype == torch.bfloat16 else -11)
                        errs = {"out_vs_sdpa": (_max_err(got[0], sdpa32), max(_max_err(sdpa_lp, sdpa32), 1e-3))}
                        for i, name in enumerate(("out", "div", "dq", "dk", "dv")):
                            if i == 0:
                                continue
                            scale = max(1.0, ref[i].abs().max().item())
                            errs[name] = (_max_err(got[i], ref[i]), max(_max_err(plain[i], ref[i]), 4 * ulp * scale))
                        bad = [k for k, (e, p) in errs.items() if not (e <= 3 * p)]
                        finite = all(torch.isfinite(a).all().item() for a in got)
                        rec["errors"] = {k: [round(e, 6), round(3 * p, 6)] for k, (e, p) in errs.items()}
                        rec["status"] = "pass" if finite and not bad else (
                            "fail: " + ("non-finite values; " if not finite else "") + ", ".join(bad))
                        records.append(rec)
                        print(json.dumps(rec), flush=True)
    return records


# --------------------------------------------------------------------------- timing

def sdpa_choice(device):
    """SDPA with the flash kernel forced where it runs, else the kernel PyTorch picks; and
    which one ran."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if device.type != "cuda":
        return None, "math (CPU)"
    q = torch.randn(1, 4, 128, 128, device=device, dtype=torch.bfloat16)
    k = torch.randn(1, 1, 128, 128, device=device, dtype=torch.bfloat16)
    for backend, name in ((SDPBackend.FLASH_ATTENTION, "flash"), (SDPBackend.CUDNN_ATTENTION, "cudnn"),
                          (SDPBackend.EFFICIENT_ATTENTION, "efficient")):
        try:
            with sdpa_kernel(backend):
                F.scaled_dot_product_attention(q, k, k, is_causal=True, enable_gqa=True)
            return backend, name
        except RuntimeError:
            continue
    return None, "math (no fused kernel took GQA)"


def provider_fn(name, shape, tensors, mode, sdpa_backend=None):
    """A closure running ``mode`` for ``name`` ("sdpa", "triton", "cuda", "eager")."""
    import contextlib

    import ral_kernels
    from torch.nn.attention import sdpa_kernel

    b, hq, hk, t, d, rows, div_name, hr = shape
    q, k, v, q_old, k_old = tensors
    q, k, v = (x.detach().requires_grad_(mode != "fwd") for x in (q, k, v))

    def forward():
        if name == "sdpa":
            ctx = sdpa_kernel(sdpa_backend) if sdpa_backend is not None else contextlib.nullcontext()
            with ctx:
                return (F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),)
        backend = name if name in ("triton", "cuda") else "reference"
        return ral_kernels.fused_attn_kl(q, k, v, q_old, k_old, divergence=div_name, head_reduction=hr,
                                         causal=True, backend=backend)

    if mode == "fwd":
        def run():
            with torch.no_grad():
                return forward()
        return run

    def run():
        outs = forward()
        loss = outs[0].float().sum() + (outs[1].sum() if len(outs) > 1 else 0.0)
        loss.backward()
        q.grad = k.grad = v.grad = None
        return outs
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


def attn_flops(shape, mode):
    """Attention-only FLOPs of one call, in ral-bench's convention (causal visible pairs;
    2 matmuls forward, 5 backward)."""
    from ral_kernels.bench.config import Shape
    from ral_kernels.bench.harness import flops

    b, hq, hk, t, d, rows, divergence, head_reduction = shape
    bench_shape = Shape(batch=b, heads=hq, kv_heads=hk, seq_len=t, head_dim=d, div_rows=rows)
    return flops(bench_shape, {"fwd": "forward", "fwd+bwd": "full"}[mode], with_divergence=False)


def check_row(name, shape, tensors, sdpa_backend, ref_cache) -> str:
    """A timed provider's output against SDPA and its divergence against the torch backend
    (computed once per shape, in the inputs' dtype with fp32 statistics)."""
    b, hq, hk, t, d, rows, div_name, hr = shape
    outs = provider_fn(name, shape, tensors, "fwd", sdpa_backend)()
    if name == "sdpa":
        ref_cache["sdpa"] = outs[0]
        return "baseline"
    if "torch" not in ref_cache:
        import ral_kernels

        q, k, v, q_old, k_old = tensors
        with torch.no_grad():
            ref_cache["torch"] = ral_kernels.fused_attn_kl(q, k, v, q_old, k_old, divergence=div_name,
                                                           head_reduction=hr, backend="torch")[1]
    if "sdpa" not in ref_cache:  # a stage that times this provider without SDPA (the CUDA stage)
        ref_cache["sdpa"] = provider_fn("sdpa", shape, tensors, "fwd", sdpa_backend)()[0]
    err_out = _max_err(outs[0], ref_cache["sdpa"])
    ref_div = ref_cache["torch"]
    err_div = _max_err(outs[1], ref_div) / max(1.0, ref_div.abs().max().item())
    ok = err_out <= 3e-2 and err_div <= 2e-2 and torch.isfinite(outs[1]).all().item()
    return f"{'ok' if ok else 'MISMATCH'} (out vs SDPA {err_out:.1e}, div vs torch {err_div:.1e} rel)"


def run_benchmarks(shapes, device, dtype, providers, budget: Budget, sdpa_backend):
    rows = []
    for shape_name, shape in shapes.items():
        b, hq, hk, t, d, nrows, _, _ = shape
        tensors = _inputs(b, hq, hk, t, d, nrows, device, dtype)[:5]
        ref_cache = {}
        for prov in providers:
            if prov == "eager" and shape_name.startswith(NO_EAGER):
                continue
            for mode in ("fwd", "fwd+bwd"):
                row = dict(shape=shape_name, mode=mode, provider=prov)
                if not budget.allows(20):
                    row["status"] = "skipped: out of time"
                    rows.append(row)
                    continue
                try:
                    if mode == "fwd":
                        row["check"] = check_row(prov, shape, tensors, sdpa_backend, ref_cache)
                    fn = provider_fn(prov, shape, tensors, mode, sdpa_backend)
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
                except Exception as exc:  # noqa: BLE001 - recorded as evidence
                    msg = str(exc)
                    row["status"] = "OOM" if "out of memory" in msg.lower() else f"error: {type(exc).__name__}: {msg[:200]}"
                rows.append(row)
                print(json.dumps(row), flush=True)
        del tensors, ref_cache
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def profile_breakdown(shape, device, dtype, backend: str, out: str) -> dict:
    """Per-kernel device time of one forward + backward (``torch.profiler``)."""
    from torch.profiler import ProfilerActivity, profile

    b, hq, hk, t, d, rows, _, _ = shape
    tensors = _inputs(b, hq, hk, t, d, rows, device, dtype)[:5]
    fn = provider_fn(backend, shape, tensors, "fwd+bwd")
    fn()  # compile / warm up outside the profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key, 0), reverse=True)
    top = [dict(name=e.key[:80], ms=round(getattr(e, key, 0) / 1e3, 3), calls=e.count) for e in events[:25]]
    with open(os.path.join(out, "profile.txt"), "w") as f:
        f.write(prof.key_averages().table(sort_by=key, row_limit=40))
    return dict(backend=backend, shape=shape, top=top)


# --------------------------------------------------------------------------- report

def table(rows):
    base = {(r["shape"], r["mode"]): r for r in rows if r["provider"] == "sdpa" and "median_ms" in r}
    eager = {(r["shape"], r["mode"]): r for r in rows if r["provider"] == "eager" and "median_ms" in r}
    lines = ["| shape | mode | provider | median ms [p20, p80] | TFLOP/s (attention) | peak GB | vs SDPA | "
             "eager / this | check |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "median_ms" not in r:
            lines.append(f"| {r['shape']} | {r['mode']} | {r['provider']} | {r.get('status')} | | | | | "
                         f"{r.get('check', '')} |")
            continue
        key = (r["shape"], r["mode"])
        vs = f"{r['median_ms'] / base[key]['median_ms']:.2f}x" if key in base else "-"
        ve = f"{eager[key]['median_ms'] / r['median_ms']:.1f}x" if key in eager else "-"
        mem = f"{r['peak_memory_gb']:.1f}" if "peak_memory_gb" in r else "-"
        lines.append(f"| {r['shape']} | {r['mode']} | {r['provider']} | {r['median_ms']:.2f} "
                     f"[{r['p20_ms']:.2f}, {r['p80_ms']:.2f}] | {r['tflops']:.1f} | {mem} | {vs} | {ve} | "
                     f"{r.get('check', '')} |")
    return "\n".join(lines)


def markdown(result: dict) -> str:
    env = result["env"]
    corr = result.get("correctness") or []
    n_pass = sum(r.get("status") == "pass" for r in corr)
    fails = [r for r in corr if r.get("status") != "pass"]
    lines = [f"GPU check: {env['device']}, torch {env['torch']} (CUDA {env['torch_cuda']}), nvcc {env['nvcc']}, "
             f"triton {env['triton']}, commit {env['commit']}, {env['time']}"
             + (" (DRY RUN: CPU, tiny shapes)" if env["dry_run"] else ""), "",
             f"CUDA extension: {json.dumps({k: v for k, v in result['build'].items() if k != 'log_tail'})}",
             f"SDPA kernel: {result.get('sdpa_kernel')}", "",
             f"Correctness: {n_pass}/{len(corr)} pass" + "".join(
                 f"\n- {r['backend']} {r['dtype']} d{r['head_dim']} {r['divergence']}/{r['head_reduction']}: "
                 f"{r['status']}" for r in fails), "", table(result.get("rows", []))]
    if result.get("profile"):
        lines += ["", f"Per-kernel time, one forward + backward, shape {result['profile']['shape']}, "
                      f"{result['profile']['backend']} (profile.txt):"]
        lines += [f"- {e['name']}: {e['ms']} ms ({e['calls']} calls)" for e in result["profile"]["top"][:12]]
    if result.get("cuda_checks") is not None:
        from gpu_cuda_checks import markdown as cuda_checks_markdown

        lines += ["", cuda_checks_markdown(result["cuda_checks"])]
    lines += ["", f"Stages: {json.dumps(result['stages'])}"]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="CPU: tiny shapes, Triton interpreter, CUDA emulator")
    p.add_argument("--out", default=os.environ.get("OUT") or os.path.join(REPO, "gpu_check_out"))
    p.add_argument("--budget", type=float, default=420, help="seconds for the whole run (default %(default)s)")
    p.add_argument("--no-cuda-checks", action="store_true", help="skip the layout check and compute-sanitizer")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    budget = Budget(args.budget)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"
        os.environ["RAL_CUDA_EMULATION"] = "1"
        device, dtype, shapes = torch.device("cpu"), torch.float16, DRY_SHAPES
    else:
        if not torch.cuda.is_available():
            p.error("no CUDA device: use --dry-run on a CPU machine")
        device, dtype, shapes = torch.device("cuda"), torch.bfloat16, SHAPES
    stages = {}
    t0 = time.monotonic()
    env = environment(args.dry_run)
    print(json.dumps(env), flush=True)
    build, handle = start_build(env, args.out, args.dry_run)
    result = dict(env=env, build=build, stages=stages)

    def stage(name, fn, need: float):
        if not budget.allows(need):
            stages[name] = "skipped: out of time"
            return None
        s0 = time.monotonic()
        try:
            res = fn()
            stages[name] = f"{time.monotonic() - s0:.0f} s"
            return res
        except Exception as exc:  # noqa: BLE001 - a failed stage is evidence, not the end of the run
            stages[name] = f"error after {time.monotonic() - s0:.0f} s: {type(exc).__name__}: {str(exc)[:300]}"
            return None

    stage_budget = Budget(min(90, budget.left()))  # correctness gets at most 90 s
    result["correctness"] = stage("correctness (triton)", lambda: correctness(device, args.dry_run, stage_budget,
                                                                              ["triton"]), 30) or []
    backend, result["sdpa_kernel"] = sdpa_choice(device)
    providers = ["sdpa", "triton", "eager"]
    result["rows"] = stage("timing (sdpa, triton, eager)",
                           lambda: run_benchmarks(shapes, device, dtype, providers, budget, backend), 60) or []
    result["build"] = finish_build(build, handle, args.out, wait=min(BUILD_TIMEOUT, budget.left() - 120))
    why = cuda_ready(args.dry_run)
    if why is None:
        cuda_budget = Budget(min(45, budget.left()))
        result["correctness"] += stage("correctness (cuda)", lambda: correctness(device, args.dry_run, cuda_budget,
                                                                                 ["cuda"]), 20) or []
        result["rows"] += stage("timing (cuda)", lambda: run_benchmarks(shapes, device, dtype, ["cuda"], budget,
                                                                        backend), 40) or []
    else:
        stages["cuda"] = f"skipped: {why}"
    result["profile"] = stage("profile", lambda: profile_breakdown(shapes["A"], device, dtype, "triton", args.out), 30)
    if not args.no_cuda_checks:
        from gpu_cuda_checks import run_steps

        result["cuda_checks"] = stage("layout + sanitizer", lambda: run_steps(args.dry_run), 150)
    stages["total"] = f"{time.monotonic() - t0:.0f} s"
    md = markdown(result)
    with open(os.path.join(args.out, "gpu_check.json"), "w") as f:
        json.dump(result, f, indent=1, default=str)
    with open(os.path.join(args.out, "gpu_check.md"), "w") as f:
        f.write(md)
    print("\n" + md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
