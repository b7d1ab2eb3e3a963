"""Benchmark providers: the ways of computing (attention output, per-token divergence).

* ``eager`` — what RAL users do today: Hugging Face eager attention with
  ``output_attentions=True`` (probabilities ``[B, Hq, T, T]`` in the model dtype, softmax
  in float32), the old policy's probabilities for the divergence rows under ``no_grad``,
  and the divergence of the (head-averaged) rows in float32. Written independently of
  ``ral_kernels`` (tests check it against the dense reference).
* ``eager_compiled`` — ``torch.compile`` of ``eager`` (inductor; compilation happens in
  the untimed warm-up).
* one provider per ``ral_kernels`` backend (``reference``, ``torch``, ``triton``,
  ``cuda``, and whatever ``ral_kernels`` adds later): ``fused_attn_kl(backend=name)``.
* ``sdpa`` and ``flash_attn`` — attention only, the floor the divergence's overhead is
  measured against: ``scaled_dot_product_attention(is_causal=True, enable_gqa=...)`` and
  ``flash_attn_func(causal=True)`` (when importable, on CUDA, in fp16/bf16).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import shutil
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .. import _semantics
from .config import Shape

_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
                 "float64": torch.float64}


# --------------------------------------------------------------------------- problem

class Problem:
    """Inputs of one shape: leaves ``q, k, v`` (requiring grad) and the old policy's cache
    ``q_old`` (last ``R`` rows) and ``k_old``, a perturbation of the current policy (the
    same model a few optimizer steps ago), generated on ``device`` from a fixed seed."""

    def __init__(self, shape: Shape, device: torch.device | str, seed: int = 0):
        self.shape, self.device = shape, torch.device(device)
        s, dt = shape, _TORCH_DTYPES[shape.dtype]
        g = torch.Generator(device=self.device).manual_seed(seed)

        def rnd(*size):
            return torch.randn(*size, generator=g, device=self.device, dtype=dt)

        b, hq, hk, t, d, r = s.batch, s.heads, s.kv_heads, s.seq_len, s.head_dim, s.rows
        self.q, self.k, self.v = rnd(b, hq, t, d), rnd(b, hk, t, d), rnd(b, hk, t, d)
        self.q_old = (self.q[:, :, t - r:] + 0.3 * rnd(b, hq, r, d)).contiguous()
        self.k_old = self.k + 0.3 * rnd(b, hk, t, d)
        for x in (self.q, self.k, self.v):
            x.requires_grad_()
        self.sm_scale = 1.0 / math.sqrt(d)


class Runner:
    """A provider bound to a problem: ``forward()`` returns its output tensors; the
    upstream gradients are fixed random tensors (``div``'s play the advantages)."""

    def __init__(self, forward: Callable[[], tuple], leaves: list, device: torch.device):
        self.forward, self.leaves, self.device = forward, leaves, device
        self._grads = None

    def grads(self, outs) -> list:
        if self._grads is None:
            g = torch.Generator(device=self.device).manual_seed(1)
            self._grads = [torch.randn(o.shape, generator=g, device=o.device, dtype=o.dtype) for o in outs]
        return self._grads

    def backward(self, outs) -> None:
        """The backward of the outputs of one :meth:`forward`."""
        torch.autograd.backward(list(outs), self.grads(outs))

    def step(self) -> tuple:
        """One forward + backward; returns the outputs."""
        outs = self.forward()
        self.backward(outs)
        return outs

    def mode(self, mode: str):
        """``(fn, setup)`` of a mode: ``fn`` is what is timed and measured, ``setup`` (or
        None) runs untimed before each call. forward: the forward with autograd recording,
        as in training; backward: the backward of a forward that ``setup`` records; full:
        both."""
        if mode == "forward":
            return self.forward, None
        if mode == "full":
            return self.step, None
        if mode != "backward":
            raise ValueError(f"unknown mode {mode!r}; valid: forward, backward, full")
        state = {}

        def setup():
            state.clear()
            outs = self.forward()
            state["outs"], state["grads"] = outs, self.grads(outs)

        def backward():
            outs, grads = state.pop("outs"), state.pop("grads")
            torch.autograd.backward(list(outs), grads)
        return backward, setup


# --------------------------------------------------------------------------- eager baseline

def _eager_probs(q, k, scale: float, causal: bool, row0: int = 0):
    """Hugging Face ``eager_attention_forward``: repeat KV heads, scores in the model
    dtype plus an additive causal mask, softmax in float32, probabilities cast back."""
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    s = torch.matmul(q, k.transpose(2, 3)) * scale
    if causal:  # query row row0 + i sees keys j <= row0 + i (Tq == Tk)
        mask = torch.full((q.shape[2], k.shape[2]), torch.finfo(s.dtype).min, device=q.device, dtype=s.dtype)
        s = s + mask.triu(row0 + 1)
    stat = torch.float64 if q.dtype == torch.float64 else torch.float32
    return torch.softmax(s, dim=-1, dtype=stat).to(q.dtype)


def _divergence_rows(p, r, divergence: str):
    tiny = torch.finfo(p.dtype).tiny
    log_p, log_r = p.clamp_min(tiny).log(), r.clamp_min(tiny).log()
    if divergence == "jsd":
        log_m = ((p + r) * 0.5).clamp_min(tiny).log()
        terms = 0.5 * (p * (log_p - log_m) + r * (log_r - log_m))
    elif divergence == "kl":  # KL(old || new)
        terms = r * (log_r - log_p)
    elif divergence == "reverse_kl":  # KL(new || old)
        terms = p * (log_p - log_r)
    else:
        raise ValueError(f"divergence must be one of {_semantics.DIVERGENCES}, got {divergence!r}")
    return terms.sum(-1)


def eager_attn_kl(q, k, v, q_old, k_old, *, causal: bool = True, divergence: str = "jsd",
                  head_reduction: str = "mean", sm_scale: Optional[float] = None,
                  old_sm_scale: Optional[float] = None):
    """``(out, div)`` the way RAL is computed today, materializing ``[B, Hq, T, T]``.

    Same inputs, outputs and semantics as ``fused_attn_kl`` with ``Tq == Tk``, no masks and
    ``exclude_self=False``: ``div`` is float32 ``[B, T]`` (``"mean"``) or ``[B, Hq, T]``
    (``"none"``), zero before the ``R = q_old.shape[2]`` divergence rows.
    """
    t, r = q.shape[2], q_old.shape[2]
    scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else sm_scale
    old_scale = 1.0 / math.sqrt(q_old.shape[-1]) if old_sm_scale is None else old_sm_scale
    probs = _eager_probs(q, k, scale, causal)  # output_attentions=True
    out = torch.matmul(probs, v.repeat_interleave(q.shape[1] // v.shape[1], dim=1))
    with torch.no_grad():
        probs_old = _eager_probs(q_old, k_old, old_scale, causal, row0=t - r)
    stat = torch.float64 if q.dtype == torch.float64 else torch.float32
    p, p_old = probs[:, :, t - r:].to(stat), probs_old.to(stat)
    if head_reduction == "mean":
        p, p_old = p.mean(1, keepdim=True), p_old.mean(1, keepdim=True)
    div = F.pad(_divergence_rows(p, p_old, divergence), (t - r, 0))  # [B, groups, T]
    return out, (div[:, 0] if head_reduction == "mean" else div)


# --------------------------------------------------------------------------- providers

@dataclasses.dataclass(frozen=True)
class Provider:
    name: str
    kind: str  # "baseline" (eager), "fused" (ral_kernels backends), "floor" (attention only)
    description: str
    dense: bool  # materializes [B, H, T, T]: subject to the memory guard
    divergence: bool  # computes the divergence (counts in the FLOPs)
    _reason: Callable[[torch.device, Shape], Optional[str]]
    _build: Callable[..., Callable[[], tuple]]

    def unavailable(self, device, shape: Shape | None = None) -> Optional[str]:
        """``None`` if the provider can run ``shape`` on ``device``, else why not."""
        return self._reason(torch.device(device), shape)

    def build(self, problem: Problem, *, compile_dynamic: bool = False, compile_backend: str = "inductor") -> Runner:
        """Bind to ``problem``. ``compile_dynamic`` / ``compile_backend`` only concern
        ``eager_compiled``: one dynamic-shape graph for every sequence length instead of
        one per shape, and the ``torch.compile`` backend (the test suite uses
        ``"aot_eager"``, which skips inductor's C++ code generation)."""
        forward, leaves = self._build(problem, compile_dynamic=compile_dynamic, compile_backend=compile_backend)
        return Runner(forward, leaves, problem.device)


def _always(device, shape):
    return None


def _eager_build(problem: Problem, **_):
    s, p = problem.shape, problem

    def forward():
        return eager_attn_kl(p.q, p.k, p.v, p.q_old, p.k_old, causal=s.causal, divergence=s.divergence,
                             head_reduction=s.head_reduction)
    return forward, [p.q, p.k, p.v]


def _compile_reason(device, shape):
    try:
        import torch._dynamo
        if not torch._dynamo.is_dynamo_supported():
            return "torch.compile is not supported on this Python / platform"
    except Exception as e:  # pragma: no cover - depends on the install
        return f"torch.compile is unavailable: {e}"
    if device.type == "cuda":
        if importlib.util.find_spec("triton") is None:
            return "torch.compile's inductor needs the `triton` package on CUDA"
    elif not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        return "torch.compile's inductor needs a C++ compiler (g++ or clang++) on the CPU"
    return None


def _compiled_build(problem: Problem, *, compile_dynamic: bool = False, compile_backend: str = "inductor"):
    import torch._dynamo

    s, p = problem.shape, problem
    key = (s.causal, s.divergence, s.head_reduction, compile_backend)
    fn = _compiled_cache.get(key) if compile_dynamic else None
    if fn is None:
        if not compile_dynamic:
            torch._dynamo.reset()  # one specialization per shape; never reach the recompile limit

        def eager(q, k, v, q_old, k_old):
            return eager_attn_kl(q, k, v, q_old, k_old, causal=s.causal, divergence=s.divergence,
                                 head_reduction=s.head_reduction)
        fn = torch.compile(eager, dynamic=compile_dynamic, backend=compile_backend)
        if compile_dynamic:
            _compiled_cache[key] = fn

    def forward():
        return fn(p.q, p.k, p.v, p.q_old, p.k_old)
    return forward, [p.q, p.k, p.v]


_compiled_cache: dict = {}


def _backend_reason(name: str):
    def reason(device, shape):
        from ..api import BackendUnavailableError, resolve_backend
        try:
            if shape is None:
                resolve_backend(name, device)
            else:
                resolve_backend(name, device, getattr(torch, shape.dtype), shape.head_dim)
        except BackendUnavailableError as e:
            return str(e)
        if name == "triton" and device.type != "cuda":
            return "Triton on the CPU only runs under TRITON_INTERPRET=1, far too slow to benchmark"
        if name == "cuda" and device.type != "cuda":
            return "the CUDA kernels on the CPU only run in the emulator (RAL_CUDA_EMULATION=1), far too slow to benchmark"
        return None
    return reason


def _backend_build(name: str):
    def build(problem: Problem, **_):
        from ..api import fused_attn_kl

        s, p = problem.shape, problem

        def forward():
            return fused_attn_kl(p.q, p.k, p.v, p.q_old, p.k_old, causal=s.causal, divergence=s.divergence,
                                 head_reduction=s.head_reduction, backend=name)
        return forward, [p.q, p.k, p.v]
    return build


def _sdpa_build(problem: Problem, **_):
    s, p = problem.shape, problem
    gqa = s.heads != s.kv_heads

    def forward():
        return (F.scaled_dot_product_attention(p.q, p.k, p.v, is_causal=s.causal, scale=p.sm_scale,
                                               enable_gqa=gqa),)
    return forward, [p.q, p.k, p.v]


def _flash_reason(device, shape):
    if importlib.util.find_spec("flash_attn") is None:
        return "the `flash_attn` package is not installed"
    if device.type != "cuda":
        return f"flash-attn needs CUDA tensors (got {device.type})"
    if shape is not None and shape.dtype not in ("float16", "bfloat16"):
        return f"flash-attn needs float16 or bfloat16 (got {shape.dtype})"
    return None


def _flash_build(problem: Problem, **_):
    from flash_attn import flash_attn_func

    s, p = problem.shape, problem
    # flash-attn's layout is [B, T, H, D]; the transposes are setup, not timed.
    q, k, v = (x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (p.q, p.k, p.v))

    def forward():
        return (flash_attn_func(q, k, v, causal=s.causal, softmax_scale=p.sm_scale),)
    return forward, [q, k, v]


_BACKEND_ORDER = ("reference", "torch", "triton", "cuda")


def _registry() -> dict[str, Provider]:
    backends = [b for b in _BACKEND_ORDER if b in _semantics.BACKENDS]
    backends += [b for b in _semantics.BACKENDS if b not in backends and b != "auto"]
    providers = [
        Provider("eager", "baseline", "eager attention (output_attentions) + divergence in plain PyTorch",
                 True, True, _always, _eager_build),
        Provider("eager_compiled", "baseline", "torch.compile of eager", True, True, _compile_reason,
                 _compiled_build),
    ]
    for b in backends:
        providers.append(Provider(b, "fused", f"ral_kernels.fused_attn_kl(backend={b!r})", b == "reference", True,
                                  _backend_reason(b), _backend_build(b)))
    providers += [
        Provider("sdpa", "floor", "torch scaled_dot_product_attention (attention only)", False, False, _always,
                 _sdpa_build),
        Provider("flash_attn", "floor", "flash_attn_func (attention only)", False, False, _flash_reason,
                 _flash_build),
    ]
    return {p.name: p for p in providers}


PROVIDERS: dict[str, Provider] = _registry()


def get_provider(name: str) -> Provider:
    if name not in PROVIDERS:
        raise ValueError(f"unknown provider {name!r}; valid: {', '.join(PROVIDERS)}")
    return PROVIDERS[name]


def dense_bytes(shape: Shape) -> int:
    """A bound on what a dense provider holds at once in forward + backward: about ten
    float32 ``[B, Hq, T, T]`` tensors (measured: eager ~3-6, the reference ~7)."""
    return 10 * 4 * shape.batch * shape.heads * shape.seq_len * shape.seq_len
