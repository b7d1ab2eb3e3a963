"""Shared test helpers: input factories with readable ids and one ``assert_close``."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import zlib

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's interpreter; it must be switched on
# before anything imports triton.
# Likewise the CUDA C++ kernels run in the CPU emulator (csrc/emu).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("RAL_CUDA_EMULATION", "1")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# CPU-emulator schedules that stand in for a GPU's warps drifting apart (csrc/emu/cuda_emu.h):
# random thread order, preemption at shared stores, cp.async issue and ldmatrix, and cp.async
# copies landing at once or at any moment before their wait. Each of them catches every missing
# release barrier (tests/cuda_emu/test_kernel_checks.py).
PERTURBED_SCHEDULES = ("random:seed=1,preempt=0.25,landing=issue", "random:seed=2,preempt=0.1,landing=random")
HAS_TRITON = importlib.util.find_spec("triton") is not None
ON_GPU = DEVICE == "cuda"


def backends_under_test() -> list[str]:
    """Every non-reference backend that can run here (Triton: interpreter on the CPU)."""
    return ["torch"] + (["triton"] if HAS_TRITON else [])


def oracle_dtype(backend: str):
    """The dtype a backend is checked in against the float64 oracle: float64 where it
    computes in float64, float32 otherwise."""
    return torch.float64 if backend == "torch" else torch.float32


@dataclasses.dataclass(frozen=True)
class Case:
    """One problem shape. ``ho``/``hko``/``do`` describe the old policy (teacher);
    ``n_old`` is the number of cached old rows (the last rows of the query)."""

    b: int = 2
    hq: int = 4
    hk: int = 2
    tq: int = 37
    tk: int = 37
    d: int = 16
    dv: int = 16
    ho: int = 4
    hko: int = 2
    do: int = 16
    n_old: int | None = None
    causal: bool = True
    divergence: str = "jsd"
    head_reduction: str = "mean"
    exclude_self: bool = False
    query_mask: bool = False
    key_mask: bool = False
    lse_old: bool = False
    sharp: float = 1.0

    @property
    def id(self) -> str:
        parts = [f"B{self.b}-H{self.hq}-K{self.hk}-T{self.tq}x{self.tk}-D{self.d}"]
        if (self.ho, self.hko, self.do) != (self.hq, self.hk, self.d):
            parts.append(f"old{self.ho}x{self.hko}x{self.do}")
        if self.n_old is not None:
            parts.append(f"R{self.n_old}")
        parts.append("causal" if self.causal else "full")
        parts += [self.divergence, self.head_reduction]
        for flag in ("exclude_self", "query_mask", "key_mask", "lse_old"):
            if getattr(self, flag):
                parts.append(flag)
        if self.sharp != 1.0:
            parts.append(f"sharp{self.sharp:g}")
        return "-".join(parts)


def mutant_csrc(tmp, file: str, old: str, new: str):
    """A copy of the repository's csrc/ under ``tmp`` with ``old`` replaced by ``new`` (it must
    occur exactly once) in ``file``: mutation tests build the kernels or the emulator from it."""
    import shutil

    from ral_kernels.backends.cuda.build import CSRC

    csrc = tmp / "csrc"
    shutil.copytree(CSRC, csrc)
    text = (csrc / file).read_text()
    assert text.count(old) == 1, f"{old!r} occurs {text.count(old)} times in {file}"
    (csrc / file).write_text(text.replace(old, new))
    return csrc


def seed_of(text: str) -> int:
    return zlib.crc32(text.encode())


def make_inputs(case: Case, dtype=torch.float64, seed: int = 0, device="cpu"):
    """Fresh random inputs (never zeros). Masks leave some rows with no key when
    ``key_mask`` is set (the whole second sequence's keys are masked out)."""
    g = torch.Generator().manual_seed(seed)
    n_old = case.tq if case.n_old is None else case.n_old

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(device)

    s = case.sharp
    q = rnd(case.b, case.hq, case.tq, case.d, scale=s)
    k = rnd(case.b, case.hk, case.tk, case.d)
    v = rnd(case.b, case.hk, case.tk, case.dv)
    q_old = rnd(case.b, case.ho, n_old, case.do, scale=s)
    k_old = rnd(case.b, case.hko, case.tk, case.do)
    query_mask = key_mask = None
    if case.query_mask:
        query_mask = torch.rand(case.b, case.tq, generator=g) < 0.7
        query_mask[:, : case.tq - n_old] = False
        query_mask = query_mask.to(device)
    if case.key_mask:
        key_mask = torch.rand(case.b, case.tk, generator=g) < 0.75
        if case.b > 1:
            key_mask[1] = False  # a sequence whose rows have no key at all
        key_mask = key_mask.to(device)
    return dict(q=q, k=k, v=v, q_old=q_old, k_old=k_old, query_mask=query_mask, key_mask=key_mask)


def op_kwargs(case: Case) -> dict:
    return dict(causal=case.causal, divergence=case.divergence, head_reduction=case.head_reduction,
                exclude_self=case.exclude_self)


def run_op(fn, inputs: dict, kwargs: dict, seed: int = 1, upstream=None):
    """Run ``fn`` (``fused_attn_kl`` with a backend bound), backprop random weights through
    both outputs; returns ``(out, div, dq, dk, dv)`` and the upstream grads used."""
    q, k, v = (inputs[n].detach().clone().requires_grad_() for n in ("q", "k", "v"))
    out, div = fn(q, k, v, inputs["q_old"], inputs["k_old"], query_mask=inputs["query_mask"],
                  key_mask=inputs["key_mask"], lse_old=inputs.get("lse_old"), **kwargs)
    if upstream is None:
        g = torch.Generator().manual_seed(seed)
        upstream = (torch.randn(out.shape, generator=g, dtype=torch.float64),
                    torch.randn(div.shape, generator=g, dtype=torch.float64))
    go, gd = upstream
    ((out * go.to(out.dtype).to(out.device)).sum() + (div * gd.to(div.dtype).to(div.device)).sum()).backward()
    return (out.detach(), div.detach(), q.grad, k.grad, v.grad), upstream


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_close(actual, expected, *, atol: float, rtol: float = 0.0, name: str = "") -> None:
    """``|actual - expected| <= atol + rtol * |expected|``, printing max and mean error."""
    a, e = actual.double().cpu(), expected.double().cpu()
    assert a.shape == e.shape, f"{name}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    assert torch.isfinite(a).all(), f"{name}: non-finite values"
    err = (a - e).abs()
    bound = atol + rtol * e.abs()
    bad = err > bound
    assert not bad.any(), (f"{name}: {int(bad.sum())}/{a.numel()} elements off; max err {err.max().item():.3e}, "
                           f"mean err {err.mean().item():.3e}, atol {atol:g}, rtol {rtol:g}")


@pytest.fixture
def small_blocks(monkeypatch):
    """Shrink the torch backend's tiles so odd sizes cross several tile boundaries."""
    from ral_kernels.backends import torch as torch_backend

    monkeypatch.setattr(torch_backend, "BLOCK_Q", 16)
    monkeypatch.setattr(torch_backend, "BLOCK_K", 32)


@pytest.fixture
def poison(monkeypatch):
    """Fill the backends' output buffers with NaN before the kernels write them."""
    from ral_kernels.backends import torch as torch_backend
    from ral_kernels.backends.cuda import launch as cuda_backend

    def nan_alloc(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(torch_backend, "_alloc", nan_alloc)
    monkeypatch.setattr(cuda_backend, "_alloc", nan_alloc)
    if HAS_TRITON:
        from ral_kernels.backends.triton import launch as triton_backend

        monkeypatch.setattr(triton_backend, "_alloc", nan_alloc)


def assert_within_plain_error(got, plain, exact, *, names=("out", "div", "dq", "dk", "dv"), floor=1e-6):
    """flash-attention's tolerance idiom: a backend's error against a float64 oracle stays
    within 2x (3x for gradients) of the dense PyTorch path's error in the same precision,
    plus ``floor`` times the magnitude of the quantity (rounding of the last ulp)."""
    for i, name in enumerate(names):
        factor = 2.0 if i < 2 else 3.0
        a, p, e = got[i].double().cpu(), plain[i].double().cpu(), exact[i].double().cpu()
        assert a.shape == e.shape, f"{name}: shape {tuple(a.shape)} != {tuple(e.shape)}"
        assert torch.isfinite(a).all(), f"{name}: non-finite values"
        err, ref_err = max_err(a, e), max_err(p, e)
        bound = factor * ref_err + floor * max(1.0, e.abs().max().item() if e.numel() else 0.0)
        assert err <= bound, (f"{name}: max error {err:.3e} (mean {(a - e).abs().mean().item():.3e}) vs "
                              f"plain PyTorch {ref_err:.3e}, bound {bound:.3e}")


def largest_new_tensor(fn) -> int:
    """The element count of the largest tensor any op creates while ``fn()`` runs (the
    cost-model tests: nothing may be ``Tq x Tk``)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        numel = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            res = func(*args, **(kwargs or {}))
            for t in res if isinstance(res, (tuple, list)) else (res,):
                if isinstance(t, torch.Tensor):
                    Largest.numel = max(Largest.numel, t.numel())
            return res

    with Largest():
        fn()
    return Largest.numel
