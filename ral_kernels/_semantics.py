"""Semantics shared by every backend: names, masks and the divergence's pointwise terms.

Implementations (``reference.py``, ``backends/torch.py``, the Triton and CUDA kernels)
never import each other; whatever they must agree on lives here.

Notation (SPEC section 2): for query row ``i`` and key ``j``

* ``allowed(i, j) = key_mask[b, j] and (not causal or j <= i + Tk - Tq)``
* the policy support ``S(i)`` is ``allowed`` minus ``j = i + Tk - Tq`` when ``exclude_self``
* ``p`` (current) and ``r`` (old) are head-averaged (or per-head) attention rows
  renormalized on ``S(i)``.

Logarithms use ``p`` clamped to the smallest normal number of the statistics dtype, so a
probability that underflowed to zero gives a large finite KL instead of ``inf`` and never a
NaN; JSD is bounded either way. ``0 * log 0 = 0`` holds exactly.
"""

from __future__ import annotations

import torch

DIVERGENCES = ("jsd", "kl", "reverse_kl")
HEAD_REDUCTIONS = ("mean", "none")
BACKENDS = ("auto", "triton", "cuda", "torch", "reference")


def allowed_mask(
    i0: int, i1: int, j0: int, j1: int, tq: int, tk: int, causal: bool,
    key_mask: torch.Tensor | None, device: torch.device,
) -> torch.Tensor | None:
    """Bool mask of ``allowed(i, j)`` for rows ``[i0, i1)`` and keys ``[j0, j1)``.

    Shape ``[B or 1, 1, i1 - i0, j1 - j0]``; ``None`` when every pair is allowed.
    """
    mask = None
    if causal and j1 - 1 > i0 + tk - tq:  # some key of the block lies past some row's limit
        rows = torch.arange(i0, i1, device=device)[:, None]
        cols = torch.arange(j0, j1, device=device)[None, :]
        mask = (cols <= rows + (tk - tq))[None, None]
    if key_mask is not None:
        km = key_mask[:, None, None, j0:j1]
        mask = km if mask is None else mask & km
    return mask


def self_mask(i0: int, i1: int, j0: int, j1: int, tq: int, tk: int, device: torch.device):
    """Bool mask ``[1, 1, i1 - i0, j1 - j0]`` of the query's own position ``j = i + Tk - Tq``,
    or ``None`` when the block holds no such position."""
    lo, hi = i0 + tk - tq, i1 - 1 + tk - tq
    if hi < j0 or lo >= j1:
        return None
    rows = torch.arange(i0, i1, device=device)[:, None]
    cols = torch.arange(j0, j1, device=device)[None, :]
    return (cols == rows + (tk - tq))[None, None]


def self_scores(qo: torch.Tensor, k_old: torch.Tensor, i0: int, tq: int, tk: int, key_mask, cdt):
    """Old score of each row's own position, -inf where that key is absent or masked.
    ``qo`` [B, Ho, C, D] holds rows ``i0..``, already scaled."""
    b, ho, c, _ = qo.shape
    hko = k_old.shape[1]
    pos = torch.arange(i0, i0 + c, device=qo.device) + (tk - tq)
    ok = (pos >= 0) & (pos < tk)
    kself = k_old[:, :, pos.clamp(0, tk - 1)].to(cdt).repeat_interleave(ho // hko, dim=1)
    s = (qo * kself).sum(-1)
    keep = ok[None, None].expand(b, 1, c)
    if key_mask is not None:
        keep = keep & key_mask[:, None, pos.clamp(0, tk - 1)]
    return s.masked_fill(~keep, float("-inf"))



def support_mass_from_lse(lse, q_scaled, k, first_row: int, tq: int, tk: int, key_mask, exclude_self: bool):
    """Support mass ``sum_S exp(s - lse)`` of rows ``first_row..`` given their log-sum-exp
    over allowed keys (``+inf`` for none): 1 (or 0) minus the self term when excluded."""
    mass = torch.isfinite(lse).to(lse.dtype)
    if exclude_self:
        s_self = self_scores(q_scaled, k, first_row, tq, tk, key_mask, lse.dtype)
        mass = (mass - torch.exp(s_self - lse)).clamp_min(0.0)
    return mass


def divergence_terms(p: torch.Tensor, r: torch.Tensor, divergence: str):
    """Pointwise terms ``t_j`` (the divergence is ``sum_j t_j``) and ``g_j = dD/dp_j``.

    ``p`` and ``r`` must be zero outside the support; both outputs are zero there.
    """
    tiny = torch.finfo(p.dtype).tiny
    on = (p > 0) | (r > 0)
    log_p = torch.log(p.clamp_min(tiny))
    if divergence == "jsd":
        log_m = torch.log(((p + r) * 0.5).clamp_min(tiny))
        log_r = torch.log(r.clamp_min(tiny))
        t = 0.5 * (p * (log_p - log_m) + r * (log_r - log_m))
        g = 0.5 * (log_p - log_m)
    elif divergence == "kl":  # KL(old || new)
        log_r = torch.log(r.clamp_min(tiny))
        t = r * (log_r - log_p)
        g = -r / p.clamp_min(tiny)
    elif divergence == "reverse_kl":  # KL(new || old)
        log_r = torch.log(r.clamp_min(tiny))
        t = p * (log_p - log_r)
        g = log_p - log_r + 1.0
    else:  # validated by the API; kept for direct callers
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    zero = torch.zeros((), dtype=p.dtype, device=p.device)
    return torch.where(on, t, zero), torch.where(on, g, zero)
