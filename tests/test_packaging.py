"""Packaging: ``python -m build`` makes an sdist and, from it, a wheel; both carry the kernel
sources; the wheel installed into a fresh virtual environment finds them and runs the op on
``torch`` and on ``cuda`` (the CPU emulator, built from the installed sources), and its
commands (``ral-bench`` on one provider, ``--version``) work.

The venv reuses this interpreter's packages (``--system-site-packages``: torch and the rest
are not installed again) and pip gets no index: the project itself needs no network. The
emulator build in the venv shares the extension cache with this session (the build compiles
a staged copy of the sources, see ``load_emulator``), so after ``test_cuda_backend`` it
compiles nothing; on its own this file builds the emulator once (a minute or two).
"""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import pytest
import torch

from conftest import Case, assert_close, assert_within_plain_error, make_inputs, op_kwargs, run_op
from ral_kernels import __version__, fused_attn_kl
from ral_kernels.backends.cuda import build as cuda_build

ROOT = Path(__file__).resolve().parents[1]
# Every file the JIT build and the emulator compile or include.
NEEDED = sorted(p.relative_to(cuda_build.CSRC).as_posix() for p in (cuda_build.BINDINGS, *cuda_build.KERNEL_SOURCES,
                                                                     *cuda_build.HEADERS))
CASE = Case(b=2, hq=4, hk=2, tq=29, tk=29, d=16, dv=16, ho=4, hko=2, do=16, n_old=11, key_mask=True,
            query_mask=True)


def _run(cmd, timeout=900, **kwargs) -> subprocess.CompletedProcess:
    t0 = time.perf_counter()
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kwargs)
    took = time.perf_counter() - t0
    assert proc.returncode == 0, (f"{' '.join(map(str, cmd))} exited {proc.returncode} after {took:.0f} s\n"
                                  f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}")
    shown = [Path(str(cmd[0])).name] + [str(c)[:40] for c in cmd[1:4] if str(c) != "-c"]
    print(f"{' '.join(shown)}: {took:.1f} s")
    return proc


def _shipped_sources() -> set[str]:
    """What must ship: csrc's files by the package's patterns, and (in a git checkout) every
    tracked file of csrc/, so a new kernel file cannot be left out by the patterns."""
    files = {p.as_posix() for p in cuda_build.source_files(ROOT / "csrc")}
    git = subprocess.run(["git", "ls-files", "csrc"], cwd=ROOT, capture_output=True, text=True)
    if git.returncode == 0 and git.stdout.strip():
        tracked = {line.removeprefix("csrc/") for line in git.stdout.split()}
        assert tracked <= files, f"tracked in csrc/ but not shipped (SOURCE_PATTERNS): {sorted(tracked - files)}"
    return files


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> dict:
    """The sdist and the wheel built from it, the way pip builds them by default: build
    isolation hides torch, so no prebuilt ral_kernels._C (RAL_SKIP_CUDA_BUILD makes that so
    here too, where torch is visible)."""
    out = tmp_path_factory.mktemp("dist")
    env = {**os.environ, "RAL_SKIP_CUDA_BUILD": "1"}
    _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", out, ROOT], env=env)
    (sdist,), (wheel,) = sorted(out.glob("*.tar.gz")), sorted(out.glob("*.whl"))
    return {"sdist": sdist, "wheel": wheel}


def test_sdist_and_wheel_carry_the_kernel_sources(dist):
    expected = _shipped_sources()
    assert set(NEEDED) <= expected, f"build.py compiles files that do not ship: {sorted(set(NEEDED) - expected)}"
    assert dist["wheel"].name == f"ral_kernels-{__version__}-py3-none-any.whl"
    with zipfile.ZipFile(dist["wheel"]) as whl:
        names = whl.namelist()
        meta = whl.read(f"ral_kernels-{__version__}.dist-info/METADATA").decode()
        scripts = whl.read(f"ral_kernels-{__version__}.dist-info/entry_points.txt").decode()
    in_wheel = {n.removeprefix("ral_kernels/csrc/") for n in names if n.startswith("ral_kernels/csrc/")}
    assert in_wheel == expected, f"missing {sorted(expected - in_wheel)}, extra {sorted(in_wheel - expected)}"
    assert not any(n.startswith("csrc/") for n in names), "the sources belong inside the package"
    assert "ral_kernels/backends/cuda/build.py" in names and "ral_trainer/demo.py" in names

    assert f"Version: {__version__}" in meta.splitlines()
    assert "Provides-Extra: flash" in meta.splitlines()
    flash = [line for line in meta.splitlines() if line.startswith("Requires-Dist: flash-attn")]
    assert flash and 'platform_machine == "x86_64"' in flash[0] and 'extra == "flash"' in flash[0], flash
    assert all(f"Requires-Dist: {dep}" in meta for dep in ("torch>=2.5", "ninja"))
    for command in ("ral-bench", "ral-train", "ral-demo"):
        assert f"{command} = " in scripts

    with tarfile.open(dist["sdist"]) as tar:
        top = f"ral_kernels-{__version__}/"
        in_sdist = {n.removeprefix(top) for n in tar.getnames()}
    assert {f"csrc/{f}" for f in expected} <= in_sdist
    assert {"setup.py", "pyproject.toml", "ral_kernels/backends/cuda/build.py"} <= in_sdist


@pytest.fixture(scope="module")
def venv(dist, tmp_path_factory) -> dict:
    """A fresh venv with the wheel installed; ``env`` and ``cwd`` keep the checkout off its
    path (no PYTHONPATH, a working directory outside the checkout)."""
    where = tmp_path_factory.mktemp("venv")
    env_dir = where / "env"
    _run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", env_dir])
    python = env_dir / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["RAL_CUDA_EMULATION"] = "1"
    # pip from the system site; --no-index: the dependencies must already be satisfied.
    _run([python, "-m", "pip", "install", "--no-index", "--disable-pip-version-check", dist["wheel"]],
         env=env, cwd=where)
    site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], env=env,
                     cwd=where).stdout.strip())
    return {"python": python, "bin": env_dir / "bin", "env": env, "cwd": where, "package": site / "ral_kernels"}


# Runs in the venv: backend BACKEND on the saved inputs, forward and backward with the saved
# upstream gradients; saves (out, div, dq, dk, dv) and where the package and its sources are.
_OP_SCRIPT = """
import sys, torch, ral_kernels
from ral_kernels.backends.cuda import build
backend, path = sys.argv[1], sys.argv[2]
x = torch.load(path)
q, k, v = (x[n].clone().requires_grad_() for n in ("q", "k", "v"))
out, div = ral_kernels.fused_attn_kl(q, k, v, x["q_old"], x["k_old"], query_mask=x["query_mask"],
                                     key_mask=x["key_mask"], backend=backend, **x["kwargs"])
((out * x["go"].to(out.dtype)).sum() + (div * x["gd"].to(div.dtype)).sum()).backward()
torch.save({"got": (out.detach(), div.detach(), q.grad, k.grad, v.grad), "package": ral_kernels.__file__,
            "csrc": str(build.CSRC), "version": ral_kernels.__version__}, path + ".out")
"""


def _run_in_venv(venv, backend: str, dtype: torch.dtype, tmp_path) -> tuple[dict, tuple]:
    """Run the op in the venv; returns its results and the reference's upstream gradients."""
    x = make_inputs(CASE, dtype, seed=3)
    kw = op_kwargs(CASE)
    _, (go, gd) = run_op(lambda *a, **k: fused_attn_kl(*a, backend="reference", **k), x, kw)
    path = tmp_path / f"{backend}.pt"
    torch.save({**x, "kwargs": kw, "go": go, "gd": gd}, path)
    _run([venv["python"], "-c", _OP_SCRIPT, backend, path], env=venv["env"], cwd=venv["cwd"])
    res = torch.load(str(path) + ".out")
    assert Path(res["package"]).parent == venv["package"], f"imported {res['package']}, not the installed wheel"
    assert Path(res["csrc"]) == venv["package"] / "csrc"
    assert res["version"] == __version__
    return res, (go, gd)


def _reference(dtype, upstream):
    return run_op(lambda *a, **k: fused_attn_kl(*a, backend="reference", **k), make_inputs(CASE, dtype, seed=3),
                  op_kwargs(CASE), upstream=upstream)[0]


def test_installed_wheel_runs_torch_backend(venv, tmp_path):
    res, upstream = _run_in_venv(venv, "torch", torch.float64, tmp_path)
    exact = _reference(torch.float64, upstream)
    for name, got, want in zip(("out", "div", "dq", "dk", "dv"), res["got"], exact):
        assert_close(got, want, atol=1e-10, rtol=1e-8, name=name)


@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "c++")) is None, reason="no C++ compiler for the CPU emulator")
def test_installed_wheel_runs_cuda_backend_in_the_emulator(venv, tmp_path):
    """The emulator is built from the installed copy of the sources (the venv's own
    ``ral_kernels/csrc``: a missing file there fails the build), fp16 against the
    float64 reference within 2x (3x for gradients) of the dense fp16 path's error."""
    res, upstream = _run_in_venv(venv, "cuda", torch.float16, tmp_path)
    assert_within_plain_error(res["got"], _reference(torch.float16, upstream), _reference(torch.float64, upstream))


def test_installed_commands(venv, tmp_path):
    out = tmp_path / "bench"
    _run([venv["bin"] / "ral-bench", "--quick", "--providers", "torch", "--seq-lens", "256", "--modes", "full",
          "--repeats", "1", "--isolation", "none", "--no-progress", "--out", out], env=venv["env"], cwd=venv["cwd"])
    with open(out / "fused_attn_kl.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["provider"], r["mode"], r["seq_len"], r["status"]) for r in rows] == [("torch", "full", "256", "ok")]
    assert float(rows[0]["median_ms"]) > 0

    for command in ("ral-bench", "ral-train", "ral-demo"):
        text = _run([venv["bin"] / command, "--version"], env=venv["env"], cwd=venv["cwd"]).stdout
        assert text.startswith(f"{command} {__version__} (ral_kernels at {venv['package']})"), text
        assert f"kernel sources: {venv['package'] / 'csrc'}" in text
        assert "flash-attn " in text and "CPU emulator (RAL_CUDA_EMULATION=1): " in text


def test_emulator_stage_mirrors_the_sources(tmp_path):
    """The staged copy the emulator compiles: changed files rewritten, unchanged ones left
    alone (ninja's timestamps), removed ones deleted (no stale header is compiled)."""
    src, stage = tmp_path / "csrc", tmp_path / "stage"
    (src / "emu").mkdir(parents=True)
    (src / "a.cu").write_text("a")
    (src / "b.cuh").write_text("b")
    (src / "emu" / "c.h").write_text("c")
    (src / "notes.md").write_text("docs are not compiled")
    cuda_build._stage(src, stage)
    assert sorted(p.relative_to(stage).as_posix() for p in stage.rglob("*") if p.is_file()) == \
        ["a.cu", "b.cuh", "emu/c.h"]
    os.utime(stage / "b.cuh", (1, 1))
    (src / "a.cu").write_text("a2")
    (src / "emu" / "c.h").unlink()
    cuda_build._stage(src, stage)
    assert (stage / "a.cu").read_text() == "a2"
    assert (stage / "b.cuh").stat().st_mtime == 1
    assert not (stage / "emu" / "c.h").exists()
