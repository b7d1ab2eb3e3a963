"""RAL inside TRL: a drop-in subclass of ``trl.GRPOTrainer`` (TRL ``>=1.0,<2``).

Usage::

    from ral_trainer.adapters.trl import RALGRPOConfig, RALGRPOTrainer

    args = RALGRPOConfig(output_dir="out", ral_coef=1.0, num_iterations=2, ...)
    trainer = RALGRPOTrainer(model=model, reward_funcs=reward_fn, args=args, train_dataset=ds)
    trainer.train()

What it changes in TRL's loop (nothing else):

- ``_generate_and_score_completions``: when TRL computes the old policy's log-probs (the
  no-grad pass it runs only when the rollout batch gets more than one optimizer step), the
  last decoder layer's old queries of the completion rows and all keys are captured
  (:meth:`ral_trainer.RALPatch.capture`) — one forward hook per chunk, no extra pass.
  Each rollout row gets an index (``inputs["ral_index"]``) that travels through TRL's
  shuffle and split, so every micro-batch finds its rows of the capture.
- ``_compute_loss``: TRL's own forward runs inside :meth:`ral_trainer.RALPatch.update`, so
  the patched layer returns the per-token divergence beside its output; the loss becomes
  ``L_TRL + ral_coef · ral_loss(div, advantages, mask)`` with TRL's normalization
  (``loss_type``, ``max_completion_length``, ``num_items_in_batch``, gradient accumulation,
  number of processes), plus ``teacher_ral_coef · ral_loss(div_teacher, 1, mask)``
  with a teacher (on-policy attention distillation).
- Metrics ``ral/attention_loss``, ``ral/attention_div`` (and ``ral/teacher_attention_*``)
  land in TRL's ``self._metrics`` and so in its logs (console, W&B, TensorBoard...).

Settings that would make the term do nothing are caught up front:

- every update at θ = θ_old (``gradient_accumulation_steps % (steps_per_generation *
  num_iterations) == 0``, with or without vLLM's importance-sampling correction): the
  term is identically zero, so nothing is captured and the trainer warns once
  (:class:`ral_trainer.ZeroAttentionTermWarning`), naming the settings that fix it;
- ``use_liger_kernel=True`` on TRL versions whose ``compute_loss`` routes to
  ``compute_liger_loss`` (TRL <= 1.9): that route never calls ``_compute_loss``, so it is
  refused with a ``ValueError``;
- at run time, :class:`ral_trainer.ZeroTermGuard` warns if the divergence stays exactly
  zero on updates made after an optimizer step on their rollout batch.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Optional

import torch

import ral_kernels

from ..guard import ZeroTermGuard, deprecated_alias, warn_zero_schedule
from ..losses import TeacherMisalignmentError
from ..models import decoder_layers, unwrap_model
from ..patch import OldPolicy, PatchError, patch_model
from . import check_version

TRL_RANGE = "trl>=1.0,<2"


def _check_trl_version():
    try:
        import trl
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(f"ral_trainer.adapters.trl needs TRL ({TRL_RANGE}): pip install 'ral_kernels[trl]'") from e
    check_version("trl", trl.__version__, "1.0", "2")
    return trl


_check_trl_version()
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

__all__ = ["RALGRPOConfig", "RALGRPOTrainer", "TRL_RANGE"]

# TRL loss_type -> the ral_loss aggregation that TRL's own normalization matches
_LOSS_MAP = {"grpo": "grpo", "sapo": "grpo", "bnpo": "bnpo", "dr_grpo": "dr_grpo", "dapo": "dapo",
             "cispo": "dapo", "vespo": "dapo"}


@dataclasses.dataclass
class RALGRPOConfig(GRPOConfig):
    """``trl.GRPOConfig`` plus the RAL settings.

    Args:
        ral_coef: λ of ``L = L_GRPO + λ · E_t[A_t · D(p_θ^t ‖ p_old^t)]``; 0 disables the term.
        attention_divergence: ``"jsd"`` (paper), ``"kl"`` (KL(old‖new)) or ``"reverse_kl"``.
        attention_head_reduction: ``"mean"``: the policy is the head-averaged attention row (paper).
        attention_layers: decoder-layer indices to patch (default: the last one, as the paper).
        attention_backend: ``ral_kernels`` backend (``"auto"``: Triton on CUDA, else torch).
        attention_cache_offload: ``"cpu"``: keep the old-policy cache in (pinned) host memory
            between the old-log-prob pass and the updates; each micro-batch's rows move back.
        attention_allow_unlisted: patch a model family outside ``ral_trainer.SUPPORTED_ARCHITECTURES``
            whose attention dispatches through ``ALL_ATTENTION_FUNCTIONS`` (checked).
        teacher_ral_coef: γ of the on-policy attention distillation term
            ``γ · Σ_t JSD(p_student^t ‖ p_teacher^t)`` (weight 1, no advantage); needs
            ``teacher_model=`` on the trainer.
        teacher_attention_divergence: divergence to the teacher (default ``"jsd"``).
        attention_coef, teacher_attention_coef: deprecated names of ``ral_coef`` and
            ``teacher_ral_coef`` (DeprecationWarning; removed in the next release).
    """

    ral_coef: float = dataclasses.field(default=1.0, metadata={"help": "RAL attention term coefficient λ."})
    attention_divergence: str = dataclasses.field(default="jsd", metadata={"help": "jsd | kl | reverse_kl"})
    attention_head_reduction: str = dataclasses.field(default="mean", metadata={"help": "mean (head-averaged rows)"})
    attention_layers: Optional[list[int]] = dataclasses.field(
        default=None, metadata={"help": "decoder layers to patch (default: the last)"})
    attention_backend: str = dataclasses.field(default="auto", metadata={"help": "ral_kernels backend"})
    attention_cache_offload: Optional[str] = dataclasses.field(
        default=None, metadata={"help": "'cpu': keep the old-policy attention cache in host memory between the "
                                        "old-log-prob pass and the updates (moved back per micro-batch)"})
    attention_allow_unlisted: bool = dataclasses.field(
        default=False, metadata={"help": "patch a model family outside the tested list (its attention must dispatch "
                                         "through ALL_ATTENTION_FUNCTIONS)"})
    teacher_ral_coef: float = dataclasses.field(
        default=0.0, metadata={"help": "attention distillation coefficient γ (needs teacher_model)"})
    teacher_attention_divergence: str = dataclasses.field(default="jsd", metadata={"help": "jsd | kl | reverse_kl"})
    attention_coef: Optional[float] = dataclasses.field(
        default=None, metadata={"help": "deprecated: use ral_coef"})
    teacher_attention_coef: Optional[float] = dataclasses.field(
        default=None, metadata={"help": "deprecated: use teacher_ral_coef"})

    def __post_init__(self):
        deprecated_alias(self, "attention_coef", "ral_coef")
        deprecated_alias(self, "teacher_attention_coef", "teacher_ral_coef")
        super().__post_init__()
        if self.attention_divergence not in ("jsd", "kl", "reverse_kl"):
            raise ValueError(f"attention_divergence must be 'jsd', 'kl' or 'reverse_kl', got {self.attention_divergence!r}")
        if self.teacher_attention_divergence not in ("jsd", "kl", "reverse_kl"):
            raise ValueError("teacher_attention_divergence must be 'jsd', 'kl' or 'reverse_kl', got "
                             f"{self.teacher_attention_divergence!r}")
        if self.attention_cache_offload not in (None, "cpu"):
            raise ValueError(f"attention_cache_offload must be None or 'cpu', got {self.attention_cache_offload!r}")
        if self.attention_head_reduction != "mean":
            raise ValueError(f"attention_head_reduction={self.attention_head_reduction!r}: the patched layers compute "
                             "the head-averaged policy (RAL's definition); only 'mean' is supported")
        if self.ral_coef < 0 or self.teacher_ral_coef < 0:
            raise ValueError(f"ral_coef and teacher_ral_coef must be >= 0, got {self.ral_coef} and "
                             f"{self.teacher_ral_coef}")


def _trl_version() -> str:
    import trl

    return trl.__version__


def _liger_bypasses_compute_loss() -> bool:
    """True on TRL versions (<= 1.9) whose ``GRPOTrainer.compute_loss`` sends
    ``use_liger_kernel=True`` to ``compute_liger_loss`` instead of ``_compute_loss``."""
    if not hasattr(GRPOTrainer, "compute_liger_loss"):
        return False
    try:
        return "compute_liger_loss" in inspect.getsource(GRPOTrainer.compute_loss)
    except (OSError, TypeError):  # no source (frozen install): assume the old routing
        return True


def _term_can_move(args, num_iterations: int) -> bool:
    """Whether some update of a rollout batch runs after an optimizer step on it (θ != θ_old),
    i.e. TRL's ``gradient_accumulation_steps`` is not a multiple of
    ``steps_per_generation * num_iterations``."""
    return args.gradient_accumulation_steps % (args.steps_per_generation * num_iterations) != 0


_MM_KEYS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "image_sizes", "token_type_ids",
            "mm_token_type_ids", "image_position_ids", "spatial_shapes")


class RALGRPOTrainer(GRPOTrainer):
    """``trl.GRPOTrainer`` with the RAL attention term (and optional attention distillation).

    Same arguments as ``GRPOTrainer`` (``model`` may be a model id, a model, or a PEFT model;
    ``peft_config=`` works), plus:

    Args:
        args: a :class:`RALGRPOConfig`.
        teacher_model: optional teacher (a model, same tokenizer as the student) for on-policy
            attention distillation, weighted by ``args.teacher_ral_coef``; any head
            count / head dim (heads are averaged).
        teacher_processing_class: the teacher's tokenizer, checked against the student's.

    Raises:
        UnsupportedArchitectureError: the model's attention cannot be patched.
        TeacherMisalignmentError: the teacher's tokenizer / vocabulary / layout differs.
        ValueError: settings RAL cannot honour (``loss_type="luspo"``; ``use_liger_kernel=True`` on a
            TRL whose Liger loss bypasses ``_compute_loss``).

    Gradient checkpointing (TRL's default) stays on for every layer except the patched
    one(s), which :meth:`ral_trainer.RALPatch.update` runs without it: recomputing a
    patched layer in the backward would run it outside the update pass. The fused op keeps
    no ``T x T`` map, so the patched layer's activations are small next to the rest.
    """

    def __init__(self, model, reward_funcs, args: Optional[RALGRPOConfig] = None, *, teacher_model=None,
                 teacher_processing_class=None, **kwargs):
        if args is None:
            args = RALGRPOConfig(output_dir="ral_grpo_output")
        if not isinstance(args, RALGRPOConfig):
            raise TypeError(f"args must be a RALGRPOConfig (the GRPOConfig with RAL settings), got {type(args).__name__}")
        if args.loss_type not in _LOSS_MAP:
            raise ValueError(f"loss_type={args.loss_type!r} has no RAL normalization; use one of {sorted(_LOSS_MAP)}")
        if args.teacher_ral_coef and teacher_model is None:
            raise ValueError("teacher_ral_coef > 0 needs teacher_model=")
        if args.use_liger_kernel and (args.ral_coef or args.teacher_ral_coef) and _liger_bypasses_compute_loss():
            raise ValueError(
                f"use_liger_kernel=True with trl {_trl_version()}: GRPOTrainer.compute_loss then routes to "
                "compute_liger_loss, which never calls _compute_loss, so the RAL attention term would silently be "
                "dropped. Set use_liger_kernel=False (Liger's layer kernels can still be applied to the model "
                "yourself), or use a TRL whose compute_loss always calls _compute_loss (>= 1.10)")
        super().__init__(model=model, reward_funcs=reward_funcs, args=args, **kwargs)
        self.ral_patch = patch_model(unwrap_model(self.model), args.attention_layers, backend=args.attention_backend,
                                     allow_unlisted=args.attention_allow_unlisted)
        self.teacher_model = teacher_model
        self.teacher_patch = None
        if teacher_model is not None:
            self._check_teacher(teacher_model, teacher_processing_class)
            teacher_model.eval().requires_grad_(False)
            dev = next(unwrap_model(self.model).parameters()).device
            teacher_model.to(dev)
            n_student = len(self.ral_patch.layers)
            nt = len(decoder_layers(teacher_model, args.attention_allow_unlisted))
            self.teacher_patch = patch_model(teacher_model, list(range(nt - n_student, nt)),
                                             backend=args.attention_backend, allow_unlisted=args.attention_allow_unlisted)
        # The term moves only if some micro-batch of a rollout comes after an optimizer step on
        # it. vLLM's importance-sampling correction makes TRL compute old log-probs every time,
        # but those equal the current ones too when the schedule above holds: no capture then.
        self._ral_needs_old = _term_can_move(args, self.num_iterations)
        self._ral_capture_next = False
        self._ral_capture_parts: Optional[list] = None
        self._ral_old: Optional[OldPolicy] = None
        self._ral_capture_step = 0
        self._ral_signal = False
        self._ral_zero_warned = False
        self.ral_zero_guard = ZeroTermGuard(where="RALGRPOTrainer")
        if args.ral_coef and not self._ral_needs_old:
            self._warn_zero()

    # ------------------------------------------------------------------ checks
    def _warn_zero(self):
        if self._ral_zero_warned:
            return
        self._ral_zero_warned = True
        a = self.args
        vllm = bool(getattr(self, "use_vllm", False) and getattr(self, "vllm_importance_sampling_correction", False))
        what = (f"gradient_accumulation_steps={a.gradient_accumulation_steps} is a multiple of steps_per_generation="
                f"{a.steps_per_generation} × num_iterations={self.num_iterations} (one optimizer step per rollout "
                "batch" + ("; vLLM's importance-sampling correction only corrects for vLLM's sampling, the "
                           "old policy is still the current model" if vllm else "") + ")")
        warn_zero_schedule(what, "Set num_iterations > 1, or steps_per_generation > gradient_accumulation_steps "
                                 "(e.g. steps_per_generation = 2 × gradient_accumulation_steps).", stacklevel=4)

    def _check_teacher(self, teacher, teacher_tok):
        st = self.processing_class
        st = getattr(st, "tokenizer", st)
        if teacher_tok is not None:
            tt = getattr(teacher_tok, "tokenizer", teacher_tok)
            if hasattr(st, "get_vocab") and hasattr(tt, "get_vocab") and st.get_vocab() != tt.get_vocab():
                raise TeacherMisalignmentError(
                    "the teacher's tokenizer differs from the student's (different vocabularies): on-policy attention "
                    "distillation runs the teacher on the student's sampled tokens, so both must share one tokenizer")
        s_cfg, t_cfg = unwrap_model(self.model).config, teacher.config
        s_tc = getattr(s_cfg, "text_config", None) or s_cfg
        t_tc = getattr(t_cfg, "text_config", None) or t_cfg
        sv, tv = getattr(s_tc, "vocab_size", None), getattr(t_tc, "vocab_size", None)
        if sv is not None and tv is not None and sv != tv:
            raise TeacherMisalignmentError(f"teacher vocab_size {tv} != student vocab_size {sv}: the teacher must use "
                                           "the student's tokenizer")
        for key in ("image_token_id", "video_token_id", "vision_start_token_id"):
            a, b = getattr(s_cfg, key, None), getattr(t_cfg, key, None)
            if a is not None and b is not None and a != b:
                raise TeacherMisalignmentError(f"teacher {key}={b} but student {key}={a}: the sequence layouts "
                                               "(where image/video tokens sit) do not match")

    # ------------------------------------------------------------------ capture (old log-prob pass)
    def _generate_and_score_completions(self, inputs):
        want = bool(self.model.training and self.args.ral_coef and self._ral_needs_old)
        self._ral_capture_next = want
        self._ral_capture_parts = None
        try:
            out = super()._generate_and_score_completions(inputs)
        finally:
            self._ral_capture_next = False
        parts, self._ral_capture_parts = self._ral_capture_parts, None
        if want:
            if not parts or "old_per_token_logps" not in out:
                raise PatchError("RAL: TRL did not run the old-log-prob pass that the attention capture hooks into "
                                 f"(trl {__import__('trl').__version__}); supported range {TRL_RANGE}")
            old = OldPolicy.cat(parts)
            b = out["completion_ids"].shape[0]
            if old.batch_size != b:
                raise PatchError(f"RAL: captured {old.batch_size} sequences but the rollout batch has {b}")
            self._ral_old = old
            self._ral_capture_step = self.state.global_step
            self._ral_signal = bool((out["advantages"] != 0).any())
            out["ral_index"] = torch.arange(b, device=out["completion_ids"].device)
        return out

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           *args, **kwargs):
        if not self._ral_capture_next:
            return super()._get_per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep,
                                                              batch_size, *args, **kwargs)
        self._ral_capture_next = False  # only the old-policy pass (the first one), never the reference model's
        patch, parts, state = self.ral_patch, [], {}

        def pre(mod, a, kw):
            cm = patch.capture(num_rows=logits_to_keep + 1, offload=self.args.attention_cache_offload)
            state["ctx"] = cm.__enter__()
            state["cm"] = cm

        def post(mod, a, kw, output):
            cm = state.pop("cm")
            cm.__exit__(None, None, None)
            parts.append(state.pop("ctx").old_policy)

        h1 = model.register_forward_pre_hook(pre, with_kwargs=True)
        h2 = model.register_forward_hook(post, with_kwargs=True)
        try:
            res = super()._get_per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep,
                                                             batch_size, *args, **kwargs)
        finally:
            h1.remove()
            h2.remove()
            if "cm" in state:  # the forward raised: leave capture mode
                state.pop("cm").__exit__(None, None, None)
        self._ral_capture_parts = parts
        return res

    # ------------------------------------------------------------------ loss
    def _ral_normalizer(self, inputs, mode):
        """Returns (ral_loss loss_type, num_items_in_batch, divide_by) matching TRL's normalization."""
        lt = _LOSS_MAP[self.loss_type]
        ga = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        if lt == "dapo":
            n = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if mode == "train":
                n = n * self.current_gradient_accumulation_steps / self.args.steps_per_generation
            return lt, n, 1.0
        return lt, None, ga

    def _compute_loss(self, model, inputs):
        mode = "train" if self.model.training else "eval"
        coef, tcoef = self.args.ral_coef, self.args.teacher_ral_coef
        idx = inputs.get("ral_index")
        use_old = bool(coef) and idx is not None and self._ral_old is not None and mode == "train"
        use_teacher = bool(tcoef) and self.teacher_patch is not None
        if not use_old and not use_teacher:
            if coef and mode == "train":
                self._metrics[mode]["ral/attention_loss"].append(0.0)
            return super()._compute_loss(model, inputs)
        prompt_ids, completion_ids = inputs["prompt_ids"], inputs["completion_ids"]
        p, c = prompt_ids.shape[1], completion_ids.shape[1]
        mask = inputs["completion_mask"]
        if "tool_mask" in inputs:
            mask = mask * inputs["tool_mask"]
        rows = torch.zeros(mask.shape[0], p + c, dtype=torch.bool, device=mask.device)
        rows[:, p - 1:p + c - 1] = mask.bool()  # row t-1 produces completion token t
        old = self._ral_old.select(idx) if use_old else None
        teacher = self._teacher_capture(inputs, p, c) if use_teacher else None
        with self.ral_patch.update(old, rows, divergence=self.args.attention_divergence, teacher=teacher,
                                   teacher_divergence=self.args.teacher_attention_divergence) as upd:
            loss = super()._compute_loss(model, inputs)
        lt, n_items, div_by = self._ral_normalizer(inputs, mode)
        kw = dict(loss_type=lt, max_completion_length=self.max_completion_length, num_items_in_batch=n_items)
        m = mask.float()
        if use_old:
            div = upd.divergence[:, p - 1:p + c - 1]
            if mode == "train":
                moved = self._ral_signal and self.state.global_step > self._ral_capture_step
                self.ral_zero_guard.observe(div, mask, moved=moved)
            adv = inputs["advantages"].float()
            term = ral_kernels.ral_loss(div, adv, mask, **kw) / div_by
            loss = loss + coef * term.to(loss.dtype)
            self._log_ral(mode, "ral/attention_loss", "ral/attention_div", term * div_by, div, m)
        if use_teacher:
            tdiv = upd.teacher_divergence[:, p - 1:p + c - 1]
            ones = torch.ones(tdiv.shape[0], device=tdiv.device)
            tterm = ral_kernels.ral_loss(tdiv, ones, mask, **kw) / div_by
            loss = loss + tcoef * tterm.to(loss.dtype)
            self._log_ral(mode, "ral/teacher_attention_loss", "ral/teacher_attention_div", tterm * div_by, tdiv, m)
        return loss

    def _log_ral(self, mode, loss_key, div_key, term, div, m):
        g = self.accelerator.gather
        self._metrics[mode][loss_key].append(g(term.detach().reshape(1)).nanmean().item())
        num = g((div.detach() * m).sum().reshape(1)).sum()
        den = g(m.sum().reshape(1)).sum().clamp(min=1.0)
        self._metrics[mode][div_key].append((num / den).item())

    @torch.no_grad()
    def _teacher_capture(self, inputs, p, c) -> OldPolicy:
        ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        am = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        extra = {k: inputs[k] for k in _MM_KEYS if inputs.get(k) is not None}
        with self.teacher_patch.capture(num_rows=c + 1) as tc:
            with self.accelerator.autocast():
                self.teacher_model(input_ids=ids, attention_mask=am, logits_to_keep=1, **extra)
        if tc.old_policy is None:
            raise TeacherMisalignmentError("the teacher's forward did not reach its patched attention layer")
        return tc.old_policy
