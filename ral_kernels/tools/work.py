"""Count the work the GPU passes execute, on a CPU: ``ral-bench work``.

The Triton backend runs in Triton's interpreter with a GPU's tile and SM count
(:func:`ral_kernels.backends.triton.launch.simulate_gpu`) while the interpreter's builder
is instrumented: every executed ``tl.dot`` adds ``2 M N K`` tensor-core FLOPs and every
``exp``/``exp2``/``log``/``log2`` adds its element count, attributed to the kernel that ran
it. The totals are set against FlashAttention-2's work for the same causal attention and
tiles (SPEC "cost model": per executed tile pair 2 matmuls and one exponential per element
forward, 5 matmuls and one per element backward). Masked elements count: a GPU executes
them too.

    ral-bench work --preset shape-A              # the preset, scaled down (--scale), head-mean JSD
    ral-bench work --seq-len 512 --heads 4:1 --head-dim 64 --div-rows 64 --divergence kl --head-reduction none
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import json
import math
import os
import subprocess
import sys
from typing import Optional

GPU_SMS = 132  # an H100 SXM: what the key splits of the divergence passes are sized for


@dataclasses.dataclass
class Counts:
    dot_flops: int = 0
    transcendental: int = 0
    launches: int = 0

    def add(self, other: "Counts") -> None:
        self.dot_flops += other.dot_flops
        self.transcendental += other.transcendental
        self.launches += other.launches


class WorkCounter:
    """Instruments Triton's interpreter while active: per-kernel :class:`Counts`."""

    def __init__(self):
        self.kernels: dict[str, Counts] = collections.defaultdict(Counts)
        self._current: list[str] = []

    @contextlib.contextmanager
    def active(self):
        from triton.runtime import interpreter as interp

        builder, fn_cls = interp.InterpreterBuilder, interp.InterpretedFunction
        saved = {name: getattr(builder, name) for name in ("create_dot", "create_exp", "create_exp2", "create_log",
                                                            "create_log2")}
        saved_run = fn_cls.run
        counter = self

        def count_dot(b, a, bb, d, *args):
            m, k = a.data.shape[-2:]
            n = bb.data.shape[-1]
            batch = math.prod(a.data.shape[:-2])
            counter._here().dot_flops += 2 * m * n * k * batch
            return saved["create_dot"](b, a, bb, d, *args)

        def transcendental(name):
            def fn(b, arg):
                counter._here().transcendental += int(arg.data.size)
                return saved[name](b, arg)
            return fn

        def run(fn_self, *args, **kwargs):
            counter._current.append(fn_self.fn.__name__)
            counter._here().launches += 1
            try:
                return saved_run(fn_self, *args, **kwargs)
            finally:
                counter._current.pop()

        builder.create_dot = count_dot
        for name in ("create_exp", "create_exp2", "create_log", "create_log2"):
            setattr(builder, name, transcendental(name))
        fn_cls.run = run
        try:
            yield self
        finally:
            for name, fn in saved.items():
                setattr(builder, name, fn)
            fn_cls.run = saved_run

    def _here(self) -> Counts:
        return self.kernels[self._current[-1] if self._current else "(outside a kernel)"]

    def total(self) -> Counts:
        tot = Counts()
        for c in self.kernels.values():
            tot.add(c)
        return tot


def causal_tile_pairs(tq: int, tk: int, block_m: int, block_n: int, causal: bool = True) -> int:
    """Tile pairs a flash kernel executes: per row block, the key blocks any of its rows sees."""
    pairs = 0
    for m0 in range(0, tq, block_m):
        end = min(tk, m0 + block_m + tk - tq) if causal else tk
        pairs += math.ceil(max(end, 0) / block_n)
    return pairs


def causal_elements(tq: int, tk: int, causal: bool = True) -> int:
    """Allowed (row, key) pairs of one head."""
    if not causal:
        return tq * tk
    return sum(max(0, min(tk, i + 1 + tk - tq)) for i in range(tq))


def fa2_work(b: int, hq: int, tq: int, tk: int, d: int, dv: int, block_m: int, block_n: int,
             causal: bool = True) -> dict:
    """FlashAttention-2's executed work for the same attention and tiles."""
    pairs = causal_tile_pairs(tq, tk, block_m, block_n, causal) * b * hq
    per_tile = block_m * block_n
    return dict(fwd_flops=pairs * 2 * per_tile * (d + dv), bwd_flops=pairs * 2 * per_tile * (3 * d + 2 * dv),
                fwd_transcendental=pairs * per_tile, bwd_transcendental=pairs * per_tile,
                causal_elements=causal_elements(tq, tk, causal) * b * hq)


@dataclasses.dataclass(frozen=True)
class WorkShape:
    batch: int = 1
    heads: int = 4
    kv_heads: int = 1
    seq_len: int = 512
    head_dim: int = 64
    div_rows: int = 64
    divergence: str = "jsd"
    head_reduction: str = "mean"
    exclude_self: bool = False
    lse_old: bool = True
    deterministic: bool = False
    block: int = 64


def measure(shape: WorkShape) -> dict:
    """Run forward and backward of the Triton backend once in the interpreter with the GPU
    tile ``shape.block`` and count each kernel's work. Needs ``TRITON_INTERPRET=1`` set
    before triton was imported (see :func:`run_in_interpreter`)."""
    import torch

    from ..backends.triton import kernels, launch
    from .. import fused_attn_kl, make_old_policy_cache

    if type(kernels._attn_fwd_kernel).__name__ != "InterpretedFunction":
        raise RuntimeError("the Triton kernels were imported without TRITON_INTERPRET=1; use run_in_interpreter()")
    s = shape
    g = torch.Generator().manual_seed(0)
    dt = torch.float16  # the interpreter's bf16 dot is wrong; the work is the same

    def rnd(*sh):
        return torch.randn(*sh, generator=g).to(dt)

    q, k, v = rnd(s.batch, s.heads, s.seq_len, s.head_dim), rnd(s.batch, s.kv_heads, s.seq_len, s.head_dim), \
        rnd(s.batch, s.kv_heads, s.seq_len, s.head_dim)
    q_old, k_old = rnd(s.batch, s.heads, s.div_rows, s.head_dim), rnd(s.batch, s.kv_heads, s.seq_len, s.head_dim)
    cache = make_old_policy_cache(q_old, k_old, with_lse=s.lse_old)
    q.requires_grad_(), k.requires_grad_(), v.requires_grad_()
    tile = launch.Tile(s.block, s.block, 4, 2)
    phases = {}
    with launch.simulate_gpu(tile, GPU_SMS):
        fwd = WorkCounter()
        with fwd.active():
            out, div = fused_attn_kl(q, k, v, **cache.as_kwargs(), divergence=s.divergence,
                                     head_reduction=s.head_reduction, exclude_self=s.exclude_self,
                                     deterministic=s.deterministic, backend="triton")
        loss = out.float().square().sum() + div.sum()
        bwd = WorkCounter()
        with bwd.active():
            loss.backward()
    phases = {"fwd": fwd, "bwd": bwd}
    ref = fa2_work(s.batch, s.heads, s.seq_len, s.seq_len, s.head_dim, s.head_dim, s.block, s.block)
    rows = sum(max(0, min(s.seq_len, i + 1)) for i in range(s.seq_len - s.div_rows, s.seq_len))
    rho = rows / causal_elements(s.seq_len, s.seq_len)
    report = {"shape": dataclasses.asdict(s), "rho": rho, "fa2": ref, "kernels": {}}
    for phase, counter in phases.items():
        for name, c in sorted(counter.kernels.items()):
            report["kernels"][f"{phase}:{name}"] = dataclasses.asdict(c)
        tot = counter.total()
        report[phase] = dict(dot_flops=tot.dot_flops, transcendental=tot.transcendental,
                             flops_vs_fa2=tot.dot_flops / ref[f"{phase}_flops"])
    tot_flops = report["fwd"]["dot_flops"] + report["bwd"]["dot_flops"]
    tot_tr = report["fwd"]["transcendental"] + report["bwd"]["transcendental"]
    report["fwd+bwd"] = dict(flops_vs_fa2=tot_flops / (ref["fwd_flops"] + ref["bwd_flops"]),
                             transcendental_per_causal_element=tot_tr / ref["causal_elements"],
                             fa2_transcendental_per_causal_element=(ref["fwd_transcendental"] +
                                                                   ref["bwd_transcendental"]) / ref["causal_elements"],
                             transcendental_vs_fa2=tot_tr / (ref["fwd_transcendental"] + ref["bwd_transcendental"]))
    return report


def run_in_interpreter(shape: WorkShape) -> dict:
    """:func:`measure` in a fresh process with ``TRITON_INTERPRET=1`` (the interpreter must
    be chosen before triton is imported)."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    code = ("import json, sys; from ral_kernels.tools.work import WorkShape, measure; "
            "print(json.dumps(measure(WorkShape(**json.loads(sys.argv[1])))))")
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(dataclasses.asdict(shape))], env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"the work count failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# The presets of ral-bench (benchmarks of the same names), scaled down for the interpreter:
# T / scale with the same share of divergence rows, so rho and the tile structure match.
PRESET_CASES = {
    "shape-A": [dict(heads=28, kv_heads=4, head_dim=128, seq_len=8192, div_rows=1024, divergence="jsd",
                     head_reduction="mean")],
    "shape-B": [dict(heads=32, kv_heads=8, head_dim=128, seq_len=8192, div_rows=8192, divergence="kl",
                     head_reduction="none"),
                dict(heads=32, kv_heads=8, head_dim=128, seq_len=8192, div_rows=8192, divergence="jsd",
                     head_reduction="mean")],
}
# SPEC's work budget, against FA2's work with the same tiles (issue 11). exp+log is bounded
# as a ratio, 1.5x FA2's ("3 against its 2" per causal element and head at full size): at
# the scaled-down sizes the masked diagonal tiles are a larger share of both counts.
GOALS = {
    ("shape-A", "jsd", "mean"): {"fwd+bwd": 1.3, "transcendental": 1.5},
    ("shape-B", "kl", "none"): {"fwd": 1.6, "bwd": 1.8},
    ("shape-B", "jsd", "mean"): {"fwd+bwd": 2.2},
}


def preset_shapes(preset: str, scale: int, heads: Optional[tuple[int, int]] = None, **overrides) -> list[WorkShape]:
    if preset not in PRESET_CASES:
        raise ValueError(f"unknown preset {preset!r}; valid: {', '.join(PRESET_CASES)}")
    out = []
    for case in PRESET_CASES[preset]:
        case = dict(case, seq_len=case["seq_len"] // scale, div_rows=max(1, case["div_rows"] // scale))
        if heads:
            case["heads"], case["kv_heads"] = heads
        out.append(WorkShape(**{**case, **overrides}))
    return out


def format_report(rep: dict, goal: Optional[dict] = None) -> str:
    s = rep["shape"]
    lines = [f"B={s['batch']} Hq={s['heads']} Hk={s['kv_heads']} T={s['seq_len']} D={s['head_dim']} "
             f"divergence rows={s['div_rows']} (rho={rep['rho']:.3f}) {s['divergence']}/{s['head_reduction']} "
             f"tile {s['block']}x{s['block']}{' deterministic' if s['deterministic'] else ''}",
             f"{'kernel':<40} {'launches':>8} {'dot GFLOP':>10} {'exp+log (M)':>12}"]
    for name, c in rep["kernels"].items():
        lines.append(f"{name:<40} {c['launches']:>8} {c['dot_flops'] / 1e9:>10.3f} {c['transcendental'] / 1e6:>12.3f}")
    fb = rep["fwd+bwd"]
    lines.append(f"vs FlashAttention-2 (same tiles): fwd {rep['fwd']['flops_vs_fa2']:.2f}x, bwd "
                 f"{rep['bwd']['flops_vs_fa2']:.2f}x, fwd+bwd {fb['flops_vs_fa2']:.2f}x; exp+log per causal "
                 f"element and head {fb['transcendental_per_causal_element']:.2f} (FA2 "
                 f"{fb['fa2_transcendental_per_causal_element']:.2f}, {fb['transcendental_vs_fa2']:.2f}x)")
    if goal:
        lines.append("goal (x FA2): " + ", ".join(f"{k} <= {v}" for k, v in goal.items()))
    return "\n".join(lines)


def check_goal(rep: dict, goal: dict) -> list[str]:
    """Which goals a report misses (empty: all met)."""
    misses = []
    for key, bound in goal.items():
        if key == "transcendental":
            got = rep["fwd+bwd"]["transcendental_vs_fa2"]
        else:
            got = rep[key]["flops_vs_fa2"]
        if got > bound:
            misses.append(f"{key}: {got:.3f} > {bound}")
    return misses


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="ral-bench work", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESET_CASES), help="shape-A or shape-B, scaled down by --scale")
    p.add_argument("--scale", type=int, default=16, help="divide the preset's sequence length and divergence "
                                                        "rows by this (default %(default)s)")
    p.add_argument("--heads", help="HQ:HK (default: the preset's, or 4:1)")
    p.add_argument("--seq-len", type=int)
    p.add_argument("--head-dim", type=int)
    p.add_argument("--div-rows", type=int)
    p.add_argument("--divergence", choices=("jsd", "kl", "reverse_kl"))
    p.add_argument("--head-reduction", choices=("mean", "none"))
    p.add_argument("--exclude-self", action="store_true")
    p.add_argument("--no-lse-old", action="store_true", help="no cached lse_old: the old statistics pass runs")
    p.add_argument("--deterministic", action="store_true")
    p.add_argument("--block", type=int, default=64, help="tile size (default %(default)s)")
    p.add_argument("--json", help="also write the reports to this file")
    args = p.parse_args(argv)
    heads = None
    if args.heads:
        hq, hk = (int(x) for x in args.heads.split(":"))
        heads = (hq, hk)
    common = dict(exclude_self=args.exclude_self, lse_old=not args.no_lse_old, deterministic=args.deterministic,
                  block=args.block)
    manual = {k: v for k, v in dict(seq_len=args.seq_len, head_dim=args.head_dim, div_rows=args.div_rows,
                                     divergence=args.divergence, head_reduction=args.head_reduction).items()
              if v is not None}
    if args.preset:
        shapes = preset_shapes(args.preset, args.scale, heads, **common, **manual)
    else:
        hq, hk = heads or (4, 1)
        shapes = [WorkShape(heads=hq, kv_heads=hk, **common, **manual)]
    reports, missed = [], 0
    for shape in shapes:
        rep = run_in_interpreter(shape)
        goal = GOALS.get((args.preset, shape.divergence, shape.head_reduction)) if args.preset else None
        print(format_report(rep, goal), flush=True)
        if goal:
            misses = check_goal(rep, goal)
            missed += bool(misses)
            print("goal met" if not misses else "goal missed: " + "; ".join(misses), flush=True)
        print()
        reports.append(rep)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(reports, f, indent=1)
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
