"""Dense reference: the oracle every backend is tested against.

It materializes ``[B, H, Tq, Tk]`` scores and log-probabilities, so it is only for tests and
small inputs. It computes in float64 when given float64 and in float32 otherwise (autocast
off), forms every log-probability in log space (``s - lse``, ``logsumexp`` over heads and
over the support), and takes its gradients from autograd through those formulas.
"""

from __future__ import annotations

import math

import torch

from ._semantics import allowed_mask, log_policy_terms, self_mask

_NEG_INF = float("-inf")


def _masked_logsumexp(x: torch.Tensor, keep: torch.Tensor, dim: int) -> torch.Tensor:
    """``logsumexp`` of ``x`` over ``dim`` on the ``keep`` entries; -inf where none is kept.
    Written so that no NaN appears in forward or backward for empty rows."""
    keep = keep.expand_as(x)
    any_kept = keep.any(dim, keepdim=True)
    safe = torch.where(keep, x, torch.where(any_kept, torch.full_like(x, _NEG_INF), torch.zeros_like(x)))
    out = torch.logsumexp(safe, dim, keepdim=True)
    return torch.where(any_kept, out, torch.full_like(out, _NEG_INF))


def _log_policy(log_alpha: torch.Tensor, keep: torch.Tensor, n_groups: int, support: torch.Tensor):
    """``log`` of the group-averaged rows renormalized on ``support`` (-inf off it, and on
    rows whose support has no mass), and the flag of rows with mass."""
    b, h, t, tk = log_alpha.shape
    la = torch.where(keep, log_alpha, torch.zeros_like(log_alpha)).view(b, n_groups, h // n_groups, t, tk)
    keep_g = keep.expand(b, h, t, tk).reshape(b, n_groups, h // n_groups, t, tk)[:, :, 0]
    log_avg = torch.logsumexp(la, dim=2) - math.log(h // n_groups)  # log of the head mean
    supp = keep_g & support
    log_mass = _masked_logsumexp(log_avg, supp, -1)
    has = ~torch.isneginf(log_mass)
    lp = torch.where(supp & has, log_avg - torch.where(has, log_mass, torch.zeros_like(log_mass)),
                     torch.full_like(log_avg, _NEG_INF))
    return lp, has[..., 0]


def fused_attn_kl_reference(
    q, k, v, q_old, k_old, *, causal, sm_scale, old_sm_scale, divergence, head_reduction,
    exclude_self, query_mask=None, key_mask=None, lse_old=None,
):
    """Dense ``(out, div)`` with the exact semantics of :func:`ral_kernels.fused_attn_kl`.

    Arguments are validated by the API. ``q_old`` may hold only the last ``R <= Tq`` query
    rows (the old-policy cache); rows before them carry no divergence.
    """
    with torch.autocast(q.device.type, enabled=False):
        return _reference(q, k, v, q_old, k_old, causal, sm_scale, old_sm_scale, divergence, head_reduction,
                          exclude_self, query_mask, key_mask, lse_old)


def _reference(q, k, v, q_old, k_old, causal, sm_scale, old_sm_scale, divergence, head_reduction, exclude_self,
               query_mask, key_mask, lse_old):
    b, hq, tq, _ = q.shape
    hk, tk = k.shape[1], k.shape[2]
    ho, n_old = q_old.shape[1], q_old.shape[2]
    hko = k_old.shape[1]
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    dev = q.device
    true = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=dev)

    allowed = allowed_mask(0, tq, 0, tk, tq, tk, causal, key_mask, dev)
    allowed = true.expand(1, 1, tq, tk) if allowed is None else allowed.expand(-1, -1, tq, tk)
    s = sm_scale * q.to(cdt) @ k.to(cdt).repeat_interleave(hq // hk, dim=1).transpose(-1, -2)
    lse = _masked_logsumexp(s, allowed, -1)
    has_key = ~torch.isneginf(lse)
    log_alpha = s - torch.where(has_key, lse, torch.zeros_like(lse))
    alpha = torch.exp(torch.where(allowed & has_key, log_alpha, torch.full_like(log_alpha, _NEG_INF)))
    out = (alpha @ v.to(cdt).repeat_interleave(hq // hk, dim=1)).to(q.dtype)

    r0 = tq - n_old  # first row that carries a divergence
    rows_allowed = allowed[:, :, r0:]
    support = rows_allowed
    if exclude_self:
        diag = self_mask(r0, tq, 0, tk, tq, tk, dev)
        if diag is not None:
            support = support & ~diag
    s_old = old_sm_scale * q_old.to(cdt) @ k_old.to(cdt).repeat_interleave(ho // hko, 1).transpose(-1, -2)
    if lse_old is None:
        lse_o = _masked_logsumexp(s_old, rows_allowed, -1)
    else:  # -inf or +inf both mark a row with no key
        lse_o = lse_old.to(cdt)[..., None]
        lse_o = torch.where(torch.isinf(lse_o), torch.full_like(lse_o, _NEG_INF), lse_o)
    has_old = ~torch.isneginf(lse_o)
    log_beta = s_old - torch.where(has_old, lse_o, torch.zeros_like(lse_o))

    n_groups = 1 if head_reduction == "mean" else hq
    lp, has_p = _log_policy(log_alpha[:, :, r0:], rows_allowed & has_key[:, :, r0:], n_groups, support)
    lr, has_r = _log_policy(log_beta, rows_allowed & has_old, n_groups, support)
    valid = has_p & has_r
    if query_mask is not None:
        valid = valid & query_mask[:, None, r0:]
    neg_inf = torch.full_like(lp, _NEG_INF)
    terms, _ = log_policy_terms(torch.where(valid[..., None], lp, neg_inf),
                                torch.where(valid[..., None], lr, neg_inf), divergence)
    d = torch.cat([terms.new_zeros(b, n_groups, r0), terms.sum(-1)], dim=-1)
    return out, (d[:, 0] if head_reduction == "mean" else d)
