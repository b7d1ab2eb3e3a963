"""The emulator's hazard checks catch real kernel bugs: each check is shown to bite on a mutant.

The CUDA kernels of ``csrc/`` are built here without torch (``kernel_driver.cpp`` links the
three ``.cu`` files and runs the backend's pipeline on fixed inputs, printing a hash of every
output), so a mutant needs one ``.cu`` file recompiled: seconds, where the torch extension
takes minutes. Mutants are built from a patched copy of ``csrc/`` in a temporary directory.

- The kernels as they are give bit-identical outputs under the default schedule and under
  perturbed ones (random thread order, preemption at shared stores, cp.async issue and
  ldmatrix, copies landing at once or at any moment before their wait).
- Removing any release barrier -- the ``__syncthreads()`` marked ``// RAL_RELEASE_BARRIER(name)``,
  which keeps a fast warp from overwriting a pipeline stage a slow warp still reads -- changes
  the outputs under a perturbed schedule (the default schedule, in which warps advance in near
  lockstep, does not see it).
- A shared-memory pad that misaligns the tile rows fails the launch (alignment trap).

The third mutation of issue 17 (swapped ldmatrix halves, caught by the one-hot layout check)
is in tests/benchmarks/test_gpu_cuda_checks.py, beside the GPU step that runs the same check.
"""

from __future__ import annotations

import concurrent.futures
import os
import pathlib
import re
import shutil
import subprocess

import pytest

from conftest import PERTURBED_SCHEDULES, mutant_csrc
from ral_kernels.backends.cuda.build import CSRC, EMU_FLAGS, KERNEL_NAMES

HERE = pathlib.Path(__file__).resolve().parent
GXX = shutil.which("g++")

pytestmark = pytest.mark.skipif(GXX is None, reason="g++ not found: the kernel checks compile C++ programs")

# -O1: mutants compile in about half the time of -O2 and the driver still runs in seconds.
FLAGS = ["-std=c++17", "-O1", *(f for f in EMU_FLAGS if not f.startswith("-O"))]
BARRIER = re.compile(r"__syncthreads\(\);\s*// RAL_RELEASE_BARRIER\((\w+)\)")
# The release barriers of the cp.async pipelines (issue 17) and of the divergence passes' per-head
# tiles; the kernels may mark more.
EXPECTED_BARRIERS = {"fwd", "dkdv", "dq", "div"}


def release_barriers(csrc: pathlib.Path = CSRC) -> dict[str, str]:
    """Marker name -> the kernel file that holds it."""
    found: dict[str, str] = {}
    for name in KERNEL_NAMES:
        for tag in BARRIER.findall((csrc / name).read_text()):
            assert tag not in found, f"RAL_RELEASE_BARRIER({tag}) is marked twice"
            found[tag] = name
    return found


BARRIERS = release_barriers()


def compile_to(out: pathlib.Path, source: pathlib.Path, csrc: pathlib.Path) -> list[str]:
    """The g++ command that compiles `source` (a .cu file as C++) against the emulator in `csrc`."""
    return [GXX, *FLAGS, "-I", str(csrc), "-I", str(csrc / "emu"), *(["-x", "c++"] if source.suffix == ".cu" else []),
            "-c", str(source), "-o", str(out)]


def run_all(commands: list[list[str]]) -> None:
    """Runs compiler commands in parallel, two at a time."""
    def one(cmd):
        return subprocess.run(cmd, capture_output=True, text=True)

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        for cmd, proc in zip(commands, pool.map(one, commands)):
            assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}{proc.stderr}"


def barrier_line(name: str) -> str:
    return next(l for l in (CSRC / BARRIERS[name]).read_text().splitlines() if f"RAL_RELEASE_BARRIER({name})" in l)


# Mutant name -> (file patched, old text, new text, kernel file rebuilt from the patched copy).
MUTANTS = {
    **{f"no-{name}-barrier": (file, barrier_line(name), barrier_line(name).replace("__syncthreads();", "", 1), file)
       for name, file in BARRIERS.items()},
    # Rows of HD + 4 halves: every other tile row starts 8 bytes off a 16-byte boundary.
    "misaligned-pad": ("kernel_utils.cuh", "constexpr int kPad = 8;", "constexpr int kPad = 4;", "attn_fwd.cu"),
}


@pytest.fixture(scope="module")
def builds(tmp_path_factory) -> dict[str, pathlib.Path]:
    """The driver linked with csrc/'s kernels ("original") and with each mutant's, all compiled
    in one batch, two at a time."""
    tmp = tmp_path_factory.mktemp("kernels")
    objs = {"driver": tmp / "driver.o", **{name: tmp / f"{pathlib.Path(name).stem}.o" for name in KERNEL_NAMES}}
    commands = [compile_to(objs["driver"], HERE / "kernel_driver.cpp", CSRC)]
    commands += [compile_to(objs[name], CSRC / name, CSRC) for name in KERNEL_NAMES]
    mutant_objs = {}
    for mutant, (patched, old, new, rebuilt) in MUTANTS.items():
        csrc = mutant_csrc(tmp / mutant, patched, old, new)
        mutant_objs[mutant] = (rebuilt, tmp / mutant / "kernel.o")
        commands.append(compile_to(mutant_objs[mutant][1], csrc / rebuilt, csrc))
    run_all(commands)

    def link(out: pathlib.Path, replaced: dict[str, pathlib.Path]) -> pathlib.Path:
        subprocess.run([GXX, str(objs["driver"]), *(str(replaced.get(n, objs[n])) for n in KERNEL_NAMES), "-o", str(out)],
                       check=True)
        return out

    exes = {"original": link(tmp / "kernel_driver", {})}
    for mutant, (rebuilt, obj) in mutant_objs.items():
        exes[mutant] = link(tmp / mutant / "kernel_driver", {rebuilt: obj})
    return exes


def drive(exe: pathlib.Path, passes: str, hd: int, schedule: str = "") -> str:
    """The driver's output hash, or its error line, under `schedule` ("" = the default)."""
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("RAL_EMU_")}, "RAL_EMU_SCHEDULE": schedule}
    proc = subprocess.run([str(exe), passes, str(hd)], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode in (0, 2), f"kernel_driver exited {proc.returncode}:\n{proc.stdout}{proc.stderr}"
    return proc.stdout.strip()


@pytest.fixture(scope="module")
def reference(builds) -> str:
    """The correct outputs' hash: the kernels as they are, default schedule, head dim 64."""
    out = drive(builds["original"], "all", 64)
    assert out.startswith("hash="), out
    return out


@pytest.mark.parametrize("hd", [64, 128])
def test_kernels_are_bit_identical_under_every_schedule(builds, reference, hd):
    default = reference if hd == 64 else drive(builds["original"], "all", hd)
    assert default.startswith("hash="), default
    for schedule in PERTURBED_SCHEDULES:
        assert drive(builds["original"], "all", hd, schedule) == default, schedule


def test_release_barriers_are_marked():
    """Each pipelined kernel marks the barrier that releases a stage; the mutation test below
    removes each in turn, so keep the markers when editing the kernels."""
    assert EXPECTED_BARRIERS <= set(BARRIERS), BARRIERS


@pytest.mark.parametrize("name", sorted(BARRIERS))
def test_missing_release_barrier_fails_under_a_perturbed_schedule(name, builds, reference):
    results = {s: drive(builds[f"no-{name}-barrier"], "all", 64, s) for s in PERTURBED_SCHEDULES}
    print(f"without RAL_RELEASE_BARRIER({name}):", results)
    assert any(r != reference for r in results.values()), f"no perturbed schedule caught the missing barrier: {results}"


def test_misaligned_shared_rows_fail_the_launch(builds):
    """Tile rows off 16-byte boundaries: a GPU's ldmatrix, cp.async and 16-byte stores fault or
    misread there; the emulator fails the launch and says where."""
    out = drive(builds["misaligned-pad"], "fwd", 64)
    assert out.startswith("error: attn_fwd") and ("misaligned" in out or "not 16-byte aligned" in out), out
