"""The captured old policy (or teacher) of a batch: per patched layer, the kernel cache
(old queries of the response rows, all old keys, optionally per-row log-sum-exp) plus what
is needed to check that an update pass sees the same tokens. Never an attention map:
``O(R·Ho·Do + T·Hko·Do)`` per sequence and layer (see ``OldPolicy.nbytes``)."""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import torch

import ral_kernels

__all__ = ["PatchError", "LayerCapture", "OldPolicy"]


class PatchError(ValueError):
    """Bad use of a patched model: the message says what was expected."""


@dataclasses.dataclass
class LayerCapture:
    """One layer's old policy (or teacher) for a batch: the kernel cache plus what is
    needed to check that the update pass sees the same tokens."""

    cache: ral_kernels.OldPolicyCache  # q_old [B, Ho, R, Do], k_old [B, Hko, T, Do], lse_old [B, Ho, R]?
    sm_scale: float
    key_mask: Optional[torch.Tensor]  # [B, T] bool, None = no padding
    num_tokens: int  # T of the (padded) layout

    def select(self, idx: torch.Tensor) -> "LayerCapture":
        c = self.cache
        lse = None if c.lse_old is None else c.lse_old[idx]
        km = None if self.key_mask is None else self.key_mask[idx]
        return LayerCapture(ral_kernels.OldPolicyCache(c.q_old[idx], c.k_old[idx], lse), self.sm_scale, km,
                            self.num_tokens)

    def nbytes(self) -> int:
        c = self.cache
        return sum(t.numel() * t.element_size() for t in (c.q_old, c.k_old, c.lse_old) if t is not None)


@dataclasses.dataclass
class OldPolicy:
    """The captured old policy (or teacher) of a batch: one :class:`LayerCapture` per
    patched layer, keyed by that model's decoder-layer index."""

    layers: dict
    model_type: str = ""

    @property
    def batch_size(self) -> int:
        return next(iter(self.layers.values())).cache.q_old.shape[0]

    def select(self, idx) -> "OldPolicy":
        """The rows ``idx`` of the batch (a minibatch of the rollout batch)."""
        if not isinstance(idx, torch.Tensor):
            idx = torch.as_tensor(idx, dtype=torch.long)
        dev = next(iter(self.layers.values())).cache.q_old.device
        idx = idx.to(dev)
        return OldPolicy({i: c.select(idx) for i, c in self.layers.items()}, self.model_type)

    def nbytes(self) -> int:
        return sum(c.nbytes() for c in self.layers.values())

    @staticmethod
    def cat(parts: Sequence["OldPolicy"]) -> "OldPolicy":
        """Concatenate the captures of consecutive chunks of one batch (along the batch),
        e.g. of an old-log-prob pass run in chunks. All chunks must be padded to the same
        width (one ``num_tokens``)."""
        if len(parts) == 1:
            return parts[0]
        out = {}
        for i in parts[0].layers:
            caps = [p.layers[i] for p in parts]
            c0 = caps[0]
            if any(c.num_tokens != c0.num_tokens for c in caps):
                raise PatchError(f"cannot concatenate captures of different widths {[c.num_tokens for c in caps]}")
            dev = c0.cache.k_old.device
            km = torch.cat([c.key_mask.to(dev) if c.key_mask is not None else
                            torch.ones(c.cache.k_old.shape[0], c.num_tokens, dtype=torch.bool, device=dev)
                            for c in caps])
            lse = None if c0.cache.lse_old is None else torch.cat([c.cache.lse_old for c in caps])
            cache = ral_kernels.OldPolicyCache(torch.cat([c.cache.q_old for c in caps]),
                                               torch.cat([c.cache.k_old for c in caps]), lse)
            out[i] = LayerCapture(cache, c0.sm_scale, None if bool(km.all()) else km, c0.num_tokens)
        return OldPolicy(out, parts[0].model_type)

    def for_layers(self, layers: Sequence[int]) -> dict:
        """Map the current model's patched layers to captured layers: by index when the
        capture comes from the same model, else in order (student's i-th patched layer ↔
        teacher's i-th captured layer, e.g. last ↔ last)."""
        mine = sorted(layers)
        theirs = sorted(self.layers)
        if set(mine) <= set(theirs) and len(mine) == len(theirs):
            return {i: self.layers[i] for i in mine}
        if len(mine) != len(theirs):
            raise PatchError(f"the old policy / teacher was captured at {len(theirs)} layer(s) {theirs} but the "
                             f"model is patched at {len(mine)} layer(s) {mine}; patch the same number of layers")
        return {i: self.layers[j] for i, j in zip(mine, theirs)}
