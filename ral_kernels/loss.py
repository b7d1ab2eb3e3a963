"""Advantage-weighted aggregation of per-token attention divergences (the RAL loss term).

Reinforced Attention Learning (RAL; Li et al., 2026, arXiv 2602.04884) adds to the usual
policy-gradient loss a term that treats the head-averaged last-layer attention row of every
response token as a policy:

    L = L_GRPO + lambda * E_t[ A_t * D_t ],     D_t = JSD(p_theta^t || p_old^t)

where ``A_t`` is the advantage of the response that token t belongs to (group-relative and
per sequence in GRPO, so constant over a sequence's tokens) and ``D_t`` the divergence that
:func:`ral_kernels.fused_attn_kl` returns for that token. Minimising ``A_t * D_t`` with
A > 0 lowers the divergence, pulling the attention back toward the rollout's pattern;
with A < 0 it raises it, pushing attention away from a pattern that led to a bad answer.
With ``A_t = 1`` everywhere (and a teacher in place of the old policy) the same term is
on-policy attention distillation.

``E_t`` is not one thing: RL trainers disagree on how a batch of ragged per-token losses
becomes a scalar, and the RAL term must be normalized exactly like the policy loss it is
added to, or ``lambda`` silently changes meaning with batch size and response length.
:func:`ral_loss` therefore takes the aggregation by the name the trainer uses for it:
TRL's ``GRPOConfig.loss_type`` ("grpo", "bnpo", "dr_grpo", "dapo") or verl's
``actor.loss_agg_mode`` ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean",
"seq-mean-token-sum-norm"). ``lambda`` is left to the caller.

Only the aggregation is reproduced here. What the trainers do around it stays with the
caller: TRL divides "grpo"/"bnpo"/"dr_grpo" by the gradient-accumulation step count, and
TRL's "dapo" and verl's "token-mean" multiply by the data-parallel world size (see
``num_items_in_batch`` in :func:`ral_loss`).
"""

from __future__ import annotations

import numbers
from typing import Optional, Union

import torch

__all__ = ["ral_loss", "LOSS_TYPES", "TRL_LOSS_TYPES", "VERL_LOSS_AGG_MODES"]

TRL_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
VERL_LOSS_AGG_MODES = (
    "token-mean",
    "seq-mean-token-sum",
    "seq-mean-token-mean",
    "seq-mean-token-sum-norm",
)
LOSS_TYPES = TRL_LOSS_TYPES + VERL_LOSS_AGG_MODES


def ral_loss(
    div: torch.Tensor,
    advantages: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    *,
    loss_type: str = "grpo",
    max_completion_length: Optional[int] = None,
    num_items_in_batch: Optional[Union[int, float, torch.Tensor]] = None,
) -> torch.Tensor:
    """Aggregate per-token divergences into the advantage-weighted RAL loss.

    The per-token loss is ``l[b, t] = advantages[b(, t)] * div[b, t]``; it is summed over
    the response tokens (``mask``) and normalized as the named trainer normalizes its
    policy loss. Write ``m`` for the mask, ``n_b = sum_t m[b, t]`` for the response length
    of sequence b, ``N = sum_b n_b``, ``B`` for the batch size, ``T`` for the padded length
    and ``S_b = sum_t m[b, t] * l[b, t]``:

    TRL (``GRPOConfig.loss_type``):

    - ``"grpo"``: ``(1/B) * sum_b S_b / max(n_b, 1)`` -- token mean per sequence, then
      mean over all B sequences (an empty sequence counts, with loss 0).
    - ``"bnpo"``: ``sum_b S_b / max(N, 1)`` -- token mean over the local batch.
    - ``"dr_grpo"``: ``sum_b S_b / (B * L)`` with the constant
      ``L = max_completion_length`` (default ``T``).
    - ``"dapo"``: ``sum_b S_b / num_items_in_batch``, the number of active tokens in the
      global batch across processes and gradient accumulation (default ``max(N, 1)``).

    verl (``actor.loss_agg_mode``, as in ``verl.trainer.ppo.core_algos.agg_loss``):

    - ``"token-mean"``: ``sum_b S_b / num_items_in_batch`` (verl's ``batch_num_tokens``;
      default ``max(N, 1)``).
    - ``"seq-mean-token-sum"``: ``sum_b S_b / max(#{b : n_b > 0}, 1)`` -- verl leaves
      sequences with no response token out of the sequence count.
    - ``"seq-mean-token-mean"``: ``sum_b (S_b / max(n_b, 1)) / max(#{b : n_b > 0}, 1)``.
      Same as "grpo" except for that sequence count (verl divides by ``n_b + 1e-8``; the
      two agree for 0/1 masks).
    - ``"seq-mean-token-sum-norm"`` (verl's Dr. GRPO): "seq-mean-token-sum" divided by the
      constant ``L = max_completion_length`` (verl's ``loss_scale_factor``; default ``T``,
      verl's default ``loss_mask.shape[-1]``, the padded response length):
      ``sum_b S_b / max(#{b : n_b > 0}, 1) / L``, as in verl 0.9's ``agg_loss``. TRL's
      "dr_grpo" divides by all ``B`` sequences instead.

    Args:
        div: per-token divergence, floating point, ``[B, T]``, or ``[B, H, T]`` per head
            (averaged over ``H`` first). Values at masked-out positions are never read, so
            padding may hold anything, NaN included.
        advantages: floating point, ``[B]`` (one advantage per sequence, broadcast over
            tokens) or ``[B, T]`` (per token). All ones gives attention distillation.
        mask: ``[B, T]``, bool or 0/1 integer/float, True on response tokens. ``None``
            means every token counts. A float mask with other values acts as token
            weights in both the sums and the counts.
        loss_type: one of :data:`LOSS_TYPES` (above).
        max_completion_length: the constant ``L`` of "dr_grpo" and
            "seq-mean-token-sum-norm"; must be > 0. Ignored by the other modes.
        num_items_in_batch: the token count of "dapo" and "token-mean"; a number or a
            one-element tensor, > 0. Ignored by the other modes. TRL and verl divide by
            ``num_items_in_batch / world_size`` (verl: ``/ batch_num_tokens * dp_size``)
            because data-parallel backends average gradients over ranks; to match them
            under DDP/FSDP pass ``num_items_in_batch = global_count / world_size``.

    Returns:
        A scalar tensor, differentiable with respect to ``div`` and ``advantages``, in
        ``float32`` (``float64`` if either input is ``float64``). Multiply by ``lambda``
        and add it to the policy loss.

    Raises:
        TypeError: ``div``/``advantages`` not floating-point tensors, ``mask`` of a
            non-real dtype, or a normalizer that is not a number.
        ValueError: unknown ``loss_type``; shapes or devices of ``div``, ``advantages``
            and ``mask`` that do not agree; ``max_completion_length`` or
            ``num_items_in_batch`` <= 0.

    Example::

        >>> out, div = ral_kernels.fused_attn_kl(q, k, v, q_old, k_old,
        ...                                      query_mask=completion_mask)
        >>> loss = policy_loss + lam * ral_loss(div, advantages, completion_mask,
        ...                                     loss_type="dapo",
        ...                                     num_items_in_batch=n_items)
        >>> # attention distillation: weight 1 on every response token
        >>> kd = ral_loss(div, torch.ones(div.shape[0]), completion_mask, loss_type="bnpo")
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(
            f"loss_type must be one of {', '.join(repr(t) for t in LOSS_TYPES)}; got {loss_type!r}"
        )
    div = _check_div(div)
    B, T = div.shape
    advantages = _check_advantages(advantages, B, T, div.device)
    mask = _check_mask(mask, B, T, div.device)
    if max_completion_length is not None:
        _check_positive_number("max_completion_length", max_completion_length)
    if num_items_in_batch is not None:
        _check_positive_number("num_items_in_batch", num_items_in_batch)

    dtype = torch.promote_types(torch.promote_types(div.dtype, advantages.dtype), torch.float32)
    div = div.to(dtype)
    adv = advantages.to(dtype)
    if adv.dim() == 1:
        adv = adv.unsqueeze(1)

    if mask is None:
        weights = torch.ones((B, T), dtype=dtype, device=div.device)
        masked = adv * div
    else:
        weights = mask.to(dtype)
        # where, not a product with the mask: padding may hold NaN/inf, and 0 * NaN is NaN
        # (in the value, and in the other factor's gradient).
        keep = mask != 0
        zero = torch.zeros((), dtype=dtype, device=div.device)
        div = torch.where(keep, div, zero)
        adv = torch.where(keep, adv, zero)  # also a [B] advantage: NaN for a fully masked sequence
        masked = adv * div * weights

    seq_sum = masked.sum(dim=-1)  # S_b
    seq_len = weights.sum(dim=-1)  # n_b
    total = seq_sum.sum()

    if loss_type == "grpo":
        return (seq_sum / seq_len.clamp(min=1.0)).sum() / max(B, 1)
    if loss_type == "bnpo":
        return total / seq_len.sum().clamp(min=1.0)
    # The default L = T is clamped only so that an empty [B, 0] batch gives 0, not 0 / 0.
    if max_completion_length is None:
        L = float(max(T, 1))
    else:
        L = _as_normalizer(max_completion_length, dtype, div.device)
    if loss_type == "dr_grpo":
        return total / (max(B, 1) * L)
    if loss_type in ("dapo", "token-mean"):
        if num_items_in_batch is None:
            return total / seq_len.sum().clamp(min=1.0)
        return total / _as_normalizer(num_items_in_batch, dtype, div.device)
    num_seqs = (seq_len > 0).to(dtype).sum().clamp(min=1.0)
    if loss_type == "seq-mean-token-sum-norm":
        return total / num_seqs / L
    if loss_type == "seq-mean-token-sum":
        return total / num_seqs
    # "seq-mean-token-mean"
    return (seq_sum / seq_len.clamp(min=1.0)).sum() / num_seqs


def _check_div(div) -> torch.Tensor:
    if not isinstance(div, torch.Tensor):
        raise TypeError(f"div must be a torch.Tensor, got {type(div).__name__}")
    if not div.is_floating_point():
        raise TypeError(f"div must be a floating-point tensor, got dtype {div.dtype}")
    if div.dim() == 3:
        div = div.mean(dim=1)
    elif div.dim() != 2:
        raise ValueError(
            f"div must have shape [B, T] or [B, H, T] (per head), got {tuple(div.shape)}"
        )
    return div


def _check_advantages(advantages, B: int, T: int, device: torch.device) -> torch.Tensor:
    if not isinstance(advantages, torch.Tensor):
        raise TypeError(f"advantages must be a torch.Tensor, got {type(advantages).__name__}")
    if not advantages.is_floating_point():
        raise TypeError(f"advantages must be a floating-point tensor, got dtype {advantages.dtype}")
    if tuple(advantages.shape) not in ((B,), (B, T)):
        raise ValueError(
            f"advantages must have shape [B]={[B]} or [B, T]={[B, T]} to match div, "
            f"got {list(advantages.shape)}"
        )
    if advantages.device != device:
        raise ValueError(f"advantages is on {advantages.device} but div is on {device}")
    return advantages


def _check_mask(mask, B: int, T: int, device: torch.device) -> Optional[torch.Tensor]:
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor or None, got {type(mask).__name__}")
    if mask.is_complex():
        raise TypeError(f"mask must be bool or a 0/1 integer/float tensor, got dtype {mask.dtype}")
    if tuple(mask.shape) != (B, T):
        raise ValueError(f"mask must have shape [B, T]={[B, T]} to match div, got {list(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"mask is on {mask.device} but div is on {device}")
    return mask


def _check_positive_number(name: str, value) -> None:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_complex() or value.dtype == torch.bool:
            raise TypeError(
                f"{name} must be a positive number or a one-element real tensor, "
                f"got a {value.dtype} tensor of shape {list(value.shape)}"
            )
        if torch.compiler.is_compiling():
            return  # a data-dependent check would break the graph
        value = value.item()  # one host sync; the count is usually a CPU or logged scalar
    elif isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a positive number, got {type(value).__name__}")
    if not value > 0:  # also rejects NaN
        raise ValueError(f"{name} must be > 0, got {value}")


def _as_normalizer(value, dtype: torch.dtype, device: torch.device):
    if isinstance(value, torch.Tensor):
        return value.reshape(()).to(device=device, dtype=dtype)
    return float(value)
