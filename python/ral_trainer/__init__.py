"""ral_trainer: the thin RAL trainer around :mod:`ral_kernels`.

- :func:`patch_model` (or the one-liner :func:`apply_ral`) swaps the fused attention +
  divergence op into chosen decoder layers of a Hugging Face model (Qwen2.5-VL, Qwen2-VL,
  Qwen3-VL, Qwen2, Qwen3, Qwen3-MoE, Llama, Mistral, Gemma 3; any other decoder whose
  attention dispatches through ``ALL_ATTENTION_FUNCTIONS`` with ``allow_unlisted=True``)
  through transformers' ``AttentionInterface``; ``patch.capture(...)`` records the old policy (or a
  teacher) in the no-grad pass, ``patch.update(...)`` returns the per-token divergence.
- :mod:`ral_trainer.losses`: GRPO (TRL loss types, β·KL), the RAL term, attention distillation.
- :class:`RALTrainer`: GRPO / RAL / RAL-zero training loop with exact-resume checkpoints.
- ``ral-train``: the CPU demo on a synthetic visual-search task (:mod:`ral_trainer.demo`).

It depends on :mod:`ral_kernels` (and transformers), never the other way round.
"""

from .guard import ZeroAttentionTermWarning, ZeroTermGuard
from .models import SUPPORTED_ARCHITECTURES, UnsupportedArchitectureError, tiny_config, tiny_model
from .patch import ATTN_NAME, LayerCapture, OldPolicy, PatchError, RALPatch, apply_ral, patch_model, unpatch_model

__all__ = [
    "ATTN_NAME", "LayerCapture", "OldPolicy", "PatchError", "RALPatch", "SUPPORTED_ARCHITECTURES",
    "RALTrainer", "TrainConfig", "UnsupportedArchitectureError", "ZeroAttentionTermWarning",
    "ZeroTermGuard",
    "apply_ral", "patch_model", "tiny_config", "tiny_model", "unpatch_model",
]


def __getattr__(name):  # the trainer pulls in tqdm; import it on first use
    if name in ("RALTrainer", "TrainConfig"):
        from . import trainer
        return getattr(trainer, name)
    raise AttributeError(name)
