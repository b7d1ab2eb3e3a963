"""Ulysses sequence parallelism for a patched Hugging Face model.

Two pieces, usable apart:

- :func:`sequence_parallel_patch` makes a :class:`~ral_trainer.RALPatch` work when each
  rank of a group holds a slice of the sequence (Ulysses: all heads of its own rows). The
  patched layer's output keeps coming from the layer's own attention implementation, which
  the engine has made sequence-parallel (verl patches flash attention with its all-to-all;
  :func:`ulysses_model` does it for SDPA); its capture keeps the old queries of this rank's
  response rows and this rank's old keys (``1/P`` of the keys); its update computes the
  divergence of this rank's rows with :func:`ral_kernels.sequence_parallel.ulysses_divergence`.
- :func:`ulysses_model` runs a Hugging Face model under Ulysses on any device (the CPU
  included), the way verl does on GPUs: the text model's inputs (embeddings after the
  vision tower, position ids, the 2-D attention mask) are sliced along the sequence when it
  is entered, and every layer's attention is SDPA between two all-to-alls, with the masks
  of the whole sequence (key padding, or packed sequences read from the gathered position
  ids, as verl reads them).

Example (2 processes)::

    sp = ulysses_model(model)                    # the engine (not needed under verl)
    patch = sequence_parallel_patch(patch_model(model))
    with torch.no_grad(), patch.capture(num_rows=R + 1):
        old = model(**inputs).logits             # inputs of the whole sequence; logits: this rank's rows
    with patch.update(old_policy, sp.local(rows, 1)) as upd:
        logits = model(**inputs).logits
    upd.divergence                               # [B, T / P]: this rank's rows
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

import ral_kernels
from ral_kernels import sequence_parallel as ksp

from .models import decoder_layers
from .layout import layout_from
from .patch import LayerCapture, PatchError, RALPatch, _original_fn

__all__ = ["ULYSSES_ATTN_NAME", "SPLayerCapture", "UlyssesModel", "sequence_parallel_patch", "ulysses_model"]

ULYSSES_ATTN_NAME = "ral_ulysses_sdpa"


def _group_info(group):
    if not dist.is_available() or not dist.is_initialized():
        raise PatchError("sequence parallelism needs an initialized torch.distributed process group")
    return dist.get_world_size(group), dist.get_rank(group)


@dataclasses.dataclass(frozen=True)
class _GlobalLayout:
    """This forward's whole-sequence layout, as one rank sees it."""

    key_mask: Optional[torch.Tensor]  # [B, n] this rank's valid keys (None: all)
    cu_seqlens: Optional[torch.Tensor]  # [S + 1] packed sequences over the global T (B = 1)
    n: int
    world: int
    rank: int

    @property
    def t(self) -> int:
        return self.n * self.world

    def positions(self, device) -> torch.Tensor:
        return torch.arange(self.rank * self.n, (self.rank + 1) * self.n, device=device)


def _global_layout(q, mask, kwargs, group) -> _GlobalLayout:
    """Key padding from the mask the model built for this rank's slice, or packed sequences
    from the position ids of all ranks (a reset to 0 starts a sequence, as verl reads them)."""
    world, rank = _group_info(group)
    b, n = q.shape[0], q.shape[2]
    pos = kwargs.get("position_ids")
    if isinstance(pos, torch.Tensor) and b == 1:  # (the same test on every rank: they gather together)
        pos = pos.reshape(-1, pos.shape[-1])[0]  # text positions ([B, n], or the first of M-RoPE's)
        allpos = torch.empty(world * n, dtype=pos.dtype, device=pos.device)
        dist.all_gather_into_tensor(allpos, pos.contiguous(), group=group)
        starts = ((allpos[1:] != allpos[:-1] + 1).nonzero().flatten() + 1).tolist()
        if starts:
            cu = torch.tensor([0] + starts + [world * n], dtype=torch.int32, device=q.device)
            return _GlobalLayout(None, cu, n, world, rank)
    if mask is None:
        return _GlobalLayout(None, None, n, world, rank)
    lay = layout_from(mask, q, q, {}, None)
    if lay.packed:
        raise PatchError("under sequence parallelism, pass packed sequences with attention_mask=None and their "
                         "position ids (verl's use_remove_padding), not a block mask")
    return _GlobalLayout(lay.key_mask, None, n, world, rank)


def _allowed(layout: _GlobalLayout, key_mask_all: Optional[torch.Tensor], device) -> torch.Tensor:
    """``[B or 1, 1, T, T]`` bool: causal, valid keys, same sequence; a row with no key may
    see itself (its output is never used, and SDPA would give NaN)."""
    t = layout.t
    i = torch.arange(t, device=device)
    allowed = (i[None, :] <= i[:, None])[None, None]
    if layout.cu_seqlens is not None:
        seq = torch.searchsorted(layout.cu_seqlens[1:].to(device), i, right=True)
        allowed = allowed & (seq[:, None] == seq[None, :])[None, None]
    if key_mask_all is not None:
        allowed = allowed & key_mask_all[:, None, None, :]
    empty = ~allowed.any(-1, keepdim=True)
    return allowed | (empty & torch.eye(t, dtype=torch.bool, device=device))


def _ulysses_sdpa_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """The attention of every layer under :func:`ulysses_model`: SDPA over the whole
    sequence for ``H/P`` heads between two all-to-alls. Returns ``[B, n, H, Dv]``."""
    handle = getattr(module, "_ral_ulysses", None)
    if handle is None:
        raise PatchError(f"{ULYSSES_ATTN_NAME} attention called on a module outside ulysses_model(...)")
    if dropout:
        raise PatchError(f"attention dropout {dropout} is not supported under Ulysses here; set attention_dropout=0")
    layout = _global_layout(query, attention_mask, kwargs, handle.group)
    km = layout.key_mask  # every rank gathers (a rank's slice may have no padding while another's has)
    km = ksp.gather_sequence(torch.ones(query.shape[0], layout.n, dtype=torch.bool, device=query.device)
                             if km is None else km, 1, handle.group)
    allowed = _allowed(layout, km, query.device)
    scale = scaling if scaling is not None else 1.0 / math.sqrt(query.shape[-1])

    def attention(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale,
                                              enable_gqa=k.shape[1] != q.shape[1])

    out = ksp.ulysses_attention(query, key, value, attention, group=handle.group)
    return out.transpose(1, 2).contiguous(), None


class UlyssesModel:
    """Handle of :func:`ulysses_model`: ``.local(x, dim)`` takes this rank's slice of a
    whole-sequence tensor; ``.remove()`` restores the model."""

    def __init__(self, model, group):
        self.model, self.group = model, group
        self.world, self.rank = _group_info(group)
        self._configs = []
        self._hooks = []

    def local(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        t = x.shape[dim]
        if t % self.world:
            raise PatchError(f"the sequence length {t} is not a multiple of the sequence-parallel degree {self.world}; "
                             "pad it (verl pads the packed row)")
        n = t // self.world
        return x.narrow(dim, self.rank * n, n)

    def _slice_inputs(self, module, args, kwargs):
        if args:
            raise PatchError("ulysses_model: the text model must be called with keyword arguments")
        emb, ids = kwargs.get("inputs_embeds"), kwargs.get("input_ids")
        whole = emb if emb is not None else ids
        b, t = whole.shape[0], whole.shape[1]
        pos = kwargs.get("position_ids")
        if pos is None:  # the single-process default (cache_position), for the whole sequence
            pos = torch.arange(t, device=whole.device)[None].expand(b, t)
        kwargs = dict(kwargs, position_ids=self.local(pos, pos.dim() - 1))
        if emb is not None:
            kwargs["inputs_embeds"] = self.local(emb, 1)
        else:
            kwargs["input_ids"] = self.local(ids, 1)
        am = kwargs.get("attention_mask")
        if isinstance(am, torch.Tensor):
            if am.dim() != 2:
                raise PatchError("ulysses_model takes a 2-D attention_mask [B, T] (or None with packed position ids)")
            kwargs["attention_mask"] = self.local(am, 1)
        return (), kwargs

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        for attn, cfg in self._configs:
            attn.config = cfg
            attn.__dict__.pop("_ral_ulysses", None)
            st = getattr(attn, "_ral_state", None)
            if st is not None and st.orig_impl == ULYSSES_ATTN_NAME:
                st.orig_impl = getattr(st, "_pre_ulysses_impl", None)
        self._hooks, self._configs = [], []


def ulysses_model(model, group=None, *, slice_inputs: bool = True) -> UlyssesModel:
    """Run ``model`` (a supported Hugging Face model) under Ulysses sequence parallelism
    over ``group``: call it with the inputs of the **whole** sequence on every rank (length a
    multiple of the degree); its text model works on this rank's slice and returns this
    rank's rows (logits ``[B, T/P, V]``). Every decoder layer's attention becomes SDPA over
    the whole sequence between all-to-alls (the heads must divide among the ranks; KV heads
    are repeated when they do not, as verl does); layers patched by
    :func:`ral_trainer.patch_model` get it as their own implementation.

    This is the engine verl provides on GPUs (``ulysses_sequence_parallel_size``), for CPU
    tests and plain torch loops; under verl use only :func:`sequence_parallel_patch`.
    ``slice_inputs=False`` leaves the inputs alone (a caller that slices them itself, as
    verl's engine does, and only needs the attention).
    """
    from transformers import AttentionInterface

    AttentionInterface.register(ULYSSES_ATTN_NAME, _ulysses_sdpa_forward)
    handle = UlyssesModel(model, group)
    layers = decoder_layers(model)
    heads = layers[0].self_attn.config.num_attention_heads
    if heads % handle.world:
        raise PatchError(f"Ulysses: the sequence-parallel degree {handle.world} does not divide the "
                         f"{heads} attention heads")
    for layer in layers:
        attn = layer.self_attn
        cfg = attn.config
        handle._configs.append((attn, cfg))
        st = getattr(attn, "_ral_state", None)
        if st is not None:  # a patched layer: its "own" implementation becomes the Ulysses one
            st._pre_ulysses_impl = st.orig_impl
            st.orig_impl = ULYSSES_ATTN_NAME
        else:
            new_cfg = copy.copy(cfg)
            new_cfg.__dict__["_attn_implementation_internal"] = ULYSSES_ATTN_NAME
            attn.config = new_cfg
        attn._ral_ulysses = handle
    if slice_inputs:
        text_model = model.get_decoder() if hasattr(model, "get_decoder") else model
        handle._hooks.append(text_model.register_forward_pre_hook(handle._slice_inputs, with_kwargs=True))
    return handle


# --------------------------------------------------------------------------- RAL's patched layer under Ulysses

@dataclasses.dataclass
class SPLayerCapture(LayerCapture):
    """A :class:`~ral_trainer.LayerCapture` of one rank under sequence parallelism: the old
    queries of this rank's rows ``old_rows`` (local indices), this rank's old keys."""

    old_rows: torch.Tensor = None  # [m] ascending local row indices of cache.q_old

    def _with(self, fn) -> "SPLayerCapture":  # select / to / offload keep the rows
        c = super()._with(fn)
        return SPLayerCapture(c.cache, c.sm_scale, c.key_mask, c.num_tokens, c.device, old_rows=self.old_rows)


def _capture_rows(layout: _GlobalLayout, num_rows: Optional[int], device) -> torch.Tensor:
    """Local indices of the rows whose old queries are kept: the last ``num_rows`` rows of
    each sequence (of the padded width, or of each packed sequence)."""
    pos = layout.positions(device)
    if num_rows is None:
        return torch.arange(layout.n, device=device)
    if layout.cu_seqlens is None:
        return (pos >= layout.t - int(num_rows)).nonzero().flatten()
    ends = layout.cu_seqlens[1:].to(device)
    end_of = ends[torch.searchsorted(ends, pos, right=True)]
    return (pos >= end_of - int(num_rows)).nonzero().flatten()


def _sp_attention(patch: RALPatch, group, state, module, q, k, v, mask, dropout, scaling, sliding_window, softcap,
                  kwargs):
    """``RALPatch._attention`` under Ulysses (bound to the patch by :func:`sequence_parallel_patch`)."""
    mode = patch._mode

    def engine():  # the layer's own (sequence-parallel) attention: the output
        return _original_fn(module, state.orig_impl)(module, q, k, v, mask, dropout=dropout, scaling=scaling,
                                                     sliding_window=sliding_window, softcap=softcap, **kwargs)

    if mode is None:
        return engine()
    if sliding_window is not None or softcap is not None or dropout:
        raise PatchError(f"layer {state.layer_idx}: sliding-window attention, logit soft-capping and attention dropout "
                         "are not supported by the fused op")
    scale = float(scaling) if scaling is not None else 1.0 / math.sqrt(q.shape[-1])
    layout = _global_layout(q, mask, kwargs, group)
    if mode == "capture":
        ctx = patch._ctx
        rows = _capture_rows(layout, ctx.num_rows, q.device)
        cache = ral_kernels.OldPolicyCache(q.detach()[:, :, rows].clone(), k.detach().clone(), None)
        ctx.layers[state.layer_idx] = SPLayerCapture(cache, scale, layout.key_mask, layout.n, old_rows=rows)
        return engine()
    ctx = patch._ctx
    rm = ctx.response_mask.to(q.device)
    if tuple(rm.shape) != (q.shape[0], layout.n):
        raise PatchError(f"under sequence parallelism response_mask covers this rank's rows: expected "
                         f"{(q.shape[0], layout.n)}, got {tuple(rm.shape)} (slice it like the sequence)")
    targets = []
    if ctx._mapping is not None:
        targets.append((ctx._mapping[state.layer_idx], ctx.divergence_name, ctx.per_layer))
    if ctx._teacher_mapping is not None:
        targets.append((ctx._teacher_mapping[state.layer_idx], ctx.teacher_divergence_name, ctx.teacher_per_layer))
    for cap, div_name, store in targets:
        if not isinstance(cap, SPLayerCapture) or cap.num_tokens != layout.n or cap.cache.q_old.shape[0] != q.shape[0]:
            raise PatchError("the captured policy does not align with this sequence-parallel pass: capture it with "
                             "the same sequence-parallel layout (same tokens, same degree)")
        c = cap.cache
        qm = torch.zeros_like(rm)
        qm[:, cap.old_rows] = rm[:, cap.old_rows]
        if bool((rm & ~qm).any()):
            raise PatchError("response_mask marks rows the capture did not keep (capture(num_rows=...) must cover "
                             "the response)")
        store[state.layer_idx] = ksp.ulysses_divergence(
            q, k, c.q_old.to(q.dtype), c.k_old.to(q.dtype), group=group, sm_scale=scale, old_sm_scale=cap.sm_scale,
            divergence=div_name, exclude_self=ctx.exclude_self, query_mask=qm, key_mask=layout.key_mask,
            old_rows=cap.old_rows, cu_seqlens=layout.cu_seqlens, backend=patch.backend)
    return engine()


def sequence_parallel_patch(patch: RALPatch, group=None) -> RALPatch:
    """Make ``patch``'s layers work under Ulysses sequence parallelism over ``group`` (each
    rank: all heads of its slice of the sequence). Returns the same handle.

    - capture: keeps the old queries of this rank's rows among the last ``num_rows`` of each
      sequence and this rank's old keys (``1/P`` of the single-process cache's keys);
    - update: ``response_mask`` is this rank's ``[B, T/P]`` slice; ``upd.divergence`` is
      ``[B, T/P]`` (this rank's rows), from
      :func:`ral_kernels.sequence_parallel.ulysses_divergence` (keys all-gathered);
    - the output of a patched layer comes from its own, sequence-parallel, implementation.

    Every rank must run the same forwards and backpropagate through the divergence."""
    _group_info(group)

    def attention(state, module, q, k, v, mask, dropout, scaling, sliding_window, softcap, kwargs):
        return _sp_attention(patch, group, state, module, q, k, v, mask, dropout, scaling, sliding_window, softcap,
                             kwargs)

    patch._attention = attention  # the instance's hook, read by the registered "ral_fused" function
    patch.sequence_parallel_group = group
    return patch
