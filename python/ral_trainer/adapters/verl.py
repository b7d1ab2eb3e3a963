"""RAL inside verl (``verl>=0.9,<0.10``): an adapter for the actor's FSDP engine.

verl 0.9 has no ``DataParallelPPOActor`` any more; the actor is a
``verl.workers.engine.fsdp.FSDPEngineWithLMHead`` driven by a ``TrainingWorker``. Its
registered policy losses only see log-probs, so the adapter hooks the engine itself:

- ``engine.forward_step`` with ``forward_only=True`` (the actor's ``compute_log_prob``
  pass, the one that produces ``old_log_probs``): the model's forward runs inside
  :meth:`ral_trainer.RALPatch.capture`, which keeps the old queries of the response rows
  and all keys of the patched layer(s). Each sequence's capture is stored under its token
  ids, so verl's shuffling, mini-batching, micro-batching and dynamic batch sizes (which
  reorder the sequences) all find their rows. The reference-policy pass of a LoRA actor
  (``no_lora_adapter``, run under ``engine.disable_adapter()``) is not captured.
- ``engine.forward_step`` with ``forward_only=False`` (``update_actor``): the forward runs
  inside :meth:`ral_trainer.RALPatch.update` against the captured old policy of exactly
  those sequences, and verl's loss (``ppo_loss``) is wrapped: ``loss + λ · term`` with
  ``term = ral_kernels.ral_loss(div, advantages, response_mask, loss_type=loss_agg_mode)``
  rescaled to verl's global-batch normalization (``dp_size``, ``batch_num_tokens``,
  ``global_batch_size``, ``loss_scale_factor``; see :func:`verl_normalized_ral_loss`).
- Both the padded path and the padding-free path (``use_remove_padding=True``: one packed
  row per micro-batch, ``attention_mask=None``) work: the patched layer reads the packing
  from the model's own mask (sdpa/eager: block-diagonal mask built from the packed
  ``position_ids``) or from ``position_ids`` / ``cu_seq_lens`` (flash-attention); the update
  runs ``fused_attn_kl_varlen`` on the packed tokens.

Usage (in-process, after the engine is initialized)::

    from ral_trainer.adapters.verl import RALVerlAdapter
    adapter = RALVerlAdapter(worker.actor.engine, ral_coef=1.0)   # ActorRolloutRefWorker
    # or, with Ray: use RALActorRolloutRefWorker as the actor_rollout worker class

Metrics ``actor/ral_attention_loss`` and ``actor/ral_attention_div`` land in verl's actor
metrics.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

import ral_kernels

from ..models import decoder_layers, unwrap_model
from ..patch import LayerCapture, OldPolicy, PatchError, patch_model
from ..policy import OFFLOAD_TARGETS, to_host
from ..guard import ZeroTermGuard, deprecated_alias, warn_zero_schedule
from . import check_version

VERL_RANGE = "verl>=0.9,<0.10"


def _check_verl_version(version: Optional[str] = None):
    """Raise :class:`UnsupportedVersionError` unless ``version`` (default: the installed
    verl's) is in :data:`VERL_RANGE`."""
    if version is None:
        try:
            import verl
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError(f"ral_trainer.adapters.verl needs verl ({VERL_RANGE}): "
                              "pip install 'ral_kernels[verl]'") from e
        version = verl.__version__
    return check_version("verl", version, "0.9", "0.10",
                         " (the engine-based actor: FSDPEngineWithLMHead.forward_step)")


_check_verl_version()

from tensordict import TensorDict  # noqa: E402
from verl.utils import tensordict_utils as tu  # noqa: E402
from verl.utils.metric import AggregationType, Metric  # noqa: E402
from verl.workers.utils.padding import no_padding_2_padding  # noqa: E402

__all__ = ["RALVerlAdapter", "RALVerlConfig", "verl_normalized_ral_loss", "VERL_RANGE", "RALActorRolloutRefWorker",
           "attach_to_worker", "install_worker_hook", "ray_setup_hook", "route_verl_attention"]

VERL_LOSS_AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean",
                       "seq-mean-token-sum-norm")


@dataclasses.dataclass
class RALVerlConfig:
    """RAL settings for verl (e.g. ``actor_rollout_ref.actor.ral`` in the Hydra config).

    Args:
        ral_coef: λ of ``L = L_PPO + λ · agg_t(A_t · D(p_θ^t ‖ p_old^t))``; 0 disables the term.
        attention_divergence: ``"jsd"`` (paper), ``"kl"`` (KL(old‖new)) or ``"reverse_kl"``.
        attention_layers: decoder-layer indices to patch (default: the last one, as the paper).
        attention_backend: ``ral_kernels`` backend (``"auto"``: Triton on CUDA, else torch).
        attention_allow_unlisted: patch a model family outside the tested list whose attention
            dispatches through ``ALL_ATTENTION_FUNCTIONS`` (checked).
        loss_agg_mode: override verl's ``actor.loss_agg_mode`` for the attention term
            (default: the one of verl's own ``ppo_loss`` config).
        cache_offload: ``"cpu"``: keep the captured old-policy attention in (pinned) host
            memory between ``compute_log_prob`` and ``update_actor``.
        attention_coef: deprecated name of ``ral_coef`` (DeprecationWarning).
    """

    ral_coef: float = 1.0
    attention_divergence: str = "jsd"
    attention_layers: Optional[list] = None
    attention_backend: str = "auto"
    attention_allow_unlisted: bool = False
    loss_agg_mode: Optional[str] = None
    cache_offload: Optional[str] = None
    attention_coef: Optional[float] = None

    def __post_init__(self):
        deprecated_alias(self, "attention_coef", "ral_coef")
        if self.attention_divergence not in ("jsd", "kl", "reverse_kl"):
            raise ValueError(f"attention_divergence must be 'jsd', 'kl' or 'reverse_kl', got {self.attention_divergence!r}")
        if self.ral_coef < 0:
            raise ValueError(f"ral_coef must be >= 0, got {self.ral_coef}")
        if self.cache_offload not in OFFLOAD_TARGETS:
            raise ValueError(f"cache_offload must be None or 'cpu', got {self.cache_offload!r}")
        if self.loss_agg_mode is not None and self.loss_agg_mode not in VERL_LOSS_AGG_MODES:
            raise ValueError(f"loss_agg_mode must be one of {VERL_LOSS_AGG_MODES}, got {self.loss_agg_mode!r}")


def verl_normalized_ral_loss(div, advantages, response_mask, loss_agg_mode, *, dp_size=1, batch_num_tokens=None,
                             global_batch_size=None, loss_scale_factor=None):
    """``ral_kernels.ral_loss`` normalized exactly as verl 0.9's
    ``core_algos.agg_loss(A·div, response_mask, loss_agg_mode, dp_size, batch_num_tokens,
    global_batch_size, loss_scale_factor)`` normalizes the policy loss of a micro-batch
    (the global mini-batch's token / sequence count, times ``dp_size`` because FSDP averages
    gradients over ranks). ``div``, ``response_mask``: ``[B, R]``; ``advantages``: ``[B]``
    or ``[B, R]``."""
    if loss_agg_mode not in VERL_LOSS_AGG_MODES:
        raise ValueError(f"RAL: verl loss_agg_mode {loss_agg_mode!r} is not supported; use one of {VERL_LOSS_AGG_MODES}")
    m = response_mask
    if loss_agg_mode == "token-mean":
        n = None if batch_num_tokens is None else float(batch_num_tokens) / dp_size
        if n is not None and n <= 0:
            return (div * 0).sum()
        return ral_kernels.ral_loss(div, advantages, m, loss_type="token-mean", num_items_in_batch=n)
    if loss_agg_mode == "token-sum":  # sum · dp_size
        return ral_kernels.ral_loss(div, advantages, m, loss_type="token-mean", num_items_in_batch=1.0 / dp_size)
    num_seqs = (m.float().sum(-1) > 0).float().sum().clamp(min=1.0)
    denom = num_seqs if global_batch_size is None else float(global_batch_size) / dp_size
    # seq-mean modes: ral_loss divides by the local count of non-empty sequences; verl by
    # the global batch size over dp_size
    horizon = loss_scale_factor if loss_scale_factor is not None else m.shape[-1]
    return ral_kernels.ral_loss(div, advantages, m, loss_type=loss_agg_mode,
                                max_completion_length=horizon) * num_seqs / denom


class _BatchLayout:
    """Where each sequence of a verl micro-batch sits in the padded form the patched layer
    works in: packed (``use_remove_padding``) rows are unpacked left-padded to the longest
    sequence; padded inputs are right-padded (verl's ``to_padded_tensor``)."""

    def __init__(self, micro_batch: TensorDict, packed: bool):
        ids = micro_batch["input_ids"]
        if not getattr(ids, "is_nested", False):
            raise PatchError("RAL: verl micro-batch input_ids are not a nested tensor (pad_mode NO_PADDING expected)")
        offs = ids.offsets().tolist()
        self.offsets = offs
        self.lengths = [b - a for a, b in zip(offs, offs[1:])]
        self.values = ids.values()
        prompts, responses = micro_batch["prompts"], micro_batch["responses"]
        if responses.is_nested:
            rl = responses.offsets().diff()
        else:
            am = micro_batch["attention_mask"]
            rl = am[:, prompts.shape[1]:].sum(dim=1)
        self.resp = [int(x) for x in rl.tolist()]
        self.packed = packed
        self.width = max(self.lengths)
        t = self.width
        # first row that produces a response token (row j predicts token j + 1), in-sequence index
        self.starts = [max(length - r - 1, 0) for length, r in zip(self.lengths, self.resp)]
        self.pos0 = [t - length if packed else 0 for length in self.lengths]  # layout position of token 0
        self.num_rows = max(t - (p + s) for p, s in zip(self.pos0, self.starts))

    def keys(self):
        v = self.values.detach().cpu()
        return [(n, v[a:b].numpy().tobytes()) for n, a, b in zip(self.lengths, self.offsets, self.offsets[1:])]

    def key_mask(self, device):
        km = torch.zeros(len(self.lengths), self.width, dtype=torch.bool, device=device)
        for i, (p, n) in enumerate(zip(self.pos0, self.lengths)):
            km[i, p:p + n] = True
        return km

    def row_mask(self, total, device):
        """True on the rows that produce response tokens, in the model-input form."""
        if self.packed:
            rm = torch.zeros(1, total, dtype=torch.bool, device=device)
            for a, n, s in zip(self.offsets, self.lengths, self.starts):
                rm[0, a + s:a + n - 1] = True
            return rm
        rm = torch.zeros(len(self.lengths), self.width, dtype=torch.bool, device=device)
        for i, (n, s) in enumerate(zip(self.lengths, self.starts)):
            rm[i, s:n - 1] = True
        return rm

    def flat(self, div):
        """The per-token divergence in verl's flat (total_nnz,) form."""
        if self.packed:
            return div[0, :self.offsets[-1]]
        return torch.cat([div[i, :n] for i, n in enumerate(self.lengths)])


def _qwen2_vl_routed_forward(self, hidden_states, attention_mask=None, position_ids=None, position_embeddings=None,
                             **kwargs):
    """verl's Qwen2-VL / Qwen2.5-VL attention forward (``qwen2_vl_attn_forward``), except
    inside RAL's capture / update blocks on a patched layer: there the queries and keys
    (after M-RoPE) go to the patch, and an update returns the fused op's output. Packed
    rows (``use_remove_padding``: one row, no mask) are read from the text position ids,
    which restart at 0 for every sequence, as verl's flash-attention call reads them."""
    from verl.models.transformers.qwen2_vl import qwen2_vl_attn_forward

    state = getattr(self, "_ral_state", None)
    patch = state.patch() if state is not None else None
    mode = None if patch is None else patch._mode
    if mode is None:
        return qwen2_vl_attn_forward(self, hidden_states, attention_mask, position_ids, position_embeddings, **kwargs)
    from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_multimodal_rotary_pos_emb

    b, t, _ = hidden_states.shape
    q, k, v = (proj(hidden_states).view(b, t, -1, self.head_dim).transpose(1, 2)
               for proj in (self.q_proj, self.k_proj, self.v_proj))
    cos, sin = position_embeddings
    rope = getattr(self, "rope_scaling", None) or getattr(self, "rope_parameters", None) or {}
    q, k = apply_multimodal_rotary_pos_emb(q, k, cos, sin, rope.get("mrope_section"))
    extra = {}
    if attention_mask is None and b == 1 and position_ids is not None:
        pos = position_ids[0] if position_ids.dim() == 3 else position_ids  # [1, T] text positions
        starts = (pos[0] == 0).nonzero().flatten().tolist()
        if not starts or starts[0] != 0:
            raise PatchError("RAL: packed Qwen2-VL input whose position ids do not start at 0")
        cu = torch.tensor(starts + [t], dtype=torch.int32, device=q.device)
        extra = {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu}
    dropout = self.attention_dropout if self.training else 0.0
    out = patch._attention(state, self, q, k, v, attention_mask, dropout, self.scaling, None, None, extra,
                           capture_output=False)
    if mode == "capture":  # the cache is recorded; verl's forward gives the output, as without RAL
        return qwen2_vl_attn_forward(self, hidden_states, attention_mask, position_ids, position_embeddings, **kwargs)
    return self.o_proj(out[0].reshape(b, t, -1)), None


_qwen2_vl_routed_forward._ral_routed = True


def route_verl_attention(model) -> int:
    """verl's monkey patch for Qwen2-VL / Qwen2.5-VL with ``use_remove_padding=True`` (its
    default) replaces the attention class's forward with one that calls flash-attention
    itself and never consults ``ALL_ATTENTION_FUNCTIONS``: a patched layer would be
    bypassed. Give each such attention module of ``model`` a forward that runs verl's
    outside RAL's capture / update blocks and the patch inside them. Returns how many
    modules were routed (0 for models verl did not patch that way)."""
    import types

    try:
        from verl.models.transformers.qwen2_vl import qwen2_vl_attn_forward
    except ImportError:  # pragma: no cover - a verl without it has nothing to route
        return 0
    n = 0
    for layer in decoder_layers(model, allow_unlisted=True):
        attn = layer.self_attn
        if type(attn).forward is qwen2_vl_attn_forward and "forward" not in attn.__dict__:
            attn.forward = types.MethodType(_qwen2_vl_routed_forward, attn)
            n += 1
    return n


class RALVerlAdapter:
    """Plug RAL into an initialized verl ``FSDPEngineWithLMHead`` (the actor's engine).

    Args:
        engine: ``worker.actor.engine`` of verl's ``ActorRolloutRefWorker`` (after
            ``init_model``), or any initialized ``FSDPEngineWithLMHead``.
        config: a :class:`RALVerlConfig`, or its fields as keyword arguments.

    Raises:
        UnsupportedVersionError: verl outside :data:`VERL_RANGE` (at import).
        UnsupportedArchitectureError: the model's attention cannot be patched.
        PatchError: settings the adapter cannot honour (``pad_to_length``, an engine that is
            not an LM-head FSDP engine). Ulysses sequence parallelism is supported
            (:mod:`ral_trainer.adapters.verl_sp`).
    """

    def __init__(self, engine, config: Optional[RALVerlConfig] = None, **kwargs):
        from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead

        if config is None:
            config = RALVerlConfig(**kwargs)
        elif kwargs:
            config = dataclasses.replace(config, **kwargs)
        self.config = config
        if not isinstance(engine, FSDPEngineWithLMHead):
            raise PatchError(f"RAL: the verl adapter hooks FSDPEngineWithLMHead (the actor engine of verl "
                             f"{VERL_RANGE} with strategy fsdp/fsdp2), got {type(engine).__name__}")
        if getattr(engine, "pad_to_length", False):
            raise PatchError("RAL: engine.pad_to_length appends a pad segment to the packed row; disable it")
        if getattr(engine, "module", None) is None:
            raise PatchError("RAL: the engine has no model yet; attach the adapter after engine.initialize() "
                             "(worker.init_model())")
        self.engine = engine
        self.model = unwrap_model(engine.module)
        self.routed_layers = route_verl_attention(self.model)
        self.patch = patch_model(self.model, config.attention_layers, backend=config.attention_backend,
                                 allow_unlisted=config.attention_allow_unlisted)
        self._sp = None  # Ulysses sequence parallelism (ulysses_sequence_parallel_size > 1): verl_sp
        if getattr(engine, "use_ulysses_sp", False):
            from .verl_sp import VerlUlysses

            self._sp = VerlUlysses(engine, self.patch)
        self._store: dict = {}  # (length, token bytes) -> {layer: (q_rows [Ho, n, D], k [Hk, L, D])}
        self._sm_scale: dict = {}
        self._no_capture = 0
        self._warned_zero = False
        self.zero_guard = ZeroTermGuard(where="the verl actor")
        self._steps_since_capture = 0  # optimizer steps since the last compute_log_prob capture
        self._orig_forward_step = engine.forward_step
        self._orig_infer_batch = engine.infer_batch
        self._orig_disable_adapter = engine.disable_adapter
        self._orig_optimizer_step = engine.optimizer_step
        engine.forward_step = self._forward_step
        engine.infer_batch = self._infer_batch
        engine.disable_adapter = self._disable_adapter
        engine.optimizer_step = self._optimizer_step
        engine._ral_adapter = self

    def detach(self):
        """Restore the engine's methods and unpatch the model."""
        for name in ("forward_step", "infer_batch", "disable_adapter", "optimizer_step"):
            self.engine.__dict__.pop(name, None)
        self.engine.__dict__.pop("_ral_adapter", None)
        self.patch.unpatch()
        self._store.clear()

    # ------------------------------------------------------------------ hooks
    def _disable_adapter(self):
        import contextlib

        @contextlib.contextmanager
        def ctx():
            self._no_capture += 1
            try:
                with self._orig_disable_adapter():
                    yield
            finally:
                self._no_capture -= 1
        return ctx()

    def _infer_batch(self, data, loss_function=None):
        if self._capturing():
            self._store.clear()  # a new rollout batch: its old policy replaces the previous one
            self._steps_since_capture = 0
        return self._orig_infer_batch(data, loss_function=loss_function)

    def _optimizer_step(self, *args, **kwargs):
        self._steps_since_capture += 1
        return self._orig_optimizer_step(*args, **kwargs)

    def _capturing(self):
        return bool(self.config.ral_coef) and self._no_capture == 0

    def _forward_step(self, micro_batch, loss_function, forward_only):
        if not self.config.ral_coef:
            return self._orig_forward_step(micro_batch, loss_function=loss_function, forward_only=forward_only)
        packed = bool(tu.get_non_tensor_data(data=micro_batch, key="use_remove_padding", default=True))
        layout = _BatchLayout(micro_batch, packed)
        if forward_only:
            if not self._capturing():
                return self._orig_forward_step(micro_batch, loss_function=loss_function, forward_only=True)
            with self.patch.capture(num_rows=layout.num_rows) as cap:
                out = self._orig_forward_step(micro_batch, loss_function=loss_function, forward_only=True)
            self._store_capture(cap.old_policy, layout)
            return out
        return self._update_step(micro_batch, loss_function, layout)

    # ------------------------------------------------------------------ capture
    def _store_capture(self, old: Optional[OldPolicy], layout: _BatchLayout):
        if old is None:
            raise PatchError("RAL: verl's log-prob forward did not reach the patched attention layer(s)")
        if self._sp is not None:
            return self._sp.store_capture(old, layout, self._store, self._sm_scale)
        t, r = layout.width, layout.num_rows
        per_seq = [dict() for _ in layout.lengths]
        for li, cap in old.layers.items():
            if cap.num_tokens != t or cap.cache.q_old.shape[0] != len(layout.lengths):
                raise PatchError(f"RAL: the patched layer saw {cap.cache.q_old.shape[0]} sequences of {cap.num_tokens} "
                                 f"tokens, the verl micro-batch has {len(layout.lengths)} of {t} (unexpected packing)")
            self._sm_scale[li] = cap.sm_scale
            q, k = cap.cache.q_old, cap.cache.k_old
            for i, (p, n, s) in enumerate(zip(layout.pos0, layout.lengths, layout.starts)):
                a = p + s - (t - r)  # q row index of the first kept row
                qi, ki = q[i, :, a:a + n - s].clone(), k[i, :, p:p + n].clone()
                if self.config.cache_offload:
                    qi, ki = to_host(qi), to_host(ki)
                per_seq[i][li] = (qi, ki)
        for key, caps in zip(layout.keys(), per_seq):
            self._store[key] = caps

    def _captures(self, layout: _BatchLayout) -> list:
        missing = [i for i, key in enumerate(layout.keys()) if key not in self._store]
        if missing:
            raise PatchError(
                f"RAL: {len(missing)} of {len(layout.lengths)} sequences of this update micro-batch have no captured "
                "old-policy attention: the actor's compute_log_prob pass must run (through this adapter's engine) on "
                "the same batch before update_actor. Recompute old log-probs with the actor (not the rollout's log-probs)")
        return [self._store[key] for key in layout.keys()]

    def _old_for(self, layout: _BatchLayout, device) -> OldPolicy:
        t, r, b = layout.width, layout.num_rows, len(layout.lengths)
        caps = self._captures(layout)
        if self._sp is not None:
            return self._sp.old_for(layout, caps, self._sm_scale, self.patch.layers, device)
        km = layout.key_mask(device)
        layers = {}
        for li in self.patch.layers:
            q0, k0 = caps[0][li]
            q = q0.new_zeros((b, q0.shape[0], r, q0.shape[2]))
            k = k0.new_zeros((b, k0.shape[0], t, k0.shape[2]))
            for i, (p, n, s) in enumerate(zip(layout.pos0, layout.lengths, layout.starts)):
                qi, ki = caps[i][li]
                a = p + s - (t - r)
                q[i, :, a:a + n - s] = qi
                k[i, :, p:p + n] = ki
            layers[li] = LayerCapture(ral_kernels.OldPolicyCache(q.to(device), k.to(device), None), self._sm_scale[li],
                                      None if bool(km.all()) else km, t)
        return OldPolicy(layers)

    # ------------------------------------------------------------------ update
    def _update_step(self, micro_batch, loss_function, layout: _BatchLayout):
        dev = micro_batch["input_ids"].values().device
        old = self._old_for(layout, dev)
        rows = layout.row_mask(layout.offsets[-1], dev)
        if self._sp is not None:
            rows = self._sp.local_rows(rows)
        cfg = self.config
        state = {}

        def loss_fn(model_output, data, dp_group=None):
            loss, metrics = loss_function(model_output=model_output, data=data, dp_group=dp_group)
            div = state["upd"].divergence
            if self._sp is not None:  # this rank's rows -> the micro-batch's (as verl gathers the log-probs)
                div = self._sp.gather(div, layout.offsets[-1])
            term, div_mean, agg = self._term(div, data, layout, loss_function)
            loss = loss + cfg.ral_coef * term.to(loss.dtype)
            metrics = dict(metrics)
            metrics["actor/ral_attention_loss"] = Metric(value=term.detach(), aggregation=agg)
            metrics["actor/ral_attention_div"] = Metric(value=div_mean, aggregation=AggregationType.MEAN)
            return loss, metrics

        with self.patch.update(old, rows.to(dev), divergence=cfg.attention_divergence) as upd:
            state["upd"] = upd
            return self._orig_forward_step(micro_batch, loss_function=loss_fn, forward_only=False)

    def _term(self, div, data, layout: _BatchLayout, loss_function):
        vcfg = getattr(loss_function, "keywords", {}).get("config") if loss_function is not None else None
        mode = self.config.loss_agg_mode or getattr(vcfg, "loss_agg_mode", None) or "token-mean"
        lsf = getattr(vcfg, "loss_scale_factor", None)
        div_resp = no_padding_2_padding(layout.flat(div), data)  # [B, R], row t-1 ↔ response token t
        td = data.select("response_mask", "advantages").to_padded_tensor()
        mask = td["response_mask"].bool()
        adv = td["advantages"].float()
        dp_size = data["dp_size"] if "dp_size" in data.keys() else 1
        n_tok = data["batch_num_tokens"] if "batch_num_tokens" in data.keys() else None
        gbs = data["global_batch_size"] if "global_batch_size" in data.keys() else None
        term = verl_normalized_ral_loss(div_resp, adv, mask, mode, dp_size=dp_size, batch_num_tokens=n_tok,
                                        global_batch_size=gbs, loss_scale_factor=lsf)
        global_norm = dp_size > 1 or n_tok is not None or gbs is not None or lsf is not None
        agg = AggregationType.SUM if global_norm else AggregationType.MEAN
        with torch.no_grad():
            m = mask.float()
            div_mean = float((div_resp.float() * m).sum() / m.sum().clamp(min=1.0))
            moved = self._steps_since_capture > 0 and bool(((adv != 0) & mask).any())
        self.zero_guard.observe(div_resp, mask, moved)
        return term, div_mean, agg

    # ------------------------------------------------------------------ checks
    def check_schedule(self, *, train_batch_size: int, rollout_n: int, ppo_mini_batch_size: int, ppo_epochs: int):
        """Warn (once) when verl's schedule makes every update run at θ = θ_old (one
        mini-batch, one epoch): the attention term is then identically zero. Sizes in
        prompts, as in verl's config (``rollout_n`` multiplies both sides)."""
        if ppo_epochs <= 1 and ppo_mini_batch_size >= train_batch_size and not self._warned_zero:
            self._warned_zero = True
            warn_zero_schedule(f"one PPO mini-batch per rollout batch (ppo_mini_batch_size={ppo_mini_batch_size} "
                               f">= data.train_batch_size={train_batch_size}) and ppo_epochs={ppo_epochs}",
                               "Set ppo_epochs > 1 or ppo_mini_batch_size < data.train_batch_size.")
            return True
        return False


def attach_to_worker(worker) -> Optional["RALVerlAdapter"]:
    """Attach :class:`RALVerlAdapter` to an initialized ``ActorRolloutRefWorker`` (after
    its ``init_model``) when its config has an ``ral`` block with ``ral_coef > 0``
    (Hydra: ``+actor_rollout_ref.ral.ral_coef=1.0``; the block sits beside ``actor``, not in
    it, because verl builds its actor dataclass from ``actor`` and rejects unknown keys).
    Returns the adapter (also stored as ``worker.ral_adapter``), or None for a worker
    without an actor role or without RAL settings."""
    if "actor" not in getattr(worker, "role", ""):
        return None
    cfg = worker.config
    if "ral" in cfg.get("actor", {}):
        raise PatchError("RAL: put the RAL settings in actor_rollout_ref.ral, not actor_rollout_ref.actor.ral (verl "
                         "builds its actor config from actor_rollout_ref.actor and rejects unknown keys)")
    ral = cfg.get("ral", None)
    if not ral:
        return None
    ral = RALVerlConfig(**dict(ral.items()))
    if not ral.ral_coef:
        return None
    worker.ral_adapter = RALVerlAdapter(worker.actor.engine, ral)
    return worker.ral_adapter


def install_worker_hook():
    """Make every ``verl.workers.engine_workers.ActorRolloutRefWorker`` created in this
    process attach the adapter at the end of its ``init_model``. Idempotent. Returns the
    class."""
    import functools

    from verl.workers import engine_workers as ew

    cls = ew.ActorRolloutRefWorker
    if getattr(cls.init_model, "_ral_hooked", False):
        return cls
    orig = cls.init_model

    @functools.wraps(orig)  # keeps verl's @register dispatch attributes
    def init_model(self, *args, **kwargs):
        out = orig(self, *args, **kwargs)
        attach_to_worker(self)
        return out

    init_model._ral_hooked = True
    cls.init_model = init_model
    return cls


def ray_setup_hook():
    """Ray ``worker_process_setup_hook`` (runs in every Ray worker process, before verl's
    actors are created there): :func:`install_worker_hook`. Enable it from verl's Hydra
    config alone, no launcher code::

        +ray_kwargs.ray_init.runtime_env.worker_process_setup_hook=ral_trainer.adapters.verl.ray_setup_hook
        +actor_rollout_ref.ral.ral_coef=1.0

    (see ``examples/verl/ral_grpo_qwen2_5_vl.yaml``). Patching in the driver does not reach
    verl's workers: its ``TaskRunner`` is a Ray actor that imports the worker class in its
    own process."""
    install_worker_hook()


def _make_worker_cls():
    from verl.workers.engine_workers import ActorRolloutRefWorker
    from verl.single_controller.base.decorator import Dispatch, register

    class RALActorRolloutRefWorker(ActorRolloutRefWorker):
        """verl's ``ActorRolloutRefWorker`` with the RAL adapter on its actor engine (for
        launchers that register their own worker class). Reads :class:`RALVerlConfig`
        fields from ``actor_rollout_ref.ral`` (Hydra: ``+actor_rollout_ref.ral.ral_coef=1.0``)."""

        @register(dispatch_mode=Dispatch.ONE_TO_ALL)
        def init_model(self):
            super().init_model()
            if not hasattr(self, "ral_adapter"):  # the process hook may have attached it already
                attach_to_worker(self)

    return RALActorRolloutRefWorker


def __getattr__(name):
    if name == "RALActorRolloutRefWorker":
        cls = _make_worker_cls()
        globals()[name] = cls
        return cls
    raise AttributeError(name)
