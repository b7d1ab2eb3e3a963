"""Swap the fused attention + divergence op into chosen decoder layers of a Hugging Face
model, capture the old policy's (or a teacher's) attention cheaply, and hand the
per-token divergence to the loss through a side channel.

How it plugs in. Every supported attention module looks its kernel up with
``ALL_ATTENTION_FUNCTIONS[self.config._attn_implementation]``. :func:`patch_model`
registers one function under the name ``"ral_fused"`` (transformers refuses names with
"flash") and gives each patched attention module a shallow copy of its config whose
``_attn_implementation`` is that name. Every other layer keeps the model's config and so
its own implementation (sdpa / flash / eager), and the model still builds the masks of its
own implementation: the patched layers read key padding (and packing) from that mask, so
no extra mask function is needed. :meth:`RALPatch.unpatch` restores the original configs.

Three modes, switched by context managers on the handle:

- plain (default): a patched layer calls the layer's original implementation, so
  ``generate`` runs at full speed and gives the same tokens.
- :meth:`RALPatch.capture` (the no-grad pass that computes old log-probs, or a teacher's
  forward): the layer also keeps the old queries of the last ``num_rows`` rows (the
  response), all old keys and optionally per-row log-sum-exp — an
  :class:`ral_kernels.OldPolicyCache`, ``O(R·H·D + T·Hk·D)`` per sequence, never an
  attention map.
- :meth:`RALPatch.update` (the pass with gradients): the layer runs
  :func:`ral_kernels.fused_attn_kl` against the captured cache and stores the
  per-token divergence ``[B, T]`` on the context object; the loss reads it from there.

Example::

    patch = patch_model(model)                       # default: the last decoder layer
    with torch.no_grad(), patch.capture(num_rows=R) as cap:
        old_logits = model(**inputs).logits          # old log-probs, as before
    with patch.update(cap.old_policy, response_mask=mask) as upd:
        logits = model(**inputs).logits
    loss = pg_loss + lam * ral_kernels.ral_loss(upd.divergence[:, -R:], adv, mask[:, -R:])
    patch.unpatch()
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import sys
import weakref
from typing import Optional, Sequence

import torch

import ral_kernels
from ral_kernels.varlen import left_padded_index

from .models import decoder_layers, model_type

ATTN_NAME = "ral_fused"

__all__ = ["ATTN_NAME", "RALPatch", "patch_model", "unpatch_model", "OldPolicy", "LayerCapture",
           "CaptureContext", "UpdateContext", "PatchError"]


class PatchError(ValueError):
    """Bad use of a patched model: the message says what was expected."""


# --------------------------------------------------------------------------- captured policy

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


# --------------------------------------------------------------------------- layouts (padding / packing)

class _Layout:
    """How the tokens this layer sees map to a left/right-padded batch ``[B, H, T, D]``
    with a key mask. Padded inputs map to themselves; packed inputs (one row holding
    several sequences, flash-attn ``cu_seqlens`` style) are unpacked left-padded for the
    capture (the old-policy cache is padded, its last rows the responses) and run through
    ``fused_attn_kl_varlen`` in the update."""

    def __init__(self, key_mask, segments=None):
        self.key_mask = key_mask  # [B', T'] bool or None
        self.segments = segments  # None, or (lengths list, batch_idx, pos_idx, width)

    @property
    def packed(self) -> bool:
        return self.segments is not None

    def to_padded(self, x):  # [B, H, T, D] -> [B', H, T', D]
        if not self.packed:
            return x
        lengths, bi, pi, width = self.segments
        rows = x[0].transpose(0, 1)  # [T, H, D]
        out = rows.new_zeros((len(lengths), width) + tuple(rows.shape[1:]))
        out = out.index_put((bi, pi), rows)
        return out.transpose(1, 2)

    def rows_to_padded(self, m):  # [B, T] -> [B', T']
        if not self.packed or m is None:
            return m
        lengths, bi, pi, width = self.segments
        out = m.new_zeros((len(lengths), width))
        return out.index_put((bi, pi), m[0])

    # packed (varlen) form of a packed layout: [total, H, D] with flash-attn cu_seqlens
    def cu_seqlens(self, lengths=None) -> torch.Tensor:
        lens = torch.tensor(self.segments[0] if lengths is None else lengths, device=self.key_mask.device)
        return torch.nn.functional.pad(torch.cumsum(lens, 0), (1, 0)).to(torch.int32)

    def padded_to_varlen(self, x):  # [B', H, T', D] (left-padded) -> [total, H, D]
        _, bi, pi, _ = self.segments
        return x.transpose(1, 2)[bi, pi]

    def old_rows_to_varlen(self, cache):
        """The cached last ``R`` rows of every sequence (padded ``[B', Ho, R, Do]``, plus
        ``lse_old`` ``[B', Ho, R]``) in varlen form: each sequence keeps its last
        ``min(R, length)`` rows. Returns ``(q_old [total_old, Ho, Do], lse_old [Ho, total_old]
        or None, cu_seqlens_old)``."""
        r = cache.q_old.shape[2]
        keep = [min(r, n) for n in self.segments[0]]
        q_old = torch.cat([cache.q_old[s, :, r - n:].transpose(0, 1) for s, n in enumerate(keep)])
        lse = None if cache.lse_old is None else torch.cat([cache.lse_old[s, :, r - n:] for s, n in enumerate(keep)], 1)
        return q_old, lse, self.cu_seqlens(keep)


def _segments_layout(lengths: list, device) -> _Layout:
    width = max(lengths)
    bi, pi = left_padded_index(lengths, width, device)
    key_mask = torch.zeros(len(lengths), width, dtype=torch.bool, device=device)
    key_mask[bi, pi] = True
    return _Layout(key_mask, (lengths, bi, pi, width))


def _causal(tq: int, tk: int, device) -> torch.Tensor:
    i = torch.arange(tq, device=device)[:, None]
    j = torch.arange(tk, device=device)[None, :]
    return j <= i + (tk - tq)


def _layout_from(mask, q, k, kwargs, impl=None) -> _Layout:
    """Read key padding (or packing) from whatever mask the model's own implementation
    built: ``None`` (plain causal), a 2D padding mask (flash), a 4D bool (sdpa) or
    additive float (eager) mask."""
    b, tq, tk = q.shape[0], q.shape[2], k.shape[2]
    if mask is None:
        cu = kwargs.get("cu_seq_lens_q")
        if cu is not None and b == 1:
            offs = cu.tolist()
            return _segments_layout([y - x for x, y in zip(offs, offs[1:]) if y > x], q.device)
        # flash attention (only) reads packing from position_ids; sdpa/eager would have built a mask
        pos = kwargs.get("position_ids") if impl and "flash" in impl else None
        if isinstance(pos, torch.Tensor) and pos.dim() == 2 and b == 1 and tq == tk and tq > 1:
            starts = (pos[0, 1:] == 0).nonzero().flatten() + 1
            if starts.numel():
                bounds = [0] + starts.tolist() + [tq]
                return _segments_layout([y - x for x, y in zip(bounds, bounds[1:])], q.device)
        return _Layout(None)
    if not isinstance(mask, torch.Tensor):
        raise PatchError(f"ral_fused attention got an attention mask of type {type(mask).__name__} "
                         "(e.g. flex BlockMask); use attn_implementation='sdpa', 'eager' or 'flash_attention_2'")
    if mask.dim() == 2:
        return _Layout(None if bool(mask.all()) else mask.bool())
    if mask.dim() != 4:
        raise PatchError(f"unexpected attention mask shape {tuple(mask.shape)}")
    allowed = mask[:, 0] if mask.dtype == torch.bool else (mask[:, 0] > torch.finfo(mask.dtype).min / 2)
    if allowed.shape[-2:] != (tq, tk):
        allowed = allowed[..., -tq:, -tk:]
    causal = _causal(tq, tk, q.device)
    key_mask = allowed[:, -1, :] | ~causal[-1][None, :]  # the last row sees every valid key
    # Rows of padding queries are not compared: implementations differ there (all masked, or
    # all unmasked to avoid NaN), and their outputs never reach a real token. A row the last
    # row cannot see that attends to a proper subset of keys is a packed sequence instead.
    valid_q = key_mask[:, tk - tq:]
    mismatch = allowed ^ (causal[None] & key_mask[:, None, :])
    diff = mismatch & valid_q[:, :, None]
    packed_like = ~valid_q & mismatch.any(-1) & ~allowed.all(-1)
    if not bool(diff.any()) and not bool(packed_like.any()):
        return _Layout(None if bool(key_mask.all()) else key_mask)
    if b == 1 and tq == tk:  # block-diagonal causal: packed sequences
        idx = torch.arange(1, tq, device=q.device)
        starts = (~allowed[0, idx, idx - 1]).nonzero().flatten() + 1
        bounds = [0] + starts.tolist() + [tq]
        lengths = [y - x for x, y in zip(bounds, bounds[1:])]
        seg = torch.repeat_interleave(torch.arange(len(lengths), device=q.device), torch.tensor(lengths, device=q.device))
        if torch.equal(allowed[0], causal & (seg[:, None] == seg[None, :])):
            return _segments_layout(lengths, q.device)
    raise PatchError("the attention mask of this layer is neither causal with key padding nor packed causal "
                     "sequences (sliding window, bidirectional image attention, ...): the fused op cannot express it")


def _original_fn(module, impl):
    from transformers import AttentionInterface

    if impl in (None, "eager"):
        mod = sys.modules[type(module).__module__]
        return getattr(mod, "eager_attention_forward")
    return AttentionInterface._global_mapping[impl]


def _ral_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                           sliding_window=None, softcap=None, **kwargs):
    """The function registered as ``"ral_fused"``; dispatches to the module's patch."""
    state = getattr(module, "_ral_state", None)
    patch = state.patch() if state is not None else None
    if patch is None:
        raise PatchError("ral_fused attention called on a module that is not patched (or whose patch was "
                         "garbage-collected); call ral_trainer.patch_model(model) first")
    return patch._attention(state, module, query, key, value, attention_mask, dropout, scaling, sliding_window,
                            softcap, kwargs)


def _register():
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(ATTN_NAME, _ral_attention_forward)
    # Only used if someone sets the *model-wide* implementation to ral_fused; the patched
    # layers otherwise read the mask that the model's own implementation builds.
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)


@dataclasses.dataclass
class _LayerState:
    layer_idx: int
    orig_config: object
    orig_impl: Optional[str]
    patch: "weakref.ref"


# --------------------------------------------------------------------------- contexts (side channel)

class CaptureContext:
    """Active during a capture pass; afterwards ``.old_policy`` holds the cache and
    ``.attention_rows`` (if requested) the head-averaged attention rows of the response,
    ``{layer: [B, R, T] float32}`` (for metrics only)."""

    def __init__(self, num_rows, with_lse, record_attention):
        self.num_rows = num_rows
        self.with_lse = with_lse
        self.record_attention = record_attention
        self.layers: dict = {}
        self.attention_rows: dict = {}
        self.old_policy: Optional[OldPolicy] = None


class UpdateContext:
    """Active during an update pass. ``.per_layer[layer]`` and ``.divergence`` (mean over
    patched layers) are ``[B, T]`` float32, differentiable w.r.t. the patched layers'
    queries and keys, zero outside ``response_mask``."""

    def __init__(self, old: OldPolicy, response_mask, divergence, exclude_self, record_attention):
        self.old = old
        self.response_mask = response_mask
        self.divergence_name = divergence
        self.exclude_self = exclude_self
        self.record_attention = record_attention
        self.per_layer: dict = {}
        self.teacher_per_layer: dict = {}
        self.attention_rows: dict = {}
        self._mapping = None
        self._teacher_mapping = None
        self.teacher_divergence_name = "jsd"

    @staticmethod
    def _mean(d: dict, what: str) -> torch.Tensor:
        if not d:
            raise PatchError(f"no {what} divergence: run the model's forward inside the `with patch.update(...)` "
                             "block" + (" and pass teacher=" if what == "teacher" else ""))
        vals = [d[i] for i in sorted(d)]
        return vals[0] if len(vals) == 1 else torch.stack(vals).mean(0)

    @property
    def divergence(self) -> torch.Tensor:
        """Divergence to the old policy, ``[B, T]``, mean over patched layers."""
        return self._mean(self.per_layer, "old-policy")

    @property
    def teacher_divergence(self) -> torch.Tensor:
        """Divergence to the teacher, ``[B, T]``, mean over patched layers."""
        return self._mean(self.teacher_per_layer, "teacher")


@torch.no_grad()
def _attention_rows(q, k, layout_key_mask, num_rows, scale):
    """Head-averaged attention rows of the last ``num_rows`` queries, ``[B, R, T]`` fp32.
    Metrics only: ``R x T`` per sequence, computed in the no-grad pass."""
    qr = q[:, :, -num_rows:].float()
    kf = k.float()
    if kf.shape[1] != qr.shape[1]:
        kf = kf.repeat_interleave(qr.shape[1] // kf.shape[1], dim=1)
    s = torch.einsum("bhrd,bhtd->bhrt", qr, kf) * scale
    allowed = _causal(q.shape[2], k.shape[2], q.device)[-num_rows:][None, None]
    if layout_key_mask is not None:
        allowed = allowed & layout_key_mask[:, None, None, :]
    s = s.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    return p.mean(1)


# --------------------------------------------------------------------------- the patch handle

class RALPatch:
    """Handle returned by :func:`patch_model`. Not thread-safe: one forward at a time."""

    def __init__(self, model, layers: list[int], backend: str = "auto"):
        self.model = model
        self.layers = layers
        self.backend = backend
        self._mode: Optional[str] = None
        self._ctx = None
        self._active = True

    # ---- modes
    @contextlib.contextmanager
    def capture(self, num_rows: Optional[int] = None, *, with_lse: bool = False, record_attention: bool = False):
        """Capture the old policy (or teacher) during the forward run inside the block.

        Args:
            num_rows: keep the old queries of the last ``num_rows`` rows of each (padded)
                sequence: the response width. Default all rows.
            with_lse: also keep per-row log-sum-exp (saves one sweep in the update pass).
            record_attention: also keep the head-averaged attention rows of those rows
                (``[B, R, T]``, for metrics such as attention entropy and mass on a region).
        """
        self._enter("capture", CaptureContext(num_rows, with_lse, record_attention))
        ctx = self._ctx
        try:
            yield ctx
        finally:
            self._exit()
        if ctx.layers:
            ctx.old_policy = OldPolicy(dict(ctx.layers), model_type(self.model))

    @contextlib.contextmanager
    def update(self, old: Optional[OldPolicy], response_mask: torch.Tensor, *, divergence: str = "jsd",
               exclude_self: bool = False, record_attention: bool = False, teacher: Optional[OldPolicy] = None,
               teacher_divergence: str = "jsd"):
        """Run the patched layers on the fused op against ``old`` (from :meth:`capture`, of
        this model or of a teacher) and record the per-token divergence.

        Args:
            old: the captured old policy / teacher for exactly this batch (use
                ``old.select(idx)`` for a minibatch).
            response_mask: ``[B, T]`` bool, True on the response tokens of the full input
                sequence (only the last ``num_rows`` captured rows may be True).
            divergence: ``"jsd"`` (default), ``"kl"`` (KL(old‖new)) or ``"reverse_kl"``.
            teacher: optionally a teacher's capture on the same tokens (on-policy attention
                distillation); its divergence lands in ``ctx.teacher_divergence``. With a
                teacher, ``old`` may be ``None`` (distillation without the RAL term).
        """
        if not isinstance(old, OldPolicy) and not (old is None and isinstance(teacher, OldPolicy)):
            raise PatchError("update pass without a captured old policy: pass the `old_policy` of a "
                             "`with patch.capture(...)` block run on the same batch (got "
                             f"{type(old).__name__})")
        if not isinstance(response_mask, torch.Tensor) or response_mask.dim() != 2:
            raise PatchError(f"response_mask must be a [B, T] bool tensor over the full input sequence, got "
                             f"{getattr(response_mask, 'shape', type(response_mask).__name__)}")
        if teacher is not None and not isinstance(teacher, OldPolicy):
            raise PatchError(f"teacher must be the old_policy of a teacher's capture block, got {type(teacher).__name__}")
        ctx = UpdateContext(old, response_mask.bool(), divergence, exclude_self, record_attention)
        ctx._mapping = old.for_layers(self.layers) if old is not None else None
        if teacher is not None:
            ctx._teacher_mapping = teacher.for_layers(self.layers)
            ctx.teacher_divergence_name = teacher_divergence
        self._enter("update", ctx)
        try:
            yield ctx
        finally:
            self._exit()

    def _enter(self, mode, ctx):
        if not self._active:
            raise PatchError("this patch was removed (unpatch); patch the model again")
        if self._mode is not None:
            raise PatchError(f"already inside a {self._mode} block; capture and update blocks do not nest")
        self._mode, self._ctx = mode, ctx

    def _exit(self):
        self._mode, self._ctx = None, None

    # ---- the attention function
    def _attention(self, state, module, q, k, v, mask, dropout, scaling, sliding_window, softcap, kwargs):
        mode = self._mode
        if mode is None or (mode == "capture" and q.shape[2] != k.shape[2]):
            return _original_fn(module, state.orig_impl)(module, q, k, v, mask, dropout=dropout, scaling=scaling,
                                                         sliding_window=sliding_window, softcap=softcap, **kwargs)
        if sliding_window is not None or softcap is not None:
            raise PatchError(f"layer {state.layer_idx} uses sliding-window attention or logit soft-capping, which the "
                             "fused op does not implement; patch a full-attention layer")
        if dropout:
            raise PatchError(f"attention dropout {dropout} is not supported by the fused op; set attention_dropout=0 "
                             "(RL fine-tuning normally runs without it) or call model.eval()")
        if q.shape[2] != k.shape[2]:
            raise PatchError("update passes need the whole sequence in one forward (no KV cache): got "
                             f"{q.shape[2]} queries for {k.shape[2]} keys")
        scale = float(scaling) if scaling is not None else 1.0 / math.sqrt(q.shape[-1])
        layout = _layout_from(mask, q, k, kwargs, state.orig_impl)
        if mode == "capture":
            ctx: CaptureContext = self._ctx
            qp, kp = layout.to_padded(q), layout.to_padded(k)
            t = qp.shape[2]
            r = t if ctx.num_rows is None else int(ctx.num_rows)
            if not 0 < r <= t:
                raise PatchError(f"capture(num_rows={ctx.num_rows}) but the sequences have {t} tokens")
            with torch.no_grad():
                cache = ral_kernels.make_old_policy_cache(qp.detach(), kp.detach(), num_rows=r,
                                                          with_lse=ctx.with_lse, key_mask=layout.key_mask,
                                                          old_sm_scale=scale)
            ctx.layers[state.layer_idx] = LayerCapture(cache, scale, layout.key_mask, t)
            if ctx.record_attention:
                ctx.attention_rows[state.layer_idx] = _attention_rows(qp, kp, layout.key_mask, r, scale)
            return _original_fn(module, state.orig_impl)(module, q, k, v, mask, dropout=dropout, scaling=scaling,
                                                         sliding_window=sliding_window, softcap=softcap, **kwargs)
        # update
        ctx: UpdateContext = self._ctx
        rm = ctx.response_mask.to(q.device)
        if tuple(rm.shape) != (q.shape[0], q.shape[2]):
            raise PatchError(f"response_mask has shape {tuple(rm.shape)} but the sequences are "
                             f"{(q.shape[0], q.shape[2])} ([B, T] of the full input)")
        rm = layout.rows_to_padded(rm)
        km = layout.key_mask
        if km is not None and bool((rm & ~km).any()):
            raise PatchError("response_mask marks padding tokens (where attention_mask is 0)")
        targets = []
        if ctx._mapping is not None:
            targets.append((ctx._mapping[state.layer_idx], ctx.divergence_name, ctx.per_layer, "old policy"))
        if ctx._teacher_mapping is not None:
            targets.append((ctx._teacher_mapping[state.layer_idx], ctx.teacher_divergence_name,
                            ctx.teacher_per_layer, "teacher"))
        out = None
        dt = q.dtype
        for cap, div_name, store, what in targets:
            self._check_aligned(cap, km, rm, state.layer_idx, what)
            c = cap.cache
            kw = dict(causal=True, sm_scale=scale, old_sm_scale=cap.sm_scale, divergence=div_name,
                      head_reduction="mean", exclude_self=ctx.exclude_self, backend=self.backend)
            if layout.packed:  # padding-free input: the varlen op on the packed tokens
                cu = layout.cu_seqlens()
                q_old, lse_old, cu_old = layout.old_rows_to_varlen(c)
                o, div = ral_kernels.fused_attn_kl_varlen(
                    q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), q_old.to(dt),
                    layout.padded_to_varlen(c.k_old).to(dt), cu, cu, cu_seqlens_old=cu_old, lse_old=lse_old,
                    query_mask=ctx.response_mask[0].to(q.device), **kw)
                o, div = o.transpose(0, 1).unsqueeze(0), div.unsqueeze(0)
            else:  # padded input: the layer's own q, k, v
                o, div = ral_kernels.fused_attn_kl(q, k, v, c.q_old.to(dt), c.k_old.to(dt), lse_old=c.lse_old,
                                                   query_mask=rm, key_mask=km, **kw)
            # a second target recomputes the output; the model uses the first one's
            out = o if out is None else out
            store[state.layer_idx] = div
        if ctx.record_attention:
            r = targets[0][0].cache.q_old.shape[2]
            ctx.attention_rows[state.layer_idx] = _attention_rows(layout.to_padded(q).detach(),
                                                                  layout.to_padded(k).detach(), km, r, scale)
        return out.transpose(1, 2).contiguous(), None

    @staticmethod
    def _check_aligned(cap: LayerCapture, km, rm, layer_idx, what):
        b, t = rm.shape
        c = cap.cache
        if c.q_old.shape[0] != b or cap.num_tokens != t:
            raise PatchError(
                f"the captured {what} does not align with this pass: it holds {c.q_old.shape[0]} sequences of "
                f"{cap.num_tokens} tokens, this pass has {b} of {t} (layer {layer_idx}); capture on the same tokens "
                "(use old.select(idx) for minibatches)")
        cm = cap.key_mask
        if (cm is None) != (km is None) or (km is not None and not torch.equal(cm.to(km.device), km)):
            ones = torch.ones(b, t, dtype=torch.bool, device=rm.device)
            a = ones if cm is None else cm.to(rm.device)
            m = ones if km is None else km
            if not torch.equal(a, m):
                raise PatchError(f"the captured {what} saw different padding than this pass (attention masks "
                                 "differ): the tokens do not align")
        r = c.q_old.shape[2]
        if r < t and bool(rm[:, : t - r].any()):
            raise PatchError(f"response_mask marks tokens before the last {r} positions, but the {what} "
                             f"captured only the last {r} rows (capture(num_rows=...) must cover the response)")

    # ---- removal
    def unpatch(self) -> None:
        """Restore every patched layer's original attention implementation."""
        if not self._active:
            return
        layers = decoder_layers(self.model)
        for i in self.layers:
            attn = layers[i].self_attn
            st = getattr(attn, "_ral_state", None)
            if st is not None:
                attn.config = st.orig_config
                del attn._ral_state
        self._active = False
        if getattr(self.model, "_ral_patch", None) is self:
            del self.model._ral_patch

    def __repr__(self):
        return f"RALPatch(model={type(self.model).__name__}, layers={self.layers}, backend={self.backend!r})"


def patch_model(model, layers: Optional[Sequence[int]] = None, *, backend: str = "auto") -> RALPatch:
    """Swap the attention of decoder ``layers`` (default: the last one, as RAL uses) for
    the fused attention + divergence op. Returns the :class:`RALPatch` handle whose
    ``capture`` / ``update`` blocks drive it; ``patch.unpatch()`` restores the model.

    Args:
        model: a supported Hugging Face model (see ``ral_trainer.SUPPORTED_ARCHITECTURES``).
        layers: decoder-layer indices; negative indices count from the end.
        backend: ``ral_kernels`` backend (``"auto"``: Triton/CUDA on GPU when built, else torch).

    Raises:
        UnsupportedArchitectureError: the model family is not supported (the message lists them).
        IndexError: a layer index out of range.
        PatchError: the model is already patched.
    """
    dec_layers = decoder_layers(model)
    n = len(dec_layers)
    if getattr(model, "_ral_patch", None) is not None:
        raise PatchError("the model is already patched; call .unpatch() on its patch first")
    if layers is None:
        layers = [n - 1]
    if isinstance(layers, int):
        layers = [layers]
    idx = []
    for i in layers:
        if isinstance(i, bool) or not isinstance(i, int):
            raise TypeError(f"layer indices must be ints, got {i!r}")
        if not -n <= i < n:
            raise IndexError(f"layer index {i} out of range: {type(model).__name__} has {n} decoder layers "
                             f"(valid: 0..{n - 1} or -{n}..-1)")
        idx.append(i % n)
    idx = sorted(set(idx))
    ral_kernels.resolve_backend(backend, next(model.parameters()).device)
    _register()
    patch = RALPatch(model, idx, backend)
    for i in idx:
        attn = dec_layers[i].self_attn
        cfg = attn.config
        impl = cfg._attn_implementation
        new_cfg = copy.copy(cfg)
        new_cfg.__dict__["_attn_implementation_internal"] = ATTN_NAME
        attn._ral_state = _LayerState(i, cfg, impl, weakref.ref(patch))
        attn.config = new_cfg
    model._ral_patch = patch
    return patch


def unpatch_model(model) -> None:
    """Remove the patch of ``model`` if any (same as ``patch.unpatch()``)."""
    p = getattr(model, "_ral_patch", None)
    if p is not None:
        p.unpatch()
