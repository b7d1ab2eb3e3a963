"""Public API: validation and backend dispatch for the fused attention + divergence op."""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

from . import backends, ops
from ._semantics import BACKENDS, DIVERGENCES, HEAD_REDUCTIONS
from .backends import torch as torch_backend
from .errors import BackendUnavailableError
from .reference import fused_attn_kl_reference

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# --------------------------------------------------------------------------- backends

def resolve_backend(backend: str = "auto", device: torch.device | str = "cpu",
                    dtype: Optional[torch.dtype] = None, head_dim: int = 0) -> str:
    """The backend that ``backend`` runs on ``device`` (for inputs of ``dtype`` whose
    largest head dim is ``head_dim``).

    ``"auto"`` tries, in order, ``"triton"`` and ``"cuda"`` (CUDA tensors only), then
    ``"torch"``, which always runs. An explicit backend that cannot run raises
    :class:`BackendUnavailableError` saying why.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    device = torch.device(device)
    if backend == "auto":
        for name in backends.AUTO_ORDER:
            if device.type == "cuda" and backends.unavailable_reason(name, device, dtype, head_dim) is None:
                return name
        return "torch"
    why = backends.unavailable_reason(backend, device, dtype, head_dim)
    if why is not None:
        raise BackendUnavailableError(f"backend={backend!r} cannot run: {why}")
    return backend


# Under torch.compile the choice is made once, at trace time: availability checks look at
# the file system and the environment, which a traced graph must not do.
_resolve_constant = torch.compiler.assume_constant_result(resolve_backend)


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Backends that can run on ``device``, best first (the order ``"auto"`` uses)."""
    device = torch.device(device)
    return [b for b in backends.NAMES if backends.unavailable_reason(b, device) is None]


# --------------------------------------------------------------------------- validation

def _check_tensor(name: str, x, ndim: int, layout: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {layout}, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims {layout}, got shape {tuple(x.shape)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")


def _check_mask(name: str, mask, shape: tuple, device: torch.device) -> None:
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a bool tensor of shape {shape} or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"{name} must have dtype torch.bool, got {mask.dtype}")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"{name} is on {mask.device} but q is on {device}")


def _check_choice(name: str, value, choices) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _check_scale(name: str, value, default: float) -> float:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite positive number or None, got {value!r}")
    return float(value)


def _validate(q, k, v, q_old, k_old, lse_old, query_mask, key_mask, divergence, head_reduction, backend):
    _check_tensor("q", q, 4, "[B, Hq, Tq, D]")
    _check_tensor("k", k, 4, "[B, Hk, Tk, D]")
    _check_tensor("v", v, 4, "[B, Hk, Tk, Dv]")
    _check_tensor("q_old", q_old, 4, "[B, Ho, R, Do] (R <= Tq: the last R query rows)")
    _check_tensor("k_old", k_old, 4, "[B, Hko, Tk, Do]")
    _check_choice("divergence", divergence, DIVERGENCES)
    _check_choice("head_reduction", head_reduction, HEAD_REDUCTIONS)
    _check_choice("backend", backend, BACKENDS)
    for name, x in (("k", k), ("v", v), ("q_old", q_old), ("k_old", k_old)):
        if x.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {x.dtype} but q has {q.dtype}; all five inputs must share a dtype")
        if x.device != q.device:
            raise ValueError(f"{name} is on {x.device} but q is on {q.device}; all inputs must share a device")
    b, hq, tq, d = q.shape
    _, hk, tk, _ = k.shape
    _, ho, n_old, d_old = q_old.shape
    hko = k_old.shape[1]
    for name, x in (("k", k), ("v", v), ("q_old", q_old), ("k_old", k_old)):
        if x.shape[0] != b:
            raise ValueError(f"{name} has batch size {x.shape[0]} but q has {b}")
    if tq == 0 or tk == 0:
        raise ValueError(f"sequence lengths must be positive, got Tq={tq} (q) and Tk={tk} (k)")
    for name, x, what in (("q", q, "query heads Hq"), ("k", k, "key/value heads Hk"), ("q_old", q_old, "old heads Ho"),
                          ("k_old", k_old, "old key heads Hko")):
        if x.shape[1] == 0:
            raise ValueError(f"{name} has no heads: the number of {what} must be positive, got shape {tuple(x.shape)}")
    for name, x in (("q", q), ("v", v), ("q_old", q_old)):
        if x.shape[3] == 0:
            raise ValueError(f"{name} has head dim 0: head dims must be positive, got shape {tuple(x.shape)}")
    if k.shape[3] != d:
        raise ValueError(f"k has head dim {k.shape[3]} but q has {d}")
    if v.shape[1] != hk or v.shape[2] != tk:
        raise ValueError(f"v must be [B, Hk={hk}, Tk={tk}, Dv] like k, got {tuple(v.shape)}")
    if hq % hk != 0:
        raise ValueError(f"the number of query heads Hq={hq} must be a multiple of the KV heads Hk={hk}")
    if ho % hko != 0:
        raise ValueError(f"q_old heads Ho={ho} must be a multiple of k_old heads Hko={hko}")
    if k_old.shape[3] != d_old:
        raise ValueError(f"k_old has head dim {k_old.shape[3]} but q_old has {d_old}")
    if k_old.shape[2] != tk:
        raise ValueError(f"k_old has {k_old.shape[2]} keys but k has Tk={tk}; the old policy scores the same keys")
    if n_old > tq:
        raise ValueError(f"q_old has {n_old} rows but q has Tq={tq}; q_old holds the last R <= Tq query rows")
    if head_reduction == "none" and ho != hq:
        raise ValueError(f'head_reduction="none" needs as many old heads as current heads, got Ho={ho} and Hq={hq}')
    _check_mask("query_mask", query_mask, (b, tq), q.device)
    _check_mask("key_mask", key_mask, (b, tk), q.device)
    if lse_old is not None:
        if not isinstance(lse_old, torch.Tensor) or not lse_old.is_floating_point():
            raise TypeError("lse_old must be a floating tensor [B, Ho, R] or None")
        if tuple(lse_old.shape) != (b, ho, n_old):
            raise ValueError(f"lse_old must have shape {(b, ho, n_old)} (one per old head and cached row), got {tuple(lse_old.shape)}")
        if lse_old.device != q.device:
            raise ValueError(f"lse_old is on {lse_old.device} but q is on {q.device}")
    if query_mask is not None and n_old < tq:
        check_no_rows(query_mask[:, : tq - n_old],
                      f"query_mask marks rows before the cached old rows: q_old holds the last {n_old} of {tq} "
                      "rows, so only those can carry a divergence")


def check_no_rows(marked: torch.Tensor, message: str) -> None:
    """Raise ``ValueError(message)`` if any element of the bool tensor ``marked`` is set.

    Under ``torch.compile`` the check stays in the graph as an asynchronous assert (a
    data-dependent branch cannot be traced), so the same rule holds on every path."""
    if torch.compiler.is_compiling():
        torch._assert_async(~marked.any(), message)
    elif bool(marked.any()):
        raise ValueError(message)


# --------------------------------------------------------------------------- public op

def fused_attn_kl(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_old: torch.Tensor,
    k_old: torch.Tensor,
    *,
    causal: bool = True,
    sm_scale: Optional[float] = None,
    old_sm_scale: Optional[float] = None,
    divergence: str = "jsd",
    head_reduction: str = "mean",
    exclude_self: bool = False,
    query_mask: Optional[torch.Tensor] = None,
    key_mask: Optional[torch.Tensor] = None,
    lse_old: Optional[torch.Tensor] = None,
    deterministic: bool = False,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention output and the per-token divergence between current and old attention.

    Computes ``out = softmax(sm_scale * q @ k^T) @ v`` and, for every query row that
    carries a divergence, ``D(p || r)`` between the current policy ``p`` (head-averaged
    attention row, renormalized on the support) and the old policy's ``r`` computed from
    ``q_old``, ``k_old`` — without materializing any ``Tq x Tk`` matrix (except for
    ``backend="reference"``). See ``SPEC.md`` section 2 for the exact semantics.

    Args:
        q: ``[B, Hq, Tq, D]`` current queries.
        k, v: ``[B, Hk, Tk, D]`` and ``[B, Hk, Tk, Dv]``; ``Hq % Hk == 0`` (GQA: query
            head ``h`` reads KV head ``h // (Hq // Hk)``).
        q_old: ``[B, Ho, R, Do]`` old-policy (or teacher) queries of the **last R query
            rows** (``R <= Tq``). Pass all ``Tq`` rows, or only the response suffix: rows
            before it carry no divergence. This is the old-policy cache (see
            :func:`make_old_policy_cache`); no attention map is ever stored.
        k_old: ``[B, Hko, Tk, Do]``, ``Ho % Hko == 0``. ``Ho``/``Do`` may differ from
            ``Hq``/``D`` for ``head_reduction="mean"``. No gradient reaches ``q_old`` or
            ``k_old``.
        causal: bottom-right aligned mask: row ``i`` sees keys ``j <= i + Tk - Tq``.
        sm_scale, old_sm_scale: softmax scales, default ``1/sqrt(D)`` and ``1/sqrt(Do)``.
        divergence: ``"jsd"`` (Jensen-Shannon), ``"kl"`` (``KL(old || new)``) or
            ``"reverse_kl"`` (``KL(new || old)``).
        head_reduction: ``"mean"`` (one policy per row: heads averaged) or ``"none"``
            (per head; needs ``Ho == Hq``).
        exclude_self: drop the query's own position from the policy and renormalize.
        query_mask: ``[B, Tq]`` bool, rows that carry a divergence (response tokens).
        key_mask: ``[B, Tk]`` bool, valid (non-padding) keys, for attention and policy.
        lse_old: optional ``[B, Ho, R]`` natural-log log-sum-exp of the old scores
            (``old_sm_scale * q_old @ k_old^T`` over allowed keys; ``+inf`` for a row with
            no key), e.g. from :func:`make_old_policy_cache`. Saves one sweep.
        deterministic: ``True`` keeps the GPU backward passes free of atomics, so repeated
            calls give bit-identical gradients (FlashAttention's ``deterministic``); the
            default lets them add ``dq`` / ``dk`` with atomics where that is faster. The
            torch and reference backends are deterministic either way.
        backend: ``"auto" | "triton" | "cuda" | "torch" | "reference"``; see
            :func:`resolve_backend`.

    Returns:
        ``out``: ``[B, Hq, Tq, Dv]`` in ``q.dtype``.
        ``div``: ``[B, Tq]`` (``"mean"``) or ``[B, Hq, Tq]`` (``"none"``), float32
        (float64 for float64 inputs); 0 where ``query_mask`` is False, before the cached
        rows, and where the policy row has no key. Rows with no allowed key get
        ``out = 0`` and zero gradients. Non-finite inputs are not checked (as in SDPA): a
        NaN or inf in the inputs propagates to the rows it touches.

    Example::

        >>> q = torch.randn(2, 8, 128, 64, requires_grad=True)
        >>> k, v = torch.randn(2, 2, 128, 64), torch.randn(2, 2, 128, 64)
        >>> q_old, k_old = q.detach()[:, :, -32:], k.clone()  # old queries of the response only
        >>> out, div = fused_attn_kl(q, k, v, q_old, k_old)   # div: [2, 128], nonzero on the last 32 rows
    """
    _validate(q, k, v, q_old, k_old, lse_old, query_mask, key_mask, divergence, head_reduction, backend)
    sm_scale = _check_scale("sm_scale", sm_scale, 1.0 / math.sqrt(q.shape[-1]))
    old_sm_scale = _check_scale("old_sm_scale", old_sm_scale, 1.0 / math.sqrt(q_old.shape[-1]))
    causal, exclude_self = bool(causal), bool(exclude_self)
    q_old, k_old, lse_old = (None if x is None else _constant(x) for x in (q_old, k_old, lse_old))
    name = _resolve_constant(backend, q.device, q.dtype, max(q.shape[-1], v.shape[-1], q_old.shape[-1]))
    if q.shape[0] == 0:  # an empty batch, as SDPA allows: empty outputs, no kernel launched
        div_shape = (0, q.shape[2]) if head_reduction == "mean" else (0, q.shape[1], q.shape[2])
        sdt = torch.float64 if q.dtype == torch.float64 else torch.float32
        connect = (q.sum() + k.sum() + v.sum()) * 0  # keeps the (empty) outputs in the autograd graph
        return q.new_zeros(0, q.shape[1], q.shape[2], v.shape[3]) + connect, q.new_zeros(div_shape, dtype=sdt)
    if name == "reference":
        return fused_attn_kl_reference(
            q, k, v, q_old, k_old, causal=causal, sm_scale=sm_scale, old_sm_scale=old_sm_scale,
            divergence=divergence, head_reduction=head_reduction, exclude_self=exclude_self,
            query_mask=query_mask, key_mask=key_mask, lse_old=lse_old)
    res = ops.fused_attn_kl_fwd(q, k, v, q_old, k_old, lse_old, query_mask, key_mask, causal, sm_scale,
                                old_sm_scale, divergence, head_reduction, exclude_self, bool(deterministic), name)
    return res[0], res[1]


def _constant(x: torch.Tensor) -> torch.Tensor:
    """An input that gets no gradient: detached, and copied out of inference mode when it
    was made under ``torch.inference_mode()`` (autograd cannot save such a tensor)."""
    x = x.detach()
    if torch.compiler.is_compiling():  # dynamo cannot trace is_inference(); a traced graph holds no such tensor
        return x
    return x.clone() if x.is_inference() and not torch.is_inference_mode_enabled() else x


# --------------------------------------------------------------------------- old-policy cache

class OldPolicyCache(NamedTuple):
    """What a trainer keeps of the old policy (or teacher) per sequence: queries of the
    divergence rows only, all keys, and optionally per-row log-sum-exp.
    ``O(R * Ho * Do + Tk * Hko * Do)`` memory, never an attention map."""

    q_old: torch.Tensor  # [B, Ho, R, Do]
    k_old: torch.Tensor  # [B, Hko, Tk, Do]
    lse_old: Optional[torch.Tensor] = None  # [B, Ho, R]

    def as_kwargs(self) -> dict:
        """``fused_attn_kl(q, k, v, **cache.as_kwargs(), ...)``."""
        return {"q_old": self.q_old, "k_old": self.k_old, "lse_old": self.lse_old}


@torch.no_grad()
def make_old_policy_cache(
    q_old: torch.Tensor,
    k_old: torch.Tensor,
    num_rows: Optional[int] = None,
    *,
    with_lse: bool = False,
    causal: bool = True,
    key_mask: Optional[torch.Tensor] = None,
    old_sm_scale: Optional[float] = None,
) -> OldPolicyCache:
    """Capture the old policy from its queries and keys (e.g. inside the no-grad pass that
    computes old log-probs).

    Args:
        q_old: ``[B, Ho, Tq, Do]`` old queries of all rows (or already only the last rows).
        k_old: ``[B, Hko, Tk, Do]`` old keys.
        num_rows: keep the last ``num_rows`` query rows (the response); default all. The
            kept rows and the keys are copied, so the sources can be freed or updated in place.
        with_lse: also store the per-row log-sum-exp (computed chunk by chunk, memory
            ``O(chunk)``), so that ``fused_attn_kl`` skips the old policy's first sweep.
        causal, key_mask, old_sm_scale: as passed to :func:`fused_attn_kl` later.
    """
    _check_tensor("q_old", q_old, 4, "[B, Ho, Tq, Do]")
    _check_tensor("k_old", k_old, 4, "[B, Hko, Tk, Do]")
    tq = q_old.shape[2]
    n = tq if num_rows is None else num_rows
    if isinstance(n, bool) or not isinstance(n, int) or not 0 < n <= tq:
        raise ValueError(f"num_rows must be an int in [1, {tq}] (rows of q_old) or None, got {num_rows!r}")
    if k_old.shape[0] != q_old.shape[0] or k_old.shape[3] != q_old.shape[3] or q_old.shape[1] % k_old.shape[1]:
        raise ValueError(f"k_old {tuple(k_old.shape)} does not match q_old {tuple(q_old.shape)}: "
                         "expected the same batch and head dim, and Ho a multiple of Hko")
    _check_mask("key_mask", key_mask, (q_old.shape[0], k_old.shape[2]), q_old.device)
    scale = _check_scale("old_sm_scale", old_sm_scale, 1.0 / math.sqrt(q_old.shape[-1]))
    # Copies, so that the cache survives an in-place update (or the freeing) of its sources.
    rows = q_old[:, :, tq - n:].clone(memory_format=torch.contiguous_format)
    k_keep = k_old.detach().clone(memory_format=torch.contiguous_format)
    lse = None
    if with_lse:
        lse = torch_backend.lse_rows(rows, k_keep, tq - n, tq, bool(causal), key_mask, scale)
        lse = lse.float() if lse.dtype != torch.float64 else lse
    return OldPolicyCache(rows, k_keep, lse)
