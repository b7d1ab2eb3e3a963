"""Packed variable-length form (flash-attn's ``cu_seqlens`` convention).

Sequences are packed along the first dim, ``[total, H, D]``; ``cu_seqlens`` ``[B + 1]``
int32 holds the offsets. Every backend gets the same numbers as the padded form: the
sequences are laid left-padded into ``[B, H, T_max, D]`` (which keeps the bottom-right
causal alignment of every sequence), run through :func:`fused_attn_kl` with key and query
masks, and unpacked. Gradients flow back through the gather.
"""

from __future__ import annotations

from typing import Optional

import torch

from .api import _check_mask, _check_tensor, check_no_rows, fused_attn_kl


def _lengths(name: str, cu, batch: Optional[int], total: int, max_seqlen: Optional[int]):
    """Per-sequence lengths (a tensor) and the padded width (``max_seqlen`` or the longest).

    Eager calls check the offsets' values; under ``torch.compile`` they are data, so only
    their type is checked and ``max_seqlen`` must be given (flash-attn's convention)."""
    if not isinstance(cu, torch.Tensor) or cu.dim() != 1 or cu.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be a 1-D int32/int64 tensor [B + 1] of offsets, got {cu!r:.80}")
    if cu.shape[0] < 2:
        raise ValueError(f"{name} must hold B + 1 >= 2 offsets, got {cu.shape[0]}")
    if batch is not None and cu.shape[0] - 1 != batch:
        raise ValueError(f"{name} describes {cu.shape[0] - 1} sequences but cu_seqlens_q describes {batch}")
    if max_seqlen is not None and (isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < 0):
        raise ValueError(f"max_seqlen for {name} must be a non-negative int or None, got {max_seqlen!r}")
    lens = cu[1:] - cu[:-1]
    if torch.compiler.is_compiling():
        if max_seqlen is None:
            raise ValueError(f"under torch.compile, pass the longest sequence of {name} as an int "
                             "(max_seqlen_q / max_seqlen_k / max_seqlen_old): the padded width cannot come "
                             "from the offsets' values inside a traced graph")
        return lens, max_seqlen
    offs = cu.tolist()
    if offs[0] != 0 or any(b < a for a, b in zip(offs, offs[1:])):
        raise ValueError(f"{name} must start at 0 and be non-decreasing, got {offs[:8]}")
    if offs[-1] != total:
        raise ValueError(f"{name} ends at {offs[-1]} but the packed tensor has {total} rows")
    longest = max(b - a for a, b in zip(offs, offs[1:]))
    if max_seqlen is not None and max_seqlen < longest:
        raise ValueError(f"max_seqlen for {name} is {max_seqlen} but its longest sequence has {longest} rows")
    return lens, (longest if max_seqlen is None else max_seqlen)


def left_padded_index(lengths, width: int, device, total: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(batch, position) of every packed row in the left-padded ``[B, width]`` layout.

    ``lengths``: per-sequence lengths (list or tensor); ``total``: their sum, if known (it
    keeps the index traceable by ``torch.compile``)."""
    lens = torch.as_tensor(lengths, device=device)
    if total is None:
        total = int(lens.sum())
    batch = torch.repeat_interleave(torch.arange(lens.shape[0], device=device), lens, output_size=total)
    starts = torch.cumsum(lens, 0) - lens
    pos = torch.arange(total, device=device) - starts[batch] + (width - lens[batch])
    return batch, pos


def _pad(x: torch.Tensor, idx, batch: int, width: int, fill: float = 0.0) -> torch.Tensor:
    """``[total, H, ...]`` -> ``[B, H, width, ...]`` left-padded."""
    out = x.new_full((batch, width) + tuple(x.shape[1:]), fill)
    out = out.index_put(idx, x)
    return out.transpose(1, 2)


def fused_attn_kl_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_old: torch.Tensor,
    k_old: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    *,
    cu_seqlens_old: Optional[torch.Tensor] = None,
    max_seqlen_q: Optional[int] = None,
    max_seqlen_k: Optional[int] = None,
    max_seqlen_old: Optional[int] = None,
    lse_old: Optional[torch.Tensor] = None,
    query_mask: Optional[torch.Tensor] = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed form of :func:`ral_kernels.fused_attn_kl`.

    Args:
        q: ``[total_q, Hq, D]``; k, v: ``[total_k, Hk, D]``, ``[total_k, Hk, Dv]``.
        q_old: ``[total_old, Ho, Do]``: per sequence, the old queries of its **last** rows;
            ``cu_seqlens_old`` gives their offsets (default: ``cu_seqlens_q``, all rows).
        k_old: ``[total_k, Hko, Do]``.
        cu_seqlens_q, cu_seqlens_k: ``[B + 1]`` int32 offsets (flash-attn convention).
        max_seqlen_q, max_seqlen_k, max_seqlen_old: the longest sequence of each, as ints
            (flash-attn convention). Optional in eager mode (read from the offsets); required
            under ``torch.compile``, where the offsets are data.
        lse_old: optional ``[Ho, total_old]`` log-sum-exp of the old rows (flash-attn's
            varlen ``softmax_lse`` layout).
        query_mask: optional ``[total_q]`` bool, rows that carry a divergence.
        **kwargs: ``causal``, ``sm_scale``, ``old_sm_scale``, ``divergence``,
            ``head_reduction``, ``exclude_self``, ``backend`` as in ``fused_attn_kl``.

    Returns:
        ``out`` ``[total_q, Hq, Dv]`` and ``div`` ``[total_q]`` (``"mean"``) or
        ``[total_q, Hq]`` (``"none"``).

    Example::

        >>> cu = torch.tensor([0, 5, 12], dtype=torch.int32)   # two sequences, 5 and 7 tokens
        >>> q = torch.randn(12, 4, 64); k = v = torch.randn(12, 2, 64)
        >>> out, div = fused_attn_kl_varlen(q, k, v, q.clone(), k.clone(), cu, cu)
    """
    for name, x in (("q", q), ("k", k), ("v", v), ("q_old", q_old), ("k_old", k_old)):
        _check_tensor(name, x, 3, "[total, H, D]")
    if "key_mask" in kwargs:
        raise TypeError("fused_attn_kl_varlen takes no key_mask: packed sequences have no padding keys")
    lq, tq = _lengths("cu_seqlens_q", cu_seqlens_q, None, q.shape[0], max_seqlen_q)
    b = lq.shape[0]
    lk, tk = _lengths("cu_seqlens_k", cu_seqlens_k, b, k.shape[0], max_seqlen_k)
    if cu_seqlens_old is None:
        lo, n_old = lq, tq if max_seqlen_old is None else max_seqlen_old
    else:
        lo, n_old = _lengths("cu_seqlens_old", cu_seqlens_old, b, q_old.shape[0], max_seqlen_old)
    if not torch.compiler.is_compiling():
        if q_old.shape[0] != int(lo.sum()):
            raise ValueError(f"q_old has {q_old.shape[0]} rows but cu_seqlens_old (or cu_seqlens_q) describes "
                             f"{int(lo.sum())}")
        if bool((lo > lq).any()):
            raise ValueError(f"each sequence's old rows must be at most its query rows, got {lo.tolist()} old vs "
                             f"{lq.tolist()}")
    if n_old > tq:
        raise ValueError(f"max_seqlen_old={n_old} exceeds max_seqlen_q={tq}: old rows are each sequence's last query rows")
    for name, x, rows in (("v", v, k.shape[0]), ("k_old", k_old, k.shape[0])):
        if x.shape[0] != rows:
            raise ValueError(f"{name} has {x.shape[0]} rows but k has {rows}")
    _check_mask("query_mask", query_mask, (q.shape[0],), q.device)

    dev = q.device
    true = torch.tensor(True, device=dev)
    iq = left_padded_index(lq, tq, dev, q.shape[0])
    ik = left_padded_index(lk, tk, dev, k.shape[0])
    io = left_padded_index(lo, n_old, dev, q_old.shape[0])
    key_mask = torch.zeros(b, tk, dtype=torch.bool, device=dev).index_put(ik, true)
    qmask = query_mask if query_mask is not None else torch.ones(q.shape[0], dtype=torch.bool, device=dev)
    qmask_pad = torch.zeros(b, tq, dtype=torch.bool, device=dev).index_put(iq, qmask)
    # The rows of each sequence that have cached old rows (its last lo rows).
    has_old = torch.zeros(b, tq, dtype=torch.bool, device=dev)
    has_old[:, tq - n_old:] = torch.zeros(b, n_old, dtype=torch.bool, device=dev).index_put(io, true)
    if query_mask is not None:
        check_no_rows(qmask_pad & ~has_old, "query_mask marks rows before a sequence's cached old rows: "
                      "cu_seqlens_old gives each sequence's last rows, and only those can carry a divergence")
    qmask_pad &= has_old
    lse_pad = None
    if lse_old is not None:
        if tuple(lse_old.shape) != (q_old.shape[1], q_old.shape[0]):
            raise ValueError(f"lse_old must have shape {(q_old.shape[1], q_old.shape[0])} [Ho, total_old], got {tuple(lse_old.shape)}")
        lse_pad = _pad(lse_old.t(), io, b, n_old, float("inf"))
    out, div = fused_attn_kl(
        _pad(q, iq, b, tq), _pad(k, ik, b, tk), _pad(v, ik, b, tk), _pad(q_old, io, b, n_old),
        _pad(k_old, ik, b, tk), query_mask=qmask_pad, key_mask=key_mask, lse_old=lse_pad, **kwargs)
    out = out.transpose(1, 2)[iq]
    div = div[iq] if div.dim() == 2 else div.transpose(1, 2)[iq]
    return out, div
