"""Measure providers over shapes and modes; write the rows to a CSV.

Modes: ``forward`` (with autograd recording, as in training), ``backward`` (the backward
of one recorded forward) and ``full`` (both).

Speed. CUDA: ``triton.testing.do_bench`` per mode (median and 20/80 percentiles) when
Triton imports, else a CUDA-event loop with do_bench's warm-up, repetition and L2 flush;
the backward mode always uses that loop, since an untimed forward must precede each timed
backward. CPU: after one untimed full step (warm-up, compilation), a wall-clock loop of
full steps timing the forward, the backward that follows it and the whole step in the
same iterations: at least ``repeats`` of them, more for short calls (until 0.3 s of timed
steps); median and 20/80 percentiles of each.

Memory: one forward + backward read in two phases (``tools.measure.peak_memory_split_mb``):
forward = peak above the start; backward = peak above what was allocated when it started
(the recorded forward excluded); full = peak of both above the start. CUDA:
``max_memory_allocated``. CPU: peak resident-set growth, read in a separate worker process
that pinned glibc's mmap threshold before allocating anything, so that freed tensors
leave the resident set (timing runs in another, unpinned, worker: pinning slows
allocation). Each provider gets its own pair of fresh workers, reused across its shapes
in increasing size.

FLOPs (the count every provider's TFLOP/s uses; ``causal`` counts only visible pairs):

* one attention matmul over rows ``I`` is ``2 * B * H * D * sum_{i in I} keys(i)``, with
  ``keys(i) = i + 1`` causal (``Tq == Tk``) and ``T`` otherwise;
* forward: 2 matmuls per query head over all rows (``QK^T``, ``PV``); backward: 5
  (``QK^T`` recomputed, ``dV``, ``dP``, ``dQ``, ``dK``) — FlashAttention's convention;
* the divergence (providers that compute one): 1 more matmul per old head over the
  divergence rows (the old scores ``q_old k_old^T``) in forward, and 1 in backward (the
  fused kernels recompute it rather than store an attention map). Work an implementation
  chooses to redo (a second sweep over the current scores) is not counted.

Out-of-memory (``torch.OutOfMemoryError``, a RuntimeError saying "out of memory", or a
worker killed by the kernel) is recorded as ``OOM``; a dense provider whose estimated
footprint exceeds the memory limit is recorded as ``skipped: ...`` without running; an
unavailable provider as ``skipped: <why>``.
"""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import datetime
import gc
import multiprocessing
import os
import platform
import signal
import subprocess
from concurrent.futures.process import BrokenProcessPool
from typing import Callable, Iterable, Optional, Sequence

import torch

from ..tools.measure import (available_memory_mb, bench_ms, is_out_of_memory, peak_memory_split_mb,
                        pin_cpu_allocator, time_split_ms)
from .config import MODES, Shape
from .providers import PROVIDERS, Problem, dense_bytes, get_provider

CSV_NAME = "fused_attn_kl.csv"
CPU_MIN_TIME_MS = 300.0  # CPU: repeat short calls until their timed runs add up to this

SHAPE_COLUMNS = ["seq_len", "batch", "heads", "kv_heads", "head_dim", "div_rows", "div_spec", "divergence",
                 "head_reduction", "dtype", "causal"]
COLUMNS = (["provider", "mode", "seq_len", "status", "median_ms", "p20_ms", "p80_ms", "tflops", "peak_memory_mb",
            "time_vs_sdpa", "time_vs_eager", "memory_vs_sdpa", "memory_vs_eager"]
           + SHAPE_COLUMNS[1:]
           + ["gflop", "preset", "device", "threads", "torch_version", "triton_version", "commit", "time", "run_id"])
# Rows that describe the same measurement (a later run replaces an earlier one).
KEY_COLUMNS = ["device", "threads", "provider", "mode"] + SHAPE_COLUMNS


# --------------------------------------------------------------------------- FLOPs

def _visible_pairs(t: int, rows: int, causal: bool) -> int:
    """Sum over the last ``rows`` query rows of the keys each one sees (``Tq == Tk == t``)."""
    if not causal:
        return rows * t
    first = t - rows  # rows first .. t-1 see i + 1 keys
    return (first + 1 + t) * rows // 2


def flops(shape: Shape, mode: str, with_divergence: bool = True) -> int:
    """FLOPs of one call in ``mode`` under the module's convention."""
    s = shape
    attn = 2 * s.batch * s.heads * s.head_dim * _visible_pairs(s.seq_len, s.seq_len, s.causal)
    old = 2 * s.batch * s.heads * s.head_dim * _visible_pairs(s.seq_len, s.rows, s.causal) if with_divergence else 0
    fwd, bwd = 2 * attn + old, 5 * attn + old
    return {"forward": fwd, "backward": bwd, "full": fwd + bwd}[mode]


# --------------------------------------------------------------------------- one point

@dataclasses.dataclass(frozen=True)
class Task:
    """One provider on one shape, all ``modes``; ``what``: "time", "memory" or "both"."""

    provider: str
    shape: Shape
    modes: tuple
    device: str
    what: str = "both"
    repeats: int = 3
    compile_dynamic: bool = False
    min_time_ms: float = CPU_MIN_TIME_MS
    threads: Optional[int] = None  # torch CPU threads (default: torch's)


def _reset(leaves) -> None:
    for x in leaves:
        x.grad = None


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _error(exc: BaseException) -> str:
    if is_out_of_memory(exc):
        return "OOM"
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"error: {type(exc).__name__}: {msg}"[:300]


def _finite(runner) -> Optional[str]:
    outs = runner.step()
    names = ["out", "div"]
    for name, o in zip(names, outs):
        if not torch.isfinite(o).all():
            return f"error: non-finite {name}"
    for name, x in zip(("dq", "dk", "dv"), runner.leaves):
        if x.grad is None or not torch.isfinite(x.grad).all():
            return f"error: {'missing' if x.grad is None else 'non-finite'} {name}"
    return None


def _assign(res: dict, values, names) -> None:
    """Spread ``[forward, backward, full]`` values (or ``[forward]``, or an error status)
    over the modes of ``res`` that are still ok."""
    for m in res:
        if res[m]["status"] != "ok":
            continue
        if isinstance(values, str):
            res[m]["status"] = values
            continue
        v = values[{"forward": 0, "backward": 1, "full": 2}[m]]
        res[m].update(zip(names, v))


def measure(task: Task) -> dict:
    """``{mode: {status, median_ms, p20_ms, p80_ms, peak_memory_mb}}`` for one point. Runs
    wherever it is called (a worker process on the CPU). Never raises for a provider's own
    failure: OOM and errors become the status."""
    device = torch.device(task.device)
    prov = get_provider(task.provider)
    res = {m: {"status": "ok"} for m in task.modes}
    if task.threads:
        torch.set_num_threads(task.threads)

    def all_modes(status):
        for m in task.modes:
            res[m]["status"] = status
        return res

    why = prov.unavailable(device, task.shape)
    if why:
        return all_modes(f"skipped: {why}")
    runner = None
    try:
        cpu_memory = task.what == "memory" and device.type == "cpu"
        if cpu_memory:
            pin_cpu_allocator()
        if cpu_memory and task.provider != "eager_compiled":
            # Library initialisation on a small problem, so that it is not counted; the
            # compiled provider warms up at full size instead (its graph is shape-specialized).
            small = dataclasses.replace(task.shape, seq_len=64, div_rows=None, div_frac=0.25)
            prov.build(Problem(small, device), compile_dynamic=task.compile_dynamic).step()
            _free(device)
        runner = prov.build(Problem(task.shape, device), compile_dynamic=task.compile_dynamic)
        if not cpu_memory or task.provider == "eager_compiled":
            bad = _finite(runner)  # warm-up (and compilation), untimed; checks the results
            if bad:
                return all_modes(bad)
        _reset(runner.leaves)
    except Exception as e:  # noqa: BLE001 - recorded, not raised
        status = _error(e)
    else:
        status = None
    if status is not None:
        runner = None
        _free(device)  # outside the except block: the traceback no longer pins the tensors
        return all_modes(status)
    both = any(m != "forward" for m in task.modes)
    backward = runner.backward if both else None
    if task.what in ("time", "both"):
        if device.type == "cpu":
            # forward, the backward that follows it and the whole step, timed in one loop
            try:
                times = time_split_ms(runner.forward, backward, device, repeats=task.repeats,
                                      min_time_ms=task.min_time_ms, grad_to_none=runner.leaves)
            except Exception as e:  # noqa: BLE001
                times = _error(e)
            _assign(res, times, ("median_ms", "p20_ms", "p80_ms"))
        else:
            for m in task.modes:
                try:
                    fn, setup = runner.mode(m)
                    med, p20, p80 = bench_ms(fn, device, warmup=1, repeats=task.repeats, grad_to_none=runner.leaves,
                                             setup=setup)
                    res[m].update(median_ms=med, p20_ms=p20, p80_ms=p80)
                except Exception as e:  # noqa: BLE001
                    res[m]["status"] = _error(e)
                fn = setup = None
                _reset(runner.leaves)
                _free(device)
    if task.what in ("memory", "both"):
        _reset(runner.leaves)
        try:
            # Pin glibc only in the dedicated memory worker: pinning slows a process for good.
            peaks = peak_memory_split_mb(runner.forward, backward, device, pin=task.what == "memory")
        except Exception as e:  # noqa: BLE001
            peaks = _error(e)
        _assign(res, [(p,) for p in peaks] if isinstance(peaks, list) else peaks, ("peak_memory_mb",))
        _reset(runner.leaves)
        _free(device)
    return res


# --------------------------------------------------------------------------- workers

def _spawn_pool(pinned: bool) -> concurrent.futures.ProcessPoolExecutor:
    return concurrent.futures.ProcessPoolExecutor(
        1, mp_context=multiprocessing.get_context("spawn"), initializer=pin_cpu_allocator if pinned else None)


class Workers:
    """A timing worker and a (pinned) memory worker, created on first use, replaced when
    one dies (the kernel's OOM killer)."""

    def __init__(self):
        self.pools: dict = {}

    def run(self, task: Task) -> dict:
        pool = self.pools.get(task.what)
        if pool is None:
            pool = self.pools[task.what] = _spawn_pool(task.what == "memory")
        try:
            return pool.submit(measure, task).result()
        except BrokenProcessPool:
            self.pools.pop(task.what, None)
            procs = list((getattr(pool, "_processes", None) or {}).values())
            for proc in procs:
                proc.join(timeout=10)
            codes = [proc.exitcode for proc in procs]
            pool.shutdown(wait=False, cancel_futures=True)
            if not codes or any(c == -signal.SIGKILL for c in codes if c is not None):
                status = "OOM: the worker process was killed (SIGKILL, the kernel's OOM killer)"
            else:
                status = f"error: the worker process died (exit code {codes[0]})"
            return {m: {"status": status} for m in task.modes}

    def close(self) -> None:
        for pool in self.pools.values():
            pool.shutdown(wait=True, cancel_futures=True)
        self.pools.clear()


def _merge(a: dict, b: dict) -> dict:
    out = {}
    for m in a:
        row = {**a[m], **{k: v for k, v in b[m].items() if k != "status"}}
        sa, sb = a[m]["status"], b[m]["status"]
        row["status"] = sa if sa != "ok" else sb
        out[m] = row
    return out


# --------------------------------------------------------------------------- metadata

def _commit() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=here,
                              timeout=10).stdout.strip()
        if not head:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=here, timeout=10).stdout.strip()
        return head + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine()
    return f"{model} ({os.cpu_count()} cores)"


def run_metadata(device, preset: str = "") -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except Exception:  # noqa: BLE001 - any import failure means "no triton"
        triton_version = ""
    now = datetime.datetime.now(datetime.timezone.utc)
    return dict(preset=preset, device=device_name(device), torch_version=torch.__version__,
                triton_version=triton_version, commit=_commit(), time=now.isoformat(timespec="seconds"),
                run_id=now.strftime("%Y%m%dT%H%M%S"))


# --------------------------------------------------------------------------- a run

def _fmt(x) -> str:
    if x is None or x == "":
        return ""
    if isinstance(x, float):
        return f"{x:.6g}"
    return str(x)


def _ratio(a, b) -> Optional[float]:
    return a / b if a is not None and b not in (None, 0) and b > 0 else None


def add_ratios(rows: list[dict]) -> None:
    """Fill ``time_vs_*`` and ``memory_vs_*`` (provider ÷ baseline, same shape and mode,
    same run) in place; rows hold floats or None."""
    def key(r):
        return tuple(r[c] for c in SHAPE_COLUMNS) + (r["mode"], r.get("device"), r.get("threads"))
    base = {(r["provider"], key(r)): r for r in rows if r["status"] == "ok"}
    for r in rows:
        for name in ("sdpa", "eager"):
            b = base.get((name, key(r)))
            r[f"time_vs_{name}"] = _ratio(r.get("median_ms"), b and b.get("median_ms")) if r["status"] == "ok" else None
            r[f"memory_vs_{name}"] = (_ratio(r.get("peak_memory_mb"), b and b.get("peak_memory_mb"))
                                      if r["status"] == "ok" else None)


def _progress(total: int, enabled: bool):
    """A tqdm bar on stderr when it is a terminal (a plain counter without tqdm); each
    finished point is also printed as a line, so logs show progress too."""
    if enabled:
        try:
            from tqdm.auto import tqdm
            return tqdm(total=total, unit="point", dynamic_ncols=True, disable=None)
        except ImportError:
            pass

    class Plain:
        n = 0

        def update(self, k=1):
            self.n += k

        def set_description(self, text):
            pass

        @staticmethod
        def write(text):
            print(text, flush=True)

        def close(self):
            pass
    return Plain()


def _summary(provider: str, shape: Shape, res: dict) -> str:
    statuses = {r["status"] for r in res.values()}
    if len(statuses) == 1 and statuses != {"ok"}:
        return f"{provider:<15} T={shape.seq_len:<6} {statuses.pop()}"
    parts = []
    for m, r in res.items():
        if r["status"] != "ok":
            parts.append(f"{m} {r['status']}")
            continue
        t = f"{r['median_ms']:.4g} ms" if r.get("median_ms") is not None else "-"
        mb = r.get("peak_memory_mb")
        parts.append(f"{m} {t}" + (f" {mb:.4g} MiB" if mb is not None else ""))
    return f"{provider:<15} T={shape.seq_len:<6} " + " | ".join(parts)


def run(shapes: Sequence[Shape], providers: Sequence[str], modes: Sequence[str], device: str, *,
        isolation: str = "process", repeats: int = 3, compile_dynamic: bool = False,
        memory_limit_mb: Optional[float] = None, preset: str = "", progress: bool = True,
        min_time_ms: float = CPU_MIN_TIME_MS, threads: Optional[int] = None,
        on_row: Optional[Callable[[dict], None]] = None) -> list[dict]:
    """Measure every provider on every shape in every mode; one row per
    (provider, shape, mode), ratio columns filled. ``isolation="process"`` (the CPU
    default) measures in worker processes; ``"none"`` in this process (CUDA, tests)."""
    dev = torch.device(device)
    for m in modes:
        if m not in MODES:
            raise ValueError(f"unknown mode {m!r}; valid: {', '.join(MODES)}")
    for p in providers:
        get_provider(p)
    if isolation not in ("process", "none"):
        raise ValueError(f"isolation must be 'process' or 'none', got {isolation!r}")
    meta = run_metadata(dev, preset)
    meta["threads"] = threads or torch.get_num_threads()
    rows: list[dict] = []
    total, done = len(shapes) * len(providers), 0
    bar = _progress(total, progress)
    try:
        for name in providers:
            prov = PROVIDERS[name]
            workers = Workers() if isolation == "process" and dev.type == "cpu" else None
            try:
                for shape in shapes:
                    bar.set_description(f"{name} T={shape.seq_len}")
                    why = prov.unavailable(dev, shape)
                    limit = memory_limit_mb if memory_limit_mb is not None else (
                        0.7 * (available_memory_mb(dev) or float("inf")) if dev.type == "cpu" else None)
                    need = dense_bytes(shape) / 2**20 if prov.dense else 0
                    if why:
                        res = {m: {"status": f"skipped: {why}"} for m in modes}
                    elif limit is not None and need > limit:
                        res = {m: {"status": f"skipped: the dense path needs ~{need / 1024:.1f} GiB, over the "
                                             f"{limit / 1024:.1f} GiB limit (--max-memory-gb)"} for m in modes}
                    else:
                        task = Task(name, shape, tuple(modes), str(dev), "both", repeats, compile_dynamic,
                                    min_time_ms, threads)
                        if workers is None:
                            res = measure(task)
                        else:
                            res = _merge(workers.run(dataclasses.replace(task, what="time")),
                                         workers.run(dataclasses.replace(task, what="memory")))
                    for m in modes:
                        r = res[m]
                        med = r.get("median_ms")
                        row = dict(provider=name, mode=m, **shape.columns(), status=r["status"],
                                   median_ms=med, p20_ms=r.get("p20_ms"), p80_ms=r.get("p80_ms"),
                                   peak_memory_mb=r.get("peak_memory_mb"),
                                   gflop=flops(shape, m, prov.divergence) / 1e9, **meta)
                        row["tflops"] = (row["gflop"] / med if med else None)  # GFLOP / ms = TFLOP/s
                        rows.append(row)
                        if on_row:
                            on_row(row)
                    done += 1
                    bar.write(f"[{done}/{total}] " + _summary(name, shape, res))
                    bar.update(1)
            finally:
                if workers is not None:
                    workers.close()
    finally:
        bar.close()
    add_ratios(rows)
    return rows


# --------------------------------------------------------------------------- CSV

def append_csv(path: str, rows: Iterable[dict]) -> str:
    """Append ``rows`` to ``path`` (created with a header); an existing file with other
    columns is rewritten with the union of both."""
    rows = [{k: _fmt(v) for k, v in r.items()} for r in rows]
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    old, columns = [], list(COLUMNS)
    if os.path.exists(path) and os.path.getsize(path) > 0:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            if header != columns:
                old = list(reader)
                columns = header + [c for c in columns if c not in header]
    extra = [c for r in rows for c in r if c not in columns]
    columns += list(dict.fromkeys(extra))
    if old or not os.path.exists(path) or os.path.getsize(path) == 0:
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=columns, restval="")
            w.writeheader()
            w.writerows(old + rows)
    else:
        with open(path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=columns, restval="").writerows(rows)
    return path


def read_csv(path: str) -> list[dict]:
    """Rows of a results CSV, the latest measurement of each (device, provider, mode,
    shape) kept, numbers as floats (``None`` when empty)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such results file: {path}")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        needed = {"provider", "mode", "seq_len", "median_ms", "peak_memory_mb", "device"}
        missing = needed - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{path} is not a ral-bench results CSV: missing columns {sorted(missing)}")
        raw = list(reader)
    latest = {}
    for r in raw:
        latest[tuple(r.get(c, "") for c in KEY_COLUMNS)] = r
    out = []
    numeric = {"median_ms", "p20_ms", "p80_ms", "tflops", "peak_memory_mb", "time_vs_sdpa", "time_vs_eager",
               "memory_vs_sdpa", "memory_vs_eager", "gflop"}
    integer = {"seq_len", "batch", "heads", "kv_heads", "head_dim", "div_rows", "threads"}
    for r in latest.values():
        r = dict(r)
        for c in numeric:
            r[c] = float(r[c]) if r.get(c) not in (None, "") else None
        for c in integer:
            if r.get(c) not in (None, ""):
                r[c] = int(float(r[c]))
        out.append(r)
    return out
