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
    device = torch.device(device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    pin_cpu_allocator()
    if not _reset_cpu_peak():
        return None
    base = _status_kb("VmRSS")
    fn()
    return (_status_kb("VmHWM") - base) / 1024


def in_fresh_process(fn: Callable, *args):
    """``fn(*args)`` in a new Python process (spawned, so nothing is inherited), for
    peak-memory readings free of what this process's allocator holds. ``fn`` must be a
    module-level function and its arguments picklable."""
    import concurrent.futures
    import multiprocessing

    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()
