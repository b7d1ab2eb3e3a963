"""The O(T) per-row glue between the kernel passes, shared by the Triton and CUDA backends.

SPEC section 2, "Per-row scalars": after the flash sweep the group supports ``Z`` and
``Z_old`` are means of per-head support masses; after the divergence sweep
``c_h = (A_h - E B_h) / Z``; in backward ``delta_eff = rowsum(dO * O) + w c_h / n`` carries
the ``-alpha_h c_h`` part of the divergence's dS and ``w = ddiv / n`` on rows with ``Z > 0``.
"""

from __future__ import annotations

import functools
import math

import torch

from .._semantics import support_mass_from_lse


def check_supported(backend: str, q, d_old: int, dv: int, dtypes, max_head_dim: int) -> None:
    """The kernels' dtype and head-dim limits, as errors naming the backend."""
    if q.dtype not in dtypes:
        names = [str(d).replace("torch.", "") for d in dtypes]
        raise TypeError(f"backend={backend!r} supports {', '.join(names[:-1])} or {names[-1]} inputs, got {q.dtype}")
    if max(q.shape[-1], d_old, dv) > max_head_dim:
        raise ValueError(f"backend={backend!r} supports head dims up to {max_head_dim}, "
                         f"got D={q.shape[-1]}, Do={d_old}, Dv={dv}")


def without_divergence_rows(out, lse, groups: int, ho: int):
    """``fwd``'s outputs when there are no cached rows (R = 0): a zero divergence and empty
    statistics."""
    b, hq, tq = lse.shape
    div = lse.new_zeros(b, tq) if groups == 1 else lse.new_zeros(b, hq, tq)
    z = lse.new_zeros(b, groups, 0)
    return out, div, lse, lse.new_zeros(b, ho, 0), z, z.clone(), z.clone(), lse.new_zeros(b, hq, 0)


def divergence_buffers(b: int, groups: int, hq: int, tq: int, n_old: int, device):
    """Zeroed ``div`` ``[B, G, Tq]`` and the accumulators ``E`` ``[B, G, R]`` and ``A_h``
    ``[B, Hq, R]`` that the divergence pass adds to."""
    zeros = functools.partial(torch.zeros, dtype=torch.float32, device=device)
    return zeros(b, groups, tq), zeros(b, groups, n_old), zeros(b, hq, n_old)


def old_lse_and_mass(lse_old, q_old, k_old, old_sm_scale, r0, tq, tk, key_mask, exclude_self):
    """A caller-supplied ``lse_old`` in the kernels' convention (float32, ``+inf`` for a row
    with no key, contiguous) and the old support mass it implies."""
    lse_old = lse_old.float()
    lse_old = torch.where(torch.isneginf(lse_old), torch.full_like(lse_old, math.inf), lse_old).contiguous()
    mass_old = support_mass_from_lse(lse_old, q_old.float() * old_sm_scale, k_old, r0, tq, tk, key_mask,
                                     exclude_self)
    return lse_old, mass_old


def group_supports(mass_cur, mass_old, query_mask, r0: int, groups: int):
    """``(Z, Z_old)`` per group and cached row; ``Z = 0`` marks rows without a divergence
    (masked query, or no support on either side)."""
    b, hq, n_old = mass_cur.shape
    zc = mass_cur.view(b, groups, hq // groups, n_old).mean(2)
    zoc = mass_old.view(b, groups, mass_old.shape[1] // groups, n_old).mean(2)
    valid = (zc > 0) & (zoc > 0)
    if query_mask is not None:
        valid = valid & query_mask[:, None, r0:]
    return torch.where(valid, zc, torch.zeros_like(zc)).contiguous(), zoc.contiguous()


def row_coupling(a_stat, e_stat, mass_cur, z):
    """``c_h = (A_h - E B_h) / Z`` (zero where ``Z = 0``)."""
    n = a_stat.shape[1] // z.shape[1]
    zs = torch.where(z > 0, z, torch.ones_like(z)).repeat_interleave(n, 1)
    return torch.where(z.repeat_interleave(n, 1) > 0,
                       (a_stat - e_stat.repeat_interleave(n, 1) * mass_cur) / zs, torch.zeros_like(a_stat))


def effective_delta(dout, out, ddiv, z, c_stat, r0: int):
    """``(delta_eff, w)``: ``w`` is ``None`` when there is no divergence gradient."""
    delta = (dout.float() * out.float()).sum(-1)
    n_old = z.shape[2]
    if ddiv is None or n_old == 0:
        return delta.contiguous(), None
    n = out.shape[1] // z.shape[1]
    w = ddiv.float()
    w = ((w[:, None] if w.dim() == 2 else w)[:, :, r0:] * (z > 0) / n).contiguous()
    delta[:, :, r0:] += w.repeat_interleave(n, 1) * c_stat  # the -alpha_h c_h part of dS
    return delta.contiguous(), w
