"""Triton backend: launchers for the kernels of :mod:`ral_kernels.backends.triton.kernels`.

:class:`TritonKernels` implements the passes of :mod:`ral_kernels.backends.pipeline`
(which strings them together with the per-row glue); every kernel is launched by keyword.
Tile sizes come from a short per-architecture list of ``triton.Config``s, autotuned on a
GPU; Triton's interpreter (``TRITON_INTERPRET=1``, the CPU tests) runs one small tile.

Runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (tests).
"""

from __future__ import annotations

import functools
import math
import os
from typing import NamedTuple

import torch
import triton

from .. import pipeline
from ..glue import check_supported as _check_supported
from . import kernels as kern

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256
LOG2E = 1.4426950408889634


def _alloc(shape, dtype, device) -> torch.Tensor:
    """Uninitialized buffer the kernels fill (tests poison it with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _pow2(x: int) -> int:
    return max(16, triton.next_power_of_2(x))


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


class Tile(NamedTuple):
    """A launch configuration: tile sizes and the compiler's warps / pipeline stages."""

    BLOCK_M: int
    BLOCK_N: int
    num_warps: int
    num_stages: int


# The interpreter's tile: small, so the tests' odd sizes cross several tiles.
INTERPRETER_TILE = Tile(16, 16, 4, 1)


def tile_configs(head_dim: int, dtype: torch.dtype, arch: int = 90) -> list[Tile]:
    """The configurations the GPU dispatcher may pick for a (padded) head dim, dtype and
    compute capability (e.g. 80, 86, 89, 90); the first is the default, the rest are tried
    by the autotuner. Every one is compiled by the compile check (``tools.compile_check``)
    and must fit the arch's shared memory without register spills."""
    small_smem = arch in (86, 89)  # 99 KB of shared memory per block
    if dtype == torch.float32 or head_dim > 128:
        cands = [Tile(32, 32, 4, 1), Tile(64, 32, 8, 1)]
        if head_dim > 128 and dtype == torch.float32:
            cands = [Tile(32, 32, 4, 1), Tile(32, 32, 8, 1)]
    elif head_dim > 64:
        cands = [Tile(64, 64, 8, 2), Tile(64, 32, 4, 2), Tile(128, 32, 8, 2)]
    else:
        cands = [Tile(64, 64, 4, 2), Tile(128, 64, 8, 2), Tile(64, 32, 4, 3)]
    if small_smem:
        cands = [t._replace(num_stages=1) for t in cands]
    return cands


@functools.lru_cache(maxsize=None)
def _arch(device_index: int) -> int:
    major, minor = torch.cuda.get_device_capability(device_index)
    return 10 * major + minor


def _tile(head_dim: int, dtype: torch.dtype, device: torch.device) -> Tile:
    if interpreting() or device.type != "cuda":
        return INTERPRETER_TILE
    return tile_configs(head_dim, dtype, _arch(device.index or 0))[0]


def _prec(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: enough programs to exercise the key splits
    return torch.cuda.get_device_properties(device).multi_processor_count


def _kmask(key_mask, like):
    if key_mask is None:
        return like, False
    return key_mask.contiguous().view(torch.uint8), True


def _strides(prefix: str, x: torch.Tensor) -> dict:
    """``{prefix}b, {prefix}h, {prefix}row`` strides of a ``[B, H, T, D]`` tensor."""
    names = {"q": ("sqb", "sqh", "sqm"), "k": ("skb", "skh", "skn"), "v": ("svb", "svh", "svn"),
             "o": ("sob", "soh", "som"), "do": ("sdob", "sdoh", "sdom"), "qo": ("soqb", "soqh", "soqm"),
             "ko": ("sokb", "sokh", "sokn")}[prefix]
    return dict(zip(names, x.stride()[:3]))


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


class TritonKernels(pipeline.Kernels):
    """The pipeline's passes on the Triton kernels; per-head KL / reverse KL fused into the
    attention passes."""

    fused_kl = True

    def prepare(self, q, k, v, q_old, k_old):
        _check_supported("triton", q, q_old.shape[-1], v.shape[-1], SUPPORTED_DTYPES, MAX_HEAD_DIM)
        return tuple(_last_dim_contiguous(x) for x in (q, k, v, q_old, k_old))

    def prepare_dout(self, dout, q):
        return _last_dim_contiguous(dout.to(q.dtype))

    # ------------------------------------------------------------------ common launch arguments
    @staticmethod
    def _launch(q, v, q_old):
        bd, bdv, bdo = _pow2(q.shape[-1]), _pow2(v.shape[-1]), _pow2(q_old.shape[-1])
        tile = _tile(max(bd, bdv, bdo), q.dtype, q.device)
        consts = dict(BLOCK_M=tile.BLOCK_M, BLOCK_N=tile.BLOCK_N, INPUT_PREC=_prec(q.dtype),
                      num_warps=tile.num_warps, num_stages=tile.num_stages)
        return tile, dict(BLOCK_D=bd, BLOCK_DV=bdv, BLOCK_DO=bdo), consts

    # ------------------------------------------------------------------ forward passes
    def _sweep(self, q, k, v, key_mask, cfg, r0, pos0, scale, hold, old=None):
        b, h, n, d = q.shape
        tq = pos0 + n if v is None else n
        tk = k.shape[2]
        n_div = tq - r0
        dev = q.device
        dv_dim = v.shape[-1] if v is not None else d
        q_old, k_old, off_old = old if old is not None else (q, k, None)
        tile, dims, consts = self._launch(q, v if v is not None else q, q_old)
        km, has_km = _kmask(key_mask, q)
        out = _alloc((b, h, n, dv_dim), q.dtype, dev) if v is not None else q
        lse = _alloc((b, h, n), torch.float32, dev)
        lse_s = _alloc((b, h, n_div), torch.float32, dev) if hold else lse
        fused = old is not None
        div_f = _alloc((b, h, n_div), torch.float32, dev) if fused else lse
        r_mass = _alloc((b, h, n_div), torch.float32, dev) if fused else lse
        kern._attn_fwd_kernel[(triton.cdiv(n, tile.BLOCK_M), b * h)](
            Q=q, K=k, V=v if v is not None else k, O=out, LSE=lse, LSES=lse_s, KMASK=km,
            QO=q_old, KO=k_old, OFFO=off_old if fused else lse, DIVF=div_f, RMASS=r_mass,
            qk_scale=scale * LOG2E, oqk_scale=cfg.old_sm_scale * LOG2E, Tq=tq, Tk=tk, r0=r0, pos0=pos0, n_rows=n,
            H=h, GQA=h // k.shape[1], GQA_OLD=q_old.shape[1] // k_old.shape[1],
            **_strides("q", q), **_strides("k", k), **_strides("v", v if v is not None else k),
            **_strides("o", out), **_strides("qo", q_old), **_strides("ko", k_old),
            D=d, D_V=dv_dim, D_O=q_old.shape[-1],
            CAUSAL=cfg.causal, HAS_KMASK=has_km, HAS_V=v is not None, HOLD_SELF=hold,
            FUSED_KL=cfg.div_code if fused else 0, **dims, **consts)
        return (out if v is not None else None), lse, (lse_s if hold else None), ((div_f, r_mass) if fused else None)

    def attn_fwd(self, q, k, v, key_mask, cfg, r0, old=None):
        hold = cfg.exclude_self and r0 < q.shape[2]
        return self._sweep(q, k, v, key_mask, cfg, r0, 0, cfg.sm_scale, hold, old)

    def policy_stats(self, q_rows, k, key_mask, cfg, first_row, tq, scale):
        _, lse, lse_s, _ = self._sweep(q_rows, k, None, key_mask, cfg, first_row, first_row, scale, cfg.exclude_self)
        return lse, (lse if lse_s is None else lse_s)

    # ------------------------------------------------------------------ divergence passes
    def _div_args(self, q, k, off, q_old, k_old, off_old, key_mask, cfg, r0):
        b, hq, tq, d = q.shape
        hk, tk = k.shape[1], k.shape[2]
        ho, hko = q_old.shape[1], k_old.shape[1]
        groups = cfg.groups(hq)
        tile, dims, consts = self._launch(q, q, q_old)
        dims.pop("BLOCK_DV")
        km, has_km = _kmask(key_mask, q)
        args = dict(Q=q, K=k, OFF=off, QO=q_old, KO=k_old, OFFO=off_old, KMASK=km,
                    qk_scale=cfg.sm_scale * LOG2E, oqk_scale=cfg.old_sm_scale * LOG2E, Tq=tq, Tk=tk, r0=r0,
                    GROUPS=groups, n_heads=hq // groups, n_old=ho // groups, GQA=hq // hk, GQA_OLD=ho // hko,
                    **_strides("q", q), **_strides("k", k), soffb=off.stride(0), soffh=off.stride(1),
                    **_strides("qo", q_old), **_strides("ko", k_old), soffob=off_old.stride(0),
                    soffoh=off_old.stride(1), D=d, D_O=q_old.shape[-1],
                    DIVERGENCE=cfg.div_code, CAUSAL=cfg.causal, HAS_KMASK=has_km, EXCLUDE_SELF=cfg.exclude_self,
                    **dims, **consts)
        return tile, args

    @staticmethod
    def _splits(tile: Tile, row_blocks: int, tk: int, device) -> tuple[int, int]:
        """Key splits (flash-decoding): enough programs for about two waves of the GPU, each
        split at least 4 key tiles long. Returns ``(splits, keys per split)``."""
        want = math.ceil(2 * _num_sms(device) / max(row_blocks, 1))
        splits = max(1, min(want, triton.cdiv(tk, 4 * tile.BLOCK_N)))
        split_keys = triton.cdiv(triton.cdiv(tk, splits), tile.BLOCK_N) * tile.BLOCK_N
        return triton.cdiv(tk, split_keys), split_keys

    def div_fwd(self, q, k, off, q_old, k_old, off_old, key_mask, cfg, r0):
        b, hq, tq, _ = q.shape
        n_div = tq - r0
        tile, args = self._div_args(q, k, off, q_old, k_old, off_old, key_mask, cfg, r0)
        groups = args["GROUPS"]
        row_blocks = triton.cdiv(n_div, tile.BLOCK_M)
        splits, split_keys = self._splits(tile, row_blocks * b * groups, k.shape[2], q.device)
        part = _alloc((3, splits, b, groups, n_div), torch.float32, q.device)
        kern._div_fwd_kernel[(row_blocks, b * groups, splits)](
            **args, DIV=part[0], E=part[1], RMASS=part[2], split_keys=split_keys, s_split=b * groups * n_div)
        div, e_stat, r_mass = part.sum(1)  # partial sums of the key splits, added in a fixed order
        return div, e_stat, r_mass

    def div_bwd(self, q, k, off, q_old, k_old, off_old, e_stat, w, key_mask, cfg, r0, dq, dk):
        b, hq, tq, _ = q.shape
        hk, tk = k.shape[1], k.shape[2]
        n_div = tq - r0
        tile, args = self._div_args(q, k, off, q_old, k_old, off_old, key_mask, cfg, r0)
        groups = args["GROUPS"]
        a_stat = torch.zeros(b, hq, n_div, dtype=torch.float32, device=q.device)
        row_blocks = triton.cdiv(n_div, tile.BLOCK_M)
        if cfg.deterministic:
            splits, split_keys = 1, tk
        else:
            splits, split_keys = self._splits(tile, row_blocks * b * groups, tk, q.device)
        common = dict(args, E=e_stat.contiguous(), W=w, A=a_stat, DQ=dq, DK=dk, sm_scale=cfg.sm_scale, HK=hk,
                      split_keys=split_keys, PER_HEAD=groups > 1)
        # Row-major: dq of its rows (atomically across key splits) and A_h; dk atomically,
        # or, deterministic, from a key-major launch that owns each key block.
        kern._div_bwd_kernel[(row_blocks, b * groups, splits)](
            **common, KEY_MAJOR=False, ATOMIC=not cfg.deterministic)
        if cfg.deterministic:
            owners = b * (hk if groups > 1 else 1)
            kern._div_bwd_kernel[(triton.cdiv(tk, tile.BLOCK_N), owners, 1)](**common, KEY_MAJOR=True, ATOMIC=False)
        return a_stat

    # ------------------------------------------------------------------ attention backward
    def new_grads(self, q, k, v):
        bd, bdv = _pow2(q.shape[-1]), _pow2(v.shape[-1])
        zeros = functools.partial(torch.zeros, dtype=torch.float32, device=q.device)
        return zeros(*q.shape[:3], bd), zeros(*k.shape[:3], bd), zeros(*v.shape[:3], bdv)

    def finish_grads(self, q, k, v, dq, dk, dv):
        return (dq[..., :q.shape[-1]].to(q.dtype), dk[..., :k.shape[-1]].to(k.dtype),
                dv[..., :v.shape[-1]].to(v.dtype))

    def attn_bwd(self, q, k, v, dout, lse, delta, key_mask, cfg, r0, dq, dk, dv, old=None):
        b, hq, tq, d = q.shape
        hk, tk = k.shape[1], k.shape[2]
        fused = old is not None
        q_old, k_old, off, off_old, w, div_rows = old if fused else (q, k, lse, lse, lse, lse)
        tile, dims, consts = self._launch(q, v, q_old)
        km, has_km = _kmask(key_mask, q)
        args = dict(Q=q, K=k, V=v, DO=dout, LSE=lse.contiguous(), DELTA=delta, KMASK=km, QO=q_old, KO=k_old,
                    OFF=off, OFFO=off_old, W=w, DIVR=div_rows,
                    sm_scale=cfg.sm_scale, qk_scale=cfg.sm_scale * LOG2E, oqk_scale=cfg.old_sm_scale * LOG2E,
                    Tq=tq, Tk=tk, r0=r0, GQA=hq // hk, GQA_OLD=q_old.shape[1] // k_old.shape[1],
                    **_strides("q", q), **_strides("k", k), **_strides("v", v), **_strides("do", dout),
                    **_strides("qo", q_old), **_strides("ko", k_old), D=d, D_V=v.shape[-1], D_O=q_old.shape[-1],
                    FUSED_KL=cfg.div_code if fused else 0, EXCLUDE_SELF=cfg.exclude_self, CAUSAL=cfg.causal,
                    HAS_KMASK=has_km, **dims, **consts)
        kern._attn_bwd_kernel[(triton.cdiv(tk, tile.BLOCK_N), b * hk)](
            **args, DQ=dq, DK=dk, DV=dv, HK=hk, ATOMIC_DQ=not cfg.deterministic)
        if cfg.deterministic:
            kern._attn_bwd_dq_kernel[(triton.cdiv(tq, tile.BLOCK_M), b * hq)](**args, DQ=dq, HQ=hq)


KERNELS = TritonKernels()


def fwd(q, k, v, q_old, k_old, lse_old, query_mask, key_mask, cfg):
    return pipeline.forward(KERNELS, q, k, v, q_old, k_old, lse_old, query_mask, key_mask, cfg)


def bwd(dout, ddiv, q, k, v, q_old, k_old, out, div, stats, key_mask, cfg):
    return pipeline.backward(KERNELS, dout, ddiv, q, k, v, q_old, k_old, out, div, stats, key_mask, cfg)
