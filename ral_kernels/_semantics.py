"""Semantics shared by every backend: names, masks and the divergence's pointwise terms.

Implementations (``reference.py``, ``backends/torch.py``, the Triton and CUDA kernels)
never import each other; whatever they must agree on lives here.

Notation (SPEC section 2): for query row ``i`` and key ``j``

* ``allowed(i, j) = key_mask[b, j] and (not causal or j <= i + Tk - Tq)``
* the policy support ``S(i)`` is ``allowed`` minus ``j = i + Tk - Tq`` when ``exclude_self``
* ``p`` (current) and ``r`` (old) are head-averaged (or per-head) attention rows
  renormalized on ``S(i)``.

Log-probabilities are formed in log space (SPEC "Numerics"): per head ``log alpha = s - lse``,
head means by ``logsumexp`` over heads, never ``log(max(p, tiny))``; ``0 * log 0 = 0``.
"""

from __future__ import annotations

import math

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


def log_policy_terms(lp: torch.Tensor, lr: torch.Tensor, divergence: str):
    """Pointwise terms ``t_j`` (the divergence is ``sum_j t_j``) and ``p_j g_j`` with
    ``g_j = dD/dp_j``, from the log-policies ``lp = log p``, ``lr = log r``.

    Off the support (and on rows without a divergence) both logs are ``-inf`` and both
    outputs are 0. Formed in log space, so they are exact where ``p`` or ``r`` underflows
    (``KL`` of an underflowed ``p`` is large, not clamped), and need no ``log`` of a
    probability. ``p g`` for ``kl`` is ``-r`` (``g = -r / p``), never a division by ``p``.
    """
    on = ~(torch.isneginf(lp) & torch.isneginf(lr))  # NaN inputs stay "on" and propagate
    zero = torch.zeros((), dtype=lp.dtype, device=lp.device)
    lp = torch.where(on, lp, zero)
    lr = torch.where(on, lr, zero)
    p, r = torch.exp(lp), torch.exp(lr)
    if divergence == "jsd":
        lm = torch.logaddexp(lp, lr) - math.log(2.0)
        t = 0.5 * (p * (lp - lm) + r * (lr - lm))
        pg = 0.5 * p * (lp - lm)
    elif divergence == "kl":  # KL(old || new)
        t = r * (lr - lp)
        pg = -r
    elif divergence == "reverse_kl":  # KL(new || old)
        t = p * (lp - lr)
        pg = p * (lp - lr + 1.0)
    else:  # validated by the API; kept for direct callers
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    return torch.where(on, t, zero), torch.where(on, pg, zero)
