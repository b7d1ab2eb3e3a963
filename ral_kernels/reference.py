"""Dense reference: the oracle every backend is tested against.

It materializes ``[B, H, Tq, Tk]`` scores and probabilities, so it is only for tests and
small inputs. It computes in float64 when given float64 and in float32 otherwise, and its
gradients come from autograd through the plain formulas of SPEC section 2.
"""

from __future__ import annotations

import torch

from ._semantics import allowed_mask, divergence_terms, self_mask


def _masked_softmax(s: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
    """Softmax over the last dim on ``allowed`` entries; rows with no allowed entry are 0."""
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(s - m)
    total = e.sum(-1, keepdim=True)
    return e / torch.where(total > 0, total, torch.ones_like(total))


def _policy(probs: torch.Tensor, n_groups: int, support: torch.Tensor | None):
    """Group-average heads (``n_groups`` = 1 for "mean", H for "none") and renormalize on
    the support. Returns ``(policy, mass)``; rows of zero mass have a zero policy."""
    b, h, t, tk = probs.shape
    avg = probs.view(b, n_groups, h // n_groups, t, tk).mean(2)
    if support is not None:
        avg = avg * support
    mass = avg.sum(-1, keepdim=True)
    return avg / torch.where(mass > 0, mass, torch.ones_like(mass)), mass


def fused_attn_kl_reference(
    q, k, v, q_old, k_old, *, causal, sm_scale, old_sm_scale, divergence, head_reduction,
    exclude_self, query_mask=None, key_mask=None, lse_old=None,
):
    """Dense ``(out, div)`` with the exact semantics of :func:`ral_kernels.fused_attn_kl`.

    Arguments are validated by the API. ``q_old`` may hold only the last ``R <= Tq`` query
    rows (the old-policy cache); rows before them carry no divergence.
    """
    b, hq, tq, _ = q.shape
    hk, tk = k.shape[1], k.shape[2]
    ho, r_rows = q_old.shape[1], q_old.shape[2]
    hko = k_old.shape[1]
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    dev = q.device

    allowed = allowed_mask(0, tq, 0, tk, tq, tk, causal, key_mask, dev)
    kf = k.to(cdt).repeat_interleave(hq // hk, dim=1)
    vf = v.to(cdt).repeat_interleave(hq // hk, dim=1)
    alpha = _masked_softmax(sm_scale * q.to(cdt) @ kf.transpose(-1, -2), allowed)
    out = (alpha @ vf).to(q.dtype)

    r0 = tq - r_rows  # first row that carries a divergence
    rows_allowed = allowed if allowed is None or allowed.shape[2] == 1 else allowed[:, :, r0:]
    support = rows_allowed
    if exclude_self:
        diag = self_mask(r0, tq, 0, tk, tq, tk, dev)
        if diag is not None:
            support = ~diag if support is None else support & ~diag
    s_old = old_sm_scale * q_old.to(cdt) @ k_old.to(cdt).repeat_interleave(ho // hko, 1).transpose(-1, -2)
    if lse_old is None:
        beta = _masked_softmax(s_old, rows_allowed)
    else:
        beta = torch.exp(s_old - lse_old.to(cdt)[..., None])
        if rows_allowed is not None:
            beta = beta.masked_fill(~rows_allowed, 0.0)

    n_groups = 1 if head_reduction == "mean" else hq
    p, z = _policy(alpha[:, :, r0:], n_groups, support)
    r, z_old = _policy(beta, n_groups, support)
    terms, _ = divergence_terms(p, r, divergence)
    d = terms.sum(-1)  # [B, groups, R]
    valid = (z > 0) & (z_old > 0)
    d = torch.where(valid[..., 0], d, torch.zeros_like(d))
    d = torch.cat([d.new_zeros(b, n_groups, r0), d], dim=-1)
    if query_mask is not None:
        d = d * query_mask[:, None, :]
    div = d[:, 0] if head_reduction == "mean" else d
    return out, div
