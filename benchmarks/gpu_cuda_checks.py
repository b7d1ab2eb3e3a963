"""GPU-side checks of the CUDA C++ kernels (issue 17), one function per step; gpu_check.py runs them.

    python benchmarks/gpu_cuda_checks.py [--out DIR]   # on a GPU: both steps
    python benchmarks/gpu_cuda_checks.py --dry-run     # on a CPU: the steps' stand-ins

Each step returns a record (a dict: ``step``, ``status`` = "pass" | "fail" | "error" |
"skipped", ``seconds``, ``device`` and the step's findings); a failure is evidence in the
record, never an exception out of the step.

- ``layout_step``: the one-hot check of mma.m16n8k16 (fp16, bf16) and ldmatrix.x4 (plain and
  .trans) against the PTX fragment tables (``tests/cuda_emu/layout_check.cu``), compiled with
  nvcc for this GPU and run (a ~10 s compile, a second to run): the layouts that the kernels
  and the CPU emulator assume, confirmed on the hardware. Stand-in: the same program built
  against the CPU emulator.
- ``sanitizer_step``: compute-sanitizer's memcheck, racecheck, synccheck and initcheck, run in
  parallel, each over a small workload (``run_workload``) that launches every CUDA kernel
  forward and backward -- head dims 64 and 128 (and 80 padded into 128), fp16 and bf16,
  head-mean and per-head, JSD, KL and reverse KL, masks, cached rows with and without lse_old,
  Tq != Tk -- and the Triton kernels on the same shapes. The workload first runs once without
  the sanitizer (it compiles the Triton kernels, so the sanitized runs only check). Stand-in:
  the workload on the CPU, the CUDA kernels in the emulator under a perturbed schedule (its
  counterpart of racecheck; its alignment and write-ownership checks are always on), the Triton
  kernels in Triton's interpreter.

Budget on an H100: about 15 s for the layout step (mostly nvcc) and 60-90 s for the sanitizer
step (a warm-up run, then the four tools at once); the timeouts (``LAYOUT_TIMEOUT``,
``WARMUP_TIMEOUT``, ``TOOL_TIMEOUT``) bound both at 195 s. The dry run takes about 2 minutes
on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAYOUT_SOURCE = REPO / "tests" / "cuda_emu" / "layout_check.cu"
TOOLS = ("memcheck", "racecheck", "synccheck", "initcheck")
LAYOUT_TIMEOUT, WARMUP_TIMEOUT, TOOL_TIMEOUT = 45, 60, 90
# The dry run is no GPU budget: the Triton interpreter alone takes a minute or more on 2 cores.
DRY_RUN_TIMEOUT = 900
# The emulator's counterpart of racecheck in the dry run (one of the CI's perturbed schedules).
DRY_RUN_SCHEDULE = "random:seed=1,preempt=0.25,landing=issue"

# name: shape and options of one workload case (fused_attn_kl keywords plus the sizes).
WORKLOAD = {
    "mean-jsd-d64-fp16-masks": dict(b=2, hq=4, hk=2, tq=150, tk=150, d=64, ho=4, hko=2, do=64, rows=80,
                                    divergence="jsd", head_reduction="mean", exclude_self=True, masks=True,
                                    dtype="float16"),
    "none-kl-d128-bf16-lse_old": dict(b=1, hq=2, hk=1, tq=97, tk=97, d=128, ho=2, hko=1, do=128, rows=40,
                                      divergence="kl", head_reduction="none", lse_old=True, dtype="bfloat16"),
    "mean-rkl-d80-fp16-tq<tk": dict(b=1, hq=2, hk=2, tq=70, tk=130, d=80, ho=3, hko=1, do=112, rows=70,
                                    divergence="reverse_kl", head_reduction="mean", dtype="float16"),
}


def _record(step: str, device: str, start: float, status: str, **details) -> dict:
    return dict(step=step, status=status, device=device, seconds=round(time.time() - start, 1), **details)


def _tail(text: str, lines: int = 30) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _device(dry_run: bool) -> str:
    if dry_run:
        return "cpu (dry run: CUDA emulator, Triton interpreter)"
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"


# --------------------------------------------------------------------------- layout step

def _layout_build(dry_run: bool, exe: Path, csrc: Path) -> list[str]:
    """The compiler command: nvcc for this GPU's arch, or g++ against the CPU emulator."""
    if dry_run:
        from ral_kernels.backends.cuda.build import EMU_FLAGS

        return [os.environ.get("CXX", "g++"), "-std=c++17", *EMU_FLAGS, "-I", str(csrc), "-I", str(csrc / "emu"),
                "-x", "c++", str(LAYOUT_SOURCE), "-o", str(exe)]
    import torch
    from ral_kernels.tools.cuda_compile_check import find_nvcc

    nvcc = find_nvcc()
    if nvcc is None:
        raise FileNotFoundError("nvcc was not found (set CUDA_HOME)")
    major, minor = torch.cuda.get_device_capability()
    return [nvcc, "-std=c++17", "-O2", f"-arch=sm_{major}{minor}", "-I", str(csrc), str(LAYOUT_SOURCE), "-o", str(exe)]


def layout_step(dry_run: bool = False, timeout: float = LAYOUT_TIMEOUT, csrc: Path = REPO / "csrc") -> dict:
    """Build (from ``csrc``) and run the one-hot mma / ldmatrix layout check; see the module
    docstring."""
    start, device = time.time(), _device(dry_run)
    if not dry_run and device == "no CUDA device":
        return _record("layout", device, start, "skipped", reason="no CUDA device")
    with tempfile.TemporaryDirectory(prefix="ral_layout_") as tmp:
        exe = Path(tmp) / "layout_check"
        try:
            cmd = _layout_build(dry_run, exe, Path(csrc))
            build = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
            if build.returncode != 0:
                return _record("layout", device, start, "error", command=" ".join(cmd),
                               output=_tail(build.stdout + build.stderr))
            run = subprocess.run([str(exe)], capture_output=True, text=True,
                                 timeout=max(1.0, timeout - (time.time() - start)))
        except (OSError, subprocess.TimeoutExpired) as exc:
            return _record("layout", device, start, "error", reason=f"{type(exc).__name__}: {exc}")
    found = re.search(r"mismatches=(\d+)", run.stdout)
    checks = [line for line in run.stdout.splitlines() if re.match(r"\S.*: \d+ mismatches", line)]
    status = "pass" if run.returncode == 0 and found and int(found.group(1)) == 0 and len(checks) == 4 else \
        "fail" if found else "error"
    return _record("layout", device, start, status, mismatches=int(found.group(1)) if found else None,
                   checks=checks, output=_tail(run.stdout + run.stderr))


# --------------------------------------------------------------------------- workload

def _inputs(spec: dict, device, dtype):
    """Random inputs of one workload case (fixed seed); masks leave one sequence keyless."""
    import torch

    import ral_kernels

    g = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    b, tq, tk = spec["b"], spec["tq"], spec["tk"]
    q, k, v = rnd(b, spec["hq"], tq, spec["d"]), rnd(b, spec["hk"], tk, spec["d"]), rnd(b, spec["hk"], tk, spec["d"])
    q_old, k_old = rnd(b, spec["ho"], tq, spec["do"]), rnd(b, spec["hko"], tk, spec["do"])
    kw = dict(divergence=spec["divergence"], head_reduction=spec["head_reduction"],
              exclude_self=spec.get("exclude_self", False))
    if spec.get("masks"):
        key_mask = torch.rand(b, tk, generator=g) < 0.8
        key_mask[-1] = False  # a sequence whose rows have no key
        query_mask = torch.rand(b, tq, generator=g) < 0.7
        query_mask[:, : tq - spec["rows"]] = False  # only the cached rows carry a divergence
        kw.update(key_mask=key_mask.to(device), query_mask=query_mask.to(device))
    cache = ral_kernels.make_old_policy_cache(q_old, k_old, spec["rows"], with_lse=spec.get("lse_old", False),
                                              key_mask=kw.get("key_mask"))
    return (q, k, v), dict(kw, **cache.as_kwargs())


def run_workload(backends=("cuda", "triton"), dry_run: bool = False) -> int:
    """Every workload case forward and backward on each backend; prints one line per run.
    Returns 0 when every available backend ran and gave finite, non-trivial results, 3 otherwise
    (a backend that cannot run here is reported and skipped)."""
    import torch

    import ral_kernels
    from ral_kernels.backends import unavailable_reason

    device = torch.device("cpu" if dry_run else "cuda")
    failed = False
    for backend in backends:
        why = unavailable_reason(backend, device)
        if why is not None:
            print(f"workload: {backend}: skipped: {why}", flush=True)
            continue
        for name, spec in WORKLOAD.items():
            if dry_run:  # the CPU stand-ins run the same cases at half the length (every kernel, less time)
                spec = dict(spec, **{key: max(1, spec[key] // 2) for key in ("tq", "tk", "rows")})
            # Triton's interpreter computes bfloat16 dots wrongly, so the dry run keeps it to float16.
            dtype = torch.float16 if dry_run and backend == "triton" else getattr(torch, spec["dtype"])
            t0 = time.time()
            try:
                (q, k, v), kw = _inputs(spec, device, dtype)
                q, k, v = (x.requires_grad_() for x in (q, k, v))
                out, div = ral_kernels.fused_attn_kl(q, k, v, backend=backend, **kw)
                (out.float().sum() + div.sum()).backward()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                ok = all(torch.isfinite(t).all() for t in (out, div, q.grad, k.grad, v.grad)) and div.abs().sum() > 0
            except Exception as exc:  # noqa: BLE001 - every failure is evidence for the record
                print(f"workload: {backend} {name}: {type(exc).__name__}: {exc}", flush=True)
                ok = False
            failed = failed or not ok
            print(f"workload: {backend} {name}: {'ok' if ok else 'FAILED'} ({time.time() - t0:.1f} s)", flush=True)
    return 3 if failed else 0


# --------------------------------------------------------------------------- sanitizer step

def find_compute_sanitizer():
    """compute-sanitizer on PATH, next to nvcc, or under CUDA_HOME / /usr/local/cuda; None if absent."""
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    from ral_kernels.tools.cuda_compile_check import find_nvcc

    nvcc = find_nvcc()
    homes = [os.environ.get("CUDA_HOME"), "/usr/local/cuda", str(Path(nvcc).parents[1]) if nvcc else None]
    for home in filter(None, homes):
        for sub in ("bin", "compute-sanitizer"):
            if (Path(home) / sub / "compute-sanitizer").is_file():
                return str(Path(home) / sub / "compute-sanitizer")
    return None


def _workload_cmd(dry_run: bool) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "workload"] + (["--dry-run"] if dry_run else [])


def _run(cmd: list[str], timeout: float, env: dict | None = None) -> dict:
    start = time.time()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env)
        return dict(rc=proc.returncode, output=proc.stdout + proc.stderr, seconds=round(time.time() - start, 1))
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        return dict(rc=None, output=out + f"\ntimed out after {timeout:.0f} s", seconds=round(time.time() - start, 1))


def parse_sanitizer(tool: str, run: dict) -> dict:
    """One tool's verdict from its output: errors (and racecheck warnings), the first findings,
    the kernels they name, and whether the workload itself succeeded."""
    text = run["output"]
    summary = re.search(r"ERROR SUMMARY: (\d+) error", text)
    race = re.search(r"RACECHECK SUMMARY: \d+ hazards? displayed \((\d+) errors?, (\d+) warnings?\)", text)
    errors = int(race.group(1)) if race else int(summary.group(1)) if summary else None
    findings = [line for line in text.splitlines()
                if line.startswith("=========") and "SUMMARY" not in line and line.strip("= ")][:12]
    kernels = sorted({k.removeprefix("void ") for k in re.findall(r"\bat (.+?)\+0x[0-9a-f]+", text)})[:8]
    workload_ok = run["rc"] is not None and "FAILED" not in text and re.search(r"workload: .*: ok", text) is not None
    if run["rc"] is None or errors is None:
        status = "error"
    elif errors > 0:
        status = "fail"
    else:
        status = "pass" if workload_ok else "error"
    return dict(status=status, errors=errors, warnings=int(race.group(2)) if race else None, rc=run["rc"],
                seconds=run["seconds"], findings=findings, kernels=kernels,
                workload=[l for l in text.splitlines() if l.startswith("workload:")], output=_tail(text, 15))


def sanitizer_step(dry_run: bool = False, tools=TOOLS, tool_timeout: float = TOOL_TIMEOUT,
                   warmup_timeout: float = WARMUP_TIMEOUT) -> dict:
    """compute-sanitizer over the workload (or the dry run's stand-in); see the module docstring."""
    start, device = time.time(), _device(dry_run)
    if dry_run:
        env = dict(os.environ, RAL_CUDA_EMULATION="1", TRITON_INTERPRET="1", RAL_EMU_SCHEDULE=DRY_RUN_SCHEDULE)
        run = _run(_workload_cmd(True), DRY_RUN_TIMEOUT, env)
        status = "pass" if run["rc"] == 0 else "error" if run["rc"] is None else "fail"
        return _record("sanitizer", device, start, status, stand_in=f"emulator schedule {DRY_RUN_SCHEDULE}, "
                       "alignment and write-ownership checks; Triton interpreter", rc=run["rc"],
                       workload=[l for l in run["output"].splitlines() if l.startswith("workload:")],
                       output=_tail(run["output"], 15))
    if device == "no CUDA device":
        return _record("sanitizer", device, start, "skipped", reason="no CUDA device")
    sanitizer = find_compute_sanitizer()
    if sanitizer is None:
        return _record("sanitizer", device, start, "skipped", reason="compute-sanitizer was not found")
    warmup = _run(_workload_cmd(False), warmup_timeout)
    if warmup["rc"] != 0:
        return _record("sanitizer", device, start, "error", reason="the workload failed without the sanitizer",
                       rc=warmup["rc"], output=_tail(warmup["output"], 20))

    def one(tool):
        cmd = [sanitizer, "--tool", tool, "--print-limit", "20", *_workload_cmd(False)]
        return tool, parse_sanitizer(tool, _run(cmd, tool_timeout))

    with concurrent.futures.ThreadPoolExecutor(len(tools)) as pool:
        results = dict(pool.map(one, tools))
    statuses = {r["status"] for r in results.values()}
    status = "fail" if "fail" in statuses else "error" if "error" in statuses else "pass"
    return _record("sanitizer", device, start, status, sanitizer=sanitizer, warmup_seconds=warmup["seconds"],
                   tools=results)


# --------------------------------------------------------------------------- driver

def run_steps(dry_run: bool = False) -> list[dict]:
    """Both steps; a step that raises becomes an "error" record."""
    records = []
    for step in (layout_step, sanitizer_step):
        start = time.time()
        try:
            records.append(step(dry_run))
        except Exception as exc:  # noqa: BLE001 - evidence, not a crash of the whole GPU check
            records.append(_record(step.__name__.replace("_step", ""), "?", start, "error",
                                   reason=f"{type(exc).__name__}: {exc}"))
        print(json.dumps({k: v for k, v in records[-1].items() if k != "output"}), flush=True)
    return records


def markdown(records: list[dict]) -> str:
    """A few lines for gpu_check.md."""
    lines = ["CUDA kernel checks (benchmarks/gpu_cuda_checks.py):"]
    for r in records:
        line = f"- {r['step']}: **{r['status']}** ({r['seconds']} s)"
        if r["step"] == "layout" and r.get("checks"):
            line += ": " + "; ".join(r["checks"])
        for tool, t in (r.get("tools") or {}).items():
            line += f"\n  - {tool}: {t['status']}, {t['errors']} errors" + (
                f" (first: {t['findings'][0].strip('= ')})" if t["errors"] and t["findings"] else "")
        if r.get("stand_in"):
            line += f": stand-in: {r['stand_in']}"
        if r.get("reason"):
            line += f": {r['reason']}"
        lines.append(line)
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", nargs="?", choices=("steps", "workload"), default="steps",
                   help="steps (default) or workload (what the sanitizer runs)")
    p.add_argument("--dry-run", action="store_true", help="CPU stand-ins: CUDA emulator, Triton interpreter")
    p.add_argument("--out", default=None, help="write cuda_checks.json here")
    args = p.parse_args(argv)
    if args.what == "workload":
        if args.dry_run:
            os.environ.setdefault("RAL_CUDA_EMULATION", "1")
            os.environ.setdefault("TRITON_INTERPRET", "1")
        return run_workload(dry_run=args.dry_run)
    records = run_steps(args.dry_run)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "cuda_checks.json"), "w") as f:
            json.dump(records, f, indent=1)
    print(markdown(records))
    return 0 if all(r["status"] in ("pass", "skipped") for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
