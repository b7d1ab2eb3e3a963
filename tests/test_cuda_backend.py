"""backend="cuda" (csrc/) against the dense reference: outputs and gradients in fp16 / bf16.

On a GPU the kernels run for real; without one they run in the CPU emulator
(RAL_CUDA_EMULATION=1, set by conftest), which executes the same kernel sources thread by
thread, mma.sync fragments included. The extension (or the emulator build) is compiled
once per machine, which takes a minute or two.
"""

from __future__ import annotations

import contextlib
import functools

import pytest
import torch

from conftest import (DEVICE, ON_GPU, PERTURBED_SCHEDULES, Case, assert_close, assert_within_plain_error,
                      largest_new_tensor, make_inputs, op_kwargs, run_op)
from ral_kernels import BackendUnavailableError, fused_attn_kl, fused_attn_kl_varlen, make_old_policy_cache
from ral_kernels.backends import unavailable_reason
from test_fused_attn_kl import CASES, to64, with_lse_old
from test_varlen import LENS, cu, packed

WHY_NOT = unavailable_reason("cuda", torch.device(DEVICE))
pytestmark = pytest.mark.skipif(WHY_NOT is not None, reason=f"backend='cuda' cannot run here: {WHY_NOT}")

DTYPES = [pytest.param(torch.float16, id="fp16"), pytest.param(torch.bfloat16, id="bf16")]
cuda_op = functools.partial(fused_attn_kl, backend="cuda")

HEAD_DIM_CASES = [  # the kernels' head dims 64 and 128, and padding into them
    Case(b=1, hq=4, hk=2, tq=131, tk=131, d=64, dv=64, ho=4, hko=2, do=64, key_mask=True, query_mask=True),
    Case(b=1, hq=2, hk=1, tq=77, tk=77, d=128, dv=128, ho=2, hko=1, do=128, head_reduction="none",
         exclude_self=True, divergence="kl"),
    Case(b=1, hq=2, hk=2, tq=70, tk=70, d=80, dv=96, ho=3, hko=1, do=112, n_old=33, divergence="reverse_kl"),
]


def check_against_reference(case: Case, dtype: torch.dtype, seed: int) -> None:
    x = with_lse_old(case, make_inputs(case, dtype, seed=seed, device=DEVICE))
    kw = op_kwargs(case)
    got, up = run_op(cuda_op, x, kw)
    plain, _ = run_op(functools.partial(fused_attn_kl, backend="reference"), x, kw, upstream=up)
    exact, _ = run_op(functools.partial(fused_attn_kl, backend="reference"), to64(x), kw, upstream=up)
    assert got[0].dtype == dtype and got[1].dtype == torch.float32
    assert_within_plain_error(got, plain, exact, floor=1e-4)
    assert exact[1].abs().sum() > 0, "the case must carry a non-zero divergence"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES + HEAD_DIM_CASES, ids=lambda c: c.id)
def test_matches_reference(case, dtype, poison):
    """Every semantic case of the Triton / torch suites, within 2x (3x for gradients) of
    the dense PyTorch path's error in the same precision (flash-attention's idiom)."""
    check_against_reference(case, dtype, seed=3)


@contextlib.contextmanager
def emulator(schedule: str | None = None, arch: int | None = None):
    """The CPU emulator, with a schedule or an emulated arch for the duration."""
    from ral_kernels.backends.cuda import launch

    ext = launch._emulator()
    previous = (ext.emu_set_schedule(schedule) if schedule is not None else None,
                ext.emu_set_arch(arch) if arch is not None else None)
    try:
        yield ext
    finally:
        if previous[0] is not None:
            ext.emu_set_schedule(previous[0])
        if previous[1] is not None:
            ext.emu_set_arch(previous[1])


# Cases whose every pipelined loop runs three or more tiles, so both cp.async stages are reused:
# head dims 64 and 128, head-mean and per-head, cached rows with lse_old.
MULTI_TILE_CASES = [HEAD_DIM_CASES[0], HEAD_DIM_CASES[1],
                    Case(b=1, hq=4, hk=2, tq=140, tk=140, d=64, dv=64, ho=2, hko=1, do=48, n_old=70, lse_old=True,
                         exclude_self=True)]


@pytest.mark.skipif(ON_GPU, reason="emulator schedules (the GPU has its own; see benchmarks/gpu_cuda_checks.py)")
@pytest.mark.parametrize("case", MULTI_TILE_CASES, ids=lambda c: c.id)
def test_perturbed_schedules_change_no_bit(case, poison):
    """The emulator under schedules that make warps drift apart as on a GPU (random thread order,
    preemption at shared stores, cp.async issue and ldmatrix, copies landing at once or at any
    moment): the kernels have no race, so outputs and gradients are bit-identical to the default
    schedule's (which test_matches_reference checks against the reference). A missing barrier
    changes them (tests/cuda_emu/test_kernel_checks.py)."""
    x = with_lse_old(case, make_inputs(case, torch.float16, seed=5, device=DEVICE))
    kw = op_kwargs(case)
    default, up = run_op(cuda_op, x, kw)
    assert default[1].abs().sum() > 0
    for schedule in PERTURBED_SCHEDULES:
        with emulator(schedule=schedule):
            perturbed, _ = run_op(cuda_op, x, kw, upstream=up)
        for name, a, b in zip(("out", "div", "dq", "dk", "dv"), default, perturbed):
            assert torch.equal(a, b), f"{name} differs under {schedule}: max diff {(a - b).abs().max().item():.3e}"


@pytest.mark.skipif(ON_GPU, reason="the emulator's per-arch shared-memory limits")
@pytest.mark.parametrize("arch", [80, 86, 89, 90])
def test_every_kernel_fits_the_shared_memory_of(arch):
    """Each kernel instance (head dims 64 and 128; head-mean and per-head; forward and backward)
    launches within the arch's per-block shared memory (sm_86 / sm_89: 99 KiB)."""
    with emulator(arch=arch) as ext:
        assert ext.emu_arch() == arch
        for d, hr in ((64, "mean"), (128, "none")):
            case = Case(b=1, hq=2, hk=1, tq=20, tk=20, d=d, dv=d, ho=2, hko=1, do=d, head_reduction=hr)
            got, _ = run_op(cuda_op, make_inputs(case, torch.bfloat16, seed=1, device=DEVICE), op_kwargs(case))
            assert all(torch.isfinite(t).all() for t in got)


@pytest.mark.skipif(ON_GPU, reason="the emulator's arch")
def test_emulated_arch_is_the_most_constrained_target(monkeypatch):
    """Like a launch, the emulator checks the archs the build targets (RAL_CUDA_ARCHS, default
    80;90): the one with the least shared memory per block."""
    from ral_kernels.backends.cuda import launch

    monkeypatch.delenv("RAL_EMU_ARCH", raising=False)
    with emulator() as ext:
        previous = ext.emu_arch()
        try:
            for archs, want in (("80;90", 80), ("90;86", 86), ("90", 90)):
                monkeypatch.setenv("RAL_CUDA_ARCHS", archs)
                launch._emulator.cache_clear()
                assert launch._emulator().emu_arch() == want, archs
        finally:
            launch._emulator.cache_clear()
            ext.emu_set_arch(previous)


@pytest.mark.parametrize("dtype", DTYPES)
def test_no_key_rows_are_zero_and_finite(dtype, poison):
    case = Case(b=2, hq=4, hk=2, tq=50, tk=20, d=16, dv=16, exclude_self=True, key_mask=True)
    x = make_inputs(case, dtype, seed=2, device=DEVICE)
    x["key_mask"][0] = True
    out, div, dq, dk, dv = run_op(cuda_op, x, op_kwargs(case))[0]
    for t in (out, div, dq, dk, dv):
        assert torch.isfinite(t).all()
    assert (out[1] == 0).all() and (div[1] == 0).all()
    assert (out[0, :, :30] == 0).all() and (div[0, :31] == 0).all()
    assert (dq[1] == 0).all() and (dq[0, :, :30] == 0).all()
    assert div[0, 31:].abs().sum() > 0


@pytest.mark.parametrize("head_reduction", ["mean", "none"])
def test_zero_at_old_policy(head_reduction):
    """theta = theta_old: current and old statistics come from the same kernel code on the
    same inputs, so the divergence and its gradient vanish (to rounding: the two lse come
    from two instantiations of the forward kernel)."""
    case = Case(b=2, hq=4, hk=2, tq=45, tk=45, d=64, dv=64, ho=4, hko=2, do=64)
    x = make_inputs(case, torch.float16, seed=9, device=DEVICE)
    q = x["q"].clone().requires_grad_()
    _, div = cuda_op(q, x["k"], x["v"], x["q"], x["k"], head_reduction=head_reduction)
    div.sum().backward()
    assert div.abs().max() < 1e-6
    assert q.grad.abs().max() < 1e-4


def test_cache_of_response_rows_equals_full_old_queries():
    case = Case(b=2, hq=4, hk=2, tq=90, tk=90, d=64, dv=64, ho=4, hko=2, do=64)
    x = make_inputs(case, torch.bfloat16, seed=8, device=DEVICE)
    key_mask = torch.ones(2, 90, dtype=torch.bool, device=DEVICE)
    key_mask[0, :7] = False
    n = 25
    qmask = torch.zeros(2, 90, dtype=torch.bool, device=DEVICE)
    qmask[:, -n:] = True
    full = cuda_op(x["q"], x["k"], x["v"], x["q_old"], x["k_old"], query_mask=qmask, key_mask=key_mask)
    for with_lse in (False, True):
        cache = make_old_policy_cache(x["q_old"], x["k_old"], n, with_lse=with_lse, key_mask=key_mask)
        cached = cuda_op(x["q"], x["k"], x["v"], **cache.as_kwargs(), key_mask=key_mask)
        assert_close(cached[0], full[0], atol=0, name="out")
        assert_close(cached[1], full[1], atol=2e-6, name="div")  # lse_old from the torch helper: fp32 rounding


def test_varlen_equals_per_sequence_padded_form():
    x = packed(LENS, ho=6, hko=3, d=64, do=64, dtype=torch.float16, device=DEVICE)
    cq, ck, co = (cu([l[i] for l in LENS]).to(DEVICE) for i in range(3))
    kw = dict(causal=True, head_reduction="mean", exclude_self=True, backend="cuda")
    q, k, v = (x[n].clone().requires_grad_() for n in ("q", "k", "v"))
    out, div = fused_attn_kl_varlen(q, k, v, x["q_old"], x["k_old"], cq, ck, cu_seqlens_old=co, **kw)
    (out.float().sum() + div.sum()).backward()
    for s, (lq, lk, lo) in enumerate(LENS):
        sq, sk, so = slice(cq[s], cq[s + 1]), slice(ck[s], ck[s + 1]), slice(co[s], co[s + 1])
        qs, ks, vs = (t[sl].detach().clone().transpose(0, 1)[None].requires_grad_()
                      for t, sl in ((x["q"], sq), (x["k"], sk), (x["v"], sk)))
        o1, d1 = fused_attn_kl(qs, ks, vs, x["q_old"][so].transpose(0, 1)[None], x["k_old"][sk].transpose(0, 1)[None],
                               **kw)
        (o1.float().sum() + d1.sum()).backward()
        assert_close(out[sq], o1[0].transpose(0, 1), atol=2e-3, name="out")
        assert_close(div[sq], d1[0], atol=2e-5, name="div")
        assert_close(q.grad[sq], qs.grad[0].transpose(0, 1), atol=2e-2, name="dq")
        assert_close(k.grad[sk], ks.grad[0].transpose(0, 1), atol=2e-2, name="dk")
    assert div.abs().sum() > 0


def test_never_allocates_tq_by_tk():
    case = Case(b=1, hq=2, hk=1, tq=256, tk=256, d=64, dv=64, ho=2, hko=1, do=64, exclude_self=True)
    x = make_inputs(case, torch.float16, seed=6, device=DEVICE)
    q = x["q"].clone().requires_grad_()

    def step():
        out, div = cuda_op(q, x["k"], x["v"], x["q_old"], x["k_old"], exclude_self=True)
        (out.float().sum() + div.sum()).backward()

    numel = largest_new_tensor(step)
    assert 0 < numel <= 2 * 256 * 64, numel  # q-sized buffers only


def test_errors_name_the_problem():
    x = make_inputs(Case(b=1, hq=2, hk=1, tq=8, tk=8, d=16, dv=16, ho=2, hko=1, do=16), torch.float32, device=DEVICE)
    with pytest.raises(BackendUnavailableError, match="float16 or bfloat16"):
        cuda_op(x["q"], x["k"], x["v"], x["q_old"], x["k_old"])
    big = torch.randn(1, 2, 8, 160, dtype=torch.float16, device=DEVICE)
    with pytest.raises(BackendUnavailableError, match="head dims up to 128"):
        cuda_op(big, big[:, :1], big[:, :1], big, big[:, :1])


def test_auto_never_picks_cuda_on_cpu():
    from ral_kernels import resolve_backend

    assert resolve_backend("auto", "cpu", torch.float16, 64) == "torch"


@pytest.mark.skipif(ON_GPU, reason="checks the emulation build's input validation")
def test_extension_validates_its_inputs():
    """The bindings (same file in the CUDA and emulation builds) reject bad tensors with a
    message naming the argument, instead of reading out of bounds."""
    from ral_kernels.backends.cuda import build as _cuda_build

    ext = _cuda_build.load_emulator()
    q = torch.randn(1, 2, 8, 64, dtype=torch.float16)
    k = torch.randn(1, 1, 8, 64, dtype=torch.float16)
    lse = torch.empty(1, 2, 8)
    with pytest.raises(RuntimeError, match="lse must have shape"):
        ext.attn_fwd(q, k, k, torch.empty_like(q), lse[:, :, :4].contiguous(), None, None, 8, 0, 0, 0.1, True, False)
    with pytest.raises(RuntimeError, match="k must have q's dtype"):
        ext.attn_fwd(q, k.bfloat16(), k, torch.empty_like(q), lse, None, None, 8, 0, 0, 0.1, True, False)
    with pytest.raises(RuntimeError, match="head dim of 64 or 128"):
        ext.attn_fwd(q[..., :32].contiguous(), k, k, torch.empty_like(q), lse, None, None, 8, 0, 0, 0.1, True, False)
    many = torch.randn(1100, 64, 1, 64, dtype=torch.float16)  # batch x heads over the grid's 65535
    with pytest.raises(RuntimeError, match="exceeds the CUDA grid limit"):
        ext.attn_fwd(many, many[:, :1].contiguous(), None, None, torch.empty(1100, 64, 1), None, None, 1, 0, 0, 0.1,
                     True, False)
    with pytest.raises(RuntimeError, match="must be contiguous"):
        ext.attn_fwd(q.transpose(1, 2), k, k, torch.empty_like(q), lse, None, None, 8, 0, 0, 0.1, True, False)
