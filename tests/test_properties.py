"""Property-based tests: every backend that runs here against the float64 oracle
(``tests/oracle.py``, written from the SPEC in probability space) over the whole input
space: shapes, GQA, teacher shapes, masks (rows with no key, no support), ``exclude_self``,
scales, sharp (large-logit) rows, rows dominated by their own key, dtypes, strides, a
cached ``lse_old``, and packed sequences with empty and single-token sequences.

Checked on every example: outputs and all three gradients are finite wherever the oracle
is, close to it within the precision's rounding (scaled by the logits' magnitude), and no
divergence is negative beyond rounding.

CI runs a bounded, derandomized number of examples (profile ``ci``, the default);
``pytest tests/test_properties.py --hypothesis-profile=long`` explores far more.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis", reason="the property tests need hypothesis (the [test] extra)")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from conftest import HAS_TRITON  # noqa: E402
from oracle import oracle  # noqa: E402
from ral_kernels import fused_attn_kl, fused_attn_kl_varlen, make_old_policy_cache  # noqa: E402
from ral_kernels.backends import unavailable_reason  # noqa: E402

settings.register_profile("ci", max_examples=1, deadline=None, derandomize=True, database=None,
                          suppress_health_check=list(HealthCheck))
settings.register_profile("long", max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))
settings.load_profile("ci")

EPS = {torch.float64: 2.2e-16, torch.float32: 1.2e-7, torch.float16: 9.8e-4, torch.bfloat16: 7.8e-3}
HAS_CUDA_EMU = unavailable_reason("cuda", torch.device("cpu")) is None


def examples(n: int):
    """``n`` examples per unit of the active profile (``ci``: 1 unit; ``long``: 20)."""
    return settings(max_examples=n * settings.default.max_examples)


@dataclasses.dataclass(frozen=True)
class Problem:
    b: int
    hq: int
    hk: int
    tq: int
    tk: int
    d: int
    dv: int
    ho: int
    hko: int
    do: int
    n_old: int
    causal: bool
    divergence: str
    head_reduction: str
    exclude_self: bool
    key_density: float  # 0 < density: share of valid keys; a whole sequence may have none
    query_density: float
    sharp: float  # multiplies the queries: logit spreads up to a few hundred
    self_gap: float  # > 0: some divergence rows' own key beats the others by about this much
    sm_scale: float | None
    lse_old: bool
    layout: str  # "contiguous", "hf" (transposed [B, T, H, D] storage) or "sliced"
    seed: int


@st.composite
def problems(draw, *, max_t=24, max_d=12, head_dims=None, allow_teacher=True):
    hk = draw(st.sampled_from([1, 2]))
    hq = hk * draw(st.sampled_from([1, 2, 3]))
    head_reduction = draw(st.sampled_from(["mean", "none"]))
    if head_reduction == "none" or not allow_teacher:
        ho, hko = hq, draw(st.sampled_from([h for h in (1, 2, 3, 6) if hq % h == 0]))
    else:
        hko = draw(st.sampled_from([1, 2]))
        ho = hko * draw(st.sampled_from([1, 2]))
    dims = st.sampled_from(head_dims) if head_dims else st.integers(1, max_d)
    d = draw(dims)
    tq = draw(st.integers(1, max_t))
    tk = draw(st.sampled_from([tq, max(1, tq + draw(st.integers(-3, 5)))]))
    return Problem(
        b=draw(st.integers(1, 2)), hq=hq, hk=hk, tq=tq, tk=tk, d=d, dv=draw(dims), ho=ho, hko=hko,
        do=d if head_dims else draw(dims), n_old=draw(st.integers(1, tq)), causal=draw(st.booleans()),
        divergence=draw(st.sampled_from(["jsd", "kl", "reverse_kl"])), head_reduction=head_reduction,
        exclude_self=draw(st.booleans()), key_density=draw(st.sampled_from([1.0, 0.8, 0.4])),
        query_density=draw(st.sampled_from([1.0, 0.7])), sharp=draw(st.sampled_from([1.0, 4.0, 15.0, 40.0])),
        self_gap=draw(st.sampled_from([0.0, 0.0, 30.0, 100.0, 130.0])),
        sm_scale=draw(st.sampled_from([None, 0.3, 1.0])), lse_old=draw(st.booleans()),
        layout=draw(st.sampled_from(["contiguous", "hf", "sliced"])), seed=draw(st.integers(0, 2**31 - 1)))


def _layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "hf":
        return x.transpose(1, 2).contiguous().transpose(1, 2)
    if layout == "sliced":  # a view into a wider buffer: row stride larger than the head dim
        wide = torch.zeros(*x.shape[:-1], x.shape[-1] + 3, dtype=x.dtype)
        wide[..., 1:x.shape[-1] + 1] = x
        return wide[..., 1:x.shape[-1] + 1]
    return x


def make_problem(pb: Problem, dtype: torch.dtype):
    """Inputs (rounded to ``dtype``), never zeros; masks may leave rows with no key."""
    g = torch.Generator().manual_seed(pb.seed)

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * scale

    q = rnd(pb.b, pb.hq, pb.tq, pb.d, scale=pb.sharp)
    k = rnd(pb.b, pb.hk, pb.tk, pb.d)
    v = rnd(pb.b, pb.hk, pb.tk, pb.dv)
    q_old = rnd(pb.b, pb.ho, pb.n_old, pb.do, scale=pb.sharp)
    k_old = rnd(pb.b, pb.hko, pb.tk, pb.do)
    r0 = pb.tq - pb.n_old
    scale = pb.d ** -0.5 if pb.sm_scale is None else pb.sm_scale
    if pb.self_gap > 0:  # rows whose own key (current and old) dominates by about self_gap
        for i in range(r0, pb.tq, 2):
            j = i + pb.tk - pb.tq
            if 0 <= j < pb.tk:
                qi = q[:, 0, i]
                k[:, 0, j] = qi * (pb.self_gap / scale) / qi.square().sum(-1, keepdim=True).clamp_min(1e-6)
                qo = q_old[:, 0, i - r0]
                oscale = pb.do ** -0.5 if pb.sm_scale is None else pb.sm_scale
                k_old[:, 0, j] = qo * (pb.self_gap / oscale) / qo.square().sum(-1, keepdim=True).clamp_min(1e-6)
    key_mask = query_mask = None
    if pb.key_density < 1.0:
        key_mask = torch.rand(pb.b, pb.tk, generator=g) < pb.key_density
        if pb.b > 1:
            key_mask[1] = False  # a sequence with no key at all
    if pb.query_density < 1.0:
        query_mask = torch.rand(pb.b, pb.tq, generator=g) < pb.query_density
        query_mask[:, :r0] = False
    x = dict(q=q, k=k, v=v, q_old=q_old, k_old=k_old)
    x = {n: t.to(dtype) for n, t in x.items()}
    kwargs = dict(causal=pb.causal, divergence=pb.divergence, head_reduction=pb.head_reduction,
                  exclude_self=pb.exclude_self, sm_scale=pb.sm_scale, old_sm_scale=pb.sm_scale)
    return x, dict(query_mask=query_mask, key_mask=key_mask), kwargs


def _scores_max(x, kwargs) -> float:
    """The largest |scaled logit| on either side (what float rounding of logits scales with)."""
    sc = kwargs["sm_scale"] or x["q"].shape[-1] ** -0.5
    osc = kwargs["old_sm_scale"] or x["q_old"].shape[-1] ** -0.5

    def largest(q, k, scale):
        k = k.double().repeat_interleave(q.shape[1] // k.shape[1], 1)
        return (scale * q.double() @ k.transpose(-1, -2)).abs().max().item()

    return max(largest(x["q"], x["k"], sc), largest(x["q_old"], x["k_old"], osc))


def check_against_oracle(pb: Problem, dtype, run, coef: float):
    """Run ``run(q, k, v, q_old, k_old, masks, kwargs)`` -> (out, div) and the oracle on the
    same (rounded) inputs; compare outputs and gradients of a random projection of both."""
    x, masks, kwargs = make_problem(pb, dtype)
    g = torch.Generator().manual_seed(pb.seed + 1)
    n_div = (pb.b, pb.tq) if pb.head_reduction == "mean" else (pb.b, pb.hq, pb.tq)
    w_out = torch.randn(pb.b, pb.hq, pb.tq, pb.dv, generator=g, dtype=torch.float64)
    w_div = torch.randn(*n_div, generator=g, dtype=torch.float64)

    def grads(fn, inputs, cast):
        q, k, v = (inputs[n].detach().clone().requires_grad_() for n in ("q", "k", "v"))
        out, div = fn(q, k, v)
        loss = (out.double() * w_out).sum() + (div.double() * w_div).sum()
        loss.backward()
        return [t.detach().double() for t in (out, div, q.grad, k.grad, v.grad)]

    x_lay = {n: _layout(t, pb.layout) for n, t in x.items()}
    got = grads(lambda q, k, v: run(q, k, v, x_lay["q_old"], x_lay["k_old"], masks, kwargs), x_lay, dtype)
    exp = grads(lambda q, k, v: oracle(q, k, v, x["q_old"], x["k_old"], **masks, **kwargs), x, torch.float64)
    smax = _scores_max(x, kwargs)
    eps = EPS[dtype]
    for name, a, e in zip(("out", "div", "dq", "dk", "dv"), got, exp):
        assert a.shape == e.shape, f"{name}: shape {tuple(a.shape)} != {tuple(e.shape)} ({pb})"
        finite = torch.isfinite(e)
        assert torch.isfinite(a[finite]).all(), f"{name}: non-finite where the float64 oracle is finite ({pb})"
        mag = e[finite].abs().max().item() if finite.any() else 0.0
        tol = coef * eps * (1.0 + smax) * (1.0 + mag)
        err = (a - e)[finite].abs().max().item() if finite.any() else 0.0
        assert err <= tol, f"{name}: max error {err:.3e} > {tol:.3e} (|ref| {mag:.3e}, max logit {smax:.1f}) ({pb})"
    assert (got[1] >= -coef * eps * (1.0 + smax)).all(), f"negative divergence {got[1].min().item():.3e} ({pb})"


def _padded(backend, lse_old: bool):
    def run(q, k, v, q_old, k_old, masks, kwargs):
        extra = {}
        if lse_old:
            n = q_old.shape[2]
            cache = make_old_policy_cache(q_old, k_old, n, with_lse=True, causal=kwargs["causal"],
                                          key_mask=masks["key_mask"], old_sm_scale=kwargs["old_sm_scale"])
            q_old, k_old, extra = cache.q_old, cache.k_old, {"lse_old": cache.lse_old}
        return fused_attn_kl(q, k, v, q_old, k_old, **masks, **kwargs, **extra, backend=backend)
    return run


@examples(40)
@given(pb=problems(), dtype=st.sampled_from([torch.float64, torch.float32]))
def test_torch_backend(pb, dtype):
    check_against_oracle(pb, dtype, _padded("torch", pb.lse_old), coef=64)


@examples(25)
@given(pb=problems(), dtype=st.sampled_from([torch.float64, torch.float32]))
def test_reference_backend(pb, dtype):
    check_against_oracle(pb, dtype, _padded("reference", pb.lse_old), coef=64)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@examples(12)
@given(pb=problems(max_t=20, max_d=8), dtype=st.sampled_from([torch.float32, torch.float16]),
       deterministic=st.booleans())
def test_triton_backend(pb, dtype, deterministic):
    run = _padded("triton", pb.lse_old)
    check_against_oracle(pb, dtype, functools.partial(_with, run, deterministic=deterministic),
                         coef=64 if dtype == torch.float32 else 16)


@pytest.mark.skipif(not HAS_CUDA_EMU, reason="the CUDA emulator cannot be built here")
@examples(8)
@given(pb=problems(max_t=20, head_dims=[8, 16]), dtype=st.sampled_from([torch.float16, torch.bfloat16]))
def test_cuda_backend(pb, dtype):
    check_against_oracle(pb, dtype, _padded("cuda", pb.lse_old), coef=16)


def _with(run, q, k, v, q_old, k_old, masks, kwargs, **extra):
    return run(q, k, v, q_old, k_old, masks, {**kwargs, **extra})


@examples(15)
@given(lens=st.lists(st.tuples(st.integers(0, 9), st.integers(0, 9)), min_size=1, max_size=4),
       pb=problems(max_t=9), dtype=st.sampled_from([torch.float64, torch.float32]))
def test_varlen_equals_oracle_per_sequence(lens, pb, dtype):
    """Packed sequences, empty and single-token ones included, against the oracle run on
    each sequence alone."""
    lens = [(max(lq, 1 if i == 0 else 0), min(lo, lq)) for i, (lq, lo) in enumerate(lens)]
    g = torch.Generator().manual_seed(pb.seed)
    tot, tot_o = sum(lq for lq, _ in lens), sum(lo for _, lo in lens)
    q, k, v = (torch.randn(tot, h, pb.d, generator=g, dtype=torch.float64).to(dtype)
               for h in (pb.hq, pb.hk, pb.hk))
    q_old = torch.randn(tot_o, pb.ho, pb.d, generator=g, dtype=torch.float64).to(dtype)
    k_old = torch.randn(tot, pb.hko, pb.d, generator=g, dtype=torch.float64).to(dtype)
    cu = torch.tensor([0] + [sum(lq for lq, _ in lens[:i + 1]) for i in range(len(lens))], dtype=torch.int32)
    cu_o = torch.tensor([0] + [sum(lo for _, lo in lens[:i + 1]) for i in range(len(lens))], dtype=torch.int32)
    kw = dict(causal=pb.causal, divergence=pb.divergence, head_reduction=pb.head_reduction,
              exclude_self=pb.exclude_self)
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    out, div = fused_attn_kl_varlen(qg, kg, vg, q_old, k_old, cu, cu, cu_seqlens_old=cu_o, backend="torch", **kw)
    ((out.double() ** 2).sum() + div.double().sum()).backward()
    tol = 1e-9 if dtype == torch.float64 else 1e-4
    for s, (lq, lo) in enumerate(lens):
        sl, so = slice(cu[s], cu[s + 1]), slice(cu_o[s], cu_o[s + 1])
        if lq == 0:
            continue
        qs, ks, vs = (t[sl].detach().double().transpose(0, 1)[None].requires_grad_() for t in (q, k, v))
        qos = q_old[so].double().transpose(0, 1)[None]
        if lo == 0:  # no cached rows: no divergence, the attention output alone
            qos = qs.detach()[:, :, :1]
            qmask = torch.zeros(1, lq, dtype=torch.bool)
        else:
            qmask = None
        o1, d1 = oracle(qs, ks, vs, qos, k_old[sl].double().transpose(0, 1)[None], query_mask=qmask, **kw)
        ((o1 ** 2).sum() + d1.sum()).backward()
        d_pk = div[sl].double() if pb.head_reduction == "mean" else div[sl].double().t()
        for name, a, e in (("out", out[sl].double(), o1[0].transpose(0, 1)), ("div", d_pk, d1[0]),
                           ("dq", qg.grad[sl].double(), qs.grad[0].transpose(0, 1)),
                           ("dk", kg.grad[sl].double(), ks.grad[0].transpose(0, 1)),
                           ("dv", vg.grad[sl].double(), vs.grad[0].transpose(0, 1))):
            err = (a - e).abs().max().item()
            assert err <= tol * (1 + e.abs().max().item()), f"sequence {s} {name}: error {err:.3e} ({lens})"


@pytest.mark.parametrize("backend", ["torch", "reference"] + (["triton"] if HAS_TRITON else [])
                         + (["cuda"] if HAS_CUDA_EMU else []))
def test_issue_repros(backend):
    """The repros of the numerics issue: a cached lse_old with exclude_self where the old
    policy puts most of its mass on the query's own key (F1), and NaN gradients / a silent
    zero when the own key beats every other by about 100 (F2)."""
    dt = torch.float16 if backend == "cuda" else torch.float32
    q = torch.ones(1, 1, 4, 1, dtype=dt)
    k = torch.tensor([0., .5, 1., 2.], dtype=dt).view(1, 1, 4, 1)
    v = torch.randn(1, 1, 4, 2, generator=torch.Generator().manual_seed(0)).to(dt)
    kw = dict(causal=True, exclude_self=True, sm_scale=1., old_sm_scale=1., divergence="kl", backend=backend)
    for top in (10.0, 14.0, 16.0, 40.0):
        ko = torch.tensor([0., .3, .6, top], dtype=dt).view(1, 1, 4, 1)
        cache = make_old_policy_cache(q, ko, with_lse=True, causal=True, old_sm_scale=1.)
        plain = fused_attn_kl(q, k, v, q, ko, **kw)[1][0, 3].double()
        cached = fused_attn_kl(q, k, v, **cache.as_kwargs(), **kw)[1][0, 3].double()
        want = oracle(q, k, v, q, ko, causal=True, exclude_self=True, sm_scale=1., old_sm_scale=1.,
                      divergence="kl")[1][0, 3]
        tol = 1e-5 if dt == torch.float32 else 2e-2
        assert abs(plain - want) <= tol * (1 + want) and abs(cached - want) <= tol * (1 + want), (top, plain, cached, want)
    for gap in (95.0, 100.0, 103.0, 110.0):
        q = torch.tensor([0., 0., 1.], dtype=dt).view(1, 1, 3, 1).requires_grad_()
        k = torch.tensor([0., 0., gap], dtype=dt).view(1, 1, 3, 1).requires_grad_()
        v = torch.randn(1, 1, 3, 2, generator=torch.Generator().manual_seed(1)).to(dt).requires_grad_()
        ko = torch.tensor([0., 1., 0.], dtype=dt).view(1, 1, 3, 1)
        out, div = fused_attn_kl(q, k, v, q.detach(), ko, causal=True, exclude_self=True, sm_scale=1.,
                                 old_sm_scale=1., backend=backend)
        (out.float().sum() + div.sum()).backward()
        q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
        o64, d64 = oracle(q64, k64, v64, q64.detach(), ko, causal=True, exclude_self=True, sm_scale=1.,
                          old_sm_scale=1.)
        (o64.sum() + d64.sum()).backward()
        for name, a, e in (("div", div, d64), ("dq", q.grad, q64.grad), ("dk", k.grad, k64.grad)):
            assert torch.isfinite(a).all(), f"gap {gap}: {name} not finite: {a}"
            assert torch.allclose(a.double(), e, atol=2e-3 if backend == "cuda" else 1e-5, rtol=1e-2), (gap, name, a, e)
        assert div[0, 2] > 0.02, f"gap {gap}: the divergence silently dropped to {div[0, 2].item()}"
