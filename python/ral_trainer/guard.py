"""Warnings for a RAL attention term that does nothing.

Two ways the term can be silently zero:

- by construction: every update runs at θ = θ_old (one optimizer step per rollout batch),
  where the divergence and its gradient are identically zero. Each trainer checks its own
  schedule up front and warns :class:`ZeroAttentionTermWarning` (see
  :func:`warn_zero_schedule`).
- at run time: the schedule is fine, yet the divergence stays 0 (to rounding) on updates that
  come after an optimizer step on the same rollout batch, e.g. when the patched layer's
  queries and keys cannot move (frozen, a LoRA that misses them, lr = 0) or the capture
  saw the current weights instead of the sampling ones. :class:`ZeroTermGuard` watches the
  divergence of such updates and warns once after ``patience`` of them in a row.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch

__all__ = ["ZeroAttentionTermWarning", "ZeroTermGuard", "warn_zero_schedule", "deprecated_alias"]


class ZeroAttentionTermWarning(UserWarning):
    """The settings (or the run so far) make the RAL attention term identically zero."""


def warn_zero_schedule(what: str, fix: str, stacklevel: int = 3) -> None:
    """Warn that ``what`` (the settings) make every update run at θ = θ_old; ``fix`` says
    which settings give more than one optimizer step per rollout batch."""
    warnings.warn(f"RAL attention term is identically zero with these settings: {what}, so every update runs at "
                  f"θ = θ_old, where the attention divergence and its gradient are zero. {fix}",
                  ZeroAttentionTermWarning, stacklevel=stacklevel)


class ZeroTermGuard:
    """Warn once if the attention divergence stays exactly zero on ``patience``
    consecutive updates that should have moved it.

    "Zero" is to rounding: every token's divergence at most ``atol`` (default 1e-7). At
    θ = θ_old a capture pass and an update pass that batch the sequences differently (the
    trainers' generation batch against their micro-batches) round the queries and keys
    differently, and the log-space divergence shows it (about 1e-8 on TRL's tiny test model),
    while any optimizer step that reaches the patched layer moves it by far more.

    Call :meth:`observe` once per update micro-batch with its divergence ``[B, R]`` (or
    any shape), the mask of the tokens that carry it, and ``moved``: True when at least
    one optimizer step was taken since the old policy of this micro-batch was captured
    and the rollout batch had a learning signal (some non-zero advantage). Before such a
    step θ = θ_old and a zero divergence is expected; with all advantages zero (every
    sample of every group scored alike) the weights need not move either.
    """

    def __init__(self, patience: int = 8, where: str = "the trainer", atol: float = 1e-7):
        if patience < 1:
            raise ValueError(f"patience must be >= 1, got {patience}")
        if not atol >= 0:
            raise ValueError(f"atol must be >= 0, got {atol}")
        self.patience = patience
        self.atol = atol
        self.where = where
        self.zero_streak = 0
        self.warned = False

    def observe(self, div: torch.Tensor, mask: Optional[torch.Tensor], moved: bool) -> bool:
        """Returns True when this call emitted the warning."""
        if not moved or self.warned:
            return False
        with torch.no_grad():
            d = div.detach()
            if mask is not None:
                m = mask.to(d.device).bool()
                if not bool(m.any()):
                    return False  # no response token: nothing to judge
                d = d[m]
            zero = bool((d.abs() <= self.atol).all())
        self.zero_streak = self.zero_streak + 1 if zero else 0
        if self.zero_streak >= self.patience:
            self.warned = True
            warnings.warn(
                f"RAL attention divergence has been 0 to rounding (at most {self.atol:g} on every token) on {self.zero_streak} consecutive updates in "
                f"{self.where}, each after an optimizer step on its rollout batch: the attention term is doing "
                "nothing. Check that the patched layer's query/key projections can change (not frozen, LoRA "
                "targets them, lr > 0) and that the old policy is captured in the pass that scores the rollout "
                "(before the update).", ZeroAttentionTermWarning, stacklevel=3)
            return True
        return False


def deprecated_alias(obj, old: str, new: str, default=None) -> None:
    """Move a value set under the deprecated field ``old`` to ``new`` (with a
    DeprecationWarning); ``old`` is reset to ``default``. Used by the configs for one
    release after a rename."""
    val = getattr(obj, old)
    if val is default:
        return
    warnings.warn(f"`{old}` is deprecated and will be removed in the next release; use `{new}`",
                  DeprecationWarning, stacklevel=4)
    setattr(obj, new, val)
    setattr(obj, old, default)
