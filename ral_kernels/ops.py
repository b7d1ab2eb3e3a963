"""``torch.library`` registration of the fused op, so ``torch.compile`` sees one opaque op.

``ral_kernels::fused_attn_kl_fwd`` returns ``out``, ``div`` and the per-row statistics of
:class:`~ral_kernels.backends.pipeline.FwdStats` (flattened: custom ops return tensors);
``ral_kernels::fused_attn_kl_bwd`` returns ``dq, dk, dv``. Both dispatch on the (already
resolved) ``backend`` string to the registry's module (``fwd`` and ``bwd``). Every output
is contiguous, in the fake kernels and the real ones alike, whatever the inputs' strides.
"""

from __future__ import annotations

from typing import Optional

import torch

from .backends import implementation as _impl
from .backends.pipeline import FwdStats, OpConfig


@torch.library.custom_op("ral_kernels::fused_attn_kl_fwd", mutates_args=())
def fused_attn_kl_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_old: torch.Tensor, k_old: torch.Tensor,
    lse_old: Optional[torch.Tensor], query_mask: Optional[torch.Tensor], key_mask: Optional[torch.Tensor],
    causal: bool, sm_scale: float, old_sm_scale: float, divergence: str, head_reduction: str,
    exclude_self: bool, deterministic: bool, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    cfg = OpConfig(causal, sm_scale, old_sm_scale, divergence, head_reduction, exclude_self, deterministic)
    out, div, stats = _impl(backend).fwd(q, k, v, q_old, k_old, lse_old, query_mask, key_mask, cfg)
    return _fresh((out, div, *stats), (q, k, v, q_old, k_old, lse_old))


def _fresh(outputs, inputs) -> tuple:
    """Contiguous outputs (the strides register_fake promises) that alias neither an input
    nor each other (a custom op's contract), copying only where a backend shared storage."""
    seen = {x.untyped_storage().data_ptr() for x in inputs if x is not None and x.numel()}
    res = []
    for x in outputs:
        x = x.contiguous()
        if x.numel() and x.untyped_storage().data_ptr() in seen:
            x = x.clone()
        seen.add(x.untyped_storage().data_ptr())
        res.append(x)
    return tuple(res)


@fused_attn_kl_fwd.register_fake
def _(q, k, v, q_old, k_old, lse_old, query_mask, key_mask, causal, sm_scale, old_sm_scale,
      divergence, head_reduction, exclude_self, deterministic, backend):
    b, hq, tq, _ = q.shape
    ho, n_old = q_old.shape[1], q_old.shape[2]
    groups = 1 if head_reduction == "mean" else hq
    sdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    div = q.new_empty((b, tq) if head_reduction == "mean" else (b, hq, tq), dtype=sdt)
    stats = FwdStats(lse=q.new_empty(b, hq, tq, dtype=sdt), lse_s=q.new_empty(b, hq, n_old, dtype=sdt),
                     off=q.new_empty(b, hq, n_old, dtype=sdt), off_old=q.new_empty(b, ho, n_old, dtype=sdt),
                     e=q.new_empty(b, groups, n_old, dtype=sdt))
    return (q.new_empty(b, hq, tq, v.shape[3]), div, *stats)


@torch.library.custom_op("ral_kernels::fused_attn_kl_bwd", mutates_args=())
def fused_attn_kl_bwd(
    dout: torch.Tensor, ddiv: Optional[torch.Tensor], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    q_old: torch.Tensor, k_old: torch.Tensor, out: torch.Tensor, div: torch.Tensor, lse: torch.Tensor,
    lse_s: torch.Tensor, off: torch.Tensor, off_old: torch.Tensor, e: torch.Tensor, key_mask: Optional[torch.Tensor],
    causal: bool, sm_scale: float, old_sm_scale: float, divergence: str, head_reduction: str,
    exclude_self: bool, deterministic: bool, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    cfg = OpConfig(causal, sm_scale, old_sm_scale, divergence, head_reduction, exclude_self, deterministic)
    grads = _impl(backend).bwd(dout, ddiv, q, k, v, q_old, k_old, out, div, FwdStats(lse, lse_s, off, off_old, e),
                               key_mask, cfg)
    return _fresh(grads, (dout, ddiv, q, k, v, q_old, k_old, out, div, lse, lse_s, off, off_old, e))


@fused_attn_kl_bwd.register_fake
def _(dout, ddiv, q, k, v, *args):
    # Contiguous whatever the inputs' strides (HF passes transposed [B, T, H, D] views):
    # the real kernels return contiguous gradients, and inductor asserts the strides match.
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, q_old, k_old, _lse_old, _qmask, key_mask, *consts = inputs
    out, div, *stats = output
    ctx.save_for_backward(q, k, v, q_old, k_old, out, div, *stats, key_mask)
    ctx.consts = consts  # causal, sm_scale, old_sm_scale, divergence, head_reduction, exclude_self, deterministic, backend


def _backward(ctx, dout, ddiv, *_stat_grads):
    *tensors, key_mask = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(tensors[5])
    dq, dk, dv = fused_attn_kl_bwd(dout, ddiv, *tensors, key_mask, *ctx.consts)
    return (dq, dk, dv) + (None,) * 13


fused_attn_kl_fwd.register_autograd(_backward, setup_context=_setup_context)
