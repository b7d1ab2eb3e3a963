"""Memory-efficient PyTorch backend (CPU and CUDA): the pipeline's passes as tile loops.

Quantity: per query row ``i`` the attention output ``out_i = sum_j alpha_ij v_j`` and the
divergence ``D_i`` between the current policy ``p_i`` and the old policy ``r_i`` (head-mean
or per-head attention rows renormalized on the support ``S(i)``; SPEC section 2).

The passes (:mod:`ral_kernels.backends.pipeline`), each a loop over query chunks of
``BLOCK_Q`` rows and key chunks of ``BLOCK_K`` keys:

* ``attn_fwd`` / ``policy_stats``: flash-style online softmax. On divergence rows with
  ``exclude_self`` the query's own key is held out of the sweep, so the sweep's
  log-sum-exp is the support's own (``lse_S``, precise for any support mass); the self
  term is merged in at the end for ``lse`` and the output.
* ``div_fwd`` (divergence rows only): per tile ``pi_h = exp(s_h - off_h)``, the policies
  ``p = sum_h pi_h`` and ``r`` with their logarithms formed in log space (``logsumexp``
  over heads), the divergence terms, ``E`` and ``A_h``.
* ``attn_bwd``: the flash backward with ``delta_eff``; ``div_bwd`` adds
  ``w pi_h (g - E)`` on the support to dS of the divergence rows.

Nothing of size ``Tq x Tk`` is ever held: the largest temporaries are
``[B, H, BLOCK_Q, BLOCK_K]`` tiles. Statistics are float32 (float64 for float64 inputs).
"""

from __future__ import annotations

import functools
import math

import torch

from .._semantics import allowed_mask, log_policy_terms, self_mask
from . import pipeline

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


def _grouped(x: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """[B, Hq, C, N] -> [B, Hkv, (Hq / Hkv) * C, N] (a view for the GQA matmuls)."""
    b, h, c, n = x.shape
    return x.reshape(b, kv_heads, (h // kv_heads) * c, n)


def _and(a, b):
    if a is None:
        return b
    return a if b is None else a & b


def _not(mask):
    return None if mask is None else ~mask


def _masked(x: torch.Tensor, keep, fill: float) -> torch.Tensor:
    return x if keep is None else x.masked_fill(~keep, fill)


def _key_end(i1: int, tq: int, tk: int, causal: bool) -> int:
    """Exclusive end of the keys any row ``< i1`` may see."""
    return max(min(tk, i1 + tk - tq), 0) if causal else tk


def _held_self(i0, i1, j0, j1, tq, tk, hold_from, device):
    """The self positions of rows ``>= hold_from`` in a tile (held out of the sweep)."""
    if i1 <= hold_from:
        return None
    diag = self_mask(max(i0, hold_from), i1, j0, j1, tq, tk, device)
    if diag is None:
        return None
    if hold_from > i0:
        diag = torch.cat([torch.zeros(1, 1, hold_from - i0, j1 - j0, dtype=torch.bool, device=device), diag], 2)
    return diag


def _self_term(qc, k, v, i0, i1, tq, tk, key_mask, hold_from, cdt):
    """Score (``-inf`` where absent) and value of each held row's own key: ``[B, H, C]`` and
    ``[B, H, C, Dv]`` (``None`` without ``v``)."""
    b, h, c, _ = qc.shape
    hk = k.shape[1]
    pos = torch.arange(i0, i1, device=qc.device) + (tk - tq)
    keep = (pos >= 0) & (pos < tk) & (torch.arange(i0, i1, device=qc.device) >= hold_from)
    idx = pos.clamp(0, tk - 1)
    ks = k[:, :, idx].to(cdt).repeat_interleave(h // hk, dim=1)
    s = (qc * ks).sum(-1)
    keep = keep[None, None].expand(b, 1, c)
    if key_mask is not None:
        keep = keep & key_mask[:, None, idx]
    vs = None if v is None else v[:, :, idx].to(cdt).repeat_interleave(h // hk, dim=1)
    return s.masked_fill(~keep, _NEG_INF), vs


def _sweep(q, k, v, first_row: int, tq: int, key_mask, causal: bool, scale: float, hold_from: int):
    """Online softmax of the rows ``first_row..`` of a ``tq``-row query.

    Returns ``out`` (or None without ``v``), ``lse`` over the allowed keys (+inf for none)
    and, for the rows ``>= hold_from``, ``lse_S`` over the allowed keys minus the row's own
    (-inf for none). The own key is held out of the sweep and merged at the end, so ``lse_S``
    keeps its precision when the own key carries almost all (or almost none) of the mass."""
    b, h, n, _ = q.shape
    tk = k.shape[2]
    cdt = _stat_dtype(q)
    dev = q.device
    last = first_row + n
    held = max(0, last - max(hold_from, first_row))
    out = _alloc((b, h, n, v.shape[3]), q.dtype, dev) if v is not None else None
    lse = _alloc((b, h, n), cdt, dev)
    lse_s = _alloc((b, h, held), cdt, dev) if hold_from < last else None
    for c0 in range(0, n, BLOCK_Q):
        c1 = min(c0 + BLOCK_Q, n)
        i0, i1 = first_row + c0, first_row + c1
        qc = _chunk(q, c0, c1, scale, cdt)
        m = torch.full((b, h, c1 - c0), _NEG_INF, dtype=cdt, device=dev)
        l = torch.zeros_like(m)
        acc = torch.zeros(b, h, c1 - c0, v.shape[3], dtype=cdt, device=dev) if v is not None else None
        for j0 in range(0, _key_end(i1, tq, tk, causal), BLOCK_K):
            j1 = min(j0 + BLOCK_K, _key_end(i1, tq, tk, causal))
            keep = _and(allowed_mask(i0, i1, j0, j1, tq, tk, causal, key_mask, dev),
                        _not(_held_self(i0, i1, j0, j1, tq, tk, hold_from, dev)))
            s = _masked(_scores(qc, k, j0, j1, cdt), keep, _NEG_INF)
            m_new = torch.maximum(m, s.amax(-1))
            m_use = torch.where(torch.isneginf(m_new), torch.zeros_like(m_new), m_new)
            corr = torch.exp(m - m_use)
            e = torch.exp(s - m_use[..., None])
            l = l * corr + e.sum(-1)
            if acc is not None:
                acc = acc * corr[..., None] + (_grouped(e, k.shape[1]) @ v[:, :, j0:j1].to(cdt)).view_as(acc)
            m = m_new
        lse_c = torch.where(l > 0, m + torch.log(l), torch.full_like(l, _NEG_INF))  # NaN stays NaN
        o_c = None if acc is None else acc / torch.where(l > 0, l, torch.ones_like(l))[..., None]
        if i1 > hold_from:
            s_self, v_self = _self_term(qc, k, v, i0, i1, tq, tk, key_mask, hold_from, cdt)
            lse_full = torch.logaddexp(lse_c, s_self)
            if o_c is not None:
                keep_full = ~torch.isneginf(lse_full)
                w_supp = torch.where(keep_full, torch.exp(lse_c - lse_full), torch.zeros_like(lse_c))
                w_self = torch.where(keep_full, torch.exp(s_self - lse_full), torch.zeros_like(lse_c))
                o_c = o_c * w_supp[..., None] + v_self * w_self[..., None]
            lo = max(hold_from, i0) - i0
            lse_s[:, :, i0 + lo - max(hold_from, first_row):i1 - max(hold_from, first_row)] = lse_c[:, :, lo:]
            lse_c = lse_full
        if out is not None:
            out[:, :, c0:c1] = o_c.to(q.dtype)
        lse[:, :, c0:c1] = torch.where(torch.isneginf(lse_c), torch.full_like(lse_c, math.inf), lse_c)
    return out, lse, lse_s


def lse_rows(q_rows, k, first_row, tq, causal, key_mask, sm_scale):
    """Per-head log-sum-exp [B, H, R] of ``q_rows`` (rows ``first_row..first_row+R-1`` of a
    ``tq``-row query) against ``k``, over allowed keys; +inf for a row with no key."""
    return _sweep(q_rows, k, None, first_row, tq, key_mask, causal, sm_scale, tq)[1]


class _Tile:
    """One tile of divergence rows ``[d0, d1)`` (cached rows ``d0 - r0..``) against keys
    ``[j0, j1)``: the support, ``pi_h``, the policies in log space and their terms."""

    def __init__(self, side_cur, side_old, d0, d1, j0, j1, tq, tk, key_mask, cfg, groups, cdt):
        dev = side_cur[0].device
        supp = allowed_mask(d0, d1, j0, j1, tq, tk, cfg.causal, key_mask, dev)
        if cfg.exclude_self:
            supp = _and(supp, _not(self_mask(d0, d1, j0, j1, tq, tk, dev)))
        self.supp, self.groups = supp, groups
        self.log_pi = self._log_head(*side_cur, j0, j1, cdt)
        self.pi = torch.exp(self.log_pi)
        self.lp = _group_log(self.log_pi, groups)
        self.lr = _group_log(self._log_head(*side_old, j0, j1, cdt), groups)
        self.t, self.pg = log_policy_terms(self.lp, self.lr, cfg.divergence)

    def _log_head(self, qd, k, off, j0, j1, cdt):
        """``log pi_h = s_h - off_h`` on the support, -inf elsewhere."""
        return _masked(_scores(qd, k, j0, j1, cdt) - off[..., None], self.supp, _NEG_INF)

    def head_pg(self) -> torch.Tensor:
        """``pi_h g`` per head, as ``(pi_h / p) * (p g)``: exact where ``p`` underflows."""
        b, h, c, n = self.log_pi.shape
        if self.groups == h:
            return self.pg
        g = self.groups
        ratio = torch.exp(self.log_pi.view(b, g, h // g, c, n) - self.lp[:, :, None])
        ratio = torch.where(torch.isneginf(self.log_pi.view_as(ratio)), torch.zeros_like(ratio), ratio)
        return (ratio * self.pg[:, :, None]).view(b, h, c, n)


def _group_log(log_pi: torch.Tensor, groups: int) -> torch.Tensor:
    """``log p = logsumexp`` over each group's heads of ``log pi_h`` (exact where p underflows)."""
    b, h, c, n = log_pi.shape
    if groups == h:
        return log_pi
    return torch.logsumexp(log_pi.view(b, groups, h // groups, c, n), dim=2)


class TorchKernels(pipeline.Kernels):
    """The pipeline's passes for any device torch runs on."""

    # ------------------------------------------------------------------ forward passes
    def attn_fwd(self, q, k, v, key_mask, cfg, r0, old=None):
        hold = r0 if cfg.exclude_self else q.shape[2]
        out, lse, lse_s = _sweep(q, k, v, 0, q.shape[2], key_mask, cfg.causal, cfg.sm_scale, hold)
        return out, lse, lse_s, None

    def policy_stats(self, q_rows, k, key_mask, cfg, first_row, tq, scale):
        hold = first_row if cfg.exclude_self else tq
        _, lse, lse_s = _sweep(q_rows, k, None, first_row, tq, key_mask, cfg.causal, scale, hold)
        return lse, (lse if lse_s is None else lse_s)

    def _div_tiles(self, q, k, off, q_old, k_old, off_old, key_mask, cfg, r0):
        """Yield ``(d0, d1, rows, qd, j0, j1, tile)`` over the divergence rows' tiles."""
        tq, tk = q.shape[2], k.shape[2]
        cdt = _stat_dtype(q)
        groups = cfg.groups(q.shape[1])
        for d0 in range(r0, tq, BLOCK_Q):
            d1 = min(d0 + BLOCK_Q, tq)
            rows = slice(d0 - r0, d1 - r0)
            qd = _chunk(q, d0, d1, cfg.sm_scale, cdt)
            qo = _chunk(q_old, d0 - r0, d1 - r0, cfg.old_sm_scale, cdt)
            side_cur = (qd, k, off[:, :, rows])
            side_old = (qo, k_old, off_old[:, :, rows])
            for j0 in range(0, _key_end(d1, tq, tk, cfg.causal), BLOCK_K):
                j1 = min(j0 + BLOCK_K, _key_end(d1, tq, tk, cfg.causal))
                tile = _Tile(side_cur, side_old, d0, d1, j0, j1, tq, tk, key_mask, cfg, groups, cdt)
                yield d0, d1, rows, qd, j0, j1, tile

    def div_fwd(self, q, k, off, q_old, k_old, off_old, key_mask, cfg, r0):
        b, hq, tq, _ = q.shape
        n_old = tq - r0
        groups = cfg.groups(hq)
        zeros = functools.partial(torch.zeros, dtype=_stat_dtype(q), device=q.device)
        div, e_stat, r_mass = (zeros(b, groups, n_old) for _ in range(3))
        for _, _, rows, _, _, _, tile in self._div_tiles(q, k, off, q_old, k_old, off_old, key_mask, cfg, r0):
            div[:, :, rows] += tile.t.sum(-1)
            e_stat[:, :, rows] += tile.pg.sum(-1)
            r_mass[:, :, rows] += torch.exp(tile.lr).sum(-1)
        return div, e_stat, r_mass

    # ------------------------------------------------------------------ backward passes
    def attn_bwd(self, q, k, v, dout, lse, delta, key_mask, cfg, r0, dq, dk, dvv, old=None):
        b, hq, tq, d = q.shape
        hk, tk = k.shape[1], k.shape[2]
        cdt = _stat_dtype(q)
        dev = q.device
        dout = dout.to(cdt)
        for i0 in range(0, tq, BLOCK_Q):
            i1 = min(i0 + BLOCK_Q, tq)
            ci = i1 - i0
            qc = _chunk(q, i0, i1, cfg.sm_scale, cdt)
            doc = dout[:, :, i0:i1].contiguous()
            lse_c, delta_c = lse[:, :, i0:i1, None], delta[:, :, i0:i1, None]
            dq_c = torch.zeros(b, hq, ci, d, dtype=cdt, device=dev)
            for j0 in range(0, _key_end(i1, tq, tk, cfg.causal), BLOCK_K):
                j1 = min(j0 + BLOCK_K, _key_end(i1, tq, tk, cfg.causal))
                cj = j1 - j0
                allowed = allowed_mask(i0, i1, j0, j1, tq, tk, cfg.causal, key_mask, dev)
                alpha = torch.exp(_masked(_scores(qc, k, j0, j1, cdt), allowed, _NEG_INF) - lse_c)
                vc, kc = v[:, :, j0:j1].to(cdt), k[:, :, j0:j1].to(cdt)
                dp = (_grouped(doc, hk) @ vc.transpose(-1, -2)).view(b, hq, ci, cj)
                ds = _grouped(alpha * (dp - delta_c), hk)
                dq_c += (ds @ kc).view(b, hq, ci, d)
                dk[:, :, j0:j1] += ds.transpose(-1, -2) @ _grouped(qc, hk)
                dvv[:, :, j0:j1] += _grouped(alpha, hk).transpose(-1, -2) @ _grouped(doc, hk)
            dq[:, :, i0:i1] += dq_c * cfg.sm_scale

    def div_bwd(self, q, k, off, q_old, k_old, off_old, e_stat, w, key_mask, cfg, r0, dq, dk):
        hq, hk = q.shape[1], k.shape[1]
        groups = cfg.groups(hq)
        n = hq // groups
        a_stat = torch.zeros(off.shape, dtype=_stat_dtype(q), device=q.device)
        for d0, d1, rows, qd, j0, j1, tile in self._div_tiles(q, k, off, q_old, k_old, off_old, key_mask, cfg, r0):
            b_, _, c, _ = tile.pi.shape
            e_h = e_stat[:, :, rows].repeat_interleave(n, 1)[..., None]
            w_h = w[:, :, rows].repeat_interleave(n, 1)[..., None]
            head_pg = tile.head_pg()
            a_stat[:, :, rows] += head_pg.sum(-1)
            ds = _grouped(w_h * (head_pg - tile.pi * e_h), hk)
            dq[:, :, d0:d1] += (ds @ k[:, :, j0:j1].to(ds.dtype)).view(b_, hq, c, -1) * cfg.sm_scale
            dk[:, :, j0:j1] += ds.transpose(-1, -2) @ _grouped(qd, hk)
        return a_stat


KERNELS = TorchKernels()


def fwd(q, k, v, q_old, k_old, lse_old, query_mask, key_mask, cfg):
    return pipeline.forward(KERNELS, q, k, v, q_old, k_old, lse_old, query_mask, key_mask, cfg)


def bwd(dout, ddiv, q, k, v, q_old, k_old, out, div, stats, key_mask, cfg):
    return pipeline.backward(KERNELS, dout, ddiv, q, k, v, q_old, k_old, out, div, stats, key_mask, cfg)
