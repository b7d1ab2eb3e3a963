"""Triton backend: launchers for the kernels of :mod:`ral_kernels.backends.triton.kernels`.

:class:`TritonKernels` implements the passes of :mod:`ral_kernels.backends.pipeline`
(which strings them together with the per-row glue); every kernel is launched by keyword.
Tile sizes come from a per-architecture, per-pass table (:func:`tile_configs`, checked
spill-free by ``tools.compile_check``; ``RAL_TRITON_TILES`` overrides it for tuning runs);
Triton's interpreter (``TRITON_INTERPRET=1``, the CPU tests) runs one small tile.

Runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (tests).
"""

from __future__ import annotations

import contextlib
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


def _pow2(x: int, dtype: torch.dtype = torch.float16) -> int:
    """The padded (block) head dim: a power of two, at least 16 (32 for float32, whose
    16-wide tiles spill registers in some kernels, see :data:`_TILES`)."""
    return max(32 if dtype == torch.float32 else 16, triton.next_power_of_2(x))


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


class Tile(NamedTuple):
    """A launch configuration: tile sizes and the compiler's warps / pipeline stages."""

    BLOCK_M: int
    BLOCK_N: int
    num_warps: int
    num_stages: int


# The interpreter's tile: small, so the tests' odd sizes cross several tiles, and not square
# (as most GPU tiles in _TILES are not), so the diagonal-tile masking is tested for that.
INTERPRETER_TILE = Tile(32, 16, 4, 1)


# Passes: attention forward / old-policy statistics, the same with per-head KL fused in,
# attention backward (and its deterministic dq kernel), the same with the KL fused in,
# divergence forward, divergence backward.
KINDS = ("fwd", "fwd_kl", "bwd", "bwd_kl", "div", "div_bwd")

# On a GPU, the head dims the kernels compile for without register spills (the compile check
# holds them to it): 16-bit inputs up to 128, float32 (IEEE dots, no tensor cores) up to 64.
GPU_MAX_HEAD_DIM = {torch.float16: 128, torch.bfloat16: 128, torch.float32: 64}

# The tile of each pass on sm_80 and sm_90, per input width and padded head dim, found with
# the compile check (tools/compile_check.py): a tile of the candidates 64x64 ... 16x16 (4 or
# 8 warps) that compiles without a spill for every kernel and head dim of its column.
# Columns: 16-bit d <= 32, 16-bit d = 64, 16-bit d = 128, float32 d = 32, float32 d = 64
# (float32 head dims are padded to at least 32).
_T = Tile
_TILES = {
    80: {"fwd": (_T(64, 64, 4, 2), _T(64, 64, 4, 2), _T(64, 64, 8, 2), _T(32, 32, 4, 1), _T(32, 32, 4, 1)),
         "fwd_kl": (_T(64, 64, 8, 2), _T(64, 64, 8, 2), _T(16, 32, 4, 1), _T(32, 32, 8, 1), _T(32, 32, 8, 1)),
         "bwd": (_T(32, 64, 4, 1), _T(32, 64, 4, 1), _T(32, 32, 8, 1), _T(16, 16, 4, 1), _T(32, 16, 4, 1)),
         "bwd_kl": (_T(16, 32, 4, 1), _T(32, 32, 8, 1), _T(32, 16, 4, 1), _T(16, 16, 4, 1), _T(16, 16, 4, 1)),
         "div": (_T(64, 64, 4, 1), _T(64, 64, 4, 1), _T(32, 32, 4, 1), _T(16, 32, 4, 1), _T(16, 32, 4, 1)),
         "div_bwd": (_T(32, 64, 4, 1), _T(64, 32, 8, 1), _T(32, 32, 4, 1), _T(16, 16, 4, 1), _T(16, 16, 4, 1))},
    90: {"fwd": (_T(64, 64, 4, 2), _T(64, 64, 4, 2), _T(64, 64, 8, 2), _T(32, 32, 4, 1), _T(32, 32, 4, 1)),
         "fwd_kl": (_T(64, 64, 4, 2), _T(64, 64, 4, 2), _T(64, 64, 8, 2), _T(32, 32, 8, 1), _T(32, 32, 8, 1)),
         "bwd": (_T(32, 64, 4, 1), _T(32, 64, 4, 1), _T(32, 32, 8, 1), _T(16, 16, 4, 1), _T(16, 16, 4, 1)),
         "bwd_kl": (_T(16, 32, 4, 1), _T(32, 32, 8, 1), _T(32, 16, 4, 1), _T(16, 32, 4, 1), _T(16, 32, 4, 1)),
         "div": (_T(64, 64, 4, 1), _T(64, 64, 4, 1), _T(32, 32, 4, 1), _T(16, 32, 4, 1), _T(16, 32, 4, 1)),
         "div_bwd": (_T(64, 64, 8, 2), _T(64, 64, 8, 2), _T(32, 32, 4, 1), _T(16, 16, 4, 1), _T(16, 16, 4, 1))},
}


def gpu_head_dim_limit(dtype: torch.dtype) -> int:
    return GPU_MAX_HEAD_DIM.get(dtype, 0)


def tile_configs(head_dim: int, dtype: torch.dtype, arch: int = 90, kind: str = "fwd") -> list[Tile]:
    """The tile the GPU dispatcher launches for one kind of pass (:data:`KINDS`), a padded
    head dim, dtype and compute capability (80, 86, 89, 90 and later). sm_86 / sm_89 (99 KB
    of shared memory per block) take sm_80's tiles with single-stage pipelines; later archs
    sm_90's. ``RAL_TRITON_TILES`` overrides a kind's tile for tuning runs on a GPU. Returned
    as a list (the dispatcher launches the first)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    limit = gpu_head_dim_limit(dtype)
    if head_dim > limit:
        raise ValueError(f"no GPU tile for head dim {head_dim} in {dtype} (at most {limit})")
    if dtype == torch.float32:
        col = 3 if head_dim <= 32 else 4
    else:
        col = 0 if head_dim <= 32 else (1 if head_dim <= 64 else 2)
    tile = _TILES[90 if arch >= 90 else 80][kind][col]
    if arch in (86, 89):
        tile = tile._replace(num_stages=1)
    return [tile]


@functools.lru_cache(maxsize=None)
def _arch(device_index: int) -> int:
    major, minor = torch.cuda.get_device_capability(device_index)
    return 10 * major + minor


# What the work counter (tools/work.py) makes the interpreter launch: a GPU's tile and SM
# count, so that the counted work is the work a GPU would execute.
_SIMULATED: dict = {}


@contextlib.contextmanager
def simulate_gpu(tile: Tile, num_sms: int):
    """Launch with ``tile`` and key splits sized for ``num_sms`` SMs (interpreter runs)."""
    _SIMULATED.update(tile=tile, num_sms=num_sms)
    try:
        yield
    finally:
        _SIMULATED.clear()


@functools.lru_cache(maxsize=None)
def _tile_overrides(spec: str) -> dict:
    """``RAL_TRITON_TILES="fwd=64x64x8x2,bwd=32x32x8x1"``: a kind's tile (BLOCK_M x BLOCK_N
    x warps x stages), for tuning runs on a GPU."""
    out = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        kind, _, dims = item.partition("=")
        try:
            vals = [int(x) for x in dims.split("x")]
            if kind not in KINDS or len(vals) != 4:
                raise ValueError
        except ValueError:
            raise ValueError(f"RAL_TRITON_TILES: cannot read {item!r}; expected KIND=MxNxWARPSxSTAGES with KIND one "
                             f"of {KINDS}, e.g. bwd=32x32x8x1") from None
        out[kind] = Tile(*vals)
    return out


def _tile(head_dim: int, dtype: torch.dtype, device: torch.device, kind: str) -> Tile:
    if _SIMULATED:
        return _SIMULATED["tile"]
    if interpreting() or device.type != "cuda":
        return INTERPRETER_TILE
    override = _tile_overrides(os.environ.get("RAL_TRITON_TILES", "")).get(kind)
    return override or tile_configs(head_dim, dtype, _arch(device.index or 0), kind)[0]


def _prec(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _num_sms(device: torch.device) -> int:
    if _SIMULATED:
        return _SIMULATED["num_sms"]
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
        _check_supported("triton", q, q_old.shape[-1], v.shape[-1], SUPPORTED_DTYPES,
                         gpu_head_dim_limit(q.dtype) if q.device.type == "cuda" else MAX_HEAD_DIM)
        return tuple(_last_dim_contiguous(x) for x in (q, k, v, q_old, k_old))

    def prepare_dout(self, dout, q):
        return _last_dim_contiguous(dout.to(q.dtype))

    # ------------------------------------------------------------------ common launch arguments
    @staticmethod
    def _launch(q, v, q_old, kind: str):
        bd, bdv, bdo = (_pow2(x.shape[-1], q.dtype) for x in (q, v, q_old))
        tile = _tile(max(bd, bdv, bdo), q.dtype, q.device, kind)
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
        fused = old is not None
        tile, dims, consts = self._launch(q, v if v is not None else q, q_old, "fwd_kl" if fused else "fwd")
        km, has_km = _kmask(key_mask, q)
        out = _alloc((b, h, n, dv_dim), q.dtype, dev) if v is not None else q
        lse = _alloc((b, h, n), torch.float32, dev)
        lse_s = _alloc((b, h, n_div), torch.float32, dev) if hold else lse
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
    def _div_args(self, q, k, off, q_old, k_old, off_old, key_mask, cfg, r0, kind="div"):
        b, hq, tq, d = q.shape
        hk, tk = k.shape[1], k.shape[2]
        ho, hko = q_old.shape[1], k_old.shape[1]
        groups = cfg.groups(hq)
        tile, dims, consts = self._launch(q, q, q_old, kind)
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
        tile, args = self._div_args(q, k, off, q_old, k_old, off_old, key_mask, cfg, r0, "div_bwd")
        groups = args["GROUPS"]
        a_stat = torch.zeros(b, hq, n_div, dtype=torch.float32, device=q.device)
        row_blocks = triton.cdiv(n_div, tile.BLOCK_M)
        if cfg.deterministic:
            splits, split_keys = 1, tk
        else:
            splits, split_keys = self._splits(tile, row_blocks * b * groups, tk, q.device)
        common = dict(args, E=e_stat.contiguous(), W=w, A=a_stat, DQ=dq, DK=dk, sm_scale=cfg.sm_scale, HK=hk,
                      split_keys=split_keys, PER_HEAD=groups > 1)
        tile_floats = (hq // groups) * tile.BLOCK_M * tile.BLOCK_N

        def launch(grid, **flags):
            scratch = torch.empty(math.prod(grid) * tile_floats, dtype=torch.float32, device=q.device)
            kern._div_bwd_kernel[grid](**common, SCR=scratch, **flags)

        # Row-major: dq of its rows (atomically across key splits) and A_h; dk atomically,
        # or, deterministic, from a key-major launch that owns each key block.
        launch((row_blocks, b * groups, splits), KEY_MAJOR=False, ATOMIC=not cfg.deterministic)
        if cfg.deterministic:
            launch((triton.cdiv(tk, tile.BLOCK_N), b * (hk if groups > 1 else 1), 1), KEY_MAJOR=True, ATOMIC=False)
        return a_stat

    # ------------------------------------------------------------------ attention backward
    def new_grads(self, q, k, v):
        bd, bdv = _pow2(q.shape[-1], q.dtype), _pow2(v.shape[-1], q.dtype)
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
        tile, dims, consts = self._launch(q, v, q_old, "bwd_kl" if fused else "bwd")
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


# --------------------------------------------------------------------------- compile checks

_TRITON_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
_INPUT_PTRS = {"Q", "K", "V", "O", "QO", "KO", "DO"}
# Integer arguments that are counts of heads or row offsets: the JIT specializes on their
# value (1, or divisible by 16) only by chance, so the compile check gives them no hint.
_SMALL_INTS = {"H", "HQ", "HK", "GQA", "GQA_OLD", "GROUPS", "n_heads", "n_old", "r0", "pos0"}
_UPPER_INTS = {"H", "HQ", "HK", "GQA", "GQA_OLD", "GROUPS", "D", "D_V", "D_O", "Tq", "Tk"}
# (dtype, padded head dim) pairs the compile check compiles: every column of the tile table,
# at the head dims it serves (up to GPU_MAX_HEAD_DIM).
COMPILE_MATRIX = [(torch.float16, 16), (torch.float16, 32), (torch.bfloat16, 64), (torch.bfloat16, 128),
                  (torch.float16, 128), (torch.float32, 32), (torch.float32, 64)]


def _signature_and_hints(fn, dtype: torch.dtype, aligned: bool):
    """The signature ``triton.compile`` takes and the ``tt.divisibility`` hints the runtime
    JIT would attach for 16-byte-aligned tensors and strides / lengths divisible by 16."""
    sig, attrs = {}, {}
    for i, p in enumerate(fn.params):
        if p.is_constexpr:
            sig[p.name] = "constexpr"
            continue
        if p.name in _INPUT_PTRS:
            sig[p.name] = "*" + _TRITON_DTYPE[dtype]
        elif p.name == "KMASK":
            sig[p.name] = "*u8"
        elif p.name.isupper() and p.name not in _UPPER_INTS:
            sig[p.name] = "*fp32"
        elif "scale" in p.name:
            sig[p.name] = "fp32"
        else:
            sig[p.name] = "i32"
        hinted = sig[p.name].startswith("*") or (sig[p.name] == "i32" and p.name not in _SMALL_INTS)
        if aligned and hinted and p.name != "KMASK":
            attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, attrs


def kernel_specs(arch: int, aligned: bool = True):
    """Every kernel configuration the GPU dispatcher launches on ``arch``, as
    ``(label, kernel, signature, constexprs, attrs, options)`` for
    ``triton.compile(ASTSource(...), target=...)`` (no GPU needed). ``aligned``: with the
    divisibility hints the runtime JIT attaches for aligned tensors and lengths (a
    different kernel than without them: the one a GPU runs in practice).

    Kernels are compiled with their heaviest flags (masks, exclude_self, the fused per-head
    KL) as well as their common plain form."""
    kernels = [
        ("fwd", "fwd", kern._attn_fwd_kernel, dict(HAS_V=True, HOLD_SELF=False, FUSED_KL=0)),
        ("fwd-self-rkl", "fwd_kl", kern._attn_fwd_kernel, dict(HAS_V=True, HOLD_SELF=True, FUSED_KL=2)),
        ("stats", "fwd", kern._attn_fwd_kernel, dict(HAS_V=False, HOLD_SELF=True, FUSED_KL=0)),
        ("div-fwd-jsd", "div", kern._div_fwd_kernel, dict(DIVERGENCE=0)),
        ("div-bwd-atomic", "div_bwd", kern._div_bwd_kernel,
         dict(KEY_MAJOR=False, ATOMIC=True, DIVERGENCE=0, PER_HEAD=False)),
        ("div-bwd-keys", "div_bwd", kern._div_bwd_kernel, dict(KEY_MAJOR=True, ATOMIC=False, DIVERGENCE=1, PER_HEAD=True)),
        ("bwd", "bwd", kern._attn_bwd_kernel, dict(ATOMIC_DQ=True, FUSED_KL=0)),
        ("bwd-rkl", "bwd_kl", kern._attn_bwd_kernel, dict(ATOMIC_DQ=True, FUSED_KL=2)),
        ("bwd-dq", "bwd", kern._attn_bwd_dq_kernel, dict(FUSED_KL=0)),
        ("bwd-dq-kl", "bwd_kl", kern._attn_bwd_dq_kernel, dict(FUSED_KL=1)),
    ]
    jobs = [(dt, hd, tile, name, fn, flags) for name, kind, fn, flags in kernels for dt, hd in COMPILE_MATRIX
            for tile in tile_configs(hd, dt, arch, kind)]
    for dtype, hd, tile, name, fn, flags in jobs:
        names = {p.name for p in fn.params}
        const = {"CAUSAL": True, "HAS_KMASK": True, "EXCLUDE_SELF": True, "INPUT_PREC": _prec(dtype),
                 "BLOCK_M": tile.BLOCK_M, "BLOCK_N": tile.BLOCK_N, "BLOCK_D": hd, "BLOCK_DV": hd,
                 "BLOCK_DO": hd, **flags}
        const = {k: v for k, v in const.items() if k in names}
        sig, attrs = _signature_and_hints(fn, dtype, aligned)
        label = (f"{name}-{_TRITON_DTYPE[dtype]}-d{hd}-{tile.BLOCK_M}x{tile.BLOCK_N}-w{tile.num_warps}"
                 f"-s{tile.num_stages}")
        yield label, fn, sig, const, attrs, {"num_warps": tile.num_warps, "num_stages": tile.num_stages}
