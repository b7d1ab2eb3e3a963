"""CUDA C++ backend: launchers for the kernels in ``csrc/`` (extension ``ral_kernels._C``).

``fwd`` / ``bwd`` have the signatures of :mod:`ral_kernels.backends.torch` and return the
same statistics. The passes are those of the Triton backend (see ``csrc/ral_cuda.h``); the
per-row glue is :mod:`ral_kernels.backends.glue`.

The kernels take fp16 / bf16 tensors with one padded head dim of 64 or 128, so q, k, v,
q_old and k_old are zero-padded here to the smallest of those that holds all of D, Dv and
Do (zero columns change no score and their outputs are sliced off).

On CUDA tensors the extension is the prebuilt ``ral_kernels._C`` or, failing that, built
just in time. With ``RAL_CUDA_EMULATION=1`` CPU tensors run the same kernel sources in the
CPU emulator (``csrc/emu``), which is how the tests check them without a GPU.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

from .. import glue
from ..._semantics import DIVERGENCES

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 128


def emulation_enabled() -> bool:
    return os.environ.get("RAL_CUDA_EMULATION") == "1"


def _alloc(shape, dtype, device) -> torch.Tensor:
    """Uninitialized buffer the kernels fill (tests poison it with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


@functools.lru_cache(maxsize=None)
def _emulator():
    """The CPU emulator, set to check the shared-memory limit of the GPUs a build targets:
    ``RAL_EMU_ARCH`` when set (the emulator reads it), else the most constrained arch of
    ``RAL_CUDA_ARCHS`` (default "80;90": sm_80's 163 KiB per block)."""
    from . import build as _cuda_build

    ext = _cuda_build.load_emulator()
    if not os.environ.get("RAL_EMU_ARCH"):
        known = [a for a in (int(a.rstrip("af")) for a in _cuda_build.parse_archs()) if ext.emu_max_dyn_smem(a) > 0]
        if known:
            ext.emu_set_arch(min(known, key=ext.emu_max_dyn_smem))
    return ext


def _ext(device: torch.device):
    from . import build as _cuda_build

    if device.type == "cuda":
        return _cuda_build.load_extension()
    if emulation_enabled():
        return _emulator()
    raise RuntimeError(f"backend='cuda' needs CUDA tensors (got {device.type}); set RAL_CUDA_EMULATION=1 to run "
                       "the kernels in the CPU emulator")


def padded_head_dim(*dims: int) -> int:
    return 64 if max(dims) <= 64 else 128


def check_supported(q: torch.Tensor, d_old: int, dv: int) -> None:
    glue.check_supported('cuda', q, d_old, dv, SUPPORTED_DTYPES, MAX_HEAD_DIM)


def _prep(x: torch.Tensor, hd: int) -> torch.Tensor:
    """Contiguous, 16-byte aligned, zero-padded to head dim ``hd``."""
    if x.shape[-1] != hd:
        x = F.pad(x, (0, hd - x.shape[-1]))
    x = x.contiguous()
    return x if x.data_ptr() % 16 == 0 else x.clone()


def _kmask(key_mask):
    return None if key_mask is None else key_mask.contiguous()


def fwd(q, k, v, q_old, k_old, lse_old, query_mask, key_mask, causal, sm_scale, old_sm_scale,
        divergence, head_reduction, exclude_self):
    check_supported(q, q_old.shape[-1], v.shape[-1])
    b, hq, tq, _ = q.shape
    tk, dv = k.shape[2], v.shape[3]
    ho, n_old = q_old.shape[1], q_old.shape[2]
    groups = 1 if head_reduction == "mean" else hq
    r0 = tq - n_old
    dev = q.device
    ext = _ext(dev)
    hd = padded_head_dim(q.shape[-1], q_old.shape[-1], dv)
    qp, kp, vp, qop, kop = (_prep(x, hd) for x in (q, k, v, q_old, k_old))
    km = _kmask(key_mask)

    out = _alloc((b, hq, tq, hd), q.dtype, dev)
    lse = _alloc((b, hq, tq), torch.float32, dev)
    track_self = exclude_self and n_old > 0
    mass = _alloc((b, hq, n_old), torch.float32, dev) if track_self else None
    ext.attn_fwd(qp, kp, vp, out, lse, mass, km, tq, 0, r0, sm_scale, causal, track_self)
    out = out if dv == hd else out[..., :dv].contiguous()  # the strides register_fake promises

    if n_old == 0:
        return glue.without_divergence_rows(out, lse, groups, ho)

    if lse_old is None:
        lse_old = _alloc((b, ho, n_old), torch.float32, dev)
        mass_old = _alloc((b, ho, n_old), torch.float32, dev)
        ext.attn_fwd(qop, kop, None, None, lse_old, mass_old, km, tq, r0, r0, old_sm_scale, causal, exclude_self)
    else:
        lse_old, mass_old = glue.old_lse_and_mass(lse_old, q_old, k_old, old_sm_scale, r0, tq, tk, key_mask,
                                                  exclude_self)
    mass_cur = mass if track_self else torch.isfinite(lse[:, :, r0:]).float()
    z, z_old = glue.group_supports(mass_cur, mass_old, query_mask, r0, groups)
    div, e_stat, a_stat = glue.divergence_buffers(b, groups, hq, tq, n_old, dev)
    ext.div_fwd(qp, kp, lse, qop, kop, lse_old, z, z_old, div, e_stat, a_stat, km, r0, sm_scale, old_sm_scale,
                DIVERGENCES.index(divergence), causal, exclude_self)
    c_stat = glue.row_coupling(a_stat, e_stat, mass_cur, z)
    return out, (div[:, 0] if groups == 1 else div), lse, lse_old, z, z_old, e_stat, c_stat


def bwd(dout, ddiv, q, k, v, q_old, k_old, out, lse, lse_old, z, z_old, e_stat, c_stat, key_mask,
        causal, sm_scale, old_sm_scale, divergence, head_reduction, exclude_self):
    b, hq, tq, d = q.shape
    hk, tk, dv = k.shape[1], k.shape[2], v.shape[3]
    n_old = q_old.shape[2]
    r0 = tq - n_old
    dev = q.device
    ext = _ext(dev)
    hd = padded_head_dim(d, q_old.shape[-1], dv)
    qp, kp, vp, qop, kop, dop = (_prep(x, hd) for x in (q, k, v, q_old, k_old, dout.to(q.dtype)))
    km = _kmask(key_mask)

    delta, w = glue.effective_delta(dout, out, ddiv, z, c_stat, r0)
    dq = _alloc((b, hq, tq, hd), torch.float32, dev)
    dk = _alloc((b, hk, tk, hd), torch.float32, dev)
    dvb = _alloc((b, hk, tk, hd), torch.float32, dev)
    ext.attn_bwd(qp, kp, vp, dop, lse.contiguous(), delta, dq, dk, dvb, km, sm_scale, causal)
    if w is not None:
        ext.div_bwd(qp, kp, lse.contiguous(), qop, kop, lse_old.contiguous(), z.contiguous(), z_old.contiguous(),
                    e_stat.contiguous(), w, dq, dk, km, r0, sm_scale, old_sm_scale, DIVERGENCES.index(divergence),
                    causal, exclude_self)
    return dq[..., :d].to(q.dtype), dk[..., :d].to(k.dtype), dvb[..., :dv].to(v.dtype)
