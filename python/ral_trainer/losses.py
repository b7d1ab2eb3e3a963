"""The losses of Reinforced Attention Learning (SPEC section 1), as plain functions.

- :func:`grpo_loss`: clipped token policy gradient with TRL's ``loss_type`` normalizations
  and an optional ``beta`` KL to a reference model (TRL's k3 estimator).
- :func:`ral_term`: ``E_t[A_t · D_t]`` from the divergence the patched layers return,
  normalized like the policy loss (``ral_kernels.ral_loss``). ``L = L_GRPO + lam · L_RAL``.
- :func:`distillation_loss`: on-policy attention distillation,
  ``mu · token KD + gamma · attention JSD`` (weight 1, no advantage).
- :func:`group_advantages`: GRPO's group-normalized advantages.

All token tensors are ``[B, R]`` over the completion (the last R positions of the input),
with ``mask`` True on the completion's real tokens.
"""

from __future__ import annotations

from typing import Optional

import torch

import ral_kernels

__all__ = ["token_logprobs", "group_advantages", "grpo_loss", "ral_term", "token_kd", "distillation_loss",
           "check_teacher_alignment", "TeacherMisalignmentError"]


class TeacherMisalignmentError(ValueError):
    """The teacher's tokens (or vocabulary) do not align with the student's."""


def token_logprobs(logits: torch.Tensor, completion_ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Log-probabilities ``[B, R]`` (float32) of ``completion_ids [B, R]``. ``logits`` are
    the model's logits for the last ``R + 1`` input positions (``logits_to_keep=R+1``) or
    all positions: the logit at position ``t`` predicts token ``t + 1``."""
    r = completion_ids.shape[1]
    lg = logits[:, -r - 1:-1].float()
    if temperature != 1.0:
        lg = lg / temperature
    return torch.gather(lg.log_softmax(-1), -1, completion_ids.unsqueeze(-1)).squeeze(-1)


def group_advantages(rewards: torch.Tensor, group_size: int, *, scale: str = "group", eps: float = 1e-4) -> torch.Tensor:
    """``(r - mean_group) / (std_group + eps)`` for rewards ``[B]`` laid out as consecutive
    groups of ``group_size`` samples of the same prompt. ``scale``: ``"group"`` (GRPO),
    ``"batch"`` (std over the batch) or ``"none"`` (Dr. GRPO: no division)."""
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards must be [B] with B a multiple of group_size={group_size}, got {tuple(rewards.shape)}")
    g = rewards.float().view(-1, group_size)
    adv = (g - g.mean(1, keepdim=True)).view(-1)
    if scale == "group":
        adv = adv / (g.std(1, keepdim=True).expand_as(g).reshape(-1) + eps)
    elif scale == "batch":
        adv = adv / (rewards.float().std() + eps)
    elif scale != "none":
        raise ValueError(f"scale must be 'group', 'batch' or 'none', got {scale!r}")
    return adv


def _aggregate(per_token, mask, loss_type, max_completion_length, num_items_in_batch):
    ones = torch.ones(per_token.shape[0], dtype=per_token.dtype, device=per_token.device)
    return ral_kernels.ral_loss(per_token, ones, mask, loss_type=loss_type,
                                max_completion_length=max_completion_length, num_items_in_batch=num_items_in_batch)


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
              loss_type: str = "grpo", epsilon_low: float = 0.2, epsilon_high: Optional[float] = None,
              ref_logp: Optional[torch.Tensor] = None, beta: float = 0.0,
              max_completion_length: Optional[int] = None, num_items_in_batch=None) -> tuple[torch.Tensor, dict]:
    """Clipped surrogate ``-min(ρ A, clip(ρ, 1-ε_low, 1+ε_high) A) + β KL_k3(π‖π_ref)`` per
    token, aggregated as TRL's ``loss_type`` (``grpo``, ``bnpo``, ``dr_grpo``, ``dapo``;
    verl's ``loss_agg_mode`` names work too). ``logp``, ``old_logp``, ``ref_logp``:
    ``[B, R]``; ``advantages``: ``[B]`` or ``[B, R]``. Returns ``(loss, stats)``."""
    mask = mask.bool()
    if logp.shape != old_logp.shape or logp.shape != mask.shape:
        raise ValueError(f"logp {tuple(logp.shape)}, old_logp {tuple(old_logp.shape)} and mask {tuple(mask.shape)} "
                         "must all be [B, R]")
    eps_hi = epsilon_low if epsilon_high is None else epsilon_high
    adv = advantages.float()
    if adv.dim() == 1:
        adv = adv[:, None]
    ratio = torch.exp(logp - old_logp.detach())
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + eps_hi)
    per_token = -torch.min(ratio * adv, clipped * adv)
    kl = None
    if beta:
        if ref_logp is None:
            raise ValueError("beta > 0 needs ref_logp (log-probs of a reference model)")
        d = ref_logp.detach() - logp
        kl = torch.exp(d) - d - 1
        per_token = per_token + beta * kl
    loss = _aggregate(per_token, mask, loss_type, max_completion_length, num_items_in_batch)
    with torch.no_grad():
        m = mask.float()
        n = m.sum().clamp(min=1)
        is_clipped = ((ratio < 1 - epsilon_low) & (adv < 0)) | ((ratio > 1 + eps_hi) & (adv > 0))
        stats = {"clip_ratio": float((is_clipped.float() * m).sum() / n)}
        if kl is not None:
            stats["kl"] = float((kl * m).sum() / n)
    return loss, stats


def ral_term(div: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *, loss_type: str = "grpo",
             max_completion_length: Optional[int] = None, num_items_in_batch=None) -> torch.Tensor:
    """``E_t[A_t · D_t]`` over the completion, normalized like the policy loss.
    ``div`` may be over the full sequence ``[B, T]``; its last ``R`` columns are used."""
    r = mask.shape[1]
    if div.shape[1] != r:
        div = div[:, -r:]
    return ral_kernels.ral_loss(div, advantages.to(div.dtype) if advantages.is_floating_point() else advantages.float(),
                                mask, loss_type=loss_type, max_completion_length=max_completion_length,
                                num_items_in_batch=num_items_in_batch)


def check_teacher_alignment(student_ids: torch.Tensor, teacher_ids: torch.Tensor,
                            student_logits: Optional[torch.Tensor] = None,
                            teacher_logits: Optional[torch.Tensor] = None) -> None:
    """Raise :class:`TeacherMisalignmentError` unless the teacher was run on exactly the
    student's tokens (same tokenizer) and, if given, logits over the same vocabulary."""
    if tuple(student_ids.shape) != tuple(teacher_ids.shape) or not torch.equal(student_ids.cpu(), teacher_ids.cpu()):
        raise TeacherMisalignmentError(
            f"the teacher's input tokens {tuple(teacher_ids.shape)} do not match the student's {tuple(student_ids.shape)}: "
            "on-policy distillation needs the teacher run on the student's sampled tokens with the same tokenizer")
    if student_logits is not None and teacher_logits is not None and student_logits.shape[-1] != teacher_logits.shape[-1]:
        raise TeacherMisalignmentError(f"teacher vocabulary {teacher_logits.shape[-1]} != student vocabulary "
                                       f"{student_logits.shape[-1]}: token-level KD needs a shared vocabulary")


def token_kd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor, *,
             kind: str = "reverse_kl", loss_type: str = "bnpo", temperature: float = 1.0) -> torch.Tensor:
    """Per-token KL over the vocabulary between student and teacher on the completion
    positions (logits ``[B, R, V]`` aligned with ``mask [B, R]``), ``"reverse_kl"``
    (KL(student‖teacher), on-policy distillation's usual choice) or ``"forward_kl"``."""
    s = (student_logits.float() / temperature).log_softmax(-1)
    t = (teacher_logits.detach().float() / temperature).log_softmax(-1)
    if kind == "reverse_kl":
        per = (s.exp() * (s - t)).sum(-1)
    elif kind == "forward_kl":
        per = (t.exp() * (t - s)).sum(-1)
    else:
        raise ValueError(f"kind must be 'reverse_kl' or 'forward_kl', got {kind!r}")
    return _aggregate(per, mask, loss_type, None, None)


def distillation_loss(student_logits, teacher_logits, div, mask, *, mu: float = 1.0, gamma: float = 1.0,
                      kd: str = "reverse_kl", loss_type: str = "bnpo") -> tuple[torch.Tensor, dict]:
    """``mu · token KD + gamma · attention divergence`` (weight 1, no advantage).
    ``student_logits``/``teacher_logits``: ``[B, R, V]`` for the completion positions;
    ``div``: from ``patch.update(teacher_policy, ...)``."""
    if student_logits.shape[:2] != teacher_logits.shape[:2]:
        raise TeacherMisalignmentError(f"teacher logits {tuple(teacher_logits.shape)} do not align with the student's "
                                       f"{tuple(student_logits.shape)}")
    if student_logits.shape[-1] != teacher_logits.shape[-1]:
        raise TeacherMisalignmentError(f"teacher vocabulary {teacher_logits.shape[-1]} != student vocabulary "
                                       f"{student_logits.shape[-1]}: token-level KD needs a shared vocabulary")
    l_kd = token_kd(student_logits, teacher_logits, mask, kind=kd, loss_type=loss_type)
    ones = torch.ones(mask.shape[0], device=mask.device)
    l_att = ral_term(div, ones, mask, loss_type=loss_type)
    return mu * l_kd + gamma * l_att, {"token_kd": float(l_kd.detach()), "attn_div": float(l_att.detach())}
