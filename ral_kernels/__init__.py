"""ral_kernels: fused attention + attention-divergence kernels for Reinforced Attention Learning."""

from .api import (
    BackendUnavailableError,
    OldPolicyCache,
    available_backends,
    fused_attn_kl,
    make_old_policy_cache,
    resolve_backend,
)
from .loss import LOSS_TYPES, ral_loss
from .varlen import fused_attn_kl_varlen

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "LOSS_TYPES",
    "OldPolicyCache",
    "available_backends",
    "fused_attn_kl",
    "fused_attn_kl_varlen",
    "make_old_policy_cache",
    "ral_loss",
    "resolve_backend",
]
