"""``torch.library`` registration of the fused op, so ``torch.compile`` sees one opaque op.

``ral_kernels::fused_attn_kl_fwd`` returns the outputs and the per-row statistics that
backward needs; ``ral_kernels::fused_attn_kl_bwd`` returns ``dq, dk, dv``. Both dispatch on
the (already resolved) ``backend`` string to the registry's module (``fwd`` and ``bwd``).
"""

from __future__ import annotations

from typing import Optional

import torch

from .backends import implementation as _impl


@torch.library.custom_op("ral_kernels::fused_attn_kl_fwd", mutates_args=())
def fused_attn_kl_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_old: torch.Tensor, k_old: torch.Tensor,
    lse_old: Optional[torch.Tensor], query_mask: Optional[torch.Tensor], key_mask: Optional[torch.Tensor],
    causal: bool, sm_scale: float, old_sm_scale: float, divergence: str, head_reduction: str,
    exclude_self: bool, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor, torch.Tensor]:
    return _impl(backend).fwd(q, k, v, q_old, k_old, lse_old, query_mask, key_mask, causal, sm_scale,
                               old_sm_scale, divergence, head_reduction, exclude_self)


@fused_attn_kl_fwd.register_fake
def _(q, k, v, q_old, k_old, lse_old, query_mask, key_mask, causal, sm_scale, old_sm_scale,
      divergence, head_reduction, exclude_self, backend):
    b, hq, tq, _ = q.shape
    ho, n_old = q_old.shape[1], q_old.shape[2]
    groups = 1 if head_reduction == "mean" else hq
    sdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    stat = q.new_empty(b, groups, n_old, dtype=sdt)
    div = q.new_empty((b, tq) if head_reduction == "mean" else (b, hq, tq), dtype=sdt)
    return (q.new_empty(b, hq, tq, v.shape[3]), div, q.new_empty(b, hq, tq, dtype=sdt),
            q.new_empty(b, ho, n_old, dtype=sdt), stat, torch.empty_like(stat), torch.empty_like(stat),
            q.new_empty(b, hq, n_old, dtype=sdt))


@torch.library.custom_op("ral_kernels::fused_attn_kl_bwd", mutates_args=())
def fused_attn_kl_bwd(
    dout: torch.Tensor, ddiv: Optional[torch.Tensor], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    q_old: torch.Tensor, k_old: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, lse_old: torch.Tensor,
    z: torch.Tensor, z_old: torch.Tensor, e: torch.Tensor, c: torch.Tensor, key_mask: Optional[torch.Tensor],
    causal: bool, sm_scale: float, old_sm_scale: float, divergence: str, head_reduction: str,
    exclude_self: bool, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _impl(backend).bwd(dout, ddiv, q, k, v, q_old, k_old, out, lse, lse_old, z, z_old, e, c,
                               key_mask, causal, sm_scale, old_sm_scale, divergence, head_reduction,
                               exclude_self)


@fused_attn_kl_bwd.register_fake
def _(dout, ddiv, q, k, v, *args):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    (q, k, v, q_old, k_old, _lse_old, _qmask, key_mask, causal, sm_scale, old_sm_scale, divergence,
     head_reduction, exclude_self, backend) = inputs
    out, _div, lse, lse_old, z, z_old, e, c = output
    ctx.save_for_backward(q, k, v, q_old, k_old, out, lse, lse_old, z, z_old, e, c, key_mask)
    ctx.consts = (causal, sm_scale, old_sm_scale, divergence, head_reduction, exclude_self, backend)


def _backward(ctx, dout, ddiv, *_stat_grads):
    q, k, v, q_old, k_old, out, lse, lse_old, z, z_old, e, c, key_mask = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv = fused_attn_kl_bwd(dout, ddiv, q, k, v, q_old, k_old, out, lse, lse_old, z, z_old, e, c,
                                   key_mask, *ctx.consts)
    return dq, dk, dv, None, None, None, None, None, None, None, None, None, None, None, None


fused_attn_kl_fwd.register_autograd(_backward, setup_context=_setup_context)
