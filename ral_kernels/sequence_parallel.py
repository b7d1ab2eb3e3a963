"""The attention divergence under sequence parallelism: Ulysses and ring / context parallel.

When one sequence is split across the ranks of a process group, the head-mean policy of a
row needs every head of that row and every key it attends to. Both layouts are reduced to
the per-row scalars of :mod:`ral_kernels.backends.glue` (SPEC "per-row scalars"), run on
the backend's kernel set (:mod:`ral_kernels.backends.pipeline`):

* **Ulysses** (:func:`ulysses_divergence`): each rank keeps *all heads of its own rows*
  (the layout before the engine's all-to-all) and all-gathers the keys of the patched
  layer (``T·Hk·D``, and the old keys likewise, without gradient). The divergence of its
  rows is then local; the gradient reaches the local queries directly and the gathered
  keys through a reduce-scatter. The attention output keeps coming from the engine's own
  Ulysses attention, so the divergence's coupling term ``-alpha_hj w b_h`` (which the
  single-process op folds into the attention backward) runs here as its own pass,
  :meth:`~ral_kernels.backends.pipeline.Kernels.coupling_bwd`.
* **Ring / context parallel** (:func:`context_parallel_divergence`): keys stay where they
  are (each rank its shard, in any order, e.g. torch's load-balanced head-tail order). The
  queries of the rows that carry a divergence (the response, usually a small share of the
  sequence) are gathered to every rank (an all-gather, or one broadcast per rank that holds
  such rows when the ranks hold different numbers); every rank computes partial statistics of *all* those rows
  over *its* keys, and they merge with small all-reduces of ``O(rows x heads)`` floats,
  never a map: log-sum-exps by ``max`` + ``sum`` (``lse``, ``lse_S`` of both policies),
  then sums (the divergence, ``E``, the old mass; in backward ``A_h`` and the incoming
  ``w``). Each rank's ``dk`` stays local; the rows' ``dq`` partials are summed back to
  their owners (reduce-scatter, or one reduce per owner).

How a rank's rows meet a key shard. The kernel passes use bottom-right aligned causal masks
(row ``i`` of ``Tq`` sees key ``j <= i + Tk - Tq``). Rows ``[x, y)`` and a contiguous run of
keys ``[c0, c1)`` of the same sequence split into at most three such problems: the
*diagonal* rows ``[max(x, c0), min(y, c1))`` against keys ``[c0, min(y, c1))`` (rows end
where the keys end, so the alignment and the self position ``j = i`` are exact); the rows
``>= c1``, which see the whole run (non-causal, no self key); without ``causal``, the rows
before the run and the keys after the diagonal likewise. Packed sequences (``cu_seqlens``)
split runs at sequence boundaries. Each problem runs the backend's passes unchanged.

Bytes on the wire: :func:`count_communication` records every collective these functions
issue (payload per rank and the ring algorithm's bytes sent per rank).

Every rank of the group must call these functions with the same arguments' structure and
must backpropagate through ``div`` (the backward runs collectives), as with any
sequence-parallel attention.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Callable, Optional

import torch
import torch.distributed as dist

from . import backends
from .api import _check_choice, _check_mask, _check_scale, _check_tensor, resolve_backend
from .errors import BackendUnavailableError
from ._semantics import DIVERGENCES, HEAD_REDUCTIONS
from .backends import glue
from .backends.pipeline import OpConfig

__all__ = ["context_parallel_divergence", "count_communication", "gather_sequence", "heads_to_seq", "seq_to_heads",
           "ulysses_attention", "ulysses_divergence", "CommunicationLog"]


# --------------------------------------------------------------------------- communication (counted)

@dataclasses.dataclass
class CommunicationLog:
    """Collectives issued inside :func:`count_communication`, per kind (``all_gather``,
    ``reduce_scatter``, ``all_reduce``, ``all_to_all``, ``broadcast``, ``reduce``): number
    of calls, ``payload`` (bytes of the tensor this rank hands in) and ``sent`` (bytes this
    rank sends under the ring algorithms NCCL uses: ``(P-1)/P`` of the gathered / scattered
    / exchanged size, ``2 (P-1)/P`` of an all-reduce, the whole message of a pipelined
    broadcast or reduce)."""

    calls: dict = dataclasses.field(default_factory=dict)
    payload: dict = dataclasses.field(default_factory=dict)
    sent: dict = dataclasses.field(default_factory=dict)

    def add(self, kind: str, payload: int, sent: int) -> None:
        self.calls[kind] = self.calls.get(kind, 0) + 1
        self.payload[kind] = self.payload.get(kind, 0) + payload
        self.sent[kind] = self.sent.get(kind, 0) + sent

    @property
    def total_sent(self) -> int:
        return sum(self.sent.values())


_LOGS: list[CommunicationLog] = []


@contextlib.contextmanager
def count_communication():
    """Count the collectives this module issues in the block (forward and backward)::

        with count_communication() as log:
            div = ulysses_divergence(...); loss.backward()
        log.sent  # {"all_gather": ..., "reduce_scatter": ...} bytes sent by this rank
    """
    log = CommunicationLog()
    _LOGS.append(log)
    try:
        yield log
    finally:
        _LOGS.remove(log)


def _record(kind: str, x: torch.Tensor, world: int) -> None:
    if not _LOGS:
        return
    n = x.numel() * x.element_size()
    # a broadcast / reduce is pipelined along the ring: each rank sends the message (once)
    sent = {"all_gather": n * (world - 1), "reduce_scatter": n * (world - 1) // world,
            "all_reduce": 2 * n * (world - 1) // world, "all_to_all": n * (world - 1) // world,
            "broadcast": n, "reduce": n}[kind]
    for log in _LOGS:
        log.add(kind, n, sent)


def _world(group) -> tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("sequence parallelism needs an initialized torch.distributed process group "
                           "(dist.init_process_group); got none")
    return dist.get_world_size(group), dist.get_rank(group)


def _all_gather(x: torch.Tensor, group, world: int) -> torch.Tensor:
    """``[P * n, ...]``: every rank's ``x`` ``[n, ...]`` stacked in rank order (dim 0)."""
    x = x.contiguous()
    out = x.new_empty((world * x.shape[0],) + tuple(x.shape[1:]))
    _record("all_gather", x, world)
    if x.dtype == torch.bool:  # gloo reduces no bools; gathering them as bytes is exact
        dist.all_gather_into_tensor(out.view(torch.uint8), x.view(torch.uint8), group=group)
    else:
        dist.all_gather_into_tensor(out, x, group=group)
    return out


def _reduce_scatter(x: torch.Tensor, group, world: int) -> torch.Tensor:
    """Sum over ranks of ``x`` ``[P * n, ...]``, this rank's block ``[n, ...]``."""
    x = x.contiguous()
    out = x.new_empty((x.shape[0] // world,) + tuple(x.shape[1:]))
    _record("reduce_scatter", x, world)
    dist.reduce_scatter_tensor(out, x, group=group)
    return out


def _all_reduce(x: torch.Tensor, group, world: int, op=dist.ReduceOp.SUM) -> torch.Tensor:
    x = x.contiguous()
    _record("all_reduce", x, world)
    dist.all_reduce(x, op=op, group=group)
    return x


class _GatherSeq(torch.autograd.Function):
    """All-gather along ``dim`` (each rank's block in rank order); backward: the summed
    gradient of this rank's block (reduce-scatter)."""

    @staticmethod
    def forward(ctx, x, dim, group, world):
        ctx.dim, ctx.group, ctx.world = dim, group, world
        out = _all_gather(x.movedim(dim, 0), group, world)
        return out.movedim(0, dim)

    @staticmethod
    def backward(ctx, grad):
        g = _reduce_scatter(grad.movedim(ctx.dim, 0), ctx.group, ctx.world)
        return g.movedim(0, ctx.dim), None, None, None


def _gather_seq(x: torch.Tensor, dim: int, group, world: int) -> torch.Tensor:
    return _GatherSeq.apply(x, dim, group, world)


def _broadcast(x: torch.Tensor, src: int, group, world: int) -> None:
    _record("broadcast", x, world)
    dist.broadcast(x, group=group, group_src=src)


def _reduce(x: torch.Tensor, dst: int, group, world: int) -> None:
    _record("reduce", x, world)
    dist.reduce(x, group=group, group_dst=dst)


class _GatherRows(torch.autograd.Function):
    """Every rank's rows ``x`` (``sizes[r]`` of them on rank ``r``, along ``dim``) in rank
    order: one all-gather when the sizes are equal, else one broadcast from each rank that
    has rows (gloo gathers no uneven blocks, and padding them would send the largest
    rank's count from every rank). Backward: each rank's rows get their gradient summed over
    the ranks (reduce-scatter / one reduce per owner)."""

    @staticmethod
    def forward(ctx, x, dim, sizes, group, world, rank):
        ctx.args = (dim, sizes, group, world, rank)
        if len(set(sizes)) == 1:
            return _all_gather(x.movedim(dim, 0), group, world).movedim(0, dim)
        x = x.movedim(dim, 0).contiguous()
        parts = []
        for r, m in enumerate(sizes):
            if m:
                buf = x if r == rank else x.new_empty((m,) + tuple(x.shape[1:]))
                _broadcast(buf, r, group, world)
                parts.append(buf)
        return torch.cat(parts).movedim(0, dim)

    @staticmethod
    def backward(ctx, grad):
        dim, sizes, group, world, rank = ctx.args
        g = grad.movedim(dim, 0)
        if len(set(sizes)) == 1:
            return _reduce_scatter(g, group, world).movedim(0, dim), None, None, None, None, None
        mine, off = g.new_zeros((sizes[rank],) + tuple(g.shape[1:])), 0
        for r, m in enumerate(sizes):
            if m:
                part = g[off:off + m].contiguous()
                _reduce(part, r, group, world)
                mine = part if r == rank else mine
                off += m
        return mine.movedim(0, dim), None, None, None, None, None


def _gather_rows(x, dim, sizes, group, world, rank):
    return _GatherRows.apply(x, dim, sizes, group, world, rank)


def gather_sequence(x: torch.Tensor, dim: int = 2, group=None) -> torch.Tensor:
    """All-gather ``x`` along the sequence dim ``dim`` (ranks' blocks in rank order, equal
    sizes), differentiable: the gradient of this rank's block is summed over the ranks
    (reduce-scatter). E.g. the keys of a layer for an attention over the whole sequence."""
    world, _ = _world(group)
    return _gather_seq(x, dim, group, world)


def _all_to_all(x: torch.Tensor, scatter_dim: int, gather_dim: int, group, world: int) -> torch.Tensor:
    """Split ``x`` along ``scatter_dim`` into ``P`` blocks, send block ``r`` to rank ``r``,
    and concatenate the received blocks along ``gather_dim`` (rank order)."""
    blocks = torch.stack(x.chunk(world, dim=scatter_dim)).contiguous()  # [P, ...]
    out = torch.empty_like(blocks)
    _record("all_to_all", blocks, world)
    dist.all_to_all_single(out, blocks, group=group)
    return torch.cat(out.unbind(0), dim=gather_dim)


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scatter_dim, gather_dim, group, world):
        ctx.args = (scatter_dim, gather_dim, group, world)
        return _all_to_all(x, scatter_dim, gather_dim, group, world)

    @staticmethod
    def backward(ctx, grad):
        scatter_dim, gather_dim, group, world = ctx.args
        return _all_to_all(grad, gather_dim, scatter_dim, group, world), None, None, None, None


def _check_heads(name: str, heads: int, world: int) -> None:
    if heads % world:
        raise ValueError(f"Ulysses layout: {name} has {heads} heads, which the sequence-parallel degree {world} does "
                         f"not divide; each rank must get a whole number of heads (choose a degree that divides "
                         "the head count, or repeat KV heads first)")


def seq_to_heads(x: torch.Tensor, group=None) -> torch.Tensor:
    """Ulysses all-to-all: ``[B, H, T/P, D]`` (this rank's rows, all heads) ->
    ``[B, H/P, T, D]`` (all rows, this rank's heads), differentiable. Raises
    ``ValueError`` if ``P`` does not divide ``H``."""
    world, _ = _world(group)
    _check_heads("the tensor", x.shape[1], world)
    return _AllToAll.apply(x, 1, 2, group, world)


def heads_to_seq(x: torch.Tensor, group=None) -> torch.Tensor:
    """The inverse of :func:`seq_to_heads`: ``[B, H/P, T, D]`` -> ``[B, H, T/P, D]``."""
    world, _ = _world(group)
    if x.shape[2] % world:
        raise ValueError(f"heads_to_seq: the sequence length {x.shape[2]} is not a multiple of the degree {world}")
    return _AllToAll.apply(x, 2, 1, group, world)


def ulysses_attention(q, k, v, attention: Callable, group=None) -> torch.Tensor:
    """Ulysses attention around any attention callable, as DeepSpeed-Ulysses and verl do it:
    ``q, k, v`` are this rank's rows ``[B, H, T/P, D]`` (all heads); they are exchanged so
    that ``attention(q, k, v)`` sees every row of ``H/P`` heads (KV heads that ``P`` does
    not divide are repeated just enough that it does, as verl does: GQA groups are kept),
    and the output comes back as this rank's rows ``[B, H, T/P, Dv]``."""
    world, _ = _world(group)
    hq, hk = q.shape[1], k.shape[1]
    _check_heads("q", hq, world)
    if hq % hk:
        raise ValueError(f"q has {hq} heads, not a multiple of the {hk} KV heads")
    rep = world // math.gcd(hk, world)  # hk * rep = lcm(hk, P), which divides hq
    if rep > 1:
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    out = attention(seq_to_heads(q, group), seq_to_heads(k, group), seq_to_heads(v, group))
    return heads_to_seq(out, group)


# --------------------------------------------------------------------------- layout: rows x key runs

@dataclasses.dataclass(frozen=True)
class _Problem:
    """Rows ``[i0, i1)`` of the row tensors against keys ``[j0, j1)`` of the key tensors.
    ``diag``: the rows end where the keys end (bottom-right causal mask and self key as in
    the op); otherwise every key is visible (non-causal) and none is the row's own."""

    i0: int
    i1: int
    j0: int
    j1: int
    diag: bool

    def cfg(self, cfg: OpConfig) -> OpConfig:
        return cfg if self.diag else cfg._replace(causal=False, exclude_self=False)


def _runs(pos, bounds: list) -> list:
    """Maximal runs of consecutive positions within one sequence, ``[p0, p1, index, seq]``
    (``pos``: global positions of a tensor's entries; ``bounds``: sequence starts)."""
    pos = torch.as_tensor(pos, dtype=torch.long).cpu()
    if pos.numel() == 0:
        return []
    seq = torch.searchsorted(torch.tensor(bounds, dtype=torch.long), pos, right=True) - 1
    brk = torch.ones(pos.shape, dtype=torch.bool)
    brk[1:] = (pos[1:] != pos[:-1] + 1) | (seq[1:] != seq[:-1])
    starts = brk.nonzero().flatten().tolist() + [pos.numel()]
    return [[int(pos[a]), int(pos[e - 1]) + 1, a, int(seq[a])] for a, e in zip(starts, starts[1:])]


def _plan(row_runs: list, key_runs: list, causal: bool) -> list:
    """The problems that cover every (row, visible key) pair exactly once, from the runs
    (:func:`_runs`) of the row tensors' and the key tensors' global positions."""
    keys_of: dict = {}
    for run in key_runs:
        keys_of.setdefault(run[3], []).append(run)
    out = []
    for x, y, i0, s in row_runs:
        for c0, c1, j0, _ in keys_of.get(s, ()):
            a, e = max(x, c0), min(y, c1)
            if a < e:
                out.append(_Problem(i0 + a - x, i0 + e - x, j0, j0 + e - c0, True))
                if not causal and e < c1:
                    out.append(_Problem(i0 + a - x, i0 + e - x, j0 + e - c0, j0 + c1 - c0, False))
            if max(x, c1) < y:
                out.append(_Problem(i0 + max(x, c1) - x, i0 + y - x, j0, j0 + c1 - c0, False))
            if not causal and x < min(y, c0):
                out.append(_Problem(i0, i0 + min(y, c0) - x, j0, j0 + c1 - c0, False))
    return out


def _bounds(cu_seqlens, total: int) -> list:
    """Sequence starts from global ``cu_seqlens`` (packed) or ``[0]``."""
    if cu_seqlens is None:
        return [0]
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.is_floating_point():
        raise TypeError(f"cu_seqlens must be a 1-D integer tensor [S + 1] of offsets, got {cu_seqlens!r:.80}")
    offs = cu_seqlens.tolist()
    if len(offs) < 2 or offs[0] != 0 or any(b < a for a, b in zip(offs, offs[1:])) or offs[-1] != total:
        raise ValueError(f"cu_seqlens must start at 0, be non-decreasing and end at the global length {total} "
                         f"(all ranks' tokens), got {offs[:8]}{'...' if len(offs) > 8 else ''}")
    return sorted(set(offs[:-1]))


# --------------------------------------------------------------------------- the divergence over a plan

@dataclasses.dataclass(frozen=True)
class _Spec:
    kernels: object
    problems: tuple
    cfg: OpConfig
    merge: bool = False  # keys sharded: merge the partial statistics over the group
    group: object = None
    world: int = 1


def _stat_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _empty_as_neginf(x: torch.Tensor) -> torch.Tensor:
    """A partial log-sum-exp with no key (``+inf`` in the kernels' convention, or ``-inf``) as ``-inf``."""
    return torch.where(torch.isinf(x), torch.full_like(x, -math.inf), x)


def _merge_lse(parts: list, spec: _Spec) -> list:
    """Log-sum-exp over ranks of each partial log-sum-exp (``-inf``: no key), with one max
    and one sum all-reduce for all of them."""
    if not spec.merge or not parts:
        return parts
    flat = torch.cat([p.reshape(-1) for p in parts])
    m = _all_reduce(flat.clone(), spec.group, spec.world, dist.ReduceOp.MAX)
    m_use = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
    s = _all_reduce(torch.exp(flat - m_use), spec.group, spec.world)
    merged = m_use + torch.log(s)  # s = 0: -inf (no key on any rank); NaN stays NaN
    return [t.view_as(p) for t, p in zip(merged.split([p.numel() for p in parts]), parts)]


def _merge_sum(parts: list, spec: _Spec) -> list:
    if not spec.merge:
        return parts
    flat = _all_reduce(torch.cat([p.reshape(-1) for p in parts]), spec.group, spec.world)
    return [t.view_as(p) for t, p in zip(flat.split([p.numel() for p in parts]), parts)]


def _rows(x: torch.Tensor, rows: slice) -> torch.Tensor:
    """A problem's rows of a ``[B, H, M]`` statistic as a tensor of its own (kernels may
    need it contiguous and aligned, which a view at an offset is not)."""
    return x[:, :, rows].clone(memory_format=torch.contiguous_format)


def _prepared(spec: _Spec, pb: _Problem, q, k, q_old, k_old, key_mask):
    """The problem's slices, prepared by the kernel set (``v``: an empty stand-in)."""
    qs, ks = q[:, :, pb.i0:pb.i1], k[:, :, pb.j0:pb.j1]
    qp, kp, _, qop, kop = spec.kernels.prepare(qs, ks, ks[:, :, :0], q_old[:, :, pb.i0:pb.i1], k_old[:, :, pb.j0:pb.j1])
    km = None if key_mask is None else key_mask[:, pb.j0:pb.j1]
    return qs, ks, qp, kp, qop, kop, km


def _forward(spec: _Spec, q, k, q_old, k_old, lse_old, lse_cur, query_mask, key_mask):
    """``div`` ``[B, G, M]`` of the ``M`` rows and the statistics the backward needs."""
    cfg, kern = spec.cfg, spec.kernels
    b, hq, m, _ = q.shape
    ho = q_old.shape[1]
    groups = cfg.groups(hq)
    cdt = _stat_dtype(q)
    full = lambda h: torch.full((b, h, m), -math.inf, dtype=cdt, device=q.device)  # noqa: E731
    own_old = lse_old is None or cfg.exclude_self  # a cached lse_old cannot give the support's mass
    lse, lse_s, lse_o, lse_so = full(hq), full(hq), full(ho), full(ho)
    for pb in spec.problems:
        _, _, qp, kp, qop, kop, km = _prepared(spec, pb, q, k, q_old, k_old, key_mask)
        c, rows, n = pb.cfg(cfg), slice(pb.i0, pb.i1), pb.i1 - pb.i0
        pairs = []
        if lse_cur is None:
            pairs.append(((lse, lse_s), kern.policy_stats(qp, kp, km, c, 0, n, cfg.sm_scale)))
        if own_old:
            pairs.append(((lse_o, lse_so), kern.policy_stats(qop, kop, km, c, 0, n, cfg.old_sm_scale)))
        for bufs, stats in pairs:
            for buf, part in zip(bufs, stats):
                buf[:, :, rows] = torch.logaddexp(buf[:, :, rows], _empty_as_neginf(part.to(cdt)))
    parts = ([lse, lse_s] if lse_cur is None else []) + ([lse_o, lse_so] if own_old else [])
    merged = iter(_merge_lse(parts, spec))
    if lse_cur is None:
        lse, lse_s = next(merged), next(merged)
    else:
        lse = lse_s = _empty_as_neginf(lse_cur.to(cdt))
    if own_old:
        lse_o, lse_so = next(merged), next(merged)
    else:
        lse_o = lse_so = _empty_as_neginf(glue.old_lse(lse_old).to(cdt))
    inf = lambda x: torch.where(torch.isneginf(x), torch.full_like(x, math.inf), x)  # noqa: E731  (no key: +inf)
    lse, lse_o = inf(lse), inf(lse_o)
    off_old, has_old = glue.offsets(lse_o, lse_so, groups)
    off, has_cur = glue.offsets(lse, lse_s, groups)
    valid = glue.valid_rows(has_cur, has_old, query_mask, 0)
    off, off_old = glue.mask_offsets(off, valid), glue.mask_offsets(off_old, valid)
    div, e_stat, r_mass = (torch.zeros(b, groups, m, dtype=cdt, device=q.device) for _ in range(3))
    has_mass = True
    for pb in spec.problems:
        _, _, qp, kp, qop, kop, km = _prepared(spec, pb, q, k, q_old, k_old, key_mask)
        rows = slice(pb.i0, pb.i1)
        d, e, rm = kern.div_fwd(qp, kp, _rows(off, rows), qop, kop, _rows(off_old, rows), km, pb.cfg(cfg), 0)
        div[:, :, rows] += d
        e_stat[:, :, rows] += e
        if rm is None:
            has_mass = False
        else:
            r_mass[:, :, rows] += rm
    div, e_stat, r_mass = _merge_sum([div, e_stat, r_mass], spec)
    if not own_old and has_mass:
        glue.check_old_lse(r_mass, valid)
    return div, (lse, lse_s.contiguous(), off, off_old, e_stat, valid)


def _backward(spec: _Spec, ddiv, q, k, q_old, k_old, key_mask, stats):
    """``dq`` of the rows and ``dk`` of the keys (statistics dtype) from ``ddiv`` ``[B, G, M]``."""
    cfg, kern = spec.cfg, spec.kernels
    lse, lse_s, off, off_old, e_stat, valid = stats
    hq = q.shape[1]
    if spec.merge:  # every rank holds every row: each rank's keys need every row's weight
        ddiv = _merge_sum([ddiv.to(e_stat.dtype)], spec)[0]
    w = glue.divergence_weight(ddiv, valid, 0)
    cdt = _stat_dtype(q)
    dq = torch.zeros(q.shape, dtype=cdt, device=q.device)
    dk = torch.zeros(k.shape, dtype=cdt, device=k.device)
    if w is None:
        return dq, dk

    def run(pass_fn):
        for pb in spec.problems:
            qs, ks, qp, kp, qop, kop, km = _prepared(spec, pb, q, k, q_old, k_old, key_mask)
            v0 = ks[:, :, :0]
            gq, gk, gv = kern.new_grads(qp, kp, v0)
            res = pass_fn(pb, slice(pb.i0, pb.i1), qp, kp, qop, kop, km, gq, gk)
            gq, gk, _ = kern.finish_grads(qs, ks, v0, gq, gk, gv)
            dq[:, :, pb.i0:pb.i1] += gq
            dk[:, :, pb.j0:pb.j1] += gk
            yield pb, res

    a_stat = torch.zeros(off.shape, dtype=cdt, device=q.device)
    for pb, a in run(lambda pb, r, qp, kp, qop, kop, km, gq, gk: kern.div_bwd(
            qp, kp, _rows(off, r), qop, kop, _rows(off_old, r), _rows(e_stat, r), _rows(w, r), km,
            pb.cfg(cfg), 0, gq, gk)):
        a_stat[:, :, pb.i0:pb.i1] += a
    a_stat = _merge_sum([a_stat], spec)[0]
    wb = w.repeat_interleave(hq // w.shape[1], 1) * glue.coupling(a_stat, e_stat, lse_s, off)
    # The coupling term -alpha_h w b_h is over the allowed keys: the support plays no part.
    for _ in run(lambda pb, r, qp, kp, qop, kop, km, gq, gk: kern.coupling_bwd(
            qp, kp, _rows(lse, r), _rows(wb, r), km, pb.cfg(cfg)._replace(exclude_self=False), gq, gk)):
        pass
    return dq, dk


class _Divergence(torch.autograd.Function):
    """``div`` ``[B, G, M]`` of rows ``q`` ``[B, Hq, M, D]`` against keys ``k``
    ``[B, Hk, N, D]`` over the plan in ``spec``; gradients to ``q`` and ``k``."""

    @staticmethod
    def forward(ctx, q, k, q_old, k_old, lse_old, lse_cur, query_mask, key_mask, spec):
        with torch.no_grad():
            div, stats = _forward(spec, q, k, q_old, k_old, lse_old, lse_cur, query_mask, key_mask)
        ctx.spec = spec
        ctx.save_for_backward(q, k, q_old, k_old, key_mask, *stats)
        return div

    @staticmethod
    def backward(ctx, ddiv):
        q, k, q_old, k_old, key_mask, *stats = ctx.saved_tensors
        dq, dk = _backward(ctx.spec, ddiv, q, k, q_old, k_old, key_mask, stats)
        return dq.to(q.dtype), dk.to(k.dtype), None, None, None, None, None, None, None


# --------------------------------------------------------------------------- public functions

def _config(q, q_old, causal, sm_scale, old_sm_scale, divergence, head_reduction, exclude_self):
    _check_choice("divergence", divergence, DIVERGENCES)
    _check_choice("head_reduction", head_reduction, HEAD_REDUCTIONS)
    return OpConfig(bool(causal), _check_scale("sm_scale", sm_scale, 1.0 / math.sqrt(q.shape[-1])),
                    _check_scale("old_sm_scale", old_sm_scale, 1.0 / math.sqrt(q_old.shape[-1])),
                    divergence, head_reduction, bool(exclude_self))


def _kernels(backend: str, q, q_old, fn: str):
    name = resolve_backend(backend, q.device, q.dtype, max(q.shape[-1], q_old.shape[-1]))
    if name == "reference":
        raise ValueError(f"{fn} runs the backends' kernel passes; backend='reference' (the dense oracle) has "
                         "none: use 'torch', 'triton', 'cuda' or 'auto'")
    return backends.kernel_set(name)


def _validate_local(q, k, q_old, k_old, lse_old, query_mask, key_mask, head_reduction, old_rows, k_old_tokens=1):
    """Shapes of one rank's inputs; returns the local rows that have old queries.
    ``k_old_tokens``: ``k_old`` may also hold this many times the local tokens (Ulysses:
    all of them, already gathered)."""
    _check_tensor("q", q, 4, "[B, Hq, n, D] (this rank's rows)")
    _check_tensor("k", k, 4, "[B, Hk, n, D] (this rank's keys)")
    _check_tensor("q_old", q_old, 4, "[B, Ho, m, Do] (old queries of m of this rank's rows)")
    _check_tensor("k_old", k_old, 4, "[B, Hko, n, Do]")
    b, hq, n, d = q.shape
    for name, x in (("k", k), ("q_old", q_old), ("k_old", k_old)):
        if x.dtype != q.dtype or x.device != q.device:
            raise TypeError(f"{name} must have q's dtype and device ({q.dtype}, {q.device}), got {x.dtype}, {x.device}")
        if x.shape[0] != b:
            raise ValueError(f"{name} has batch size {x.shape[0]} but q has {b}")
    if k.shape[2] != n or k_old.shape[2] not in (n, k_old_tokens * n):
        also = f" (or all {k_old_tokens * n} for k_old)" if k_old_tokens > 1 else ""
        raise ValueError(f"k and k_old must hold this rank's {n} tokens like q{also}, got {k.shape[2]} and "
                         f"{k_old.shape[2]}")
    if k.shape[3] != d or hq % k.shape[1]:
        raise ValueError(f"k {tuple(k.shape)} does not fit q {tuple(q.shape)}: same head dim, Hq a multiple of Hk")
    ho, m = q_old.shape[1], q_old.shape[2]
    if k_old.shape[3] != q_old.shape[3] or ho % k_old.shape[1]:
        raise ValueError(f"k_old {tuple(k_old.shape)} does not fit q_old {tuple(q_old.shape)}")
    if head_reduction == "none" and ho != hq:
        raise ValueError(f'head_reduction="none" needs as many old heads as current heads, got Ho={ho}, Hq={hq}')
    _check_mask("query_mask", query_mask, (b, n), q.device)
    _check_mask("key_mask", key_mask, (b, n), q.device)
    if old_rows is None:
        if m > n:
            raise ValueError(f"q_old has {m} rows but this rank holds {n}; q_old holds the last m <= n local rows "
                             "(or pass old_rows)")
        old_rows = torch.arange(n - m, n, device=q.device)
    else:
        if not isinstance(old_rows, torch.Tensor) or old_rows.dim() != 1 or old_rows.is_floating_point():
            raise TypeError("old_rows must be a 1-D integer tensor of local row indices")
        old_rows = old_rows.to(q.device, torch.long)
        if old_rows.numel() != m:
            raise ValueError(f"old_rows lists {old_rows.numel()} rows but q_old has {m}")
        if m and (bool((old_rows[1:] <= old_rows[:-1]).any()) or int(old_rows[0]) < 0 or int(old_rows[-1]) >= n):
            raise ValueError(f"old_rows must be strictly increasing local row indices in [0, {n})")
    if lse_old is not None and (not isinstance(lse_old, torch.Tensor) or tuple(lse_old.shape) != (b, ho, m)):
        raise ValueError(f"lse_old must be a [B, Ho, m] = {(b, ho, m)} tensor, got "
                         f"{getattr(lse_old, 'shape', type(lse_old).__name__)}")
    if query_mask is not None:
        stray = query_mask.clone()
        stray[:, old_rows] = False
        if bool(stray.any()):
            raise ValueError("query_mask marks local rows that have no old query (q_old holds the rows old_rows, "
                             "default the last m local rows); only those can carry a divergence")
    return old_rows


def _setup(fn, q, k, q_old, k_old, lse_old, query_mask, key_mask, old_rows, causal, sm_scale, old_sm_scale,
           divergence, head_reduction, exclude_self, backend, k_old_tokens=1):
    """This rank's checked inputs: ``(old_rows, OpConfig, kernel set)``."""
    old_rows = _validate_local(q, k, q_old, k_old, lse_old, query_mask, key_mask, head_reduction, old_rows,
                               k_old_tokens)
    cfg = _config(q, q_old, causal, sm_scale, old_sm_scale, divergence, head_reduction, exclude_self)
    return old_rows, cfg, _kernels(backend, q, q_old, fn)


def _finish(div_rows, old_rows, n, head_reduction):
    """``div`` ``[B, n]`` / ``[B, Hq, n]`` of this rank's rows from ``[B, G, m]``."""
    b, g, _ = div_rows.shape
    div = div_rows.new_zeros(b, g, n).index_copy(2, old_rows, div_rows)
    return div[:, 0] if head_reduction == "mean" else div


def _rank_info(q, q_old, k_old, query_mask, key_mask, lse_old, lse, error, group, world):
    """Every rank's ``(n, m)`` and which optional inputs the ranks hold (a tiny all-gather),
    so that all ranks take the same collective path (or all raise). Key and query masks: if
    any rank has one, every rank uses one (all True where it had none); ``lse_old`` and
    ``lse`` must be given on all ranks or none. ``error``: this rank's input error, raised
    here after the ranks have compared notes (a rank that raised alone would leave the
    others waiting in a collective)."""
    device = q.device if isinstance(q, torch.Tensor) else torch.device("cpu")
    flags = [0] * 8 if error is not None else [0, q.shape[2], q_old.shape[2]] + [
        int(x is not None) for x in (query_mask, key_mask, lse_old, lse)] + [int(k_old.shape[2] != q.shape[2])]
    flags[0] = int(error is not None)
    info = _all_gather(torch.tensor([flags], device=device), group, world).tolist()
    if error is not None:
        raise error
    bad = [r for r, f in enumerate(info) if f[0]]
    if bad:
        raise ValueError(f"rank(s) {bad} of the sequence-parallel group got invalid inputs (their error says which); "
                         "every rank must pass inputs of the same layout")
    for i, name in ((5, "lse_old"), (6, "lse")):
        if len({r[i] for r in info}) > 1:
            raise ValueError(f"{name} is given on some ranks of the group and not on others: give it on all or none")
    if len({r[7] for r in info}) > 1:
        raise ValueError("k_old holds the local tokens on some ranks and all of them on others: the same on every rank")
    any_of = [max(r[i] for r in info) for i in (3, 4)]
    b, n = q.shape[0], q.shape[2]
    ones = lambda: torch.ones(b, n, dtype=torch.bool, device=device)  # noqa: E731
    query_mask = ones() if any_of[0] and query_mask is None else query_mask
    key_mask = ones() if any_of[1] and key_mask is None else key_mask
    return [r[1:3] for r in info], query_mask, key_mask


def _checked(fn, *args):
    """``(fn(*args), None)``, or ``(None, the input error)`` to be raised after the ranks agree."""
    try:
        return fn(*args), None
    except (TypeError, ValueError, BackendUnavailableError) as e:
        return None, e


def ulysses_divergence(
    q: torch.Tensor,
    k: torch.Tensor,
    q_old: torch.Tensor,
    k_old: torch.Tensor,
    *,
    group=None,
    causal: bool = True,
    sm_scale: Optional[float] = None,
    old_sm_scale: Optional[float] = None,
    divergence: str = "jsd",
    head_reduction: str = "mean",
    exclude_self: bool = False,
    query_mask: Optional[torch.Tensor] = None,
    key_mask: Optional[torch.Tensor] = None,
    lse_old: Optional[torch.Tensor] = None,
    lse: Optional[torch.Tensor] = None,
    old_rows: Optional[torch.Tensor] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """The divergence of :func:`ral_kernels.fused_attn_kl` for this rank's rows under
    Ulysses sequence parallelism (the attention output comes from the engine's Ulysses
    attention, e.g. :func:`ulysses_attention`).

    Rank ``r`` of the ``P`` ranks of ``group`` holds rows (and keys) ``[r n, (r + 1) n)`` of
    a sequence of ``T = P n`` tokens, all heads: the layout before the engine's all-to-all.
    Self-attention (``Tq = Tk = T``).

    Args:
        q: ``[B, Hq, n, D]`` this rank's queries (post-RoPE), all heads.
        k: ``[B, Hk, n, D]`` this rank's keys; all-gathered here (gradient: reduce-scatter).
        q_old: ``[B, Ho, m, Do]`` old queries of ``m`` of this rank's rows: the last ``m``
            (the response part on this rank) or the rows ``old_rows``. The old-policy cache
            is sharded like the rows: ``1/P`` of the single-process cache per rank.
        k_old: ``[B, Hko, n, Do]`` this rank's old keys (all-gathered here, no gradient), or
            all ``[B, Hko, T, Do]`` when the caller already holds them.
        group: the sequence-parallel process group (default: the world).
        causal, sm_scale, old_sm_scale, divergence, head_reduction, exclude_self: as in
            :func:`ral_kernels.fused_attn_kl` (``causal`` over global positions).
        query_mask, key_mask: ``[B, n]`` bool of this rank's rows / keys (padding).
        lse_old: ``[B, Ho, m]`` cached old log-sum-exp of the ``m`` rows (saves a sweep).
        lse: optional ``[B, Hq/P, T]`` current log-sum-exp of the engine's head-sharded
            attention (natural log, this rank's heads); moved to the rows by a small
            all-to-all instead of being recomputed. Not with ``exclude_self``.
        old_rows: ``[m]`` ascending local indices of the rows of ``q_old``.
        cu_seqlens: ``[S + 1]`` offsets of packed sequences over the global ``T`` tokens
            (``B = 1``); causality and keys stay within each sequence.
        backend: the kernel set, as in :func:`ral_kernels.fused_attn_kl` (not "reference").

    Returns:
        ``div``: ``[B, n]`` ("mean") or ``[B, Hq, n]`` ("none"), this rank's rows; 0 on rows
        without an old query, outside ``query_mask`` or without keys. Differentiable w.r.t.
        ``q`` and ``k``; every rank must backpropagate through it.
    """
    world, rank = _world(group)
    setup, err = _checked(_setup, "ulysses_divergence", q, k, q_old, k_old, lse_old, query_mask, key_mask, old_rows,
                          causal, sm_scale, old_sm_scale, divergence, head_reduction, exclude_self, backend, world)
    sizes, query_mask, key_mask = _rank_info(q, q_old, k_old, query_mask, key_mask, lse_old, lse, err, group, world)
    old_rows, cfg, kern = setup
    b, hq, n, _ = q.shape
    if any(s[0] != n for s in sizes):
        raise ValueError(f"Ulysses layout: every rank must hold the same number of tokens, got {[s[0] for s in sizes]} "
                         "(pad the sequence to a multiple of the degree, as verl does)")
    t = world * n
    bounds = _bounds(cu_seqlens, t)
    if cu_seqlens is not None and b != 1:
        raise ValueError(f"packed sequences (cu_seqlens) take B = 1, got B = {b}")
    lse_rows = None
    if lse is not None:
        if exclude_self:
            raise ValueError("lse cannot be used with exclude_self=True: the support's log-sum-exp needs its own sweep")
        _check_heads("q", hq, world)
        if tuple(lse.shape) != (b, hq // world, t):
            raise ValueError(f"lse must be the head-sharded attention's [B, Hq/P, T] = {(b, hq // world, t)}, got "
                             f"{tuple(lse.shape)}")
        lse_rows = _all_to_all(lse.detach().to(_stat_dtype(q)), 2, 1, group, world)[:, :, old_rows]
    k_all = _gather_seq(k, 2, group, world)
    k_old_all = k_old.detach() if k_old.shape[2] == t != n else _gather_seq(k_old.detach(), 2, group, world)
    km_all = None if key_mask is None else _gather_seq(key_mask, 1, group, world)
    row_pos = old_rows + rank * n
    problems = tuple(_plan(_runs(row_pos, bounds), _runs(torch.arange(t), bounds), cfg.causal))
    spec = _Spec(kern, problems, cfg)
    qm = None if query_mask is None else query_mask[:, old_rows]
    div = _Divergence.apply(q.index_select(2, old_rows), k_all, q_old.detach(), k_old_all,
                            None if lse_old is None else lse_old.detach(), lse_rows, qm, km_all, spec)
    return _finish(div, old_rows, n, head_reduction)


class _OwnRows(torch.autograd.Function):
    """This rank's rows of the gathered rows (forward); backward: their gradient on their
    place, zeros elsewhere (``_Divergence`` sums the ranks' gradients)."""

    @staticmethod
    def forward(ctx, div_all, index):
        ctx.save_for_backward(index)
        ctx.shape = div_all.shape
        return div_all.index_select(2, index)

    @staticmethod
    def backward(ctx, grad):
        (index,) = ctx.saved_tensors
        return grad.new_zeros(ctx.shape).index_copy(2, index, grad), None


def context_parallel_divergence(
    q: torch.Tensor,
    k: torch.Tensor,
    q_old: torch.Tensor,
    k_old: torch.Tensor,
    *,
    positions: Optional[torch.Tensor] = None,
    group=None,
    causal: bool = True,
    sm_scale: Optional[float] = None,
    old_sm_scale: Optional[float] = None,
    divergence: str = "jsd",
    head_reduction: str = "mean",
    exclude_self: bool = False,
    query_mask: Optional[torch.Tensor] = None,
    key_mask: Optional[torch.Tensor] = None,
    lse_old: Optional[torch.Tensor] = None,
    lse: Optional[torch.Tensor] = None,
    old_rows: Optional[torch.Tensor] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """The divergence of :func:`ral_kernels.fused_attn_kl` for this rank's rows under ring /
    context parallelism (keys sharded); any CP attention computes the output.

    Rank ``r`` holds the tokens at global ``positions`` (its queries and keys, all heads),
    e.g. torch's load-balanced head-tail shards: pass the same sharding of
    ``torch.arange(T)``. The queries of the rows with old queries are all-gathered (with
    their old queries); the keys never move. Partial statistics over each rank's keys merge
    by all-reduces of ``O(rows x heads)`` floats.

    Args:
        q: ``[B, Hq, n, D]`` this rank's queries; k: ``[B, Hk, n, D]`` its keys.
        q_old: ``[B, Ho, m, Do]`` old queries of ``m`` of this rank's rows (the last ``m``
            local rows, or ``old_rows``); k_old: ``[B, Hko, n, Do]`` its old keys.
        positions: ``[n]`` global positions of the local tokens (default: contiguous shards
            ``[r n, (r + 1) n)``); every position of ``[0, T)`` on exactly one rank, where
            ``T`` is the sum of the ranks' ``n`` (shards may differ in size).
        lse: optional ``[B, Hq, n]`` current log-sum-exp of this rank's rows from the CP
            attention (natural log), so the current policy's statistics sweep is skipped.
            Not with ``exclude_self``.
        Other arguments: as in :func:`ulysses_divergence`.

    Returns:
        ``div`` ``[B, n]`` ("mean") or ``[B, Hq, n]`` ("none") of this rank's rows.
    """
    world, rank = _world(group)
    setup, err = _checked(_setup, "context_parallel_divergence", q, k, q_old, k_old, lse_old, query_mask, key_mask,
                          old_rows, causal, sm_scale, old_sm_scale, divergence, head_reduction, exclude_self, backend)
    sizes, query_mask, key_mask = _rank_info(q, q_old, k_old, query_mask, key_mask, lse_old, lse, err, group, world)
    old_rows, cfg, kern = setup
    b, hq, n, _ = q.shape
    m = q_old.shape[2]
    t = sum(s[0] for s in sizes)
    if positions is None:
        positions = torch.arange(n, device=q.device) + sum(s[0] for s in sizes[:rank])
    if not isinstance(positions, torch.Tensor) or positions.dim() != 1 or positions.numel() != n:
        raise ValueError(f"positions must be a 1-D integer tensor of this rank's {n} global positions")
    positions = positions.to(q.device, torch.long)
    if n and (int(positions.min()) < 0 or int(positions.max()) >= t or positions.unique().numel() != n):
        raise ValueError(f"positions must be distinct global positions in [0, {t}) (T = the ranks' tokens together)")
    bounds = _bounds(cu_seqlens, t)
    if cu_seqlens is not None and b != 1:
        raise ValueError(f"packed sequences (cu_seqlens) take B = 1, got B = {b}")
    if lse is not None:
        if exclude_self:
            raise ValueError("lse cannot be used with exclude_self=True: the support's log-sum-exp needs its own sweep")
        if tuple(lse.shape) != (b, hq, n):
            raise ValueError(f"lse must be the CP attention's [B, Hq, n] = {(b, hq, n)} of this rank's rows, got "
                             f"{tuple(lse.shape)}")
    cdt = _stat_dtype(q)
    if all(sz[1] == 0 for sz in sizes):
        return _finish(q.new_zeros(b, cfg.groups(hq), 0, dtype=cdt) + 0 * q.sum() + 0 * k.sum(), old_rows, n,
                       head_reduction)

    # Gather the rows with old queries (in rank order), then sort them by position.
    counts = [sz[1] for sz in sizes]
    gather = lambda x, dim: _gather_rows(x, dim, counts, group, world, rank)  # noqa: E731
    row_pos_all = gather(positions[old_rows], 0)
    order = torch.argsort(row_pos_all)
    pick = lambda x, dim: gather(x, dim).index_select(dim, order)  # noqa: E731
    q_rows = pick(q.index_select(2, old_rows), 2)
    q_old_rows = pick(q_old.detach(), 2)
    lse_old_rows = None if lse_old is None else pick(lse_old.detach().to(cdt), 2)
    lse_rows = None if lse is None else pick(lse.detach().to(cdt)[:, :, old_rows], 2)
    qm_rows = None if query_mask is None else pick(query_mask[:, old_rows], 1)
    # Keys in ascending position order (torch's load balancer keeps each shard ascending).
    kperm = torch.argsort(positions)
    if bool((kperm != torch.arange(n, device=q.device)).any()):
        k, k_old = k.index_select(2, kperm), k_old.index_select(2, kperm)
        key_mask = None if key_mask is None else key_mask.index_select(1, kperm)
    problems = tuple(_plan(_runs(row_pos_all[order], bounds), _runs(positions[kperm], bounds), cfg.causal))
    spec = _Spec(kern, problems, cfg, True, group, world)
    div_all = _Divergence.apply(q_rows, k, q_old_rows, k_old.detach(), lse_old_rows, lse_rows, qm_rows, key_mask, spec)
    # this rank's rows: their place among the sorted gathered rows
    inv = torch.empty_like(order)
    inv[order] = torch.arange(order.numel(), device=q.device)
    mine = inv[sum(s[1] for s in sizes[:rank]):sum(s[1] for s in sizes[:rank + 1])]
    return _finish(_OwnRows.apply(div_all, mine), old_rows, n, head_reduction)
