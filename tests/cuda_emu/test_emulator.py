"""Tests of the CPU emulation of CUDA in ``csrc/emu/cuda_emu.h``.

The checks are C++ programs (``emu_checks.cpp`` plus a second translation unit) written like the
kernels in ``csrc/*.cu``. They are built twice, with the default context switch (assembly on
x86-64) and with the portable ucontext fallback, and each check runs as one process.
Conversions to fp16/bf16 are compared here with numpy and torch.
"""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch

HERE = pathlib.Path(__file__).resolve().parent
EMU_DIR = HERE.parents[1] / "csrc" / "emu"
GXX = shutil.which("g++")

pytestmark = pytest.mark.skipif(GXX is None, reason="g++ not found: the CUDA emulator tests compile C++ programs")

VARIANTS = {"default": [], "ucontext": ["-DRAL_EMU_UCONTEXT"]}

CHECKS = [
    "indices",  # threadIdx/blockIdx/blockDim/gridDim/lane over a 3-D grid, block order
    "reduce_static",  # __syncthreads ordering: tree reduction in a static __shared__ array
    "reduce_dynamic",  # the same in ral_emu::dynamic_smem(), which is 16-byte aligned
    "smem_fill",  # dynamic shared memory reads 0xFF before it is written, in every block
    "shuffles",  # __shfl_sync/__shfl_xor_sync against CUDA's definitions, all widths, 4 types
    "allgather",  # ral_emu::warp_allgather, full and partial warps, aliasing arguments
    "predicates",  # __syncthreads_or/_and/_count
    "partial_warp",  # a last warp of 16 lanes: collectives use only existing lanes
    "deadlock_exit",  # threads return before __syncthreads: failure, unwinding, next launch works
    "deadlock_mixed",  # lanes stuck in __syncwarp while others wait in __syncthreads
    "collective_errors",  # mismatched collectives, partial masks, bad widths
    "exception",  # exceptions thrown by kernel code, nested launches
    "invalid_config",  # bad grid/block shapes, dynamic shared memory limits
    "arch_limits",  # per-arch shared-memory limits (sm_80/86/87/89/90/100/120)
    "schedules",  # reverse / random orders, preemption, replay by seed; a missing barrier is caught
    "cp_async",  # copies landing at the wait, at issue or at random; wait_group; alignment traps
    "alignment",  # misaligned ldmatrix rows and typed loads / stores fail the launch
    "ownership",  # two blocks writing one byte, or a block writing an input, fail the launch
    "misc",  # vector types, qualifiers, bit casts, intrinsics, by-value parameters
    "second_tu",  # the header included by two translation units of one program
]


def _compile(sources: list[pathlib.Path], out: pathlib.Path, flags: list[str]) -> list[subprocess.Popen]:
    """Starts one compile per source (objects next to ``out``); returns the processes."""
    procs = []
    for src in sources:
        cmd = [GXX, "-std=c++17", "-O2", "-Wall", "-Wextra", "-DRAL_CPU_EMULATION", "-fsanitize=alignment", *flags,
               "-I", str(EMU_DIR), "-c", str(src), "-o", str(out.with_name(f"{out.name}-{src.stem}.o"))]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return procs


@pytest.fixture(scope="module")
def builds(tmp_path_factory) -> dict[str, pathlib.Path]:
    """Both variants of emu_checks, compiled in parallel into a temporary directory."""
    tmp = tmp_path_factory.mktemp("cuda_emu")
    sources = [HERE / "emu_checks.cpp", HERE / "emu_checks_tu2.cpp"]
    exes = {name: tmp / f"emu_checks_{name}" for name in VARIANTS}
    procs = {name: _compile(sources, exes[name], flags) for name, flags in VARIANTS.items()}
    for name, exe in exes.items():
        for proc in procs[name]:
            output, _ = proc.communicate()
            assert proc.returncode == 0, f"compiling {name} failed:\n{output}"
        objects = [str(exe.with_name(f"{exe.name}-{src.stem}.o")) for src in sources]
        subprocess.run([GXX, *objects, "-o", str(exe)], check=True)
    return exes


def run_checks(exe: pathlib.Path, *args: str, env: dict | None = None) -> str:
    # The checks expect the emulator's defaults, whatever RAL_EMU_* this run was started with.
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("RAL_EMU_")}, **(env or {})}
    proc = subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, f"emu_checks {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}"
    return proc.stdout


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("check", CHECKS)
def test_check(builds, check, variant):
    run_checks(builds[variant], check)


@pytest.mark.parametrize("env, want", [
    ({}, "schedule=inorder:seed=0,preempt=0,landing=wait arch=80\nlaunch=no error"),
    ({"RAL_EMU_SCHEDULE": "random:seed=5,landing=issue", "RAL_EMU_ARCH": "86"},
     "schedule=random:seed=5,preempt=0,landing=issue arch=86\nlaunch=no error"),
    ({"RAL_EMU_SCHEDULE": "sideways"}, 'launch=invalid argument ral_emu: RAL_EMU_SCHEDULE: bad schedule "sideways"'),
    ({"RAL_EMU_ARCH": "75"}, "launch=invalid argument ral_emu: RAL_EMU_ARCH=75: expected one of 80,"),
], ids=["default", "set", "bad-schedule", "bad-arch"])
def test_environment_configures_schedule_and_arch(builds, env, want):
    """RAL_EMU_SCHEDULE / RAL_EMU_ARCH, read at startup; a bad value fails every launch, saying why."""
    assert want in run_checks(builds["default"], "config", env=env)


def test_syncwarp_switch_cost(builds):
    """1e6 __syncwarp() calls spread over a 128-thread block (7813 per thread)."""
    out = run_checks(builds["default"], "bench", "7813")
    ns = float(re.search(r"ns_per_call=([0-9.]+)", out).group(1))
    print(out.strip())
    # Around 15 ns on x86-64; a system call per switch (swapcontext) costs ~500 ns.
    assert ns < 300, out


def _f32(bits) -> np.ndarray:
    return np.asarray(bits, dtype=np.uint32).view(np.float32)


def _conversion_inputs() -> np.ndarray:
    """Random bit patterns plus every rounding tie of fp16 and bf16, with neighbours and specials."""
    rng = np.random.default_rng(0)
    random_bits = _f32(rng.integers(0, 2**32, size=200_000, dtype=np.uint64))
    halves = np.arange(0x7C00, dtype=np.uint16).view(np.float16).astype(np.float32)  # finite, >= 0
    half_ties = np.append((halves[:-1] + halves[1:]) / 2, np.float32(65520))  # exact in float32
    bf16_ties = _f32((np.arange(0x7F80, dtype=np.uint32) << 16) | 0x8000)
    ties = np.concatenate([half_ties, bf16_ties])
    near = np.concatenate([ties, np.nextafter(ties, np.float32(np.inf)), np.nextafter(ties, np.float32(0))])
    specials = np.array(
        [0.0, np.inf, np.nan, 65504, 65519.996, 65536, 1e-8, 2**-14, 2**-24, 2**-25, 1.5 * 2**-25, 1e30],
        dtype=np.float32,
    )
    tiny = _f32([1, 0x7FFFFF, 0x800000, 0x7F7FFFFF, 0x7F800001, 0x7FC00000, 0x33000001])
    signed = np.concatenate([near, specials, tiny])
    return np.concatenate([random_bits, signed, -signed])


def test_half_bfloat16_conversions(builds, tmp_path):
    values = _conversion_inputs()
    n = values.size
    (tmp_path / "in.bin").write_bytes(values.tobytes())
    run_checks(builds["default"], "convert", str(tmp_path / "in.bin"), str(tmp_path / "out.bin"))
    out = (tmp_path / "out.bin").read_bytes()
    half = np.frombuffer(out, np.uint16, n)
    bf16 = np.frombuffer(out, np.uint16, n, offset=2 * n)
    from_half = np.frombuffer(out, np.uint32, 65536, offset=4 * n)
    from_bf16 = np.frombuffer(out, np.uint32, 65536, offset=4 * n + 4 * 65536)

    nan = np.isnan(values)
    with np.errstate(over="ignore", invalid="ignore"):
        want_half = values.astype(np.float16).view(np.uint16)
    want_bf16 = torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    bad = np.flatnonzero((half != want_half) & ~nan)
    assert bad.size == 0, [(hex(values[i:i + 1].view(np.uint32)[0]), hex(half[i]), hex(want_half[i])) for i in bad[:10]]
    bad = np.flatnonzero((bf16 != want_bf16) & ~nan)
    assert bad.size == 0, [(hex(values[i:i + 1].view(np.uint32)[0]), hex(bf16[i]), hex(want_bf16[i])) for i in bad[:10]]
    assert (half[nan] == 0x7FFF).all() and (bf16[nan] == 0x7FFF).all()  # CUDA's canonical NaN

    patterns = np.arange(65536, dtype=np.uint16)
    for got, dtype in ((from_half, torch.float16), (from_bf16, torch.bfloat16)):
        want = torch.from_numpy(patterns.view(np.int16)).view(dtype).float().numpy()
        got_f = got.view(np.float32)
        assert np.array_equal(np.isnan(got_f), np.isnan(want))
        finite_or_inf = ~np.isnan(want)
        assert np.array_equal(got[finite_or_inf], want.view(np.uint32)[finite_or_inf]), dtype
