"""Memory-efficient PyTorch backend (CPU and CUDA).

Quantity: per query row ``i`` the attention output ``out_i = sum_j alpha_ij v_j`` and the
divergence ``D_i`` between the current policy ``p_i`` and the old policy ``r_i`` (head-mean
or per-head attention rows renormalized on the support ``S(i)``; SPEC section 2).

Passes, per query chunk of ``block_q`` rows, each a sweep over key chunks of ``block_k``:

1. flash-style online softmax: output, per-head log-sum-exp ``lse`` and, for rows that carry
   a divergence (the last ``R`` rows, whose old queries are cached), the support mass
   ``B_h = sum_S alpha_h`` and the same two statistics of the old policy (skipped when the
   caller hands over ``lse_old`` and the support is all allowed keys).
2. divergence sweep, divergence rows only: with ``Z = mean_h B_h`` (or ``B_h``) known, the
   divergence, ``E = sum_S p g`` and ``A_h = sum_S alpha_h g``; it stores
   ``c_h = (A_h - E B_h) / Z``.

Backward recomputes each tile's ``alpha`` (and, for divergence rows, ``beta``) from the
stored statistics and adds ``w_i / n * alpha_hj * (G_j - c_h)`` with
``G_j = (g_j - E) / Z`` to the usual ``alpha * (dP - delta)``.

Nothing of size ``Tq x Tk`` is ever held: the largest temporaries are
``[B, Hq, block_q, block_k]`` tiles. Statistics are float32 (float64 for float64 inputs).
"""

from __future__ import annotations

import torch

from .._semantics import allowed_mask, divergence_terms, self_mask, support_mass_from_lse

BLOCK_Q = 512
BLOCK_K = 512
_NEG_INF = float("-inf")


def _alloc(shape, dtype, device) -> torch.Tensor:
    """Uninitialized output buffer (tests poison it with NaN to catch unwritten elements)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _stat_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _chunk(x: torch.Tensor, i0: int, i1: int, scale: float, cdt: torch.dtype) -> torch.Tensor:
    """Rows ``[i0, i1)`` of ``x`` [B, H, T, D], scaled, contiguous, in the compute dtype."""
    return (x[:, :, i0:i1].to(cdt) * scale).contiguous()


def _scores(qc: torch.Tensor, k: torch.Tensor, j0: int, j1: int, cdt) -> torch.Tensor:
    """``qc @ k[j0:j1]^T`` for grouped-query heads: [B, Hq, C, j1 - j0]."""
    b, hq, c, d = qc.shape
    hk = k.shape[1]
    kc = k[:, :, j0:j1].to(cdt)
    return (qc.view(b, hk, (hq // hk) * c, d) @ kc.transpose(-1, -2)).view(b, hq, c, j1 - j0)


def _support(allowed, diag):
    if diag is None:
        return allowed
    return ~diag if allowed is None else allowed & ~diag


def _masked(x: torch.Tensor, keep, fill: float) -> torch.Tensor:
    return x if keep is None else x.masked_fill(~keep, fill)


def _rows(mask, start: int):
    """Rows ``start:`` of a broadcastable mask (a mask with one row applies to all)."""
    return mask if mask is None or mask.shape[2] == 1 else mask[:, :, start:]


def _group_mean(x: torch.Tensor, groups: int) -> torch.Tensor:
    b, h, c, n = x.shape
    return x.view(b, groups, h // groups, c, n).mean(2)


class _Online:
    """Running max / sum of exponentials over key chunks (and the support's share)."""

    def __init__(self, shape, like: torch.Tensor, track_support: bool):
        self.m = torch.full(shape, _NEG_INF, dtype=like.dtype, device=like.device)
        self.l = torch.zeros(shape, dtype=like.dtype, device=like.device)
        self.l_s = torch.zeros_like(self.l) if track_support else None

    def update(self, s: torch.Tensor, diag) -> tuple[torch.Tensor, torch.Tensor]:
        m_new = torch.maximum(self.m, s.amax(-1))
        m_use = torch.where(torch.isfinite(m_new), m_new, torch.zeros_like(m_new))
        corr = torch.exp(self.m - m_use)
        e = torch.exp(s - m_use[..., None])
        self.l = self.l * corr + e.sum(-1)
        if self.l_s is not None:
            self.l_s = self.l_s * corr + _masked(e, None if diag is None else ~diag, 0.0).sum(-1)
        self.m = m_new
        return e, corr

    def lse(self) -> torch.Tensor:
        return torch.where(self.l > 0, self.m + torch.log(self.l), torch.full_like(self.l, float("inf")))

    def support_mass(self) -> torch.Tensor:
        if self.l_s is None:
            return (self.l > 0).to(self.l.dtype)
        return self.l_s / torch.where(self.l > 0, self.l, torch.ones_like(self.l))


def _policy_tile(alpha_s, beta_s, z, z_old, groups, divergence):
    """Head-averaged (or per-head) rows on the support, their terms and ``g``."""
    p = _group_mean(alpha_s, groups) / z[..., None]
    r = _group_mean(beta_s, groups) / z_old[..., None]
    return divergence_terms(p, r, divergence) + (p,)


def _nonzero(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x > 0, x, torch.ones_like(x))


def fwd(q, k, v, q_old, k_old, lse_old, query_mask, key_mask, causal, sm_scale, old_sm_scale,
        divergence, head_reduction, exclude_self, block_q=None, block_k=None):
    """Returns ``out, div, lse, lse_old, z, z_old, e, c`` (see the module docstring).

    ``z`` is zero on rows that carry no divergence (masked, before the cached old rows, or
    with an empty support), which is how backward knows to skip them.
    """
    block_q, block_k = block_q or BLOCK_Q, block_k or BLOCK_K
    b, hq, tq, _ = q.shape
    tk, dv = k.shape[2], v.shape[3]
    ho, n_old = q_old.shape[1], q_old.shape[2]
    groups = 1 if head_reduction == "mean" else hq
    cdt = _stat_dtype(q)
    r0 = tq - n_old
    dev = q.device

    out = _alloc((b, hq, tq, dv), q.dtype, dev)
    lse = _alloc((b, hq, tq), cdt, dev)
    given_lse_old = lse_old is not None
    if given_lse_old:  # flash-attn convention: +inf marks a row with no key
        lse_old = lse_old.to(cdt)
        lse_old = torch.where(torch.isneginf(lse_old), torch.full_like(lse_old, float("inf")), lse_old)
    else:
        lse_old = _alloc((b, ho, n_old), cdt, dev)
    z = torch.zeros(b, groups, n_old, dtype=cdt, device=dev)
    z_old = torch.zeros_like(z)
    e_stat = torch.zeros_like(z)
    c_stat = torch.zeros(b, hq, n_old, dtype=cdt, device=dev)
    div = torch.zeros(b, groups, tq, dtype=cdt, device=dev)

    for i0 in range(0, tq, block_q):
        i1 = min(i0 + block_q, tq)
        j_end = min(tk, i1 + tk - tq) if causal else tk
        d0 = max(i0, r0)
        has_div = d0 < i1
        qc = _chunk(q, i0, i1, sm_scale, cdt)
        track_self = has_div and exclude_self
        cur = _Online((b, hq, i1 - i0), qc, track_self)
        qo = _chunk(q_old, d0 - r0, i1 - r0, old_sm_scale, cdt) if has_div else None
        old = _Online((b, ho, i1 - d0), qc, exclude_self) if has_div and not given_lse_old else None
        acc = torch.zeros(b, hq, i1 - i0, dv, dtype=cdt, device=dev)

        # Pass 1: output, lse, support masses.
        for j0 in range(0, max(j_end, 0), block_k):
            j1 = min(j0 + block_k, j_end)
            allowed = allowed_mask(i0, i1, j0, j1, tq, tk, causal, key_mask, dev)
            s = _masked(_scores(qc, k, j0, j1, cdt), allowed, _NEG_INF)
            e, corr = cur.update(s, self_mask(i0, i1, j0, j1, tq, tk, dev) if track_self else None)
            acc = acc * corr[..., None] + (
                e.view(b, k.shape[1], -1, j1 - j0) @ v[:, :, j0:j1].to(cdt)).view(b, hq, i1 - i0, dv)
            if old is not None:
                diag = self_mask(d0, i1, j0, j1, tq, tk, dev) if exclude_self else None
                allowed_d = _rows(allowed, d0 - i0)
                old.update(_masked(_scores(qo, k_old, j0, j1, cdt), allowed_d, _NEG_INF), diag)
        out[:, :, i0:i1] = (acc / _nonzero(cur.l)[..., None]).to(q.dtype)
        lse_c = cur.lse()
        lse[:, :, i0:i1] = lse_c
        if not has_div:
            continue

        # Support masses and renormalization constants of the divergence rows.
        rows = slice(d0 - r0, i1 - r0)
        mass = cur.support_mass()[:, :, d0 - i0:]
        if old is not None:
            lse_old[:, :, rows] = old.lse()
            mass_old = old.support_mass()
        else:
            mass_old = support_mass_from_lse(lse_old[:, :, rows], qo, k_old, d0, tq, tk, key_mask, exclude_self)
        zc = _group_mean(mass[..., None], groups)[..., 0]
        zoc = _group_mean(mass_old[..., None], groups)[..., 0]
        valid = (zc > 0) & (zoc > 0)
        if query_mask is not None:
            valid = valid & query_mask[:, None, d0:i1]
        zc = torch.where(valid, zc, torch.zeros_like(zc))
        zs, zos = _nonzero(zc), _nonzero(zoc)

        # Pass 2: divergence, E and A_h over the support.
        qd = qc[:, :, d0 - i0:].contiguous()
        lse_d, lse_od = lse_c[:, :, d0 - i0:, None], lse_old[:, :, rows, None]
        d_acc = torch.zeros_like(zc)
        e_acc = torch.zeros_like(zc)
        a_acc = torch.zeros(b, hq, i1 - d0, dtype=cdt, device=dev)
        for j0 in range(0, max(j_end, 0), block_k):
            j1 = min(j0 + block_k, j_end)
            supp = _support(allowed_mask(d0, i1, j0, j1, tq, tk, causal, key_mask, dev),
                            self_mask(d0, i1, j0, j1, tq, tk, dev) if exclude_self else None)
            alpha = torch.exp(_masked(_scores(qd, k, j0, j1, cdt), supp, _NEG_INF) - lse_d)
            beta = torch.exp(_masked(_scores(qo, k_old, j0, j1, cdt), supp, _NEG_INF) - lse_od)
            t, g, p = _policy_tile(alpha, beta, zs, zos, groups, divergence)
            d_acc += t.sum(-1)
            e_acc += (p * g).sum(-1)
            a_acc += (alpha.view(b, groups, hq // groups, i1 - d0, j1 - j0) * g[:, :, None]).sum(-1).view(
                b, hq, i1 - d0)
        rep = hq // groups
        c_h = (a_acc - e_acc.repeat_interleave(rep, 1) * mass) / zs.repeat_interleave(rep, 1)
        valid_h = valid.repeat_interleave(rep, 1)
        z[:, :, rows] = zc
        z_old[:, :, rows] = zoc
        e_stat[:, :, rows] = torch.where(valid, e_acc, torch.zeros_like(e_acc))
        c_stat[:, :, rows] = torch.where(valid_h, c_h, torch.zeros_like(c_h))
        div[:, :, d0:i1] = torch.where(valid, d_acc, torch.zeros_like(d_acc))

    div = div[:, 0] if head_reduction == "mean" else div
    return out, div, lse, lse_old, z, z_old, e_stat, c_stat


def bwd(dout, ddiv, q, k, v, q_old, k_old, out, lse, lse_old, z, z_old, e_stat, c_stat, key_mask,
        causal, sm_scale, old_sm_scale, divergence, head_reduction, exclude_self,
        block_q=None, block_k=None):
    """Gradients ``dq, dk, dv`` of ``<dout, out> + <ddiv, div>``, recomputed tile by tile."""
    block_q, block_k = block_q or BLOCK_Q, block_k or BLOCK_K
    b, hq, tq, _ = q.shape
    hk, tk = k.shape[1], k.shape[2]
    n_old = q_old.shape[2]
    groups = z.shape[1]
    rep = hq // groups
    cdt = _stat_dtype(q)
    r0 = tq - n_old
    dev = q.device

    dq = torch.zeros(q.shape, dtype=cdt, device=dev)
    dk = torch.zeros(k.shape, dtype=cdt, device=dev)
    dvv = torch.zeros(v.shape, dtype=cdt, device=dev)
    dout = dout.to(cdt)
    delta = (dout * out.to(cdt)).sum(-1)
    if ddiv is not None:
        w = ddiv.to(cdt)
        w = (w[:, None] if w.dim() == 2 else w)[:, :, r0:] * (z > 0)  # [B, groups, R]
        w = w / rep  # the 1/n of the head average
    else:
        w = None

    for i0 in range(0, tq, block_q):
        i1 = min(i0 + block_q, tq)
        j_end = min(tk, i1 + tk - tq) if causal else tk
        d0 = max(i0, r0)
        has_div = w is not None and d0 < i1
        ci = i1 - i0
        qc = _chunk(q, i0, i1, sm_scale, cdt)
        doc = dout[:, :, i0:i1].contiguous()
        lse_c, delta_c = lse[:, :, i0:i1, None], delta[:, :, i0:i1, None]
        dq_c = torch.zeros(b, hq, ci, q.shape[3], dtype=cdt, device=dev)
        if has_div:
            rows = slice(d0 - r0, i1 - r0)
            qo = _chunk(q_old, d0 - r0, i1 - r0, old_sm_scale, cdt)
            lse_od = lse_old[:, :, rows, None]
            zs, zos = _nonzero(z[:, :, rows]), _nonzero(z_old[:, :, rows])
            e_d, c_d, w_d = e_stat[:, :, rows], c_stat[:, :, rows], w[:, :, rows]
        for j0 in range(0, max(j_end, 0), block_k):
            j1 = min(j0 + block_k, j_end)
            cj = j1 - j0
            allowed = allowed_mask(i0, i1, j0, j1, tq, tk, causal, key_mask, dev)
            s = _masked(_scores(qc, k, j0, j1, cdt), allowed, _NEG_INF)
            alpha = torch.exp(s - lse_c)
            vc, kc = v[:, :, j0:j1].to(cdt), k[:, :, j0:j1].to(cdt)
            dp = (doc.view(b, hk, -1, doc.shape[-1]) @ vc.transpose(-1, -2)).view(b, hq, ci, cj)
            ds = alpha * (dp - delta_c)
            if has_div:
                diag = self_mask(d0, i1, j0, j1, tq, tk, dev) if exclude_self else None
                allowed_d = _rows(allowed, d0 - i0)
                supp = _support(allowed_d, diag)
                alpha_d = alpha[:, :, d0 - i0:]
                beta = torch.exp(_masked(_scores(qo, k_old, j0, j1, cdt), supp, _NEG_INF) - lse_od)
                _, g, _ = _policy_tile(_masked(alpha_d, supp, 0.0), beta, zs, zos, groups, divergence)
                big_g = _masked((g - e_d[..., None]) / zs[..., None], supp, 0.0)
                a5 = alpha_d.reshape(b, groups, rep, i1 - d0, cj)
                ds_div = a5 * (big_g[:, :, None] - c_d.reshape(b, groups, rep, -1)[..., None]) * w_d[:, :, None, :, None]
                ds[:, :, d0 - i0:] += ds_div.view(b, hq, i1 - d0, cj)
            ds_g = ds.view(b, hk, -1, cj)
            dq_c += (ds_g @ kc).view(b, hq, ci, -1)
            dk[:, :, j0:j1] += ds_g.transpose(-1, -2) @ qc.view(b, hk, -1, qc.shape[-1])
            dvv[:, :, j0:j1] += alpha.view(b, hk, -1, cj).transpose(-1, -2) @ doc.view(b, hk, -1, doc.shape[-1])
        dq[:, :, i0:i1] = dq_c * sm_scale
    return dq.to(q.dtype), dk.to(k.dtype), dvv.to(v.dtype)


def lse_rows(q_rows, k, first_row, tq, causal, key_mask, sm_scale, block_q=None, block_k=None):
    """Per-head log-sum-exp [B, H, R] of ``q_rows`` (rows ``first_row..first_row+R-1`` of a
    ``tq``-row query) against ``k``, over allowed keys; +inf for a row with no key."""
    block_q, block_k = block_q or BLOCK_Q, block_k or BLOCK_K
    b, h, n, _ = q_rows.shape
    tk = k.shape[2]
    cdt = _stat_dtype(q_rows)
    lse = _alloc((b, h, n), cdt, q_rows.device)
    for r0 in range(0, n, block_q):
        r1 = min(r0 + block_q, n)
        i0, i1 = first_row + r0, first_row + r1
        qc = _chunk(q_rows, r0, r1, sm_scale, cdt)
        acc = _Online((b, h, r1 - r0), qc, False)
        j_end = min(tk, i1 + tk - tq) if causal else tk
        for j0 in range(0, max(j_end, 0), block_k):
            j1 = min(j0 + block_k, j_end)
            allowed = allowed_mask(i0, i1, j0, j1, tq, tk, causal, key_mask, q_rows.device)
            acc.update(_masked(_scores(qc, k, j0, j1, cdt), allowed, _NEG_INF), None)
        lse[:, :, r0:r1] = acc.lse()
    return lse
