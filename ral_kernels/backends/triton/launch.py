"""Triton backend: launchers for the kernels of :mod:`ral_kernels.backends.triton.kernels`.

``fwd`` / ``bwd`` have the signatures of :mod:`ral_kernels.backends.torch` and return the
same statistics, so :mod:`ral_kernels.ops` dispatches to either. The per-row glue between
kernels (group means of support masses, ``c_h``, the effective ``delta``) is ``O(T)`` work
done here in PyTorch.

Runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (tests).
"""

from __future__ import annotations

import os

import torch
import triton

from .. import glue
from ..._semantics import DIVERGENCES
from . import kernels as kern

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256


def _alloc(shape, dtype, device) -> torch.Tensor:
    """Uninitialized buffer the kernels fill (tests poison it with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _pow2(x: int) -> int:
    return max(16, triton.next_power_of_2(x))


def tile_config(head_dim: int, dtype: torch.dtype, interpret: bool | None = None) -> dict:
    """Tile sizes and launch parameters the dispatcher picks for a (padded) head dim and
    dtype. The compile test enumerates exactly these (see :func:`kernel_specs`)."""
    if interpret is None:
        interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if interpret:
        return dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1)
    if head_dim > 128 and dtype == torch.float32:  # 4-byte tiles of 256 columns: sm_80's 163 KB
        return dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1)
    if head_dim > 128 or dtype == torch.float32:
        return dict(BLOCK_M=64, BLOCK_N=32, num_warps=8 if head_dim > 128 else 4, num_stages=1)
    return dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2)


def _prec(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def check_supported(q: torch.Tensor, d_old: int, dv: int) -> None:
    glue.check_supported('triton', q, d_old, dv, SUPPORTED_DTYPES, MAX_HEAD_DIM)


def _kmask(key_mask, like):
    if key_mask is None:
        return like, False
    return key_mask.contiguous().view(torch.uint8), True


def fwd(q, k, v, q_old, k_old, lse_old, query_mask, key_mask, causal, sm_scale, old_sm_scale,
        divergence, head_reduction, exclude_self):
    check_supported(q, q_old.shape[-1], v.shape[-1])
    q, k, v, q_old, k_old = (x.contiguous() for x in (q, k, v, q_old, k_old))
    b, hq, tq, d = q.shape
    hk, tk, dv = k.shape[1], k.shape[2], v.shape[3]
    ho, n_old, do = q_old.shape[1], q_old.shape[2], q_old.shape[3]
    hko = k_old.shape[1]
    groups = 1 if head_reduction == "mean" else hq
    n, n_o = hq // groups, ho // groups
    r0 = tq - n_old
    dev = q.device
    cfg = tile_config(max(_pow2(d), _pow2(do), _pow2(dv)), q.dtype)
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    launch = dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    prec = _prec(q.dtype)
    km, has_km = _kmask(key_mask, q)

    out = _alloc((b, hq, tq, dv), q.dtype, dev)
    lse = _alloc((b, hq, tq), torch.float32, dev)
    track_self = exclude_self and n_old > 0
    mass = _alloc((b, hq, n_old), torch.float32, dev) if track_self else lse
    kern._attn_fwd_kernel[(triton.cdiv(tq, bm), b * hq)](
        q, k, v, out, lse, mass, km, sm_scale, tq, tk, r0, hq, hq // hk,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3], d, dv,
        CAUSAL=causal, HAS_KMASK=has_km, EXCLUDE_SELF=track_self, INPUT_PREC=prec,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=_pow2(d), BLOCK_DV=_pow2(dv), **launch)

    if n_old == 0:
        return glue.without_divergence_rows(out, lse, groups, ho)

    if lse_old is None:
        lse_old = _alloc((b, ho, n_old), torch.float32, dev)
        mass_old = _alloc((b, ho, n_old), torch.float32, dev)
        kern._old_stats_kernel[(triton.cdiv(n_old, bm), b * ho)](
            q_old, k_old, lse_old, mass_old, km, old_sm_scale, tq, tk, r0, ho, ho // hko,
            *q_old.stride()[:3], *k_old.stride()[:3], do,
            CAUSAL=causal, HAS_KMASK=has_km, EXCLUDE_SELF=exclude_self, INPUT_PREC=prec,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=_pow2(do), **launch)
    else:
        lse_old, mass_old = glue.old_lse_and_mass(lse_old, q_old, k_old, old_sm_scale, r0, tq, tk, key_mask,
                                                  exclude_self)
    mass_cur = mass if track_self else torch.isfinite(lse[:, :, r0:]).float()
    z, z_old = glue.group_supports(mass_cur, mass_old, query_mask, r0, groups)
    div, e_stat, a_stat = glue.divergence_buffers(b, groups, hq, tq, n_old, dev)
    kern._div_fwd_kernel[(triton.cdiv(n_old, bm), b * groups)](
        q, k, lse, q_old, k_old, lse_old, z, z_old, km, div, e_stat, a_stat,
        sm_scale, old_sm_scale, tq, tk, r0, groups, n, n_o, hq // hk, ho // hko,
        *q.stride()[:3], *k.stride()[:3], *lse.stride()[:2],
        *q_old.stride()[:3], *k_old.stride()[:3], *lse_old.stride()[:2], d, do,
        DIVERGENCE=DIVERGENCES.index(divergence), CAUSAL=causal, HAS_KMASK=has_km, EXCLUDE_SELF=exclude_self,
        INPUT_PREC=prec, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=_pow2(d), BLOCK_DO=_pow2(do), **launch)
    c_stat = glue.row_coupling(a_stat, e_stat, mass_cur, z)
    return out, (div[:, 0] if groups == 1 else div), lse, lse_old, z, z_old, e_stat, c_stat


def bwd(dout, ddiv, q, k, v, q_old, k_old, out, lse, lse_old, z, z_old, e_stat, c_stat, key_mask,
        causal, sm_scale, old_sm_scale, divergence, head_reduction, exclude_self):
    q, k, v, q_old, k_old, dout = (x.contiguous() for x in (q, k, v, q_old, k_old, dout))
    b, hq, tq, d = q.shape
    hk, tk, dv = k.shape[1], k.shape[2], v.shape[3]
    ho, n_old, do = q_old.shape[1], q_old.shape[2], q_old.shape[3]
    hko = k_old.shape[1]
    groups = z.shape[1]
    n, n_o = hq // groups, ho // groups
    r0 = tq - n_old
    dev = q.device
    bd, bdv = _pow2(d), _pow2(dv)
    cfg = tile_config(max(bd, _pow2(do), bdv), q.dtype)
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    launch = dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    prec = _prec(q.dtype)
    km, has_km = _kmask(key_mask, q)

    delta, w = glue.effective_delta(dout, out, ddiv, z, c_stat, r0)

    dq = _alloc((b, hq, tq, bd), torch.float32, dev)
    dk = _alloc((b, hk, tk, bd), torch.float32, dev)
    dvb = _alloc((b, hk, tk, bdv), torch.float32, dev)
    common = (sm_scale, tq, tk)
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *dout.stride()[:3], d, dv)
    flags = dict(CAUSAL=causal, HAS_KMASK=has_km, INPUT_PREC=prec, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd,
                 BLOCK_DV=bdv, **launch)
    kern._attn_bwd_dkdv_kernel[(triton.cdiv(tk, bn), b * hk)](
        q, k, v, dout, lse, delta, dk, dvb, km, *common, hk, hq // hk, *strides, **flags)
    kern._attn_bwd_dq_kernel[(triton.cdiv(tq, bm), b * hq)](
        q, k, v, dout, lse, delta, dq, km, *common, hq, hq // hk, *strides, **flags)

    if w is not None:
        per_head = groups > 1
        args = (q, k, lse, q_old, k_old, lse_old.contiguous(), z, z_old, e_stat.contiguous(), w, km, dq, dk,
                sm_scale, old_sm_scale, tq, tk, r0, groups, n, n_o, hq // hk, ho // hko, hk,
                *q.stride()[:3], *k.stride()[:3], *lse.stride()[:2],
                *q_old.stride()[:3], *k_old.stride()[:3], *lse_old.stride()[:2], d, do)
        div_flags = dict(PER_HEAD=per_head, DIVERGENCE=DIVERGENCES.index(divergence), CAUSAL=causal,
                         HAS_KMASK=has_km, EXCLUDE_SELF=exclude_self, INPUT_PREC=prec, BLOCK_M=bm, BLOCK_N=bn,
                         BLOCK_D=bd, BLOCK_DO=_pow2(do), **launch)
        kern._div_bwd_kernel[(triton.cdiv(n_old, bm), b * groups)](*args, KEY_MAJOR=False, **div_flags)
        kern._div_bwd_kernel[(triton.cdiv(tk, bn), b * (hk if per_head else 1))](*args, KEY_MAJOR=True, **div_flags)
    return dq[..., :d].to(q.dtype), dk[..., :d].to(k.dtype), dvb[..., :dv].to(v.dtype)


# --------------------------------------------------------------------------- compile checks

_TRITON_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
_FLOAT_PTRS = {"LSE", "MASS", "LSEO", "MASSO", "Z", "ZO", "E", "A", "W", "DIV", "DELTA", "DQ", "DK", "DV"}
_INPUT_PTRS = {"Q", "K", "V", "O", "QO", "KO", "DO"}
PADDED_HEAD_DIMS = (16, 32, 64, 128, 256)


def _signature(fn, dtype: torch.dtype) -> dict:
    sig = {}
    for p in fn.params:
        if p.is_constexpr:
            sig[p.name] = "constexpr"
        elif p.name in _INPUT_PTRS:
            sig[p.name] = "*" + _TRITON_DTYPE[dtype]
        elif p.name in _FLOAT_PTRS:
            sig[p.name] = "*fp32"
        elif p.name == "KMASK":
            sig[p.name] = "*u8"
        elif "scale" in p.name:
            sig[p.name] = "fp32"
        else:
            sig[p.name] = "i32"
    return sig


def kernel_specs():
    """Every tile configuration the dispatcher can launch on a GPU, as
    ``(label, kernel, signature, constexprs, options)`` for
    ``triton.compile(ASTSource(...), target=...)`` (no GPU needed).

    Each kernel is compiled for every (dtype, padded head dim) tile configuration with its
    masking flags on (their heaviest setting); the flags that only change pointwise math
    (the divergence, per-head grouping) are compiled once each at head dim 128.
    """
    base = [(kern._attn_fwd_kernel, {}), (kern._old_stats_kernel, {}), (kern._attn_bwd_dkdv_kernel, {}),
            (kern._attn_bwd_dq_kernel, {}), (kern._div_fwd_kernel, {}),
            (kern._div_bwd_kernel, {"KEY_MAJOR": False}), (kern._div_bwd_kernel, {"KEY_MAJOR": True})]
    variants = [(kern._div_fwd_kernel, {"DIVERGENCE": dv}) for dv in (1, 2)] + [
        (kern._div_bwd_kernel, {"KEY_MAJOR": km, "DIVERGENCE": dv, "PER_HEAD": ph})
        for km in (False, True) for dv, ph in ((1, False), (2, False), (0, True))]
    configs = [(dt, hd) for dt in SUPPORTED_DTYPES for hd in (64, 128, 256)]
    configs += [(torch.float16, hd) for hd in PADDED_HEAD_DIMS if hd < 64]
    jobs = [(dt, hd, fn, extra) for dt, hd in configs for fn, extra in base]
    jobs += [(torch.bfloat16, 128, fn, extra) for fn, extra in variants]
    for dtype, hd, fn, extra in jobs:
        cfg = tile_config(hd, dtype, interpret=False)
        names = {p.name for p in fn.params}
        const = {"CAUSAL": True, "HAS_KMASK": True, "EXCLUDE_SELF": True, "INPUT_PREC": _prec(dtype),
                 "BLOCK_M": cfg["BLOCK_M"], "BLOCK_N": cfg["BLOCK_N"], "BLOCK_D": hd, "BLOCK_DV": hd,
                 "BLOCK_DO": hd, "KEY_MAJOR": False, "PER_HEAD": False, "DIVERGENCE": 0, **extra}
        const = {k: v for k, v in const.items() if k in names}
        label = f"{fn.__name__}-{_TRITON_DTYPE[dtype]}-d{hd}" + "".join(f"-{k}={v}" for k, v in extra.items())
        yield label, fn, _signature(fn, dtype), const, {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}
