"""Peak-memory and wall-clock measurement used by the demo and the benchmarks.

CUDA: ``torch.cuda.max_memory_allocated`` above the allocation at the start. CPU: the
process's peak resident set (``VmHWM``, reset through ``/proc/self/clear_refs``) above its
resident set at the start, with glibc's mmap threshold pinned so freed tensors leave the
resident set; where the reset is not allowed the measurement says so (``None``) instead of
reporting a stale peak. Warm up first: the first call of an op pays one-off library
initialisation.
"""

from __future__ import annotations

import ctypes
import functools
import gc
import time
from typing import Callable

import torch


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")


@functools.lru_cache(maxsize=None)
def pin_cpu_allocator() -> None:
    """Make glibc serve every block over 128 KiB with mmap and return it on free (a fixed
    M_MMAP_THRESHOLD turns off its dynamic threshold), so the resident set follows the
    tensors alive rather than what the allocator kept from earlier runs."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def _reset_cpu_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def time_ms(fn: Callable[[], object], device: torch.device | str = "cpu", *, warmup: int = 1,
            repeats: int = 3) -> tuple[float, float, float]:
    """Wall-clock milliseconds of ``fn``: ``(median, 20th, 80th percentile)`` over ``repeats``
    runs after ``warmup`` runs (synchronizing CUDA around each)."""
    device = torch.device(device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    t = torch.tensor(times, dtype=torch.float64)
    return t.median().item(), t.quantile(0.2).item(), t.quantile(0.8).item()


def peak_memory_mb(fn: Callable[[], object], device: torch.device | str = "cpu") -> float | None:
    """Extra peak memory in MiB while ``fn`` runs once (``None`` where it cannot be read).

    On the CPU, run it in a fresh process (:func:`in_fresh_process`) that called
    :func:`pin_cpu_allocator` before any large tensor: memory that glibc kept from earlier
    work would otherwise hide new allocations (and the pinned threshold slows allocation,
    so do not time in that process).
    """
    return peak_memory_split_mb(fn, None, device)[0]


def in_fresh_process(fn: Callable, *args):
    """``fn(*args)`` in a new Python process (spawned, so nothing is inherited), for
    peak-memory readings free of what this process's allocator holds. ``fn`` must be a
    module-level function and its arguments picklable."""
    import concurrent.futures
    import multiprocessing

    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


# --------------------------------------------------------------------------- benchmarks

def _reset_grads(tensors) -> None:
    for x in tensors or ():
        x.grad = None


def bench_ms(fn: Callable[[], object], device: torch.device | str = "cpu", *, warmup: int = 1, repeats: int = 3,
             grad_to_none=None, setup: Callable[[], object] | None = None, min_time_ms: float = 0.0,
             max_repeats: int = 100) -> tuple[float, float, float]:
    """``(median, 20th, 80th percentile)`` milliseconds of ``fn``, the way the benchmarks time.

    ``setup`` (optional) runs untimed before every run of ``fn`` (e.g. the forward whose
    backward is timed); ``grad_to_none``: tensors whose ``.grad`` is reset before every
    run, so that a timed backward does not accumulate.

    CUDA: ``triton.testing.do_bench`` (warm-up and repetitions by time, L2 flushed before
    each run) when Triton imports and there is no ``setup``; otherwise the same method
    with CUDA events (25 ms warm-up, 100 ms of runs, at least ``repeats``). CPU: a
    wall-clock loop of ``warmup`` untimed and at least ``repeats`` timed runs, more (up to
    ``max_repeats``) until the timed runs add up to ``min_time_ms``, so that short calls
    get enough samples to rise above scheduler noise.
    """
    device = torch.device(device)
    if device.type == "cuda":
        if setup is None:
            try:
                import triton.testing
            except ImportError:
                pass
            else:
                med, p20, p80 = triton.testing.do_bench(fn, grad_to_none=grad_to_none, quantiles=[0.5, 0.2, 0.8])
                return float(med), float(p20), float(p80)
        return _cuda_event_bench(fn, device, setup, grad_to_none, repeats)
    times: list[float] = []
    for i in range(warmup + max(repeats, 1) + max_repeats):
        if i >= warmup + repeats and (sum(times) >= min_time_ms or len(times) >= max(repeats, max_repeats)):
            break
        if setup is not None:
            setup()
        _reset_grads(grad_to_none)
        t0 = time.perf_counter()
        fn()
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    return _quantiles(times)


def _quantiles(times) -> tuple[float, float, float]:
    t = torch.tensor(times, dtype=torch.float64)
    return t.median().item(), t.quantile(0.2).item(), t.quantile(0.8).item()


def _cuda_event_bench(fn, device, setup, grad_to_none, min_repeats: int, warmup_ms: float = 25.0,
                      rep_ms: float = 100.0) -> tuple[float, float, float]:
    cache = torch.empty(256 * 2**20, dtype=torch.int8, device=device)  # flushed before each run, as do_bench

    def once() -> float:
        if setup is not None:
            setup()
        _reset_grads(grad_to_none)
        cache.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end)

    estimate = sorted(once() for _ in range(3))[1]
    for _ in range(max(1, int(warmup_ms / max(estimate, 1e-3)))):
        once()
    n = max(min_repeats, int(rep_ms / max(estimate, 1e-3)))
    return _quantiles([once() for _ in range(min(n, 1000))])


def available_memory_mb(device: torch.device | str = "cpu") -> float | None:
    """Memory a new allocation can still get: ``MemAvailable`` on the CPU, the free memory
    of the GPU on CUDA; ``None`` where it cannot be read."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] / 2**20
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is an allocator's out-of-memory error (CUDA or CPU)."""
    if isinstance(exc, getattr(torch, "OutOfMemoryError", ())):
        return True
    msg = str(exc).lower()
    return isinstance(exc, (RuntimeError, MemoryError)) and (
        isinstance(exc, MemoryError) or "out of memory" in msg or "can't allocate memory" in msg
        or "failed to allocate" in msg)


def time_split_ms(first: Callable[[], object], second: Callable[[object], object] | None = None,
                  device: torch.device | str = "cpu", *, warmup: int = 0, repeats: int = 3, min_time_ms: float = 0.0,
                  max_repeats: int = 100, grad_to_none=None) -> list[tuple[float, float, float]]:
    """Wall-clock ``(median, p20, p80)`` of ``x = first()``, of ``second(x)`` and of both,
    timed within the same iterations (synchronizing CUDA at each boundary) — on the CPU
    this times a forward, the backward that follows it and the whole step in one loop.
    At least ``repeats`` iterations, more (up to ``max_repeats``) until the whole steps add
    up to ``min_time_ms``. Without ``second``: one entry, ``first``'s."""
    device = torch.device(device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    a, b, ab = [], [], []
    i = 0
    while True:
        if i >= warmup + repeats and (sum(ab) >= min_time_ms or len(ab) >= max(repeats, max_repeats)):
            break
        _reset_grads(grad_to_none)
        sync()
        t0 = time.perf_counter()
        x = first()
        sync()
        t1 = time.perf_counter()
        if second is not None:
            second(x)
            sync()
        t2 = time.perf_counter()
        del x
        if i >= warmup:
            a.append((t1 - t0) * 1e3)
            b.append((t2 - t1) * 1e3)
            ab.append((t2 - t0) * 1e3)
        i += 1
    return [_quantiles(a)] if second is None else [_quantiles(a), _quantiles(b), _quantiles(ab)]


def peak_memory_split_mb(first: Callable[[], object], second: Callable[[object], object] | None = None,
                         device: torch.device | str = "cpu", *, pin: bool = True) -> list[float | None]:
    """Extra peak memory in MiB of ``x = first()`` (above the start), of ``second(x)``
    (above what was allocated when it started: ``first``'s outputs and what they keep
    alive) and of both (above the start) — a forward, its backward and the whole step read
    from one run. ``None`` entries where the peak cannot be read; one entry without
    ``second``. Same conditions as :func:`peak_memory_mb` (CPU: a fresh, pinned process);
    ``pin=False`` leaves the allocator alone (a rough reading that does not slow down the
    calling process for the rest of its life)."""
    device = torch.device(device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        x = first()
        torch.cuda.synchronize(device)
        peak1, mid = torch.cuda.max_memory_allocated(device), torch.cuda.memory_allocated(device)
        if second is None:
            del x
            return [(peak1 - base) / 2**20]
        torch.cuda.reset_peak_memory_stats(device)
        second(x)
        del x
        torch.cuda.synchronize(device)
        peak2 = torch.cuda.max_memory_allocated(device)
        return [(peak1 - base) / 2**20, (peak2 - mid) / 2**20, (max(peak1, peak2) - base) / 2**20]
    if pin:
        pin_cpu_allocator()
    if not _reset_cpu_peak():
        return [None] if second is None else [None, None, None]
    base = _status_kb("VmRSS")
    x = first()
    peak1, mid = _status_kb("VmHWM"), _status_kb("VmRSS")
    if second is None:
        del x
        return [(peak1 - base) / 1024]
    if not _reset_cpu_peak():
        return [(peak1 - base) / 1024, None, None]
    second(x)
    del x
    peak2 = _status_kb("VmHWM")
    return [(peak1 - base) / 1024, (peak2 - mid) / 1024, (max(peak1, peak2) - base) / 1024]
