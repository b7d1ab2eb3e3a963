"""Edge cases of the numerics issue: one shape contract, empty sizes, the old-policy cache's
copies and checks, inference-mode tensors, and the reference agreeing with the other
backends on non-finite inputs, ``lse_old = -inf`` and autocast."""

import math

import pytest
import torch

from conftest import HAS_TRITON, Case, make_inputs
from ral_kernels import fused_attn_kl, fused_attn_kl_varlen, make_old_policy_cache
from ral_kernels.backends import unavailable_reason

BACKENDS = ["torch", "reference"] + (["triton"] if HAS_TRITON else []) + (
    ["cuda"] if unavailable_reason("cuda", torch.device("cpu")) is None else [])


def _dtype(backend):
    return torch.float16 if backend == "cuda" else torch.float32


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_head_divergence_keeps_its_head_dim_with_one_head(backend):
    """``head_reduction="none"`` returns ``[B, Hq, Tq]`` also when Hq = 1 (padded and varlen)."""
    x = make_inputs(Case(b=2, hq=1, hk=1, tq=9, tk=9, d=8, dv=8, ho=1, hko=1, do=8), _dtype(backend))
    out, div = fused_attn_kl(x["q"], x["k"], x["v"], x["q_old"], x["k_old"], head_reduction="none", backend=backend)
    assert div.shape == (2, 1, 9)
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    flat = {n: x[n][0].transpose(0, 1).repeat(2, 1, 1)[:9] for n in ("q", "k", "v", "q_old", "k_old")}
    _, div_v = fused_attn_kl_varlen(flat["q"], flat["k"], flat["v"], flat["q_old"], flat["k_old"], cu, cu,
                                    head_reduction="none", backend=backend)
    assert div_v.shape == (9, 1)


def test_empty_batch_gives_empty_outputs_and_gradients():
    q = torch.randn(0, 4, 7, 8, requires_grad=True)
    k = torch.randn(0, 2, 7, 8, requires_grad=True)
    v = torch.randn(0, 2, 7, 5, requires_grad=True)
    out, div = fused_attn_kl(q, k, v, q.detach(), k.detach(), backend="torch")
    assert out.shape == (0, 4, 7, 5) and div.shape == (0, 7)
    (out.sum() + div.sum()).backward()
    assert q.grad.shape == q.shape and v.grad.shape == v.shape


@pytest.mark.parametrize("which,shape,match", [
    ("q", (1, 0, 5, 4), "q has no heads"), ("k", (1, 0, 5, 4), "k has no heads"),
    ("q", (1, 2, 5, 0), "q has head dim 0"), ("v", (1, 1, 5, 0), "v has head dim 0"),
])
def test_zero_heads_or_head_dim_raise_a_named_error(which, shape, match):
    x = dict(q=torch.randn(1, 2, 5, 4), k=torch.randn(1, 1, 5, 4), v=torch.randn(1, 1, 5, 4))
    x[which] = torch.randn(shape)
    if which == "q" and shape[1] == 0:
        x["k"] = torch.randn(1, 1, 5, 4)
    with pytest.raises(ValueError, match=match):
        fused_attn_kl(x["q"], x["k"], x["v"], torch.randn(1, 2, 5, 4), torch.randn(1, 1, 5, 4), backend="torch")


def test_cache_copies_its_sources():
    """An in-place update of the captured tensors (or their reuse as buffers) does not
    change the cache."""
    x = make_inputs(Case(b=1, hq=2, hk=1, tq=8, tk=8, d=4, dv=4, ho=2, hko=1, do=4), torch.float32)
    q_old, k_old = x["q_old"].clone(), x["k_old"].clone()
    cache = make_old_policy_cache(q_old, k_old)  # all rows: the kept rows are the whole tensor
    before = [t.clone() for t in (cache.q_old, cache.k_old)]
    q_old.add_(1.0)
    k_old.mul_(3.0)
    assert torch.equal(cache.q_old, before[0]) and torch.equal(cache.k_old, before[1])


def test_cache_from_inference_mode_tensors_trains():
    """Queries and keys captured under ``torch.inference_mode()`` (as serving stacks and
    TRL's generation do) work in a later training step."""
    x = make_inputs(Case(b=1, hq=2, hk=1, tq=8, tk=8, d=4, dv=4, ho=2, hko=1, do=4), torch.float32)
    with torch.inference_mode():
        cache = make_old_policy_cache(x["q_old"].clone(), x["k_old"].clone(), with_lse=True)
    q = x["q"].clone().requires_grad_()
    out, div = fused_attn_kl(q, x["k"], x["v"], **cache.as_kwargs(), backend="torch")
    (out.sum() + div.sum()).backward()
    assert torch.isfinite(q.grad).all()


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_lse_old_built_with_another_causal_setting_raises(backend):
    x = make_inputs(Case(b=1, hq=2, hk=1, tq=12, tk=12, d=8, dv=8, ho=2, hko=1, do=8, n_old=6), _dtype(backend))
    cache = make_old_policy_cache(x["q_old"], x["k_old"], with_lse=True, causal=False)  # the op runs causal
    with pytest.raises(ValueError, match="lse_old does not match"):
        fused_attn_kl(x["q"], x["k"], x["v"], **cache.as_kwargs(), causal=True, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_lse_old_minus_inf_is_a_row_with_no_key(backend):
    """``-inf`` and ``+inf`` both mark an old row with no key: its divergence is 0, no NaN."""
    x = make_inputs(Case(b=1, hq=2, hk=1, tq=6, tk=6, d=8, dv=8, ho=2, hko=1, do=8), _dtype(backend))
    cache = make_old_policy_cache(x["q_old"], x["k_old"], with_lse=True)
    lse = cache.lse_old.clone()
    lse[:, :, 2] = -math.inf
    out, div = fused_attn_kl(x["q"], x["k"], x["v"], cache.q_old, cache.k_old, lse_old=lse, backend=backend)
    assert torch.isfinite(div).all() and div[0, 2] == 0 and div[0, 3] > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_input_propagates_to_the_rows_it_touches(backend):
    """The contract the README states: a NaN in a row's query makes that row's output and
    divergence NaN on every backend, the reference included; other rows stay finite when the
    NaN row's key is masked out for them (causal: rows before it)."""
    x = make_inputs(Case(b=1, hq=2, hk=1, tq=8, tk=8, d=8, dv=8, ho=2, hko=1, do=8), _dtype(backend))
    q = x["q"].clone()
    q[:, :, 5] = float("nan")
    out, div = fused_attn_kl(q, x["k"], x["v"], x["q_old"], x["k_old"], backend=backend)
    assert torch.isnan(out[:, :, 5]).all() and torch.isnan(div[:, 5]).all()
    keep = [i for i in range(8) if i != 5]
    assert torch.isfinite(out[:, :, keep]).all() and torch.isfinite(div[:, keep]).all()
    k = x["k"].clone()
    k[:, :, 6] = float("nan")  # a key rows 0..5 may not attend to (causal)
    out, div = fused_attn_kl(x["q"], k, x["v"], x["q_old"], x["k_old"], backend=backend)
    assert torch.isnan(div[:, 6:]).all() and torch.isnan(out[:, :, 6:]).all()


def test_reference_under_autocast_computes_in_float32():
    x = make_inputs(Case(b=1, hq=2, hk=1, tq=8, tk=8, d=8, dv=8, ho=2, hko=1, do=8), torch.float32)
    plain = fused_attn_kl(x["q"], x["k"], x["v"], x["q_old"], x["k_old"], backend="reference")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = fused_attn_kl(x["q"], x["k"], x["v"], x["q_old"], x["k_old"], backend="reference")
    assert auto[1].dtype == torch.float32 and auto[0].dtype == torch.float32
    assert torch.allclose(auto[1], plain[1]) and torch.allclose(auto[0], plain[0])


def test_low_precision_dq_error_is_bounded_by_the_rows_scale():
    """FlashAttention's behaviour, measured: with fp16/bf16 inputs ``delta = rowsum(dO * O)``
    comes from the rounded output, so a row whose true ``dq`` is small gets an error at the
    rounding level of the row's own gradient scale (``sm_scale * |dO| |V| |K|``), not of
    ``dq``; this pins that bound on the tiled torch backend (the GPU kernels follow it too)."""
    case = Case(b=1, hq=2, hk=1, tq=64, tk=64, d=16, dv=16, ho=2, hko=1, do=16)
    x64 = make_inputs(case, torch.float64, seed=4)
    g = torch.Generator().manual_seed(5)
    dout = torch.randn(1, 2, 64, 16, generator=g, dtype=torch.float64)
    grads = {}
    for dt in (torch.float64, torch.bfloat16, torch.float16):
        q, k, v = (x64[n].to(dt).detach().requires_grad_() for n in ("q", "k", "v"))
        out, _ = fused_attn_kl(q, k, v, x64["q_old"].to(dt), x64["k_old"].to(dt), backend="torch")
        (out.double() * dout).sum().backward()
        grads[dt] = q.grad.double()
    scale = 16 ** -0.5 * dout.norm(dim=-1) * x64["v"].norm(dim=-1).max() * x64["k"].norm(dim=-1).max()
    for dt, ulp in ((torch.bfloat16, 2.0 ** -8), (torch.float16, 2.0 ** -11)):
        rel = ((grads[dt] - grads[torch.float64]).norm(dim=-1) / scale).max().item()
        assert rel <= 4 * ulp, f"{dt}: dq error {rel:.2e} of the row scale > {4 * ulp:.2e}"
