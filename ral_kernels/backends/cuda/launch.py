"""CUDA C++ backend: launchers for the kernels in ``csrc/`` (extension ``ral_kernels._C``).

:class:`CudaKernels` implements the passes of :mod:`ral_kernels.backends.pipeline` (which
strings them together with the per-row glue of :mod:`ral_kernels.backends.glue`) on the
kernels of ``csrc/`` (their math and passes: ``csrc/ral_cuda.h`` and the top of each
``.cu`` file); every kernel is called with keyword arguments.

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

from .. import glue, pipeline

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 128
DIV_ROWS = 64      # divergence rows per program of the divergence kernels (csrc/div.cu kBM)
DIV_KEY_TILE = 64  # keys per tile of the row-major divergence kernels (csrc/div.cu row_tile_keys)
# A key split of the divergence passes spans at least this many key tiles (tests lower it
# to exercise the splits on small inputs).
MIN_SPLIT_TILES = 4


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


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the emulator: enough programs to exercise the key splits
    return torch.cuda.get_device_properties(device).multi_processor_count


def key_splits(row_programs: int, tk: int, device: torch.device) -> tuple[int, int]:
    """Key splits of the divergence passes (flash-decoding): enough programs for about two
    waves of the GPU, each split at least ``MIN_SPLIT_TILES`` key tiles long. Returns
    ``(splits, keys per split)``; the splits cover all ``tk`` keys."""
    want = _cdiv(2 * _num_sms(device), max(row_programs, 1))
    splits = max(1, min(want, _cdiv(tk, MIN_SPLIT_TILES * DIV_KEY_TILE)))
    split_keys = max(1, _cdiv(_cdiv(tk, splits), DIV_KEY_TILE)) * DIV_KEY_TILE
    return max(1, _cdiv(tk, split_keys)), split_keys


class CudaKernels(pipeline.Kernels):
    """The pipeline's passes on the CUDA C++ kernels (``csrc/``).

    The kernels take one padded head dim (64 or 128) for q, k, v, q_old and k_old, so
    :meth:`prepare` pads them once per call; the gradient buffers of :meth:`new_grads` are
    padded likewise and sliced by :meth:`finish_grads`. Per-head KL / reverse KL run through
    the divergence passes like JSD (``fused_kl`` is False: the attention kernels do not form
    the old scores)."""

    fused_kl = False

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

    # ------------------------------------------------------------------ forward passes
    def attn_fwd(self, q, k, v, key_mask, cfg, r0, old=None):
        if old is not None:
            raise ValueError("the CUDA kernels do not fuse the per-head KL into the attention pass")
        b, h, tq, hd = q.shape
        hold = cfg.exclude_self and r0 < tq  # divergence rows hold their own key out of the sweep
        out = _alloc((b, h, tq, hd), q.dtype, q.device)
        lse = _alloc((b, h, tq), torch.float32, q.device)
        lse_s = _alloc((b, h, tq - r0), torch.float32, q.device) if hold else None
        _ext(q.device).attn_fwd(q=q, k=k, v=v, out=out, lse=lse, lse_s=lse_s, key_mask=_kmask(key_mask), tq=tq,
                                pos0=0, r0=r0, scale=cfg.sm_scale, causal=cfg.causal)
        return out, lse, lse_s, None

    def policy_stats(self, q_rows, k, key_mask, cfg, first_row, tq, scale):
        b, h, n, _ = q_rows.shape
        lse = _alloc((b, h, n), torch.float32, q_rows.device)
        lse_s = _alloc((b, h, n), torch.float32, q_rows.device) if cfg.exclude_self else None
        _ext(q_rows.device).attn_fwd(q=q_rows, k=k, v=None, out=None, lse=lse, lse_s=lse_s, key_mask=_kmask(key_mask),
                                     tq=tq, pos0=first_row, r0=first_row, scale=scale, causal=cfg.causal)
        return lse, (lse if lse_s is None else lse_s)

    # ------------------------------------------------------------------ divergence passes
    @staticmethod
    def _div_consts(cfg, r0) -> dict:
        return dict(r0=r0, scale=cfg.sm_scale, old_scale=cfg.old_sm_scale, divergence=cfg.div_code,
                    causal=cfg.causal, exclude_self=cfg.exclude_self)

    def div_fwd(self, q, k, off, q_old, k_old, off_old, key_mask, cfg, r0):
        b, hq, tq, _ = q.shape
        n_div, groups = tq - r0, cfg.groups(hq)
        splits, split_keys = key_splits(_cdiv(n_div, DIV_ROWS) * b * groups, k.shape[2], q.device)
        div, e_stat, r_mass = (_alloc((splits, b, groups, n_div), torch.float32, q.device) for _ in range(3))
        _ext(q.device).div_fwd(q=q, k=k, off=off, q_old=q_old, k_old=k_old, off_old=off_old,
                               key_mask=_kmask(key_mask), div_part=div, e_part=e_stat, mass_part=r_mass,
                               split_keys=split_keys, **self._div_consts(cfg, r0))
        # partial sums of the key splits, added in a fixed order
        return div.sum(0), e_stat.sum(0), r_mass.sum(0)

    def div_bwd(self, q, k, off, q_old, k_old, off_old, e_stat, w, key_mask, cfg, r0, dq, dk):
        b, hq, tq, _ = q.shape
        n_div, groups = tq - r0, cfg.groups(hq)
        if cfg.deterministic:  # one split: each row-major program owns its rows of dq and A
            splits, split_keys = 1, max(k.shape[2], 1)
        else:
            splits, split_keys = key_splits(_cdiv(n_div, DIV_ROWS) * b * groups, k.shape[2], q.device)
        a_stat = torch.zeros(b, hq, n_div, dtype=torch.float32, device=q.device)  # added to
        _ext(q.device).div_bwd(q=q, k=k, off=off, q_old=q_old, k_old=k_old, off_old=off_old,
                               key_mask=_kmask(key_mask), e=e_stat.contiguous(), w=w, a=a_stat, dq=dq, dk=dk,
                               splits=splits, split_keys=split_keys, deterministic=cfg.deterministic,
                               **self._div_consts(cfg, r0))
        return a_stat

    # ------------------------------------------------------------------ attention backward
    def attn_bwd(self, q, k, v, dout, lse, delta, key_mask, cfg, r0, dq, dk, dv, old=None):
        if old is not None:
            raise ValueError("the CUDA kernels do not fuse the per-head KL into the attention pass")
        _ext(q.device).attn_bwd(q=q, k=k, v=v, dout=dout, lse=lse.contiguous(), delta=delta, dq=dq, dk=dk, dv=dv,
                                key_mask=_kmask(key_mask), scale=cfg.sm_scale, causal=cfg.causal,
                                deterministic=cfg.deterministic)


KERNELS = CudaKernels()


def fwd(q, k, v, q_old, k_old, lse_old, query_mask, key_mask, cfg):
    return pipeline.forward(KERNELS, q, k, v, q_old, k_old, lse_old, query_mask, key_mask, cfg)


def bwd(dout, ddiv, q, k, v, q_old, k_old, out, div, stats, key_mask, cfg):
    return pipeline.backward(KERNELS, dout, ddiv, q, k, v, q_old, k_old, out, div, stats, key_mask, cfg)
