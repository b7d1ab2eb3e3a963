"""Packed variable-length form equals the padded form on the same data."""

import pytest
import torch

from conftest import DEVICE, assert_close, backends_under_test, oracle_dtype
from ral_kernels import fused_attn_kl, fused_attn_kl_varlen

LENS = [(13, 13, 13), (40, 40, 9), (7, 7, 7), (29, 29, 1)]  # (Tq, Tk, old rows) per sequence


def packed(lens, hq=4, hk=2, ho=6, hko=3, d=16, do=8, seed=0, dtype=torch.float64, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    tot_q, tot_k, tot_o = (sum(x[i] for x in lens) for i in range(3))

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)

    return dict(q=rnd(tot_q, hq, d), k=rnd(tot_k, hk, d), v=rnd(tot_k, hk, d), q_old=rnd(tot_o, ho, do),
                k_old=rnd(tot_k, hko, do))


def cu(lengths):
    return torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)


@pytest.mark.parametrize("backend", backends_under_test() + ["reference"])
@pytest.mark.parametrize("head_reduction,exclude_self,causal", [("mean", False, True), ("mean", True, False),
                                                                 ("none", True, True)])
def test_varlen_equals_per_sequence_padded_form(backend, head_reduction, exclude_self, causal):
    lens = LENS
    ho, hko = (4, 2) if head_reduction == "none" else (6, 3)
    dtype = torch.float64 if backend == "reference" else oracle_dtype(backend)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    x = packed(lens, ho=ho, hko=hko, dtype=dtype, device=DEVICE)
    cq, ck, co = (cu(l).to(DEVICE) for l in ([l[0] for l in lens], [l[1] for l in lens], [l[2] for l in lens]))
    qmask = (torch.rand(x["q"].shape[0], generator=torch.Generator().manual_seed(1)) < 0.8).to(DEVICE)
    for s, (lq, _, lo) in enumerate(lens):  # only a sequence's cached (last) rows may carry a divergence
        qmask[cq[s]: cq[s] + lq - lo] = False
    kw = dict(causal=causal, head_reduction=head_reduction, exclude_self=exclude_self, divergence="jsd",
              backend=backend)
    q, k, v = (x[n].clone().requires_grad_() for n in ("q", "k", "v"))
    out, div = fused_attn_kl_varlen(q, k, v, x["q_old"], x["k_old"], cq, ck, cu_seqlens_old=co,
                                    query_mask=qmask, **kw)
    g = torch.Generator().manual_seed(2)
    go, gd = torch.randn(out.shape, generator=g, dtype=out.dtype), torch.randn(div.shape, generator=g, dtype=div.dtype)
    ((out * go).sum() + (div * gd).sum()).backward()

    # Same data, one padded call per sequence (B = 1, no padding needed).
    for s, (lq, lk, lo) in enumerate(lens):
        sq, sk, so = slice(cq[s], cq[s + 1]), slice(ck[s], ck[s + 1]), slice(co[s], co[s + 1])
        qs, ks, vs = (t[sl].detach().clone().transpose(0, 1)[None].requires_grad_()
                      for t, sl in ((x["q"], sq), (x["k"], sk), (x["v"], sk)))
        mask = qmask[sq].clone()[None]
        o1, d1 = fused_attn_kl(qs, ks, vs, x["q_old"][so].transpose(0, 1)[None], x["k_old"][sk].transpose(0, 1)[None],
                               query_mask=mask, **kw)
        d_up = gd[sq][None] if head_reduction == "mean" else gd[sq].t()[None]
        ((o1 * go[sq].transpose(0, 1)[None]).sum() + (d1 * d_up).sum()).backward()
        assert_close(out[sq], o1[0].transpose(0, 1), atol=tol, name="out")
        d_pk = div[sq] if head_reduction == "mean" else div[sq].t()
        assert_close(d_pk, d1[0], atol=tol, name="div")
        assert_close(q.grad[sq], qs.grad[0].transpose(0, 1), atol=10 * tol, name="dq")
        assert_close(k.grad[sk], ks.grad[0].transpose(0, 1), atol=10 * tol, name="dk")
        assert_close(v.grad[sk], vs.grad[0].transpose(0, 1), atol=10 * tol, name="dv")
    assert div.abs().sum() > 0


def test_varlen_lse_old_matches_without():
    lens = LENS
    x = packed(lens)
    cq, co = cu([l[0] for l in lens]), cu([l[2] for l in lens])
    from ral_kernels.backends.torch import lse_rows

    lse = []
    for s, (lq, lk, lo) in enumerate(lens):
        qo = x["q_old"][co[s]:co[s + 1]].transpose(0, 1)[None]
        ko = x["k_old"][cq[s]:cq[s + 1]].transpose(0, 1)[None]
        lse.append(lse_rows(qo, ko, lq - lo, lq, True, None, 8 ** -0.5)[0])
    lse = torch.cat(lse, dim=1)  # [Ho, total_old]
    a = fused_attn_kl_varlen(x["q"], x["k"], x["v"], x["q_old"], x["k_old"], cq, cq, cu_seqlens_old=co)
    b = fused_attn_kl_varlen(x["q"], x["k"], x["v"], x["q_old"], x["k_old"], cq, cq, cu_seqlens_old=co, lse_old=lse)
    assert_close(b[1], a[1], atol=1e-12, name="div")


def test_varlen_errors():
    x = packed(LENS)
    c = cu([l[0] for l in LENS])
    with pytest.raises(TypeError, match="cu_seqlens_q"):
        fused_attn_kl_varlen(x["q"], x["k"], x["v"], x["q"][:, :, :8], x["k"], [0, 1], c)
    with pytest.raises(ValueError, match="cu_seqlens_k ends at"):
        fused_attn_kl_varlen(x["q"], x["k"][:-1], x["v"][:-1], x["q_old"], x["k_old"][:-1], c, c)
    with pytest.raises(ValueError, match=r"must have 3 dims"):
        fused_attn_kl_varlen(x["q"][None], x["k"], x["v"], x["q_old"], x["k_old"], c, c)
    with pytest.raises(TypeError, match="key_mask"):
        fused_attn_kl_varlen(x["q"], x["k"], x["v"], x["q_old"], x["k_old"], c, c, key_mask=None)
    with pytest.raises(ValueError, match="q_old has"):
        fused_attn_kl_varlen(x["q"], x["k"], x["v"], x["q_old"], x["k_old"], c, c)


def test_query_mask_before_cached_rows_raises():
    """The padded form's rule holds for packed sequences too: a query_mask that marks a row
    before a sequence's cached old rows is an error, not a silently dropped row."""
    lens = [(6, 6, 2), (5, 5, 5)]
    x = packed(lens, ho=4, hko=2)
    cq, ck, co = (cu([l[i] for l in lens]) for i in range(3))
    qmask = torch.zeros(11, dtype=torch.bool)
    qmask[1] = True  # sequence 0's second row; its cached rows are rows 4 and 5
    with pytest.raises(ValueError, match="before a sequence's cached old rows"):
        fused_attn_kl_varlen(x["q"], x["k"], x["v"], x["q_old"], x["k_old"], cq, ck, cu_seqlens_old=co,
                             query_mask=qmask, backend="torch")
