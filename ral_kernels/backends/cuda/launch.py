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
import math
import os

import torch
import torch.nn.functional as F

from .. import glue, pipeline

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


def _support_lse(q_rows, k, key_mask, cfg, first_row, tq, scale):
    """The support's own log-sum-exp with ``exclude_self``. The kernels' support mass (a
    ratio of two sums sharing one running max) underflows when a row's own key dominates by
    more than ~87 nats, so until they hold that key out of the sweep this uses the torch
    backend's sweep, which does."""
    from ..torch import KERNELS as torch_kernels

    return torch_kernels.policy_stats(q_rows, k, key_mask, cfg, first_row, tq, scale)[1]


class CudaKernels(pipeline.Kernels):
    """The pipeline's passes on the CUDA C++ kernels (``csrc/``).

    The kernels take one padded head dim (64 or 128) for q, k, v, q_old and k_old, so
    :meth:`prepare` pads them once per call. Their divergence passes form
    ``abar = mean_h exp(s_h - lse_h)`` and ``p = abar / Z``; handing them
    ``lse_h = off_h - log n`` and ``Z = 1`` makes that exactly ``p = sum_h pi_h`` of the
    pipeline's offsets (and ``A_h`` comes out ``n`` times the pipeline's)."""

    def prepare(self, q, k, v, q_old, k_old):
        check_supported(q, q_old.shape[-1], v.shape[-1])
        hd = padded_head_dim(q.shape[-1], q_old.shape[-1], v.shape[-1])
        return tuple(_prep(x, hd) for x in (q, k, v, q_old, k_old))

    def prepare_dout(self, dout, q):
        return _prep(dout.to(q.dtype), q.shape[-1])

    def finish_out(self, out, v):
        return out if out.shape[-1] == v.shape[-1] else out[..., :v.shape[-1]].contiguous()

    def finish_grads(self, q, k, v, dq, dk, dv):
        return (dq[..., :q.shape[-1]].to(q.dtype), dk[..., :k.shape[-1]].to(k.dtype),
                dv[..., :v.shape[-1]].to(v.dtype))

    def attn_fwd(self, q, k, v, key_mask, cfg, r0, old=None):
        b, hq, tq, hd = q.shape
        n_old = tq - r0
        out = _alloc((b, hq, tq, hd), q.dtype, q.device)
        lse = _alloc((b, hq, tq), torch.float32, q.device)
        track_self = cfg.exclude_self and n_old > 0
        mass = _alloc((b, hq, n_old), torch.float32, q.device) if track_self else None
        _ext(q.device).attn_fwd(q, k, v, out, lse, mass, _kmask(key_mask), tq, 0, r0, cfg.sm_scale, cfg.causal, track_self)
        lse_s = _support_lse(q[:, :, r0:], k, key_mask, cfg, r0, tq, cfg.sm_scale) if track_self else None
        return out, lse, lse_s, None

    def policy_stats(self, q_rows, k, key_mask, cfg, first_row, tq, scale):
        b, h, n, _ = q_rows.shape
        lse = _alloc((b, h, n), torch.float32, q_rows.device)
        mass = _alloc((b, h, n), torch.float32, q_rows.device)
        _ext(q_rows.device).attn_fwd(q_rows, k, None, None, lse, mass, _kmask(key_mask), tq, first_row, first_row, scale,
                          cfg.causal, cfg.exclude_self)
        if cfg.exclude_self:
            return lse, _support_lse(q_rows, k, key_mask, cfg, first_row, tq, scale)
        return lse, lse

    @staticmethod
    def _as_lse(off, groups, rows=None):
        """``off - log n`` where the kernels read ``lse`` (``[B, H, rows]``, the offsets in
        the last rows)."""
        n = off.shape[1] // groups
        lse = off - math.log(n)
        if rows is not None and rows != off.shape[2]:
            lse = torch.cat([lse.new_full((*lse.shape[:2], rows - off.shape[2]), math.inf), lse], 2)
        return lse.contiguous()

    def _div_fwd(self, q, k, off, q_old, k_old, off_old, key_mask, cfg, r0):
        b, hq, tq, _ = q.shape
        groups = cfg.groups(hq)
        n_old = tq - r0
        ones = torch.ones(b, groups, n_old, dtype=torch.float32, device=q.device)
        div = torch.zeros(b, groups, tq, dtype=torch.float32, device=q.device)
        e_stat = torch.zeros_like(ones)
        a_stat = torch.zeros(b, hq, n_old, dtype=torch.float32, device=q.device)
        _ext(q.device).div_fwd(q, k, self._as_lse(off, groups, tq), q_old, k_old, self._as_lse(off_old, groups), ones,
                               ones, div, e_stat, a_stat, _kmask(key_mask), r0, cfg.sm_scale, cfg.old_sm_scale,
                               cfg.div_code, cfg.causal, cfg.exclude_self)
        return div[:, :, r0:], e_stat, a_stat / (hq // groups)

    def div_fwd(self, q, k, off, q_old, k_old, off_old, key_mask, cfg, r0):
        div, e_stat, _ = self._div_fwd(q, k, off, q_old, k_old, off_old, key_mask, cfg, r0)
        return div, e_stat, None  # the kernels do not sum the old policy's mass

    def attn_bwd(self, q, k, v, dout, lse, delta, key_mask, cfg, r0, dq, dk, dv, old=None):
        # The kernel overwrites its outputs; the divergence pass has already added to dq / dk.
        tmp = [torch.empty_like(x) for x in (dq, dk, dv)]
        _ext(q.device).attn_bwd(q, k, v, dout, lse.contiguous(), delta, *tmp, _kmask(key_mask), cfg.sm_scale,
                                cfg.causal)
        for acc, t in zip((dq, dk, dv), tmp):
            acc += t

    def div_bwd(self, q, k, off, q_old, k_old, off_old, e_stat, w, key_mask, cfg, r0, dq, dk):
        b, hq, tq, _ = q.shape
        groups = cfg.groups(hq)
        ones = torch.ones(b, groups, tq - r0, dtype=torch.float32, device=q.device)
        _ext(q.device).div_bwd(q, k, self._as_lse(off, groups, tq), q_old, k_old, self._as_lse(off_old, groups), ones,
                               ones, e_stat.contiguous(), (w / (hq // groups)).contiguous(), dq, dk, _kmask(key_mask),
                               r0, cfg.sm_scale, cfg.old_sm_scale, cfg.div_code, cfg.causal, cfg.exclude_self)
        # A_h comes from the kernels' forward divergence pass (a second sweep).
        return self._div_fwd(q, k, off, q_old, k_old, off_old, key_mask, cfg, r0)[2]


KERNELS = CudaKernels()


def fwd(q, k, v, q_old, k_old, lse_old, query_mask, key_mask, cfg):
    return pipeline.forward(KERNELS, q, k, v, q_old, k_old, lse_old, query_mask, key_mask, cfg)


def bwd(dout, ddiv, q, k, v, q_old, k_old, out, div, stats, key_mask, cfg):
    return pipeline.backward(KERNELS, dout, ddiv, q, k, v, q_old, k_old, out, div, stats, key_mask, cfg)
