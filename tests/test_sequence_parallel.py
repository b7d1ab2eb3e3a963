"""Sequence parallelism (``ral_kernels.sequence_parallel``): 2 and 4 gloo processes give the
single-process ``out``, ``div`` and gradients (q, k, v and a tiny attention model's
weights), for Ulysses and ring / context-parallel layouts, with padding and packed
sequences; plus the layout decomposition in one process, on every backend that runs here.

In the multi-process runs the attention output comes from an engine's sequence-parallel
attention, as it would in training: Ulysses through ``ulysses_attention`` (all-to-all,
then SDPA over all rows of ``H/P`` heads), ring attention through **torch's own** context
parallel implementation (``_templated_ring_attention`` with its head-tail load balancer,
driven with the CPU flash kernel: torch's ``context_parallel`` dispatcher itself has no CPU
SDPA rule), and, where torch's ring has no masks (padding, packing), keys all-gathered
before SDPA. The reference is ``fused_attn_kl`` / ``fused_attn_kl_varlen`` in one process.
"""

from __future__ import annotations

import dataclasses
import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import ral_kernels
from ral_kernels import sequence_parallel as sp
from conftest import assert_close, backends_under_test

C = 12  # model width of the tiny attention model
WORLDS = (2, 4)


@dataclasses.dataclass(frozen=True)
class Layout:
    name: str
    mode: str  # "ulysses" | "cp"
    b: int = 2
    hq: int = 4
    hk: int = 2
    ho: int = 4
    hko: int = 2
    d: int = 8
    do: int = 8
    packed: bool = False
    padded: bool = False  # key padding (left prompts, right responses) and a query mask
    divergence: str = "jsd"
    head_reduction: str = "mean"
    exclude_self: bool = False
    causal: bool = True
    shard: str = "contiguous"  # or torch's load-balanced "head_tail"
    attention: str = "sdpa"  # cp: "ring" (torch's ring attention) or "sdpa" (keys all-gathered)
    use_lse: bool = False  # hand the engine attention's log-sum-exp to the divergence
    k_old_whole: bool = False  # Ulysses: hand over the old keys of the whole sequence (already gathered)
    half: bool = False  # the response is the second half (head-tail shards: as many rows on every rank)

    def tokens(self, world: int) -> int:
        return 6 if self.shard == "head_tail" else (7 if world == 2 else 5)

    @property
    def kwargs(self) -> dict:
        return dict(causal=self.causal, divergence=self.divergence, head_reduction=self.head_reduction,
                    exclude_self=self.exclude_self)


LAYOUTS = [
    Layout("ulysses-padded-teacher", "ulysses", padded=True, ho=2, hko=1, do=6),
    Layout("ulysses-perhead-kl-lse", "ulysses", padded=True, divergence="kl", head_reduction="none", use_lse=True),
    Layout("ulysses-packed-exclude-self", "ulysses", b=1, packed=True, divergence="reverse_kl", exclude_self=True,
           k_old_whole=True),
    Layout("ring-headtail-torch-lse", "cp", shard="head_tail", attention="ring", use_lse=True, half=True),
    Layout("cp-padded-kl-exclude-self", "cp", padded=True, divergence="kl", exclude_self=True, ho=2, hko=1, do=6),
    Layout("cp-headtail-packed-perhead", "cp", b=1, packed=True, shard="head_tail", head_reduction="none"),
    Layout("cp-headtail-noncausal", "cp", padded=True, shard="head_tail", causal=False, exclude_self=True),
]


# --------------------------------------------------------------------------- the global problem

def _problem(lay: Layout, world: int) -> dict:
    """The same global inputs on every rank: a tiny attention model (q/k/v projections,
    an old policy with perturbed weights) on random activations, the response rows, masks
    and the upstream gradients of ``out`` and ``div``."""
    g = torch.Generator().manual_seed(1234)
    t = world * lay.tokens(world)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    w = {"wq": rnd(C, lay.hq * lay.d), "wk": rnd(C, lay.hk * lay.d), "wv": rnd(C, lay.hk * lay.d)}
    w_old = {"wq": rnd(C, lay.ho * lay.do), "wk": rnd(C, lay.hko * lay.do)}
    x = rnd(lay.b, t, C)
    resp = torch.zeros(lay.b, t, dtype=torch.bool)  # rows whose old queries are cached
    key_mask = torch.ones(lay.b, t, dtype=torch.bool)
    cu = None
    if lay.packed:
        lens = [t // 3 - 1, t // 3 + 2, t - 2 * (t // 3) - 1]
        cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
        for s, e in zip(cu.tolist(), cu.tolist()[1:]):
            resp[0, e - max(1, (e - s) * 2 // 5):e] = True
    else:
        resp[:, t // 2 if lay.half else t - (t // 2 + 1):] = True
    query_mask = resp.clone()
    if lay.padded:
        key_mask[1, :3] = False  # a left-padded prompt
        key_mask[0, -2:] = False  # a right-padded (shorter) response
        query_mask &= key_mask
        query_mask[1, -4] = False
    elif lay.packed:
        query_mask[0, resp[0].nonzero()[1]] = False
    hd = lay.head_reduction == "none"
    go = rnd(lay.b, lay.hq, t, lay.d)
    gd = rnd(lay.b, lay.hq, t) if hd else rnd(lay.b, t)
    return dict(w=w, w_old=w_old, x=x, resp=resp, query_mask=query_mask, key_mask=key_mask if lay.padded else None,
                cu=cu, go=go, gd=gd, t=t)


def _heads(x: torch.Tensor, w: torch.Tensor, heads: int) -> torch.Tensor:
    b, t, _ = x.shape
    return (x @ w).view(b, t, heads, -1).transpose(1, 2)


def _reference(lay: Layout, p: dict) -> dict:
    """One process: the op on the whole sequence, gradients of sum(out go) + sum(div gd)."""
    w = {k: v.clone().requires_grad_() for k, v in p["w"].items()}
    q, k, v = (_heads(p["x"], w[n], h) for n, h in (("wq", lay.hq), ("wk", lay.hk), ("wv", lay.hk)))
    for x in (q, k, v):
        x.retain_grad()
    with torch.no_grad():
        q_old_all = _heads(p["x"], p["w_old"]["wq"], lay.ho)
        k_old = _heads(p["x"], p["w_old"]["wk"], lay.hko)
    if lay.packed:
        cu = p["cu"]
        rows = p["resp"][0]
        lens = [int(rows[s:e].sum()) for s, e in zip(cu.tolist(), cu.tolist()[1:])]
        cu_old = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
        tr = lambda z: z[0].transpose(0, 1)  # noqa: E731  [1, H, T, D] -> [T, H, D]
        out, div = ral_kernels.fused_attn_kl_varlen(
            tr(q), tr(k), tr(v), tr(q_old_all)[rows], tr(k_old), cu, cu, cu_seqlens_old=cu_old,
            query_mask=p["query_mask"][0], backend="torch", **lay.kwargs)
        out, div = out.transpose(0, 1)[None], (div[None] if div.dim() == 1 else div.transpose(0, 1)[None])
    else:
        r = int(p["resp"][0].sum())
        out, div = ral_kernels.fused_attn_kl(q, k, v, q_old_all[:, :, -r:], k_old, query_mask=p["query_mask"],
                                             key_mask=p["key_mask"], backend="torch", **lay.kwargs)
    ((out * p["go"]).sum() + (div * p["gd"]).sum()).backward()
    return dict(out=out.detach(), div=div.detach(), dq=q.grad, dk=k.grad, dv=v.grad,
                **{"d" + n: w[n].grad for n in w})


# --------------------------------------------------------------------------- the ranks

def _positions(lay: Layout, t: int, world: int, rank: int, mesh) -> torch.Tensor:
    if lay.shard == "contiguous":
        n = t // world
        return torch.arange(rank * n, (rank + 1) * n)
    # torch's own load-balanced sharding of the sequence dim (what context_parallel does)
    from torch.distributed.tensor.experimental._context_parallel._attention import _context_parallel_shard
    from torch.distributed.tensor.experimental._context_parallel._load_balancer import _HeadTailLoadBalancer

    lb = _HeadTailLoadBalancer(t, world, torch.device("cpu"))
    return _context_parallel_shard(mesh, [torch.arange(t)[None]], [1], load_balancer=lb)[0][0]


def _masked_sdpa(q, k, v, qpos, kpos, key_mask, seq_id, causal: bool, want_lse: bool):
    """Dense attention of rows at ``qpos`` over keys at ``kpos`` (test engine; returns the
    natural-log log-sum-exp too when asked)."""
    allowed = torch.ones(q.shape[0], 1, len(qpos), len(kpos), dtype=torch.bool)
    if causal:
        allowed = allowed & (kpos[None, :] <= qpos[:, None])
    if seq_id is not None:
        allowed = allowed & (seq_id[qpos][:, None] == seq_id[kpos][None, :])
    if key_mask is not None:
        allowed = allowed & key_mask[:, None, None, :]
    if k.shape[1] != q.shape[1]:
        k, v = k.repeat_interleave(q.shape[1] // k.shape[1], 1), v.repeat_interleave(q.shape[1] // k.shape[1], 1)
    s = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    s = s.masked_fill(~allowed, -math.inf)
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse[..., None]).nan_to_num(0.0)
    return p @ v, (lse.detach() if want_lse else None)


class _TorchRing(torch.autograd.Function):
    """torch's ring attention (``_templated_ring_attention``, head-tail load balanced) with
    the CPU flash kernel; returns the output and the merged log-sum-exp."""

    @staticmethod
    def forward(ctx, q, k, v, group):
        from torch.distributed.tensor.experimental._context_parallel import _attention as cp

        def fwd(q, k, v, is_causal, **_):
            return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, is_causal)

        out, lse = cp._templated_ring_attention(group, 2, fwd, q, k, v, is_causal=True)[:2]
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.group = group
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        from torch.distributed.tensor.experimental._context_parallel import _attention as cp

        def bwd(query, key, value, out, logsumexp, is_causal, grad_out, **_):
            return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                grad_out, query, key, value, out, logsumexp, 0.0, is_causal)

        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = cp._templated_ring_attention_backward(ctx.group, 2, bwd, dout.contiguous(), "grad_out", q, k, v,
                                                           out, lse, is_causal=True)[:3]
        return dq, dk, dv, None


def _rank_run(lay: Layout, world: int, rank: int, mesh, group) -> dict:
    p = _problem(lay, world)
    t = p["t"]
    pos = _positions(lay, t, world, rank, mesh)
    seq_id = None
    if lay.packed:
        seq_id = torch.repeat_interleave(torch.arange(len(p["cu"]) - 1), p["cu"].diff().long())
    w = {k: v.clone().requires_grad_() for k, v in p["w"].items()}
    x = p["x"][:, pos]
    q, k, v = (_heads(x, w[n], h) for n, h in (("wq", lay.hq), ("wk", lay.hk), ("wv", lay.hk)))
    for z in (q, k, v):
        z.retain_grad()
    old_rows = p["resp"][0, pos].nonzero().flatten()  # this rank's rows with an old query (the capture)
    with torch.no_grad():
        q_old = _heads(x, p["w_old"]["wq"], lay.ho)[:, :, old_rows]
        k_old = _heads(x, p["w_old"]["wk"], lay.hko)
    km = None if p["key_mask"] is None else p["key_mask"][:, pos]
    qm = p["query_mask"][:, pos]
    lse = None
    with sp.count_communication() as log:
        if lay.mode == "ulysses":
            captured = {}

            def attention(qh, kh, vh):  # the engine's attention on all rows of this rank's heads
                everything = torch.arange(t)
                o, captured["lse"] = _masked_sdpa(qh, kh, vh, everything, everything, p["key_mask"], seq_id,
                                                  lay.causal, lay.use_lse)
                return o

            out = sp.ulysses_attention(q, k, v, attention, group=group)
            lse = captured["lse"]
            k_old_in = _heads(p["x"], p["w_old"]["wk"], lay.hko) if lay.k_old_whole else k_old
            div = sp.ulysses_divergence(q, k, q_old, k_old_in, old_rows=old_rows, query_mask=qm, key_mask=km, lse=lse,
                                        cu_seqlens=p["cu"], group=group, backend="torch", **lay.kwargs)
        else:
            if lay.attention == "ring":
                rep = lay.hq // lay.hk
                out, lse = _TorchRing.apply(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), group)
            else:
                kpos = torch.cat([torch.empty_like(pos) for _ in range(world)])
                dist.all_gather_into_tensor(kpos, pos, group=group)
                k_all, v_all = (sp.gather_sequence(z, group=group) for z in (k, v))
                km_all = None if p["key_mask"] is None else p["key_mask"][:, kpos]
                out, lse = _masked_sdpa(q, k_all, v_all, pos, kpos, km_all, seq_id, lay.causal, lay.use_lse)
            div = sp.context_parallel_divergence(q, k, q_old, k_old, positions=pos, old_rows=old_rows, query_mask=qm,
                                                 key_mask=km, lse=lse if lay.use_lse else None, cu_seqlens=p["cu"],
                                                 group=group, backend="torch", **lay.kwargs)
        go = p["go"][:, :, pos]
        gd = p["gd"][..., pos]
        ((out * go).sum() + (div * gd).sum()).backward()
    grads = {"d" + n: w[n].grad.clone() for n in w}
    for g in grads.values():
        dist.all_reduce(g, group=group)  # the ranks' shares of the weights' gradient (DDP / FSDP do this)
    cache = sum(z.numel() * z.element_size() for z in (q_old, k_old))
    return dict(pos=pos, out=out.detach(), div=div.detach(), dq=q.grad, dk=k.grad, dv=v.grad, cache=cache,
                sent=dict(log.sent), calls=dict(log.calls), **grads)


def _errors(world: int, rank: int, group) -> dict:
    """Layouts that cannot be expressed raise errors naming them (on every rank alike)."""
    msgs = {}
    q = torch.randn(1, 3, 4, 8)

    def catch(name, fn):
        try:
            fn()
            msgs[name] = None
        except (ValueError, TypeError, RuntimeError) as e:
            msgs[name] = f"{type(e).__name__}: {e}"

    catch("heads", lambda: sp.seq_to_heads(q, group))
    catch("ulysses_heads", lambda: sp.ulysses_attention(q, q, q, lambda *a: a[0], group))
    k = torch.randn(1, 1, 4, 8)
    catch("lse_heads", lambda: sp.ulysses_divergence(q, k, q[:, :, -2:], k, lse=torch.zeros(1, 1, 4 * world),
                                                     group=group))
    n = 4 + rank  # ranks holding different lengths
    catch("uneven", lambda: sp.ulysses_divergence(torch.randn(1, 2, n, 8), torch.randn(1, 1, n, 8),
                                                  torch.randn(1, 2, 1, 8), torch.randn(1, 1, n, 8), group=group))
    qq, kk = torch.randn(1, 2, 4, 8), torch.randn(1, 1, 4, 8)
    catch("positions", lambda: sp.context_parallel_divergence(qq, kk, qq[:, :, -1:], kk,
                                                              positions=torch.tensor([0, 1, 2, 99]), group=group))
    catch("rows", lambda: sp.context_parallel_divergence(qq, kk, torch.randn(1, 2, 5, 8), kk, group=group))
    catch("reference", lambda: sp.ulysses_divergence(qq, kk, qq[:, :, -1:], kk, backend="reference", group=group))
    catch("cu_seqlens", lambda: sp.ulysses_divergence(qq, kk, qq[:, :, -1:], kk, cu_seqlens=torch.tensor([0, 3]),
                                                      group=group))
    # a bad input on one rank raises on every rank (instead of leaving the others in a collective)
    catch("one_rank", lambda: sp.ulysses_divergence(qq, kk, qq[:, :, -1:] if rank else torch.randn(1, 2, 9, 8), kk,
                                                    group=group))
    catch("lse_some", lambda: sp.context_parallel_divergence(qq, kk, qq[:, :, -1:], kk,
                                                             lse=torch.zeros(1, 2, 4) if rank == 0 else None,
                                                             group=group))
    return msgs


def _worker(rank: int, port: int, out: str):
    """4 processes: every layout on a group of the first 2 ranks (the others wait), then on
    all 4 (sequence-parallel groups other than the world are what trainers pass)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=max(WORLDS))
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor.experimental._context_parallel import _attention as cp

    cp._cp_options.enable_load_balance = True  # the head-tail layout of the ring
    cp._cp_options.convert_to_f32 = False  # float64 stays float64 (the reference)
    res = {}
    for world in WORLDS:
        group = dist.new_group(list(range(world)))  # collective: every rank creates every group
        mesh = DeviceMesh("cpu", list(range(world)))
        if rank < world:
            res[world] = {lay.name: _rank_run(lay, world, rank, mesh, group) for lay in LAYOUTS}
            res[world]["errors"] = _errors(world, rank, group)
        dist.barrier()
    torch.save(res, os.path.join(out, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


needs_gloo = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed gloo")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """``{world: [rank results]}`` for 2 and 4 processes (one spawn, every layout)."""
    out = tmp_path_factory.mktemp("sp")
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=max(WORLDS), join=True)
    saved = [torch.load(out / f"rank{r}.pt") for r in range(max(WORLDS))]
    return {world: [saved[r][world] for r in range(world)] for world in WORLDS}


@needs_gloo
@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("lay", LAYOUTS, ids=lambda lay: lay.name)
def test_ranks_match_one_process(ranks, world, lay):
    ref = _reference(lay, _problem(lay, world))
    rs = [r[lay.name] for r in ranks[world]]
    for rank, r in enumerate(rs):
        pos = r["pos"]
        for name in ("out", "dq", "dk", "dv"):
            assert_close(r[name], ref[name][:, :, pos], atol=1e-10, rtol=1e-9, name=f"rank {rank} {name}")
        assert_close(r["div"], ref["div"][..., pos], atol=1e-10, rtol=1e-9, name=f"rank {rank} div")
        for name in ("dwq", "dwk", "dwv"):
            assert_close(r[name], ref[name], atol=1e-10, rtol=1e-9, name=f"rank {rank} {name}")
    assert ref["div"].abs().max() > 1e-3 and ref["dwq"].abs().max() > 1e-3  # the checks can fail
    # every rank reached the divergence's collectives; the old-policy cache is split, not copied
    assert all(r["sent"].get("all_gather", 0) > 0 for r in rs)
    p = _problem(lay, world)
    whole = (p["resp"][0].sum().item() * lay.ho * lay.do + p["t"] * lay.hko * lay.do) * lay.b * 8
    assert sum(r["cache"] for r in rs) == whole
    kind = "reduce_scatter" if lay.mode == "ulysses" else "all_reduce"
    assert all(r["calls"].get(kind, 0) > 0 for r in rs)


@needs_gloo
def test_unexpressible_layouts_raise(ranks):
    for world in WORLDS:
        for e in (r["errors"] for r in ranks[world]):
            assert "degree" in e["heads"] and "3 heads" in e["heads"]
            assert "degree" in e["ulysses_heads"]
            assert "3 heads" in e["lse_heads"]
            assert "same number of tokens" in e["uneven"]
            assert "positions" in e["positions"]
            assert "q_old has 5 rows" in e["rows"]
            assert "reference" in e["reference"]
            assert "cu_seqlens" in e["cu_seqlens"]
            assert "lse is given on some ranks" in e["lse_some"]
        r0, *others = (r["errors"]["one_rank"] for r in ranks[world])
        assert "q_old has 9 rows" in r0
        assert all("rank(s) [0]" in e for e in others)


def test_needs_a_process_group(monkeypatch):
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(RuntimeError, match="process group"):
        sp.ulysses_divergence(q, q[:, :1], q[:, :, -1:], q[:, :1])


# --------------------------------------------------------------------------- one process: the decomposition

def _split_runs(t: int, cuts: list, bounds: list) -> list:
    """Key runs cut at ``cuts`` (as if the keys came from several shards)."""
    runs = []
    edges = sorted(set([0, t] + cuts + bounds))
    for a, e in zip(edges, edges[1:]):
        runs += sp._runs(torch.arange(a, e), bounds)
    for r in runs:  # indices into the key tensor = positions (one rank holding all keys)
        r[2] = r[0]
    return runs


_DECOMPOSED = [("causal", True, False, "mean", False), ("exclude_self-none", True, True, "none", False),
               ("full-exclude_self", False, True, "mean", False), ("packed", True, True, "mean", True)]


_CUDA_WHY_NOT = ral_kernels.backends.unavailable_reason("cuda", torch.device("cpu"), torch.float16)
_DTYPE = {"torch": torch.float64, "triton": torch.float32, "cuda": torch.float16}
_TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-4}


# Triton's interpreter and the CUDA emulator take seconds per case on a 2-core CPU: one
# case each (diagonal and full problems, the support's own sweep, packed sequences).
@pytest.mark.parametrize("backend,case", [("torch", c) for c in _DECOMPOSED] + [
    (b, _DECOMPOSED[-1]) for b in backends_under_test() if b != "torch"] + [
    pytest.param("cuda", _DECOMPOSED[-1], marks=pytest.mark.skipif(
        _CUDA_WHY_NOT is not None, reason=f"backend='cuda' cannot run here: {_CUDA_WHY_NOT}"))],
    ids=lambda x: x if isinstance(x, str) else x[0])
def test_decomposed_keys_match_the_op(backend, case, poison):
    """Keys cut into runs (as shards would hold them) and rows split across them: the
    divergence and its gradients equal the fused op's (dout = 0), on each backend; the
    kernels' outputs are NaN-poisoned before they run."""
    _, causal, exclude_self, head_reduction, packed = case
    dt = _DTYPE[backend]  # the reference: torch in float64 on the same (rounded) inputs
    g = torch.Generator().manual_seed(7)
    b, hq, hk, t, d, r = (1, 4, 2, 29, 16, 17) if packed else (2, 4, 2, 29, 16, 17)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dt).double()  # noqa: E731
    q, k = rnd(b, hq, t, d), rnd(b, hk, t, d)
    q_old, k_old = rnd(b, hq, r, d), rnd(b, hk, t, d)
    key_mask = None if packed else torch.rand(b, t, generator=g) > 0.2
    bounds = [0, 9, 20] if packed else [0]
    kw = dict(causal=causal, divergence="jsd", head_reduction=head_reduction, exclude_self=exclude_self)
    gd = torch.randn((b, t) if head_reduction == "mean" else (b, hq, t), generator=g, dtype=torch.float64)
    qr, kr = q.clone().requires_grad_(), k.clone().requires_grad_()
    if packed:
        cu = torch.tensor(bounds + [t], dtype=torch.int32)
        rows = torch.zeros(t, dtype=torch.bool)
        rows[t - r:] = True
        lens = [int(rows[s:e].sum()) for s, e in zip(cu.tolist(), cu.tolist()[1:])]
        cu_old = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
        tr = lambda z: z[0].transpose(0, 1)  # noqa: E731
        _, div = ral_kernels.fused_attn_kl_varlen(tr(qr), tr(kr), tr(kr.detach()), tr(q_old), tr(k_old), cu, cu,
                                                  cu_seqlens_old=cu_old, backend="torch", **kw)
        div = div[None] if div.dim() == 1 else div.transpose(0, 1)[None]
    else:
        _, div = ral_kernels.fused_attn_kl(qr, kr, kr.detach(), q_old, k_old, key_mask=key_mask, backend="torch", **kw)
    (div * gd).sum().backward()
    ref = (div.detach(), qr.grad, kr.grad)

    cfg = sp._config(q, q_old, sm_scale=None, old_sm_scale=None, **kw)
    row_runs = sp._runs(torch.arange(t - r, t), bounds)
    problems = tuple(sp._plan(row_runs, _split_runs(t, [5, 13, 14, 22], bounds), causal))
    assert len(problems) > 4
    spec = sp._Spec(ral_kernels.backends.kernel_set(backend), problems, cfg)
    qs, ks = q.to(dt).requires_grad_(), k.to(dt).requires_grad_()
    rows_q = qs[:, :, t - r:]
    div_rows = sp._Divergence.apply(rows_q, ks, q_old.to(dt), k_old.to(dt), None, None, None, key_mask, spec)
    div_full = torch.cat([div_rows.new_zeros(*div_rows.shape[:2], t - r), div_rows], 2)
    div_full = div_full[:, 0] if head_reduction == "mean" else div_full
    (div_full * gd.to(div_full.dtype)).sum().backward()
    tol = _TOL[dt]
    for name, a, e in zip(("div", "dq", "dk"), (div_full.detach(), qs.grad, ks.grad), ref):
        assert_close(a, e, atol=tol, rtol=tol, name=name)
    assert ref[1].abs().max() > 1e-3
