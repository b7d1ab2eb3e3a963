"""The O(T) per-row glue between the kernel passes, shared by every backend's pipeline.

SPEC section 2, "Per-row scalars", in log space (SPEC "Numerics"). Per head ``h`` and
divergence row ``i`` the first sweep gives ``lse_h`` (log-sum-exp over the allowed keys) and
``lse_S_h`` (over the policy support ``S(i)``; equal to ``lse_h`` unless ``exclude_self``),
each formed by its own online softmax, so a support mass near 0 or 1 keeps its precision.
From them, the **offset** of every head:

* ``"mean"`` (one group of ``n`` heads): ``off_h = lse_h + log sum_h' exp(lse_S_h' - lse_h')``
  (``= lse_h + log(n Z)``), so that the renormalized head-mean policy is
  ``p_j = sum_h pi_hj`` with ``pi_hj = exp(s_hj - off_h)`` on ``S(i)``;
* ``"none"``: ``off_h = lse_S_h`` and ``p_j = pi_hj``.

No division by a support mass is ever taken: ``p`` is exact where ``Z`` is subnormal.
Rows that carry no divergence (masked query, or no support on either side) get
``off = +inf`` on both sides, so ``pi = 0`` there and every pass adds exactly zero.

After the divergence sweep (``E = sum_S p g``, ``A_h = sum_S pi_h g``), the coupling
coefficient ``b_h = sum_S pi_h (g - E) = A_h - E P_h`` with ``P_h = sum_S pi_h =
exp(lse_S_h - off_h)``; the divergence's dS on head ``h`` is
``w (pi_hj (g_j - E) [j in S] - alpha_hj b_h)``, and the attention backward carries its
second part as ``delta_eff = rowsum(dO * O) + w b_h``.
"""

from __future__ import annotations

import math

import torch


def check_supported(backend: str, q, d_old: int, dv: int, dtypes, max_head_dim: int) -> None:
    """The kernels' dtype and head-dim limits, as errors naming the backend."""
    if q.dtype not in dtypes:
        names = [str(d).replace("torch.", "") for d in dtypes]
        raise TypeError(f"backend={backend!r} supports {', '.join(names[:-1])} or {names[-1]} inputs, got {q.dtype}")
    if max(q.shape[-1], d_old, dv) > max_head_dim:
        raise ValueError(f"backend={backend!r} supports head dims up to {max_head_dim}, "
                         f"got D={q.shape[-1]}, Do={d_old}, Dv={dv}")


def _group_logsumexp(x: torch.Tensor, groups: int) -> torch.Tensor:
    """``logsumexp`` over the heads of each group: ``[B, H, R] -> [B, G, R]``."""
    b, h, n = x.shape
    return torch.logsumexp(x.view(b, groups, h // groups, n), dim=2)


def _repeat(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x.repeat_interleave(heads // x.shape[1], dim=1)


def offsets(lse: torch.Tensor, lse_s: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head offsets ``[B, H, R]`` and the group's support flag ``[B, G, R]`` (False
    where no head of the group has a support key; NaN statistics stay "supported", so a
    NaN input propagates to the divergence as in any attention)."""
    # An empty support is -inf; a row with no key at all has lse = +inf (flash-attn's convention).
    empty = torch.isneginf(lse_s) | torch.isposinf(lse)
    lse_s = torch.where(empty, torch.full_like(lse_s, -math.inf), lse_s)
    log_mass = torch.where(empty, lse_s, lse_s - lse)  # log B_h <= 0
    if groups == lse.shape[1]:  # per head
        return lse_s, ~torch.isneginf(lse_s)
    lz = _group_logsumexp(log_mass, groups)  # log(n Z)
    return lse + _repeat(lz, lse.shape[1]), ~torch.isneginf(lz)


def valid_rows(has_cur: torch.Tensor, has_old: torch.Tensor, query_mask, r0: int) -> torch.Tensor:
    """``[B, G, R]``: rows that carry a divergence."""
    valid = has_cur & has_old
    if query_mask is not None:
        valid = valid & query_mask[:, None, r0:]
    return valid


def mask_offsets(off: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``+inf`` on rows without a divergence (so every pass adds zero there), contiguous."""
    return torch.where(_repeat(valid, off.shape[1]), off, torch.full_like(off, math.inf)).contiguous()


def coupling(a_stat: torch.Tensor, e_stat: torch.Tensor, lse_s: torch.Tensor, off: torch.Tensor) -> torch.Tensor:
    """``b_h = A_h - E P_h`` with ``P_h = exp(lse_S_h - off_h)``; zero where ``off`` is +inf."""
    p_mass = torch.exp(lse_s - off)
    p_mass = torch.where(torch.isposinf(off), torch.zeros_like(p_mass), p_mass)
    return (a_stat - _repeat(e_stat, a_stat.shape[1]) * p_mass).contiguous()


def old_lse(lse_old: torch.Tensor) -> torch.Tensor:
    """A caller-supplied ``lse_old`` in the kernels' convention: statistics dtype, ``+inf``
    for a row with no key (``-inf`` is read as the same), contiguous."""
    lse_old = lse_old.float() if lse_old.dtype != torch.float64 else lse_old
    return torch.where(torch.isneginf(lse_old), torch.full_like(lse_old, math.inf), lse_old).contiguous()


def check_old_lse(r_mass: torch.Tensor, valid: torch.Tensor) -> None:
    """A cached ``lse_old`` must normalize the old policy: on every divergence row its
    probabilities over the allowed keys sum to 1. A mismatch (built with another
    ``causal``, ``key_mask`` or ``old_sm_scale``, or from other queries/keys) raises
    instead of giving a silently wrong divergence. Skipped under ``torch.compile``."""
    if torch.compiler.is_compiling() or r_mass.numel() == 0:
        return
    bad = valid & ((r_mass - 1.0).abs() > 1e-3)
    if bool(bad.any()):
        worst = r_mass[bad]
        raise ValueError(
            "lse_old does not match q_old / k_old: the old policy's probabilities over the allowed keys sum to "
            f"{worst.min().item():.4g}..{worst.max().item():.4g} instead of 1 on {int(bad.sum())} rows. Build it "
            "with make_old_policy_cache(..., with_lse=True) using the same causal, key_mask and old_sm_scale "
            "as this call")


def effective_delta(dout: torch.Tensor, out: torch.Tensor, w, b_stat, r0: int) -> torch.Tensor:
    """``delta_eff = rowsum(dO * O) + w b_h`` (the ``-alpha_h b_h`` part of the divergence's
    dS), ``[B, Hq, Tq]`` in the statistics dtype."""
    cdt = torch.float64 if out.dtype == torch.float64 else torch.float32
    delta = (dout.to(cdt) * out.to(cdt)).sum(-1)
    if w is not None and b_stat is not None and b_stat.shape[2] > 0:
        delta[:, :, r0:] += _repeat(w, b_stat.shape[1]) * b_stat
    return delta.contiguous()


def divergence_weight(ddiv, valid: torch.Tensor, r0: int):
    """``w`` ``[B, G, R]``: the incoming gradient of ``div`` on divergence rows (zero
    elsewhere), or ``None`` when there is none."""
    if ddiv is None or valid.shape[2] == 0:
        return None
    cdt = torch.float64 if ddiv.dtype == torch.float64 else torch.float32
    w = ddiv.to(cdt)
    w = (w[:, None] if w.dim() == 2 else w)[:, :, r0:]
    return torch.where(valid, w, torch.zeros_like(w)).contiguous()
