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

from .layout import causal_mask, layout_from
from .models import check_patchable_layer, decoder_layers, model_type, unwrap_model
from .policy import OFFLOAD_TARGETS, LayerCapture, OldPolicy, PatchError

ATTN_NAME = "ral_fused"

__all__ = ["ATTN_NAME", "RALPatch", "patch_model", "unpatch_model", "OldPolicy", "LayerCapture",
           "CaptureContext", "UpdateContext", "PatchError"]


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

    def __init__(self, num_rows, with_lse, record_attention, offload=None):
        self.num_rows = num_rows
        self.with_lse = with_lse
        self.record_attention = record_attention
        self.offload = offload
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
    allowed = causal_mask(q.shape[2], k.shape[2], q.device)[-num_rows:][None, None]
    if layout_key_mask is not None:
        allowed = allowed & layout_key_mask[:, None, None, :]
    s = s.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    return p.mean(1)


# --------------------------------------------------------------------------- the patch handle

class RALPatch:
    """Handle returned by :func:`patch_model`. Not thread-safe: one forward at a time."""

    def __init__(self, model, layers: list[int], backend: str = "auto", allow_unlisted: bool = False):
        self.model = model
        self.layers = layers
        self.backend = backend
        self.allow_unlisted = allow_unlisted
        self._mode: Optional[str] = None
        self._ctx = None
        self._active = True

    # ---- modes
    @contextlib.contextmanager
    def capture(self, num_rows: Optional[int] = None, *, with_lse: bool = False, record_attention: bool = False,
                offload: Optional[str] = None):
        """Capture the old policy (or teacher) during the forward run inside the block.

        Args:
            num_rows: keep the old queries of the last ``num_rows`` rows of each (padded)
                sequence: the response width. Default all rows.
            with_lse: also keep per-row log-sum-exp (saves one sweep in the update pass).
            record_attention: also keep the head-averaged attention rows of those rows
                (``[B, R, T]``, for metrics such as attention entropy and mass on a region).
            offload: ``"cpu"``: keep the cache in host memory (pinned when the model is on
                a GPU), each layer's as soon as it is captured; ``old.select(idx)`` brings
                a minibatch's rows back. ``None`` (default): keep it on the model's device.

        Works under ``torch.no_grad()`` and ``torch.inference_mode()`` (the cache is copied
        out of inference mode so that a later update pass can save it for backward).
        """
        if offload not in OFFLOAD_TARGETS:
            raise PatchError(f"offload must be None or 'cpu', got {offload!r}")
        self._enter("capture", CaptureContext(num_rows, with_lse, record_attention, offload))
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
        # A checkpointed patched layer would be recomputed in the backward, outside this
        # block, as plain attention: the saved tensors would not match (CheckpointError) and
        # the divergence would lose its gradient. Patched layers are small next to the rest
        # (no T x T map), so they run without checkpointing inside the block; the other
        # layers keep it.
        layers = self.decoder_layers()
        ckpt = [i for i in self.layers if getattr(layers[i], "gradient_checkpointing", False)]
        for i in ckpt:
            layers[i].gradient_checkpointing = False
        try:
            yield ctx
        finally:
            for i in ckpt:
                layers[i].gradient_checkpointing = True
            self._exit()

    def decoder_layers(self) -> torch.nn.ModuleList:
        """The patched model's decoder layers."""
        return decoder_layers(self.model, self.allow_unlisted)

    def _enter(self, mode, ctx):
        if not self._active:
            raise PatchError("this patch was removed (unpatch); patch the model again")
        if self._mode is not None:
            raise PatchError(f"already inside a {self._mode} block; capture and update blocks do not nest")
        self._mode, self._ctx = mode, ctx

    def _exit(self):
        self._mode, self._ctx = None, None

    # ---- the attention function
    def _attention(self, state, module, q, k, v, mask, dropout, scaling, sliding_window, softcap, kwargs,
                   capture_output=True):
        """The patched layer's attention: ``[B, T, H, Dv]`` output (and ``None``) as HF's
        attention functions return it. ``capture_output=False``: a capture records the
        cache and returns None (for a caller that computes the output itself)."""
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
        layout = layout_from(mask, q, k, kwargs, state.orig_impl)
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
            ctx.layers[state.layer_idx] = LayerCapture(cache, scale, layout.key_mask, t).offload(ctx.offload)
            if ctx.record_attention:
                ctx.attention_rows[state.layer_idx] = _attention_rows(qp, kp, layout.key_mask, r, scale)
            if not capture_output:
                return None
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
            cap = cap.to(q.device)  # an offloaded capture used without select()
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
        layers = self.decoder_layers()
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


def patch_model(model, layers: Optional[Sequence[int]] = None, *, backend: str = "auto",
                allow_unlisted: bool = False) -> RALPatch:
    """Swap the attention of decoder ``layers`` (default: the last one, as RAL uses) for
    the fused attention + divergence op. Returns the :class:`RALPatch` handle whose
    ``capture`` / ``update`` blocks drive it; ``patch.unpatch()`` restores the model.

    Args:
        model: a supported Hugging Face model (see ``ral_trainer.SUPPORTED_ARCHITECTURES``).
        layers: decoder-layer indices; negative indices count from the end.
        backend: ``ral_kernels`` backend (``"auto"``: Triton/CUDA on GPU when built, else torch).
        allow_unlisted: patch a model family outside the tested list, as long as its patched
            layers look their kernel up in ``ALL_ATTENTION_FUNCTIONS`` (checked).

    Raises:
        UnsupportedArchitectureError: the model family is not supported (the message lists them;
            ``allow_unlisted=True`` opts in), a patched layer's attention forward does not
            dispatch through ``ALL_ATTENTION_FUNCTIONS``, or it is a sliding-window layer.
        IndexError: a layer index out of range.
        PatchError: the model is already patched.
    """
    dec_layers = decoder_layers(model, allow_unlisted)
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
    for i in idx:
        check_patchable_layer(model, dec_layers, i)
    ral_kernels.resolve_backend(backend, next(model.parameters()).device)
    _register()
    patch = RALPatch(model, idx, backend, allow_unlisted)
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


def apply_ral(model, *, layers: Optional[Sequence[int]] = None, backend: str = "auto",
              allow_unlisted: bool = False) -> RALPatch:
    """One line to put RAL's fused attention + divergence op into a model, in the spirit of
    Liger's ``apply_liger_kernel_to_*``: unwraps DDP / FSDP1 / DeepSpeed / PEFT /
    ``torch.compile`` wrappers, patches the decoder ``layers`` (default: the last) and
    returns the :class:`RALPatch` whose ``capture`` / ``update`` blocks drive it. Calling it
    again on the same model with the same settings returns the same patch.

    Example::

        patch = ral_trainer.apply_ral(model)               # any listed family
        patch = ral_trainer.apply_ral(model, allow_unlisted=True)   # any ALL_ATTENTION_FUNCTIONS decoder
    """
    base = unwrap_model(model)
    existing = getattr(base, "_ral_patch", None)
    if existing is not None:
        n = len(existing.decoder_layers())
        want = sorted({i % n for i in ([n - 1] if layers is None else [layers] if isinstance(layers, int) else layers)})
        if want == existing.layers and backend == existing.backend:
            return existing
        raise PatchError(f"the model is already patched at layers {existing.layers} with backend "
                         f"{existing.backend!r}; call .unpatch() on it before patching layers {want} / {backend!r}")
    return patch_model(base, layers, backend=backend, allow_unlisted=allow_unlisted)
