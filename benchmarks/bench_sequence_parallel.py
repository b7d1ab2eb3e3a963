"""Communication and memory per rank of the divergence under sequence parallelism.

Runs ``ral_kernels.sequence_parallel.ulysses_divergence`` and
``context_parallel_divergence`` (torch's head-tail load-balanced shards) forward and
backward on ``P`` gloo processes and records, per rank, every collective they issue
(``count_communication``: payload and the bytes the ring algorithm sends), the old-policy
cache each rank keeps and the wall time (in the JSON only: on a shared CPU it says little),
against the single-process cache ``(R·Hq + T·Hk)·D`` elements. One patched layer, one micro-batch: multiply by the patched layers
(one, RAL's last layer) and the micro-batches of a step.

    python benchmarks/bench_sequence_parallel.py --out benchmarks/results/sequence_parallel
    python benchmarks/bench_sequence_parallel.py --world 2 4 8 --tokens 8192 --rows 1024
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import subprocess
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _problem(a, dtype):
    g = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    q, k = rnd(1, a.heads, a.tokens, a.head_dim), rnd(1, a.kv_heads, a.tokens, a.head_dim)
    q_old = q + 0.1 * rnd(*q.shape)
    k_old = k + 0.1 * rnd(*k.shape)
    gd = torch.randn(1, a.tokens, generator=g)
    return q, k, q_old, k_old, gd


def _worker(rank, world, port, a, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.experimental._context_parallel._attention import _context_parallel_shard
    from torch.distributed.tensor.experimental._context_parallel._load_balancer import _HeadTailLoadBalancer

    from ral_kernels import sequence_parallel as sp

    dtype = getattr(torch, a.dtype)
    q, k, q_old, k_old, gd = _problem(a, dtype)
    t, r = a.tokens, a.rows
    mesh = init_device_mesh("cpu", (world,))
    lb = _HeadTailLoadBalancer(t, world, torch.device("cpu"))
    res = {}
    for mode in ("ulysses", "context_parallel"):
        if mode == "ulysses":
            n = t // world
            pos = torch.arange(rank * n, (rank + 1) * n)
        else:
            pos = _context_parallel_shard(mesh, [torch.arange(t)[None]], [1], load_balancer=lb)[0][0]
        rows = (pos >= t - r).nonzero().flatten()
        ql, kl = q[:, :, pos].clone().requires_grad_(), k[:, :, pos].clone().requires_grad_()
        qo, ko = q_old[:, :, pos[rows]], k_old[:, :, pos]
        fn = sp.ulysses_divergence if mode == "ulysses" else sp.context_parallel_divergence
        kw = {} if mode == "ulysses" else {"positions": pos}
        dist.barrier()
        t0 = time.perf_counter()
        with sp.count_communication() as log:
            div = fn(ql, kl, qo, ko, old_rows=rows, backend="torch", **kw)
            (div * gd[:, pos]).sum().backward()
        res[mode] = {"sent": log.sent, "payload": log.payload, "calls": log.calls, "seconds": time.perf_counter() - t0,
                     "cache": sum(x.numel() * x.element_size() for x in (qo, ko))}
    all_res = [None] * world
    dist.all_gather_object(all_res, res)
    if rank == 0:
        Path(out).write_text(json.dumps(all_res))
    dist.barrier()
    dist.destroy_process_group()


def _mib(x: float) -> str:
    return f"{x / 2**20:.2f}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--world", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--tokens", type=int, default=4096, help="sequence length T")
    ap.add_argument("--rows", type=int, default=512, help="response rows R (the last R)")
    ap.add_argument("--heads", type=int, default=28)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--out", type=Path, default=None, help="write sequence_parallel.md / .json here")
    a = ap.parse_args(argv)
    el = torch.finfo(getattr(torch, a.dtype)).bits // 8
    k_bytes = a.tokens * a.kv_heads * a.head_dim * el  # one layer's keys
    single_cache = (a.rows * a.heads + a.tokens * a.kv_heads) * a.head_dim * el
    lines = [
        f"Divergence of one patched layer, forward + backward, per rank (gloo, CPU, torch backend): B=1, "
        f"T={a.tokens}, R={a.rows} response rows, Hq={a.heads}, Hk={a.kv_heads}, D={a.head_dim}, {a.dtype}; "
        f"one layer's keys `T·Hk·D` = {_mib(k_bytes)} MiB; single-process old-policy cache {_mib(single_cache)} MiB. "
        f"Sent: bytes this rank sends under the ring algorithm (max over ranks), per collective kind. "
        f"`python benchmarks/bench_sequence_parallel.py --world {' '.join(map(str, a.world))} --tokens {a.tokens} "
        f"--rows {a.rows}` · commit {_commit()} · {datetime.date.today()}",
        "",
        "| P | mode | all-gather MiB | broadcast MiB | reduce-scatter MiB | reduce MiB | all-reduce MiB "
        "| total sent MiB | ÷ `T·Hk·D` | old-policy cache per rank MiB (max / mean) | ÷ single-process |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    raw = {}
    for world in a.world:
        if a.tokens % (2 * world):
            raise SystemExit(f"--tokens must be a multiple of 2 x world size ({2 * world}) for the head-tail shards")
        out = Path(os.environ.get("TMPDIR", "/tmp")) / f"ral_sp_bench_{os.getpid()}_{world}.json"
        mp.spawn(_worker, args=(world, _port(), a, str(out)), nprocs=world, join=True)
        ranks = json.loads(out.read_text())
        out.unlink()
        raw[world] = ranks
        for mode in ("ulysses", "context_parallel"):
            rs = [r[mode] for r in ranks]
            kinds = ("all_gather", "broadcast", "reduce_scatter", "reduce", "all_reduce")
            sent = {kd: max(r["sent"].get(kd, 0) for r in rs) for kd in kinds}
            total = max(sum(r["sent"].values()) for r in rs)
            cache = [r["cache"] for r in rs]
            lines.append(f"| {world} | {mode} | " + " | ".join(_mib(sent[kd]) for kd in kinds) +
                         f" | {_mib(total)} | {total / k_bytes:.2f} | {_mib(max(cache))} / {_mib(sum(cache) / world)} "
                         f"| {max(cache) / single_cache:.2f} / {sum(cache) / world / single_cache:.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out is not None:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "sequence_parallel.md").write_text(text)
        (a.out / "sequence_parallel.json").write_text(json.dumps({"args": vars(a) | {"out": str(a.out)}, "ranks": raw},
                                                                 indent=1))


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


if __name__ == "__main__":
    main()
