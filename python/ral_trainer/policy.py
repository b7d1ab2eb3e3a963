"""The captured old policy (or teacher) of a batch: per patched layer, the kernel cache
(old queries of the response rows, all old keys, optionally per-row log-sum-exp) plus what
is needed to check that an update pass sees the same tokens. Never an attention map:
``O(R·Ho·Do + T·Hko·Do)`` per sequence and layer (see ``OldPolicy.nbytes``)."""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import torch

import ral_kernels

__all__ = ["PatchError", "LayerCapture", "OldPolicy", "OFFLOAD_TARGETS"]


class PatchError(ValueError):
    """Bad use of a patched model: the message says what was expected."""


OFFLOAD_TARGETS = (None, "cpu")


def _normal(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """A tensor made under ``torch.inference_mode()`` cannot be saved for backward; the
    update pass saves the cache, so such tensors are copied once into normal ones."""
    if t is None or not t.is_inference():
        return t
    with torch.inference_mode(False):
        return t.clone()


def to_host(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """A copy in host memory, pinned when it comes from a GPU (so moving it back per
    minibatch can overlap with compute); a tensor already in host memory stays as it is."""
    if t is None or t.device.type == "cpu":
        return t
    out = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=t.device.type == "cuda")
    out.copy_(t)
    return out


def _cat(ts: list) -> torch.Tensor:
    out = torch.cat(ts)
    return out.pin_memory() if ts[0].is_pinned() else out  # offloaded chunks stay pinned


@dataclasses.dataclass
class LayerCapture:
    """One layer's old policy (or teacher) for a batch: the kernel cache plus what is
    needed to check that the update pass sees the same tokens.

    ``device`` is where the update pass runs; with an offloaded capture (``offload="cpu"``)
    the tensors live in host memory and :meth:`select` / :meth:`to` bring back only the
    rows a minibatch needs."""

    cache: ral_kernels.OldPolicyCache  # q_old [B, Ho, R, Do], k_old [B, Hko, T, Do], lse_old [B, Ho, R]?
    sm_scale: float
    key_mask: Optional[torch.Tensor]  # [B, T] bool, None = no padding
    num_tokens: int  # T of the (padded) layout
    device: Optional[torch.device] = None  # home device (default: where the tensors are)

    def __post_init__(self):
        c = self.cache
        self.cache = ral_kernels.OldPolicyCache(_normal(c.q_old), _normal(c.k_old), _normal(c.lse_old))
        self.key_mask = _normal(self.key_mask)
        if self.device is None:
            self.device = self.cache.q_old.device

    @property
    def offloaded(self) -> bool:
        return self.cache.q_old.device != torch.device(self.device)

    def _tensors(self):
        c = self.cache
        return c.q_old, c.k_old, c.lse_old, self.key_mask

    def _with(self, fn) -> "LayerCapture":
        q, k, lse, km = (None if t is None else fn(t) for t in self._tensors())
        return LayerCapture(ral_kernels.OldPolicyCache(q, k, lse), self.sm_scale, km, self.num_tokens, self.device)

    def select(self, idx: torch.Tensor) -> "LayerCapture":
        """Rows ``idx`` of the batch, on the home device."""
        idx = idx.to(self.cache.q_old.device)
        return self._with(lambda t: t[idx]).to(self.device)

    def to(self, device) -> "LayerCapture":
        """All rows on ``device`` (a no-op when they are there)."""
        if all(t is None or t.device == torch.device(device) for t in self._tensors()):
            return self
        return self._with(lambda t: t.to(device, non_blocking=t.is_pinned()))

    def offload(self, target: Optional[str] = "cpu") -> "LayerCapture":
        """A copy kept in host memory (``target="cpu"``; pinned when it comes from a GPU),
        or ``self`` for ``target=None``."""
        if target is None:
            return self
        if target != "cpu":
            raise ValueError(f"offload must be None or 'cpu', got {target!r}")
        return self._with(to_host)

    def nbytes(self) -> int:
        c = self.cache
        return sum(t.numel() * t.element_size() for t in (c.q_old, c.k_old, c.lse_old) if t is not None)


@dataclasses.dataclass
class OldPolicy:
    """The captured old policy (or teacher) of a batch: one :class:`LayerCapture` per
    patched layer, keyed by that model's decoder-layer index.

    Size: per sequence and patched layer, ``R·Ho·Do`` old queries (the response rows) plus
    ``T·Hko·Do`` old keys in the model's dtype, plus ``R·Ho`` float32 log-sum-exps with
    ``with_lse`` (see :meth:`nbytes`). Qwen2.5-VL-7B's last layer (Ho = 28, Hko = 4,
    Do = 128, bf16) keeps 7 KiB per response token and 1 KiB per token: 512 sequences of
    T = 8k with R = 2k hold 11 GiB (11.8 GB). ``capture(offload="cpu")`` keeps
    it in host memory and brings back one minibatch at a time."""

    layers: dict
    model_type: str = ""

    @property
    def batch_size(self) -> int:
        return next(iter(self.layers.values())).cache.q_old.shape[0]

    def select(self, idx) -> "OldPolicy":
        """The rows ``idx`` of the batch (a minibatch of the rollout batch), on the device
        the update runs on (moved back from host memory when offloaded)."""
        if not isinstance(idx, torch.Tensor):
            idx = torch.as_tensor(idx, dtype=torch.long)
        return OldPolicy({i: c.select(idx) for i, c in self.layers.items()}, self.model_type)

    def offload(self, target: Optional[str] = "cpu") -> "OldPolicy":
        """A copy in host memory (see :meth:`LayerCapture.offload`)."""
        return OldPolicy({i: c.offload(target) for i, c in self.layers.items()}, self.model_type)

    def to(self, device) -> "OldPolicy":
        return OldPolicy({i: c.to(device) for i, c in self.layers.items()}, self.model_type)

    @property
    def offloaded(self) -> bool:
        return any(c.offloaded for c in self.layers.values())

    def nbytes(self) -> int:
        """Bytes held by the cache (queries, keys, log-sum-exps) over all patched layers."""
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
            lse = None if c0.cache.lse_old is None else _cat([c.cache.lse_old for c in caps])
            cache = ral_kernels.OldPolicyCache(_cat([c.cache.q_old for c in caps]), _cat([c.cache.k_old for c in caps]),
                                               lse)
            out[i] = LayerCapture(cache, c0.sm_scale, None if bool(km.all()) else km, c0.num_tokens, c0.device)
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
