"""An independent float64 oracle, written from SPEC section 2 in probability space.

It shares no code with the package (not even the masks): dense ``[B, H, Tq, Tk]``
softmaxes, head means, renormalization on the support, ``0 log 0 = 0``, and autograd for
the gradients. float64 keeps it exact for logit spreads up to several hundred, which the
property tests stay within.
"""

from __future__ import annotations

import math

import torch


def _softmax_rows(s: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim on ``keep`` (0 elsewhere; rows with none kept are 0)."""
    s = torch.where(keep, s, torch.full_like(s, -math.inf))
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m)).detach()
    e = torch.where(keep, torch.exp(torch.where(keep, s, torch.zeros_like(s)) - m), torch.zeros_like(s))
    tot = e.sum(-1, keepdim=True)
    return e / torch.where(tot > 0, tot, torch.ones_like(tot))


def _xlogy_ratio(x: torch.Tensor, num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """``x log(num / den)`` with ``0 log(...) = 0``; autograd-safe where ``x = 0``."""
    pos = x > 0
    one = torch.ones_like(x)
    return torch.where(pos, x * (torch.log(torch.where(pos, num, one)) - torch.log(torch.where(pos, den, one))),
                       torch.zeros_like(x))


def oracle(q, k, v, q_old, k_old, *, causal=True, sm_scale=None, old_sm_scale=None, divergence="jsd",
           head_reduction="mean", exclude_self=False, query_mask=None, key_mask=None):
    """``(out, div)`` in float64, differentiable in ``q, k, v``."""
    q, k, v, q_old, k_old = (x.double() for x in (q, k, v, q_old, k_old))
    b, hq, tq, d = q.shape
    hk, tk = k.shape[1], k.shape[2]
    ho, n_old, do = q_old.shape[1], q_old.shape[2], q_old.shape[3]
    sm_scale = d ** -0.5 if sm_scale is None else sm_scale
    old_sm_scale = do ** -0.5 if old_sm_scale is None else old_sm_scale
    i = torch.arange(tq)[:, None]
    j = torch.arange(tk)[None, :]
    allowed = torch.ones(b, 1, tq, tk, dtype=torch.bool)
    if causal:
        allowed = allowed & (j <= i + tk - tq)
    if key_mask is not None:
        allowed = allowed & key_mask.cpu()[:, None, None, :]
    alpha = _softmax_rows(sm_scale * q @ k.repeat_interleave(hq // hk, 1).transpose(-1, -2), allowed)
    out = alpha @ v.repeat_interleave(hq // hk, 1)

    r0 = tq - n_old
    rows_allowed = allowed[:, :, r0:]
    support = rows_allowed
    if exclude_self:
        support = support & ~(j == i[r0:] + tk - tq)
    beta = _softmax_rows(old_sm_scale * q_old @ k_old.repeat_interleave(ho // k_old.shape[1], 1).transpose(-1, -2),
                         rows_allowed)
    groups = 1 if head_reduction == "mean" else hq
    a = alpha[:, :, r0:].reshape(b, groups, hq // groups, n_old, tk).mean(2) * support
    bt = beta.reshape(b, groups, ho // groups, n_old, tk).mean(2) * support
    za, zb = a.sum(-1, keepdim=True), bt.sum(-1, keepdim=True)
    valid = (za > 0) & (zb > 0)
    if query_mask is not None:
        valid = valid & query_mask.cpu()[:, None, r0:, None]
    p = torch.where(valid, a / torch.where(za > 0, za, torch.ones_like(za)), torch.zeros_like(a))
    r = torch.where(valid, bt / torch.where(zb > 0, zb, torch.ones_like(zb)), torch.zeros_like(bt))
    if divergence == "jsd":
        m = (p + r) / 2
        terms = 0.5 * (_xlogy_ratio(p, p, m) + _xlogy_ratio(r, r, m))
    elif divergence == "kl":
        terms = _xlogy_ratio(r, r, p)
    else:
        terms = _xlogy_ratio(p, p, r)
    div = torch.cat([terms.new_zeros(b, groups, r0), terms.sum(-1)], dim=-1)
    return out, (div[:, 0] if head_reduction == "mean" else div)
