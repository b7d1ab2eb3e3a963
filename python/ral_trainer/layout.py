"""How the tokens a patched layer sees map to a padded batch: read key padding, or packed
sequences (flash-attn ``cu_seqlens`` style), from whatever mask the model's own attention
implementation built."""

from __future__ import annotations

import torch

from ral_kernels.varlen import left_padded_index

from .policy import PatchError


class _Layout:
    """How the tokens this layer sees map to a left/right-padded batch ``[B, H, T, D]``
    with a key mask. Padded inputs map to themselves; packed inputs (one row holding
    several sequences, flash-attn ``cu_seqlens`` style) are unpacked left-padded for the
    capture (the old-policy cache is padded, its last rows the responses) and run through
    ``fused_attn_kl_varlen`` in the update."""

    def __init__(self, key_mask, segments=None):
        self.key_mask = key_mask  # [B', T'] bool or None
        self.segments = segments  # None, or (lengths list, batch_idx, pos_idx, width)

    @property
    def packed(self) -> bool:
        return self.segments is not None

    def to_padded(self, x):  # [B, H, T, D] -> [B', H, T', D]
        if not self.packed:
            return x
        lengths, bi, pi, width = self.segments
        rows = x[0].transpose(0, 1)  # [T, H, D]
        out = rows.new_zeros((len(lengths), width) + tuple(rows.shape[1:]))
        out = out.index_put((bi, pi), rows)
        return out.transpose(1, 2)

    def rows_to_padded(self, m):  # [B, T] -> [B', T']
        if not self.packed or m is None:
            return m
        lengths, bi, pi, width = self.segments
        out = m.new_zeros((len(lengths), width))
        return out.index_put((bi, pi), m[0])

    # packed (varlen) form of a packed layout: [total, H, D] with flash-attn cu_seqlens
    def cu_seqlens(self, lengths=None) -> torch.Tensor:
        lens = torch.tensor(self.segments[0] if lengths is None else lengths, device=self.key_mask.device)
        return torch.nn.functional.pad(torch.cumsum(lens, 0), (1, 0)).to(torch.int32)

    def padded_to_varlen(self, x):  # [B', H, T', D] (left-padded) -> [total, H, D]
        _, bi, pi, _ = self.segments
        return x.transpose(1, 2)[bi, pi]

    def old_rows_to_varlen(self, cache):
        """The cached last ``R`` rows of every sequence (padded ``[B', Ho, R, Do]``, plus
        ``lse_old`` ``[B', Ho, R]``) in varlen form: each sequence keeps its last
        ``min(R, length)`` rows. Returns ``(q_old [total_old, Ho, Do], lse_old [Ho, total_old]
        or None, cu_seqlens_old)``."""
        r = cache.q_old.shape[2]
        keep = [min(r, n) for n in self.segments[0]]
        q_old = torch.cat([cache.q_old[s, :, r - n:].transpose(0, 1) for s, n in enumerate(keep)])
        lse = None if cache.lse_old is None else torch.cat([cache.lse_old[s, :, r - n:] for s, n in enumerate(keep)], 1)
        return q_old, lse, self.cu_seqlens(keep)


def _segments_layout(lengths: list, device) -> _Layout:
    width = max(lengths)
    bi, pi = left_padded_index(lengths, width, device)
    key_mask = torch.zeros(len(lengths), width, dtype=torch.bool, device=device)
    key_mask[bi, pi] = True
    return _Layout(key_mask, (lengths, bi, pi, width))


def causal_mask(tq: int, tk: int, device) -> torch.Tensor:
    i = torch.arange(tq, device=device)[:, None]
    j = torch.arange(tk, device=device)[None, :]
    return j <= i + (tk - tq)


def layout_from(mask, q, k, kwargs, impl=None) -> _Layout:
    """Read key padding (or packing) from whatever mask the model's own implementation
    built: ``None`` (plain causal), a 2D padding mask (flash), a 4D bool (sdpa) or
    additive float (eager) mask."""
    b, tq, tk = q.shape[0], q.shape[2], k.shape[2]
    if mask is None:
        cu = kwargs.get("cu_seq_lens_q")
        if cu is not None and b == 1:
            offs = cu.tolist()
            return _segments_layout([y - x for x, y in zip(offs, offs[1:]) if y > x], q.device)
        # flash attention (only) reads packing from position_ids; sdpa/eager would have built a mask
        pos = kwargs.get("position_ids") if impl and "flash" in impl else None
        if isinstance(pos, torch.Tensor) and pos.dim() == 2 and b == 1 and tq == tk and tq > 1:
            starts = (pos[0, 1:] == 0).nonzero().flatten() + 1
            if starts.numel():
                bounds = [0] + starts.tolist() + [tq]
                return _segments_layout([y - x for x, y in zip(bounds, bounds[1:])], q.device)
        return _Layout(None)
    if not isinstance(mask, torch.Tensor):
        raise PatchError(f"ral_fused attention got an attention mask of type {type(mask).__name__} "
                         "(e.g. flex BlockMask); use attn_implementation='sdpa', 'eager' or 'flash_attention_2'")
    if mask.dim() == 2:
        return _Layout(None if bool(mask.all()) else mask.bool())
    if mask.dim() != 4:
        raise PatchError(f"unexpected attention mask shape {tuple(mask.shape)}")
    allowed = mask[:, 0] if mask.dtype == torch.bool else (mask[:, 0] > torch.finfo(mask.dtype).min / 2)
    if allowed.shape[-2:] != (tq, tk):
        allowed = allowed[..., -tq:, -tk:]
    causal = causal_mask(tq, tk, q.device)
    key_mask = allowed[:, -1, :] | ~causal[-1][None, :]  # the last row sees every valid key
    # Rows of padding queries are not compared: implementations differ there (all masked, or
    # all unmasked to avoid NaN), and their outputs never reach a real token. A row the last
    # row cannot see that attends to a proper subset of keys is a packed sequence instead.
    valid_q = key_mask[:, tk - tq:]
    mismatch = allowed ^ (causal[None] & key_mask[:, None, :])
    diff = mismatch & valid_q[:, :, None]
    packed_like = ~valid_q & mismatch.any(-1) & ~allowed.all(-1)
    if not bool(diff.any()) and not bool(packed_like.any()):
        return _Layout(None if bool(key_mask.all()) else key_mask)
    if b == 1 and tq == tk:  # block-diagonal causal: packed sequences
        idx = torch.arange(1, tq, device=q.device)
        starts = (~allowed[0, idx, idx - 1]).nonzero().flatten() + 1
        bounds = [0] + starts.tolist() + [tq]
        lengths = [y - x for x, y in zip(bounds, bounds[1:])]
        seg = torch.repeat_interleave(torch.arange(len(lengths), device=q.device), torch.tensor(lengths, device=q.device))
        if torch.equal(allowed[0], causal & (seg[:, None] == seg[None, :])):
            return _segments_layout(lengths, q.device)
    raise PatchError("the attention mask of this layer is neither causal with key padding nor packed causal "
                     "sequences (sliding window, bidirectional image attention, ...): the fused op cannot express it")
