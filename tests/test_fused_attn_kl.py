"""Every non-reference backend against the dense reference: outputs and gradients."""

from __future__ import annotations

import functools

import pytest
import torch

from conftest import (DEVICE, ON_GPU, Case, assert_close, assert_within_plain_error, backends_under_test,
                      largest_new_tensor, make_inputs, op_kwargs, oracle_dtype, run_op)
from ral_kernels import fused_attn_kl, make_old_policy_cache
from ral_kernels.backends.torch import lse_rows

BACKENDS = backends_under_test()

CASES = [
    # every divergence x reduction x exclude_self, causal, odd sizes that cross tiles
    Case(b=2, hq=4, hk=2, tq=97, tk=97, d=16, dv=16, ho=4, hko=2, do=16, divergence=dv_, head_reduction=hr,
         exclude_self=ex)
    for dv_ in ("jsd", "kl", "reverse_kl") for hr in ("mean", "none") for ex in (False, True)
] + [
    # non-causal, masks (incl. a sequence with no valid key), GQA 8:1
    Case(b=2, hq=8, hk=1, tq=53, tk=53, d=16, dv=12, ho=8, hko=1, do=16, causal=False, key_mask=True,
         query_mask=True),
    Case(b=2, hq=4, hk=2, tq=53, tk=53, d=16, dv=16, ho=4, hko=4, do=16, head_reduction="none", key_mask=True,
         query_mask=True, exclude_self=True, divergence="kl"),
    # teacher with other head count and head dim (head-mean only)
    Case(b=2, hq=4, hk=2, tq=61, tk=61, d=16, dv=16, ho=6, hko=3, do=24, divergence="jsd", exclude_self=True),
    Case(b=1, hq=4, hk=4, tq=61, tk=61, d=32, dv=8, ho=2, hko=1, do=8, divergence="reverse_kl", causal=False),
    # Tq != Tk, bottom-right causal alignment (Tq > Tk leaves the first rows without key)
    Case(b=2, hq=4, hk=2, tq=33, tk=75, d=16, dv=16, ho=4, hko=2, do=16, exclude_self=True, key_mask=True),
    Case(b=2, hq=4, hk=2, tq=75, tk=33, d=16, dv=16, ho=4, hko=2, do=16, divergence="kl", exclude_self=True),
    Case(b=1, hq=2, hk=1, tq=40, tk=23, d=8, dv=8, ho=2, hko=1, do=8, causal=False, exclude_self=True),
    # old-policy cache: only the last R rows, with and without lse_old
    Case(b=2, hq=4, hk=2, tq=123, tk=123, d=16, dv=16, ho=4, hko=2, do=16, n_old=29, query_mask=True,
         key_mask=True),
    Case(b=2, hq=4, hk=2, tq=123, tk=123, d=16, dv=16, ho=6, hko=2, do=8, n_old=40, lse_old=True,
         exclude_self=True),
    Case(b=2, hq=4, hk=2, tq=70, tk=70, d=16, dv=16, ho=4, hko=2, do=16, n_old=17, lse_old=True,
         head_reduction="none", divergence="reverse_kl", key_mask=True),
    # sharp (large-logit) attention
    Case(b=2, hq=4, hk=2, tq=67, tk=67, d=16, dv=16, ho=4, hko=2, do=16, sharp=12.0),
    Case(b=2, hq=4, hk=2, tq=67, tk=67, d=16, dv=16, ho=4, hko=2, do=16, sharp=12.0, divergence="kl",
         head_reduction="none", exclude_self=True),
]


def with_lse_old(case: Case, x: dict) -> dict:
    """Hand over the old rows' log-sum-exp (at their true row offset) when the case asks."""
    if not case.lse_old:
        return x
    tq, n_old = x["q"].shape[2], x["q_old"].shape[2]
    lse = lse_rows(x["q_old"], x["k_old"], tq - n_old, tq, case.causal, x["key_mask"], x["q_old"].shape[-1] ** -0.5)
    return dict(x, lse_old=lse)


def to64(x: dict) -> dict:
    return {n: (t.double() if t is not None and t.is_floating_point() else t) for n, t in x.items()}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_matches_reference(case, backend, small_blocks, poison):
    """Outputs and gradients against the float64 oracle on the same inputs: exact to
    rounding in float64 (torch), within the plain float32 path's error otherwise."""
    dtype = oracle_dtype(backend)
    x = with_lse_old(case, make_inputs(case, dtype, seed=3, device=DEVICE))
    kw = op_kwargs(case)
    got, up = run_op(functools.partial(fused_attn_kl, backend=backend), x, kw)
    exact, _ = run_op(functools.partial(fused_attn_kl, backend="reference"), to64(x), kw, upstream=up)
    if dtype == torch.float64:
        for name, a, e in zip(("out", "div", "dq", "dk", "dv"), got, exact):
            assert_close(a, e, atol=1e-9, rtol=1e-7, name=name)
    else:
        plain, _ = run_op(functools.partial(fused_attn_kl, backend="reference"), x, kw, upstream=up)
        assert_within_plain_error(got, plain, exact, floor=5e-5)
    assert exact[1].abs().sum() > 0, "the case must carry a non-zero divergence"


LOWP_CASES = [
    Case(b=2, hq=4, hk=2, tq=97, tk=97, d=32, dv=32, ho=4, hko=2, do=32, key_mask=True, query_mask=True),
    Case(b=1, hq=4, hk=1, tq=80, tk=80, d=32, dv=32, ho=4, hko=1, do=32, divergence="kl", head_reduction="none",
         exclude_self=True),
    Case(b=1, hq=4, hk=2, tq=80, tk=80, d=32, dv=32, ho=4, hko=2, do=32, divergence="reverse_kl", sharp=6.0),
]


def lowp_params():
    """(backend, dtype) pairs: Triton's interpreter computes bfloat16 dots wrongly, so
    bfloat16 runs for Triton only on a GPU."""
    for backend in BACKENDS:
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            if backend == "triton" and dtype == torch.bfloat16 and not ON_GPU:
                continue
            yield pytest.param(backend, dtype, id=f"{backend}-{str(dtype)[6:]}")


@pytest.mark.parametrize("backend,dtype", list(lowp_params()))
@pytest.mark.parametrize("case", LOWP_CASES, ids=lambda c: c.id)
def test_low_precision_within_plain_pytorch_error(case, backend, dtype, small_blocks):
    """flash-attention's idiom: the backend's error against a float64 oracle (on the same
    rounded inputs) stays within 2x (3x for gradients) of the dense PyTorch path's error in
    the same precision."""
    x = make_inputs(case, dtype, seed=7, device=DEVICE)
    kw = op_kwargs(case)
    got, up = run_op(functools.partial(fused_attn_kl, backend=backend), x, kw)
    plain, _ = run_op(functools.partial(fused_attn_kl, backend="reference"), x, kw, upstream=up)
    exact, _ = run_op(functools.partial(fused_attn_kl, backend="reference"), to64(x), kw, upstream=up)
    assert got[0].dtype == dtype and got[1].dtype == torch.float32
    assert_within_plain_error(got, plain, exact, floor=5e-5 if dtype == torch.float32 else 1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_at_old_policy(backend):
    """theta = theta_old: the divergence and its gradient vanish."""
    case = Case(b=2, hq=4, hk=2, tq=45, tk=45, d=16, dv=16)
    dtype = oracle_dtype(backend)
    x = make_inputs(case, dtype, seed=9, device=DEVICE)
    x = dict(x, q_old=x["q"], k_old=x["k"])
    q = x["q"].clone().requires_grad_()
    _, div = fused_attn_kl(q, x["k"], x["v"], x["q_old"], x["k_old"], backend=backend)
    div.sum().backward()
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    assert div.abs().max() < tol
    assert q.grad.abs().max() < tol * 100


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_key_rows_are_zero_and_finite(backend, small_blocks, poison):
    """A fully masked sequence, rows before the first key (Tq > Tk, causal), and rows whose
    only key is themselves under exclude_self: out = 0, div = 0, finite gradients."""
    case = Case(b=2, hq=4, hk=2, tq=50, tk=20, d=16, dv=16, exclude_self=True, key_mask=True)
    x = make_inputs(case, torch.float32, seed=2, device=DEVICE)
    x["key_mask"][0] = True
    got, _ = run_op(functools.partial(fused_attn_kl, backend=backend), x, op_kwargs(case))
    out, div, dq, dk, dv = got
    for t in got:
        assert torch.isfinite(t).all()
    assert (out[1] == 0).all() and (div[1] == 0).all()  # second sequence: no valid key
    assert (out[0, :, :30] == 0).all() and (div[0, :31] == 0).all()  # before/at the first key
    assert (dq[1] == 0).all() and (dq[0, :, :30] == 0).all()
    assert div[0, 31:].abs().sum() > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_gradient_to_old_policy(backend):
    case = Case(b=1, hq=2, hk=1, tq=20, tk=20, d=8, dv=8, ho=2, hko=1, do=8)
    x = make_inputs(case, torch.float32, seed=4, device=DEVICE)
    q_old, k_old = x["q_old"].clone().requires_grad_(), x["k_old"].clone().requires_grad_()
    q = x["q"].clone().requires_grad_()
    out, div = fused_attn_kl(q, x["k"], x["v"], q_old, k_old, backend=backend)
    (out.sum() + div.sum()).backward()
    assert q_old.grad is None and k_old.grad is None and q.grad is not None


@pytest.mark.parametrize("backend", BACKENDS)
def test_cache_of_response_rows_equals_full_old_queries(backend):
    """The old-policy cache (last R rows of q_old, optional lse) gives the numbers of the
    full q_old with a query mask on the same rows."""
    case = Case(b=2, hq=4, hk=2, tq=90, tk=90, d=16, dv=16, ho=4, hko=2, do=16)
    dtype = oracle_dtype(backend)
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    x = make_inputs(case, dtype, seed=8, device=DEVICE)
    key_mask = torch.ones(2, 90, dtype=torch.bool, device=DEVICE)
    key_mask[0, :7] = False  # left padding
    n = 25
    qmask = torch.zeros(2, 90, dtype=torch.bool, device=DEVICE)
    qmask[:, -n:] = True
    full = fused_attn_kl(x["q"], x["k"], x["v"], x["q_old"], x["k_old"], query_mask=qmask, key_mask=key_mask,
                         backend=backend)
    for with_lse in (False, True):
        cache = make_old_policy_cache(x["q_old"], x["k_old"], n, with_lse=with_lse, key_mask=key_mask)
        assert cache.q_old.shape == (2, 4, n, 16) and (cache.lse_old is not None) == with_lse
        cached = fused_attn_kl(x["q"], x["k"], x["v"], **cache.as_kwargs(), key_mask=key_mask, backend=backend)
        assert_close(cached[0], full[0], atol=tol, name="out")
        assert_close(cached[1], full[1], atol=tol, name="div")
    lse = make_old_policy_cache(x["q_old"], x["k_old"], n, with_lse=True, key_mask=key_mask).lse_old
    s = x["q_old"][:, :, -n:] @ x["k_old"].repeat_interleave(2, 1).transpose(-1, -2) / 4.0
    rows = torch.arange(90 - n, 90, device=DEVICE)[:, None]
    allowed = (torch.arange(90, device=DEVICE)[None, :] <= rows) & key_mask[:, None, None, :]
    assert_close(lse, torch.logsumexp(s.masked_fill(~allowed, float("-inf")), -1), atol=tol, name="lse")


@pytest.mark.parametrize("backend", BACKENDS)
def test_never_allocates_tq_by_tk(backend, small_blocks):
    """Cost model: no tensor created during forward and backward is as large as Tq x Tk
    (per head or head-summed); the largest temporaries are tiles."""
    case = Case(b=1, hq=2, hk=1, tq=256, tk=256, d=8, dv=8, ho=2, hko=1, do=8, exclude_self=True)
    x = make_inputs(case, torch.float32, seed=6, device=DEVICE)
    q = x["q"].clone().requires_grad_()

    def step():
        out, div = fused_attn_kl(q, x["k"], x["v"], x["q_old"], x["k_old"], exclude_self=True, backend=backend)
        (out.sum() + div.sum()).backward()

    numel = largest_new_tensor(step)
    assert 0 < numel < 256 * 256 // 4, numel
