"""The pass sequence of the fused op, shared by every backend (torch, Triton, CUDA).

A backend supplies a *kernel set*: an object with the passes below, each reading and
writing per-row statistics only (never anything ``Tq x Tk``). This module strings them
together with the ``O(T)`` glue of :mod:`ral_kernels.backends.glue`, so the sequence is
written once.

Forward (``R`` divergence rows = the last ``R`` query rows, whose old queries are cached):

1. ``policy_stats`` (old policy, divergence rows): ``lse_old`` and the support's
   ``lse_S,old``. Skipped when the caller hands over ``lse_old`` and the support is every
   allowed key (no ``exclude_self``): one sweep fewer.
2. ``attn_fwd`` (all rows): ``out``, ``lse``, and ``lse_S`` of the divergence rows. With a
   fused per-head KL (``kernels.fused_kl``, ``head_reduction="none"``, ``kl`` or
   ``reverse_kl``) it also forms the old scores and writes the divergence itself.
3. glue: offsets ``off``, ``off_old`` (``+inf`` on rows without a divergence).
4. ``div_fwd`` (divergence rows only, unless fused): the divergence, ``E`` and the old
   policy's mass (a consistency check of a cached ``lse_old``).

Backward: ``div_bwd`` (divergence rows only): its share of ``dq``/``dk`` and ``A_h``, from
which glue forms ``b_h``; then ``attn_bwd`` (all rows) with ``delta_eff = rowsum(dO * O) +
w b_h`` (in the fused per-head KL case it adds the divergence's dS itself).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from .. import _semantics
from . import glue


class OpConfig(NamedTuple):
    """The op's constant arguments, as every pass receives them."""

    causal: bool
    sm_scale: float
    old_sm_scale: float
    divergence: str
    head_reduction: str
    exclude_self: bool
    deterministic: bool = False

    def groups(self, hq: int) -> int:
        return 1 if self.head_reduction == "mean" else hq

    @property
    def div_code(self) -> int:
        return _semantics.DIVERGENCES.index(self.divergence)


class FwdStats(NamedTuple):
    """What the backward needs beyond the inputs and ``out`` (all ``O(T)`` per head)."""

    lse: torch.Tensor      # [B, Hq, Tq] log-sum-exp over allowed keys; +inf for a row with no key
    lse_s: torch.Tensor    # [B, Hq, R] log-sum-exp over the support (-inf: empty)
    off: torch.Tensor      # [B, Hq, R] current policy offsets; +inf on rows without a divergence
    off_old: torch.Tensor  # [B, Ho, R] old policy offsets; +inf likewise
    e: torch.Tensor        # [B, G, R] E = sum_S p g


class Kernels:
    """Base of a backend's kernel set: the hooks the pipeline calls around the passes.

    A subclass implements the passes ``policy_stats``, ``attn_fwd``, ``div_fwd``,
    ``attn_bwd`` and ``div_bwd`` (see the torch backend for their contracts) and may
    override these hooks, e.g. to pad head dims once per call."""

    fused_kl = False  # attn_fwd / attn_bwd also handle per-head KL and reverse KL

    def prepare(self, q, k, v, q_old, k_old):
        """The inputs as the passes take them."""
        return q, k, v, q_old, k_old

    def prepare_dout(self, dout, q):
        return dout

    def finish_out(self, out, v):
        """``out`` as the op returns it (``v``: the original values)."""
        return out

    def new_grads(self, q, k, v):
        """Zeroed gradient buffers the backward passes add to (statistics dtype)."""
        cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
        return tuple(torch.zeros(x.shape, dtype=cdt, device=x.device) for x in (q, k, v))

    def finish_grads(self, q, k, v, dq, dk, dv):
        """Gradients in the inputs' dtypes and shapes (``q, k, v``: the original inputs)."""
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)

    def coupling_bwd(self, q, k, lse, wb, key_mask, cfg, dq, dk):
        """The divergence's coupling term on every row of ``q`` (prepared rows, all of them
        divergence rows): ``dS_hj = -alpha_hj wb_h`` with ``alpha_h = exp(s_h - lse_h)`` the
        attention probabilities over the allowed keys and ``wb = w b_h`` ``[B, Hq, R]``,
        added to ``dq`` and ``dk`` (buffers of :meth:`new_grads`).

        The single-process :func:`backward` folds this term into the attention backward's
        ``delta_eff``; a caller that does not own the attention backward (sequence
        parallelism, where the engine's attention computes ``out``) runs it here. This
        default is that attention backward with a zero ``dout`` (so ``dS = -alpha delta``);
        a backend may override it with a pass that skips the ``dO V^T`` and ``dV`` work."""
        b, hq, n, hd = q.shape
        v = q.new_zeros(b, k.shape[1], k.shape[2], hd)
        _, _, dv = self.new_grads(q, k, v)
        dout = self.prepare_dout(q.new_zeros(b, hq, n, hd), q)
        self.attn_bwd(q, k, v, dout, lse, wb.contiguous(), key_mask, cfg, 0, dq, dk, dv)


def uses_fused_kl(kernels, cfg: OpConfig) -> bool:
    return bool(getattr(kernels, "fused_kl", False)) and cfg.head_reduction == "none" and cfg.divergence != "jsd"


def _empty_stats(lse, hq, ho, groups):
    b, _, _ = lse.shape
    z = lse.new_zeros(b, hq, 0)
    return FwdStats(lse, z, z.clone(), lse.new_zeros(b, ho, 0), lse.new_zeros(b, groups, 0))


def forward(kernels, q, k, v, q_old, k_old, lse_old: Optional[torch.Tensor], query_mask, key_mask,
            cfg: OpConfig):
    """``(out, div, FwdStats)``; ``div`` is ``[B, Tq]`` ("mean") or ``[B, Hq, Tq]``."""
    b, hq, tq, _ = q.shape
    ho, n_old = q_old.shape[1], q_old.shape[2]
    groups = cfg.groups(hq)
    r0 = tq - n_old
    fused = uses_fused_kl(kernels, cfg)
    given_lse = lse_old is not None
    v_in = v
    q, k, v, q_old, k_old = kernels.prepare(q, k, v, q_old, k_old)
    if n_old == 0:
        out, lse, _, _ = kernels.attn_fwd(q, k, v, key_mask, cfg, r0)
        div = lse.new_zeros((b, tq) if groups == 1 else (b, hq, tq))
        return kernels.finish_out(out, v_in), div, _empty_stats(lse, hq, ho, groups)

    if given_lse and not cfg.exclude_self:
        lse_o = glue.old_lse(lse_old)
        lse_s_o = lse_o
    else:  # with exclude_self a cached lse_old cannot give the support's mass precisely
        lse_o, lse_s_o = kernels.policy_stats(q_old, k_old, key_mask, cfg, r0, tq, cfg.old_sm_scale)
    off_old, has_old = glue.offsets(lse_o, lse_s_o, groups)

    old_for_fused = None
    if fused:  # the old side's offsets must be final before the attention pass reads them
        valid_old = glue.valid_rows(has_old, has_old, query_mask, r0)
        old_for_fused = (q_old, k_old, glue.mask_offsets(off_old, valid_old))
    out, lse, lse_s, fused_res = kernels.attn_fwd(q, k, v, key_mask, cfg, r0, old=old_for_fused)
    if lse_s is None:
        lse_s = lse[:, :, r0:]
    off, has_cur = glue.offsets(lse[:, :, r0:], lse_s, groups)
    valid = glue.valid_rows(has_cur, has_old, query_mask, r0)
    off = glue.mask_offsets(off, valid)
    off_old = glue.mask_offsets(off_old, valid)

    if fused:
        div_rows, r_mass = fused_res
        # The fused pass saw the current support only at its end: drop rows it had to skip.
        div_rows = torch.where(valid, div_rows, torch.zeros_like(div_rows))
        e_stat = -torch.ones_like(div_rows) if cfg.divergence == "kl" else div_rows + 1.0
        e_stat = torch.where(valid, e_stat, torch.zeros_like(e_stat))
    else:
        div_rows, e_stat, r_mass = kernels.div_fwd(q, k, off, q_old, k_old, off_old, key_mask, cfg, r0)
    if given_lse and r_mass is not None:
        glue.check_old_lse(r_mass, valid)
    div = torch.cat([div_rows.new_zeros(b, groups, r0), div_rows], dim=2)
    div = div[:, 0] if cfg.head_reduction == "mean" else div
    return kernels.finish_out(out, v_in), div, FwdStats(lse, lse_s.contiguous(), off, off_old, e_stat)


def backward(kernels, dout, ddiv, q, k, v, q_old, k_old, out, div, stats: FwdStats, key_mask, cfg: OpConfig):
    """``dq, dk, dv`` of ``<dout, out> + <ddiv, div>``.

    The divergence pass runs first: besides its share of ``dq`` / ``dk`` it returns
    ``A_h = sum_S pi_h g``, from which ``b_h`` and ``delta_eff`` follow for the attention
    pass (per-head KL / reverse KL fused: ``b_h = 0`` and the attention pass adds the
    divergence's dS itself)."""
    b, hq, tq, _ = q.shape
    n_old = q_old.shape[2]
    r0 = tq - n_old
    groups = cfg.groups(hq)
    valid = ~torch.isposinf(stats.off.view(b, groups, hq // groups, n_old)[:, :, 0])
    w = glue.divergence_weight(ddiv, valid, r0)
    fused = w is not None and uses_fused_kl(kernels, cfg)
    inputs = (q, k, v)
    q, k, v, q_old, k_old = kernels.prepare(q, k, v, q_old, k_old)
    dq, dk, dv = kernels.new_grads(q, k, v)
    b_stat = None
    if w is not None and not fused:
        a_stat = kernels.div_bwd(q, k, stats.off, q_old, k_old, stats.off_old, stats.e, w, key_mask, cfg, r0, dq, dk)
        b_stat = glue.coupling(a_stat, stats.e, stats.lse_s, stats.off)
    delta = glue.effective_delta(dout, out, w, b_stat, r0)
    old = None
    if fused:
        div_rows = (div[:, None] if div.dim() == 2 else div)[:, :, r0:].contiguous()
        old = (q_old, k_old, stats.off, stats.off_old, w, div_rows)
    kernels.attn_bwd(q, k, v, kernels.prepare_dout(dout, q), stats.lse, delta, key_mask, cfg, r0, dq, dk, dv, old=old)
    return kernels.finish_grads(*inputs, dq, dk, dv)
