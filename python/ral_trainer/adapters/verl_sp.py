"""The verl adapter under Ulysses sequence parallelism (``ulysses_sequence_parallel_size > 1``).

verl runs Ulysses only padding-free (``use_remove_padding``): each micro-batch is packed
into one row, padded to a multiple of the degree ``P`` and rank ``r`` of the group gets the
slice ``[r n, (r + 1) n)``; every rank of the group runs the same micro-batches, and verl's
patched flash attention does the all-to-alls. The patched layer runs under
:func:`ral_trainer.sequence_parallel.sequence_parallel_patch`: its output comes from verl's
Ulysses attention and its divergence from
:func:`ral_kernels.sequence_parallel.ulysses_divergence` over verl's group.

- Capture (``compute_log_prob``): each rank files, per sequence, the piece of its old keys
  and of its response rows' old queries that its slice held: ``1/P`` of the
  single-process store on each rank.
- Update: verl re-batches (shuffle, mini-batches, dynamic sizes), so a micro-batch's
  slices differ from the capture's. Each rank lays its pieces out in the update's packed
  row and one all-reduce over the group (every position comes from exactly one rank) gives
  every rank the old keys of the whole row (handed to ``ulysses_divergence`` as already
  gathered: no second gather) and the old queries of all response rows, of which it keeps
  its own.
- The divergence of the rank's rows is all-gathered with verl's ``gather_outputs_and_unpad``,
  the gather verl applies to the log-probs (gradient scaled by ``P`` alike), so the term is
  normalized over the whole micro-batch exactly as without sequence parallelism.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

import ral_kernels

from ..patch import OldPolicy, PatchError
from ..sequence_parallel import SPLayerCapture, sequence_parallel_patch


@dataclasses.dataclass(frozen=True)
class _Shapes:
    heads_k: int
    dim_k: int
    heads_q: int
    dim_q: int
    dtype: torch.dtype


class VerlUlysses:
    """The sequence-parallel side of :class:`~ral_trainer.adapters.verl.RALVerlAdapter`."""

    def __init__(self, engine, patch):
        self.group = engine.ulysses_parallel_group
        self.world = dist.get_world_size(self.group)
        self.rank = dist.get_rank(self.group)
        sequence_parallel_patch(patch, self.group)
        self._shapes: dict = {}

    def _slice(self, total: int) -> tuple[int, int, int]:
        """``(n, pad, first)``: tokens per rank, verl's pad at the end, this rank's first position."""
        n = -(-total // self.world)
        return n, n * self.world - total, self.rank * n

    def store_capture(self, old: OldPolicy, layout, store: dict, sm_scale: dict) -> None:
        """File this rank's pieces of each sequence: ``store[key][layer] = (keys, queries)``,
        each ``(first in-sequence position, [H, len, D])`` or ``None``."""
        n, _, first = self._slice(layout.offsets[-1])
        per_seq = [dict() for _ in layout.lengths]
        for li, cap in old.layers.items():
            if not isinstance(cap, SPLayerCapture) or cap.num_tokens != n:
                raise PatchError(f"RAL: the patched layer saw {cap.num_tokens} tokens on this rank, verl's Ulysses "
                                 f"slice of the micro-batch has {n} (unexpected packing)")
            sm_scale[li] = cap.sm_scale
            q, k = cap.cache.q_old[0], cap.cache.k_old[0]
            self._shapes[li] = _Shapes(k.shape[0], k.shape[2], q.shape[0], q.shape[2], q.dtype)
            row_pos = (cap.old_rows + first).tolist()
            for i, (o, length, s) in enumerate(zip(layout.offsets, layout.lengths, layout.starts)):
                x, y = max(first, o), min(first + n, o + length)
                keys = (x - o, k[:, x - first:y - first].clone()) if x < y else None
                mine = [j for j, p in enumerate(row_pos) if o + s <= p < o + length]
                rows = (row_pos[mine[0]] - o, q[:, mine[0]:mine[-1] + 1].clone()) if mine else None
                per_seq[i][li] = (keys, rows)
        for key, caps in zip(layout.keys(), per_seq):
            store[key] = caps

    def old_for(self, layout, caps: list, sm_scale: dict, layers, device) -> OldPolicy:
        """The update micro-batch's old policy on this rank (one all-reduce per layer)."""
        total = layout.offsets[-1]
        n, _, first = self._slice(total)
        resp = [length - s for length, s in zip(layout.lengths, layout.starts)]
        r_off = torch.tensor([0] + resp).cumsum(0).tolist()
        # this rank's response rows: local index and place among all response rows
        local, place = [], []
        for i, (o, length, s) in enumerate(zip(layout.offsets, layout.lengths, layout.starts)):
            for p in range(max(first, o + s), min(first + n, o + length)):
                local.append(p - first)
                place.append(r_off[i] + p - o - s)
        out = {}
        for li in layers:
            if li not in self._shapes:
                raise PatchError("RAL: no old-policy capture reached this rank's patched layer before the update")
            sh = self._shapes[li]
            k_all = torch.zeros(sh.heads_k, n * self.world, sh.dim_k, dtype=sh.dtype, device=device)
            q_all = torch.zeros(sh.heads_q, r_off[-1], sh.dim_q, dtype=sh.dtype, device=device)
            for i, (o, s) in enumerate(zip(layout.offsets, layout.starts)):
                keys, rows = caps[i][li]
                if keys is not None:
                    k_all[:, o + keys[0]:o + keys[0] + keys[1].shape[1]] = keys[1]
                if rows is not None:
                    a = r_off[i] + rows[0] - s
                    q_all[:, a:a + rows[1].shape[1]] = rows[1]
            both = torch.cat([k_all.flatten(), q_all.flatten()])
            dist.all_reduce(both, group=self.group)  # each position is filled on exactly one rank
            k_all = both[:k_all.numel()].view_as(k_all)
            q_all = both[k_all.numel():].view_as(q_all)
            idx = torch.tensor(place, dtype=torch.long, device=device)
            cache = ral_kernels.OldPolicyCache(q_all[:, idx][None], k_all[None], None)
            out[li] = SPLayerCapture(cache, sm_scale[li], None, n,
                                     old_rows=torch.tensor(local, dtype=torch.long, device=device))
        return OldPolicy(out)

    def local_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """This rank's slice ``[1, n]`` of the packed ``[1, total]`` row mask."""
        n, pad, first = self._slice(rows.shape[1])
        return torch.nn.functional.pad(rows, (0, pad))[:, first:first + n]

    def gather(self, div: torch.Tensor, total: int) -> torch.Tensor:
        """This rank's ``[1, n]`` divergence -> the micro-batch's ``[1, total]`` (verl's gather)."""
        from verl.utils.ulysses import gather_outputs_and_unpad

        _, pad, _ = self._slice(total)
        return gather_outputs_and_unpad(div[0], gather_dim=0, unpad_dim=0, padding_size=pad, group=self.group)[None]
