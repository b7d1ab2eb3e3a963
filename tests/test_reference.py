"""The oracle itself: the dense reference against a row-by-row formula written from the
SPEC, and its gradients against finite differences (gradcheck, float64)."""

import math

import pytest
import torch

from conftest import Case, assert_close, make_inputs, op_kwargs
from ral_kernels import fused_attn_kl


def direct_formula(case: Case, x: dict):
    """Row by row, straight from SPEC section 2 (no shared code with the backends)."""
    q, k, v, q_old, k_old = x["q"], x["k"], x["v"], x["q_old"], x["k_old"]
    b_, hq, tq, d = q.shape
    hk, tk = k.shape[1], k.shape[2]
    ho, n_old, do = q_old.shape[1], q_old.shape[2], q_old.shape[3]
    hko = k_old.shape[1]
    out = torch.zeros(b_, hq, tq, v.shape[3], dtype=torch.float64)
    groups = 1 if case.head_reduction == "mean" else hq
    div = torch.zeros(b_, groups, tq, dtype=torch.float64)
    for b in range(b_):
        for i in range(tq):
            keys = [j for j in range(tk)
                    if (x["key_mask"] is None or x["key_mask"][b, j]) and (not case.causal or j <= i + tk - tq)]
            alphas = []
            for h in range(hq):
                alpha = torch.zeros(tk, dtype=torch.float64)
                if keys:
                    s = torch.stack([q[b, h, i] @ k[b, h // (hq // hk), j] for j in keys]) / math.sqrt(d)
                    alpha[keys] = torch.softmax(s, 0)
                    out[b, h, i] = alpha @ v[b, h // (hq // hk)]
                alphas.append(alpha)
            r_i = i - (tq - n_old)
            if r_i < 0 or (x["query_mask"] is not None and not x["query_mask"][b, i]):
                continue
            support = [j for j in keys if not (case.exclude_self and j == i + tk - tq)]
            if not support:
                continue
            betas = []
            for h in range(ho):
                s = torch.stack([q_old[b, h, r_i] @ k_old[b, h // (ho // hko), j] for j in keys]) / math.sqrt(do)
                beta = torch.zeros(tk, dtype=torch.float64)
                beta[keys] = torch.softmax(s, 0)
                betas.append(beta)
            for grp in range(groups):
                if groups == 1:
                    pa, ra = sum(alphas) / hq, sum(betas) / ho
                else:
                    pa, ra = alphas[grp], betas[grp]
                p = pa[support] / pa[support].sum()
                r = ra[support] / ra[support].sum()
                m = (p + r) / 2
                if case.divergence == "jsd":
                    val = 0.5 * sum(pj * math.log(pj / mj) for pj, mj in zip(p.tolist(), m.tolist()) if pj > 0)
                    val += 0.5 * sum(rj * math.log(rj / mj) for rj, mj in zip(r.tolist(), m.tolist()) if rj > 0)
                elif case.divergence == "kl":
                    val = sum(rj * math.log(rj / pj) for rj, pj in zip(r.tolist(), p.tolist()) if rj > 0)
                else:
                    val = sum(pj * math.log(pj / rj) for pj, rj in zip(p.tolist(), r.tolist()) if pj > 0)
                div[b, grp, i] = val
    return out, (div[:, 0] if groups == 1 else div)


FORMULA_CASES = [
    Case(b=2, hq=4, hk=2, tq=7, tk=7, d=8, dv=5, ho=4, hko=2, do=8),
    Case(b=2, hq=4, hk=2, tq=7, tk=7, d=8, dv=5, ho=4, hko=2, do=8, divergence="kl", head_reduction="none"),
    Case(b=2, hq=4, hk=1, tq=5, tk=9, d=8, dv=8, ho=6, hko=3, do=4, divergence="reverse_kl", exclude_self=True,
         key_mask=True, query_mask=True, n_old=3),
    Case(b=1, hq=2, hk=2, tq=9, tk=6, d=4, dv=4, ho=2, hko=1, do=4, causal=True, exclude_self=True),
    Case(b=2, hq=2, hk=1, tq=6, tk=8, d=4, dv=3, ho=2, hko=2, do=6, causal=False, key_mask=True, sharp=6.0),
]


@pytest.mark.parametrize("case", FORMULA_CASES, ids=lambda c: c.id)
def test_reference_matches_direct_formula(case):
    x = make_inputs(case, torch.float64, seed=11)
    out, div = fused_attn_kl(x["q"], x["k"], x["v"], x["q_old"], x["k_old"], query_mask=x["query_mask"],
                             key_mask=x["key_mask"], backend="reference", **op_kwargs(case))
    out_ref, div_ref = direct_formula(case, x)
    assert_close(out, out_ref, atol=1e-12, name="out")
    assert_close(div, div_ref, atol=1e-12, name="div")
    assert div.abs().sum() > 0, "the case must carry a non-zero divergence"


GRADCHECK_CASES = [
    Case(b=1, hq=2, hk=1, tq=5, tk=5, d=3, dv=2, ho=2, hko=1, do=3, divergence=div, head_reduction=hr,
         exclude_self=ex, key_mask=km)
    for div in ("jsd", "kl", "reverse_kl") for hr, ex, km in (("mean", False, False), ("none", True, True))
] + [Case(b=2, hq=2, hk=2, tq=4, tk=6, d=3, dv=3, ho=3, hko=1, do=2, causal=False, exclude_self=True, query_mask=True)]


@pytest.mark.parametrize("case", GRADCHECK_CASES, ids=lambda c: c.id)
def test_reference_gradcheck(case):
    x = make_inputs(case, torch.float64, seed=5)
    q, k, v = (x[n].clone().requires_grad_() for n in ("q", "k", "v"))

    def fn(q, k, v):
        return fused_attn_kl(q, k, v, x["q_old"], x["k_old"], query_mask=x["query_mask"], key_mask=x["key_mask"],
                             backend="reference", **op_kwargs(case))

    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-6)
