"""``ral-bench``: speed and peak memory of ``fused_attn_kl`` providers side by side.

    ral-bench --quick                                   # CPU, under 5 minutes
    ral-bench --preset shape-A --out benchmarks/results/h100
    ral-bench --preset cpu-sweep --providers torch,eager,sdpa --modes full --seq-lens 1024 4096
    ral-bench table benchmarks/results/cpu-quick/fused_attn_kl.csv [--update README.md]
    ral-bench plot benchmarks/results/cpu-quick/fused_attn_kl.csv --out benchmarks/results/cpu-quick
    ral-bench list                                      # presets, providers (and why some cannot run), modes
    ral-bench work --preset shape-A                     # executed GPU work (interpreter) against FlashAttention-2
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from .._semantics import DIVERGENCES, HEAD_REDUCTIONS
from ..tools.version import add_version_option
from . import harness
from .config import DTYPES, MODES, PRESETS, get_preset, parse_dtype, parse_heads, parse_mode
from .providers import PROVIDERS

COMMANDS = ("run", "plot", "table", "list", "work")


def _split(values) -> list[str]:
    """``["a,b", "c"]`` -> ``["a", "b", "c"]`` (comma- and space-separated lists both work)."""
    out = []
    for v in values or []:
        out += [x for x in str(v).split(",") if x.strip()]
    return [x.strip() for x in out]


def _choices(values, valid, what: str) -> list[str]:
    """Split ``values`` and check each is one of ``valid`` (ValueError naming them)."""
    vals = _split(values)
    bad = [v for v in vals if v not in valid]
    if bad:
        raise ValueError(f"unknown {what} {bad[0]!r}; valid: {', '.join(valid)}")
    return vals


def _run_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ral-bench", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Speed and peak memory of fused_attn_kl providers (eager, eager_compiled, the ral_kernels "
                    "backends, SDPA, flash-attn) in forward / backward / full mode.",
        epilog="other commands: ral-bench table CSV | ral-bench plot CSV --out DIR | ral-bench list | "
               "ral-bench work --preset shape-A\n\n"
               f"presets: {', '.join(PRESETS)}\nproviders: {', '.join(PROVIDERS)}\nmodes: {', '.join(MODES)}")
    add_version_option(p)
    p.add_argument("--quick", action="store_true", help="the cpu-quick preset (CPU, under 5 minutes on 2 cores)")
    p.add_argument("--preset", help=f"one of: {', '.join(PRESETS)} (default: cpu-quick, or gpu-sweep with CUDA)")
    p.add_argument("--providers", nargs="+", help="subset of providers (default: all; unavailable ones are "
                                                  "reported as skipped)")
    p.add_argument("--modes", nargs="+", help=f"subset of {', '.join(MODES)} (also fwd, bwd, fwd+bwd)")
    p.add_argument("--out", help="output folder (default: ral_out/bench/PRESET); rows are appended to "
                                 f"{harness.CSV_NAME} there, and the markdown table is rewritten")
    p.add_argument("--device", help="cpu or cuda (default: the preset's)")
    g = p.add_argument_group("sweep overrides (each replaces the preset's axis)")
    g.add_argument("--seq-lens", nargs="+", type=int, metavar="T")
    g.add_argument("--batch", nargs="+", type=int, metavar="B")
    g.add_argument("--heads", nargs="+", metavar="HQ:HK", help="query:KV heads pairs, e.g. 28:4 32:8")
    g.add_argument("--head-dims", nargs="+", type=int, metavar="D")
    g.add_argument("--div-fracs", nargs="+", type=float, metavar="F",
                   help="fraction of rows (the last ones) carrying a divergence, in (0, 1]")
    g.add_argument("--div-rows", nargs="+", type=int, metavar="R", help="number of (last) divergence rows")
    g.add_argument("--divergences", nargs="+", metavar="NAME", help=f"of {', '.join(DIVERGENCES)}")
    g.add_argument("--head-reductions", nargs="+", metavar="NAME", help=f"of {', '.join(HEAD_REDUCTIONS)}")
    g.add_argument("--dtype", help=f"one of {', '.join(DTYPES)} (also bf16, fp16, fp32)")
    m = p.add_argument_group("measurement")
    m.add_argument("--repeats", type=int, help="CPU timed runs per mode after the warm-up (default: the preset's)")
    m.add_argument("--isolation", choices=("process", "none"),
                   help="process: measure in fresh worker processes (CPU default; needed for honest CPU peak "
                        "memory); none: in this process (CUDA default)")
    m.add_argument("--max-memory-gb", type=float,
                   help="skip a dense provider (eager, eager_compiled, reference) whose estimated footprint "
                        "exceeds this (CPU default: 70%% of available memory)")
    m.add_argument("--min-time-ms", type=float, default=harness.CPU_MIN_TIME_MS,
                   help="CPU: repeat a short call until its timed runs add up to this (default %(default)s)")
    m.add_argument("--threads", type=int, help="torch CPU threads in the measuring process (default: torch's, "
                                               "one per core); recorded in the CSV")
    m.add_argument("--no-progress", action="store_true", help="no progress bar")
    m.add_argument("--plot", action="store_true", help="also write the PNGs (needs matplotlib)")
    return p


def _overrides(args, p) -> dict:
    o = {}
    try:
        if args.seq_lens:
            o["seq_len"] = args.seq_lens
        if args.batch:
            o["batch"] = args.batch
        if args.heads:
            o[("heads", "kv_heads")] = parse_heads(_split(args.heads))
        if args.head_dims:
            o["head_dim"] = args.head_dims
        if args.div_fracs and args.div_rows:
            raise ValueError("give --div-fracs or --div-rows, not both")
        if args.div_fracs:
            o["div_frac"] = args.div_fracs
        if args.div_rows:
            o["div_rows"] = args.div_rows
        if args.divergences:
            o["divergence"] = _choices(args.divergences, DIVERGENCES, "divergence")
        if args.head_reductions:
            o["head_reduction"] = _choices(args.head_reductions, HEAD_REDUCTIONS, "head reduction")
        if args.dtype:
            o["dtype"] = [parse_dtype(args.dtype)]
    except ValueError as e:
        p.error(str(e))
    return o


def cmd_run(argv) -> int:
    p = _run_parser()
    args = p.parse_args(argv)
    if args.quick and args.preset not in (None, "cpu-quick"):
        p.error(f"--quick is the cpu-quick preset; it cannot be combined with --preset {args.preset}")
    name = "cpu-quick" if args.quick else args.preset
    if name is None:
        name = "gpu-sweep" if torch.cuda.is_available() else "cpu-quick"
    try:
        preset = get_preset(name)
        providers = _split(args.providers) or list(PROVIDERS)
        for prov in providers:
            if prov not in PROVIDERS:
                raise ValueError(f"unknown provider {prov!r}; valid: {', '.join(PROVIDERS)}")
        providers = list(dict.fromkeys(providers))
        modes = list(dict.fromkeys(parse_mode(m) for m in _split(args.modes))) or list(MODES)
    except ValueError as e:
        p.error(str(e))
    device = args.device or preset.device
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        p.error(f"unknown device {device!r}; valid: cpu, cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        hint = ("use --quick or a CPU preset (cpu-quick, cpu-sweep, cpu-axes), or --device cpu with small "
                "--seq-lens")
        p.error(f"preset {name!r} runs on CUDA, but CUDA is not available here; {hint}" if not args.device
                else f"--device {device}: CUDA is not available here; {hint}")
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads must be at least 1, got {args.threads}")
    if args.repeats is not None and args.repeats < 1:
        p.error(f"--repeats must be at least 1, got {args.repeats}")
    if any(t <= 0 for t in args.seq_lens or []):
        p.error(f"--seq-lens must be positive, got {args.seq_lens}")
    try:
        shapes = preset.shapes(_overrides(args, p))
    except ValueError as e:
        p.error(str(e))
    isolation = args.isolation or ("process" if device == "cpu" else "none")
    out_dir = args.out or os.path.join("ral_out", "bench", name)
    csv_path = os.path.join(out_dir, harness.CSV_NAME)
    limit = None if args.max_memory_gb is None else args.max_memory_gb * 1024

    print(f"ral-bench: preset {name} ({preset.description}) on {harness.device_name(device)}\n"
          f"  {len(shapes)} shape(s) x {len(providers)} provider(s) x modes {', '.join(modes)}; "
          f"results -> {csv_path}", flush=True)
    t0 = time.time()
    rows = harness.run(shapes, providers, modes, device, isolation=isolation,
                       repeats=args.repeats or preset.repeats, compile_dynamic=preset.compile_dynamic,
                       memory_limit_mb=limit, preset=name, progress=not args.no_progress,
                       min_time_ms=args.min_time_ms, threads=args.threads)
    harness.append_csv(csv_path, rows)
    from . import report

    table = report.markdown(harness.read_csv(csv_path))
    with open(os.path.join(out_dir, "fused_attn_kl.md"), "w") as f:
        f.write(table)
    print("\n" + table)
    if args.plot:
        try:
            for path in report.plot(harness.read_csv(csv_path), out_dir):
                print(f"wrote {path}")
        except ImportError as e:
            print(f"no plots: matplotlib is not installed (pip install 'ral_kernels[bench]'): {e}")
    errors = [r for r in rows if r["status"].startswith("error")]
    print(f"{len(rows)} rows in {time.time() - t0:.0f} s -> {csv_path}"
          + (f"; {len(errors)} row(s) failed with an error" if errors else ""))
    return 1 if errors else 0


def cmd_table(argv) -> int:
    p = argparse.ArgumentParser(prog="ral-bench table", description="Print a results CSV as a markdown table.")
    p.add_argument("csv")
    p.add_argument("--modes", nargs="+", help=f"modes to show (of {', '.join(MODES)})")
    p.add_argument("--out", help="also write the table to this file")
    p.add_argument("--update", metavar="README",
                   help="put the table into this file between the '<!-- ral-bench table: begin/end -->' markers "
                        "(or in place of a BENCH_TABLE_PLACEHOLDER line)")
    args = p.parse_args(argv)
    from . import report

    try:
        modes = [parse_mode(m) for m in _split(args.modes)] or None
        text = report.markdown(harness.read_csv(args.csv), modes)
        if args.update:
            report.update_file(args.update, text, os.path.relpath(args.csv))
    except (ValueError, FileNotFoundError) as e:
        p.error(str(e))
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    print(text, end="")
    return 0


def cmd_plot(argv) -> int:
    p = argparse.ArgumentParser(prog="ral-bench plot",
                                description="PNGs of time and peak memory vs sequence length per provider and mode.")
    p.add_argument("csv")
    p.add_argument("--out", help="output folder (default: the CSV's folder)")
    args = p.parse_args(argv)
    from . import report

    try:
        rows = harness.read_csv(args.csv)
    except (ValueError, FileNotFoundError) as e:
        p.error(str(e))
    try:
        paths = report.plot(rows, args.out or os.path.dirname(os.path.abspath(args.csv)))
    except ImportError as e:
        p.error(f"plotting needs matplotlib (pip install 'ral_kernels[bench]'): {e}")
    for path in paths:
        print(f"wrote {path}")
    return 0


def cmd_list(argv) -> int:
    argparse.ArgumentParser(prog="ral-bench list", description="Presets, providers and modes.").parse_args(argv)
    print("presets:")
    for pr in PRESETS.values():
        print(f"  {pr.name:<16} [{pr.device}] {pr.description}")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print("providers:")
    for prov in PROVIDERS.values():
        state = "; ".join(f"{d}: " + (prov.unavailable(d) or "available") for d in devices)
        print(f"  {prov.name:<16} {prov.description} — {state}")
    print(f"modes: {', '.join(MODES)}")
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cmd = argv.pop(0) if argv and argv[0] in COMMANDS else "run"
    return {"run": cmd_run, "plot": cmd_plot, "table": cmd_table, "list": cmd_list, "work": cmd_work}[cmd](argv)


def cmd_work(argv) -> int:
    """Count the GPU passes' executed work on the CPU (Triton's interpreter) against FA2's."""
    from ..tools import work

    return work.main(argv)


if __name__ == "__main__":
    sys.exit(main())
