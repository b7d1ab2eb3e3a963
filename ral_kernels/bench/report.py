"""Turn a results CSV into a markdown table (``ral-bench table``) and PNGs (``ral-bench plot``).

Rows are grouped by device and shape (every shape column but ``seq_len``); within a group
one table row per (seq_len, provider). matplotlib is imported only inside :func:`plot`.
"""

from __future__ import annotations

import os
import re
from typing import Optional, Sequence

from .config import MODES
from .providers import PROVIDERS

_MODE_LABEL = {"forward": "fwd", "backward": "bwd", "full": "fwd+bwd"}
_GROUP_COLUMNS = ["device", "threads", "batch", "heads", "kv_heads", "head_dim", "div_spec", "divergence",
                  "head_reduction",
                  "dtype", "causal"]
_ORDER = {name: i for i, name in enumerate(PROVIDERS)}


def _group_key(r: dict) -> tuple:
    return tuple(r.get(c) for c in _GROUP_COLUMNS)


def groups(rows: Sequence[dict]) -> list[tuple[tuple, list[dict]]]:
    out: dict = {}
    for r in rows:
        out.setdefault(_group_key(r), []).append(r)
    return list(out.items())


def describe(r: dict) -> str:
    rows = r.get("div_spec") or "?"
    rows = "all rows" if rows == "all" else f"divergence rows: {rows}"
    if rows.startswith("divergence rows: last 0."):
        rows = f"divergence rows: last {float(r['div_spec'].split()[1]):.3g} of T"
    red = "head mean" if r.get("head_reduction") == "mean" else "per head"
    return (f"B={r.get('batch')}, Hq={r.get('heads')}, Hk={r.get('kv_heads')}, D={r.get('head_dim')}, {rows}, "
            f"{r.get('divergence')} ({red}), {r.get('dtype')}, "
            f"{'causal' if str(r.get('causal')) == 'True' else 'full'}")


def slug(r: dict) -> str:
    text = (f"B{r.get('batch')}-H{r.get('heads')}-K{r.get('kv_heads')}-D{r.get('head_dim')}-"
            f"{str(r.get('div_spec')).replace('last ', 'R')}-{r.get('divergence')}-{r.get('head_reduction')}-"
            f"{r.get('dtype')}")
    return re.sub(r"[^A-Za-z0-9.+_-]+", "_", text)


def _ms(r: Optional[dict]) -> str:
    if r is None:
        return ""
    if r["status"] != "ok":
        return "OOM" if r["status"].startswith("OOM") else r["status"].split(":")[0]
    return "-" if r.get("median_ms") is None else _t(r["median_ms"])


def _t(x: float, digits: int = 4) -> str:
    """Milliseconds: 4 significant digits, no exponent."""
    return f"{x:.0f}" if x >= 10 ** (digits - 1) else f"{x:.{digits}g}"


def _spread(r: Optional[dict]) -> str:
    if r is None or r["status"] != "ok" or r.get("p20_ms") is None or r.get("p80_ms") is None:
        return ""
    return f"[{_t(r['p20_ms'], 3)}, {_t(r['p80_ms'], 3)}]"


def _num(x: Optional[float], digits: int = 3, suffix: str = "") -> str:
    return "" if x is None else f"{x:.{digits}g}{suffix}"


def markdown(rows: Sequence[dict], modes: Optional[Sequence[str]] = None) -> str:
    """A markdown report: per group a header naming device, versions, commit and date, a
    table with each mode's median time and, for the main mode (``full`` when present),
    TFLOP/s, peak memory and the ratios to SDPA and eager, then skip reasons and checks."""
    if not rows:
        return "(no rows)\n"
    present = [m for m in MODES if any(r["mode"] == m for r in rows)]
    wanted = list(modes or present)
    modes = [m for m in wanted if m in present]
    if not modes:
        raise ValueError(f"no rows with modes {wanted}; the file has {present}")
    main = "full" if "full" in modes else modes[0]
    lab = _MODE_LABEL[main]
    out = []
    for _, grp in groups(rows):
        first = grp[0]
        dates = sorted({str(r.get("time", ""))[:10] for r in grp if r.get("time")})
        commits = sorted({str(r.get("commit")) for r in grp if r.get("commit")})
        tv = sorted({str(r.get("torch_version")) for r in grp if r.get("torch_version")})
        trv = sorted({str(r.get("triton_version")) for r in grp if r.get("triton_version")})
        threads = f" · {first['threads']} thread{'s' if first['threads'] != 1 else ''}" if first.get("threads") else ""
        out.append(f"**{first.get('device')}**{threads} · torch {', '.join(tv)}"
                   + (f" · triton {', '.join(trv)}" if trv else "")
                   + f" · commit {', '.join(commits)} · {', '.join(dates)}  ")
        out.append(f"{describe(first)}; times are medians in ms (TFLOP/s and ratios for {lab}; "
                   "ratios are provider ÷ baseline, below 1 is better)\n")
        header = (["T", "provider"] + [f"{_MODE_LABEL[m]} ms" for m in modes]
                  + [f"{lab} [p20, p80]", f"{lab} TFLOP/s", f"{lab} peak MiB", "time ÷ SDPA", "time ÷ eager",
                     "memory ÷ SDPA", "memory ÷ eager"])
        out.append("| " + " | ".join(header) + " |")
        out.append("|" + "|".join("---:" if i != 1 else "---" for i in range(len(header))) + "|")
        index = {(r["provider"], r["seq_len"], r["mode"]): r for r in grp}
        provs = sorted({r["provider"] for r in grp}, key=lambda p: _ORDER.get(p, 99))
        skipped = {}
        for t in sorted({r["seq_len"] for r in grp}):
            for p in provs:
                rs = [index.get((p, t, m)) for m in modes]
                if all(r is None for r in rs):
                    continue
                m = index.get((p, t, main))
                if all(r is not None and r["status"].startswith("skipped") for r in rs):
                    skipped.setdefault(p, rs[0]["status"])
                    continue
                ok = m is not None and m["status"] == "ok"
                cells = [str(t), p] + [_ms(r) for r in rs] + [
                    _spread(m), _num(m.get("tflops")) if ok else "",
                    _num(m.get("peak_memory_mb"), 4) if ok else "",
                    _num(m.get("time_vs_sdpa"), 3, "×") if ok else "",
                    _num(m.get("time_vs_eager"), 3, "×") if ok else "",
                    _num(m.get("memory_vs_sdpa"), 3, "×") if ok else "",
                    _num(m.get("memory_vs_eager"), 3, "×") if ok else ""]
                out.append("| " + " | ".join(cells) + " |")
        notes = [f"- `{p}` {s}" for p, s in skipped.items()]
        others = sorted({(r["provider"], r["status"]) for r in grp
                         if r["status"] not in ("ok", "OOM") and not r["status"].startswith("skipped")})
        notes += [f"- `{p}`: {s}" for p, s in others]
        if notes:
            out.append("\nNot measured here:\n" + "\n".join(notes))
        checks = _checks(grp, main)
        if checks:
            out.append("\nAt a glance:\n" + "\n".join(checks))
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def _checks(grp: Sequence[dict], main: str) -> list[str]:
    """The fused providers against eager and SDPA at the largest T each ran, and the
    lengths where a fused provider ran but eager did not."""
    lines = []
    ok = {(r["provider"], r["seq_len"]): r for r in grp if r["mode"] == main and r["status"] == "ok"}
    eager = {r["seq_len"]: r for r in grp if r["mode"] == main and r["provider"] == "eager"}
    fused = [p for p in sorted({r["provider"] for r in grp}, key=lambda p: _ORDER.get(p, 99))
             if PROVIDERS.get(p) is not None and PROVIDERS[p].kind == "fused" and p != "reference"]
    for p in fused:
        ts = sorted(t for (q, t) in ok if q == p)
        if not ts:
            continue
        both = [t for t in ts if t in eager and eager[t]["status"] == "ok"]
        if both:
            r = ok[(p, both[-1])]
            mem = r.get("memory_vs_eager")
            parts = [f"memory {_num(mem, 3, '×')} eager" + (f" ({'≤' if mem <= 0.25 else '>'} ¼)" if mem else ""),
                     f"time {_num(r.get('time_vs_eager'), 3, '×')} eager"]
            tv = r.get("time_vs_eager")
            if tv:
                parts[-1] += f" ({1 / tv:.3g}× faster)" if tv < 1 else f" ({tv:.3g}× slower)"
            if r.get("time_vs_sdpa") is not None:
                parts.append(f"time {_num(r['time_vs_sdpa'], 3, '×')} SDPA")
            lines.append(f"- `{p}` at T={both[-1]} ({_MODE_LABEL[main]}): " + ", ".join(parts))
        beyond = [t for t in ts if t in eager and eager[t]["status"] != "ok"]
        if beyond:
            lines.append(f"- `{p}` runs at T={', '.join(map(str, beyond))} where eager does not "
                         f"({eager[beyond[-1]]['status'].split(':')[0]})")
    return lines


def plot(rows: Sequence[dict], out_dir: str) -> list[str]:
    """PNGs of median time and peak memory versus sequence length, one line per provider
    and one panel per mode, per group; returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for _, grp in groups(rows):
        modes = [m for m in MODES if any(r["mode"] == m for r in grp)]
        provs = sorted({r["provider"] for r in grp}, key=lambda p: _ORDER.get(p, 99))
        for metric, column, ylabel in (("time", "median_ms", "median time (ms)"),
                                       ("memory", "peak_memory_mb", "peak extra memory (MiB)")):
            fig, axes = plt.subplots(1, len(modes), figsize=(5.2 * len(modes), 4.2), squeeze=False)
            for ax, m in zip(axes[0], modes):
                for p in provs:
                    pts = sorted((r["seq_len"], r[column]) for r in grp
                                 if r["provider"] == p and r["mode"] == m and r["status"] == "ok"
                                 and r.get(column) is not None and r[column] > 0)
                    color = f"C{_ORDER.get(p, len(_ORDER)) % 10}"  # one color per provider in every figure
                    if pts:
                        ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=p, color=color)
                    failed = sorted(r["seq_len"] for r in grp if r["provider"] == p and r["mode"] == m
                                    and r["status"].startswith("OOM"))
                    if failed and pts:
                        ax.plot(failed, [pts[-1][1]] * len(failed), marker="x", linestyle="none", color="red")
                ax.set_xscale("log", base=2)
                ts = sorted({r["seq_len"] for r in grp})
                ax.set_xticks(ts, [str(t) for t in ts])
                ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
                ax.set_yscale("log")
                ax.set_xlabel("sequence length T")
                ax.set_ylabel(ylabel)
                ax.set_title(_MODE_LABEL[m])
                ax.grid(True, which="both", alpha=0.3)
                if ax.get_lines():
                    ax.legend(fontsize=8)
            th = grp[0].get("threads")
            fig.suptitle(f"{grp[0].get('device')}" + (f", {th} thread{'s' if th != 1 else ''}" if th else "")
                         + f": {describe(grp[0])}" + ("  (x: OOM)" if any(
                r["status"].startswith("OOM") for r in grp) else ""), fontsize=9)
            fig.tight_layout()
            path = os.path.join(out_dir, f"{slug(grp[0])}-{metric}.png")
            fig.savefig(path, dpi=110)
            plt.close(fig)
            paths.append(path)
    return paths


BEGIN, END = "<!-- ral-bench table: begin -->", "<!-- ral-bench table: end -->"
PLACEHOLDER = "BENCH_TABLE_PLACEHOLDER"


def update_file(path: str, table: str, source: str) -> None:
    """Put ``table`` into ``path`` (a README) between the ral-bench markers, or in place of
    a ``BENCH_TABLE_PLACEHOLDER`` line (which becomes the markers), noting the CSV it came
    from; raises ValueError when the file has neither."""
    with open(path) as f:
        text = f.read()
    block = f"{BEGIN}\n<!-- generated by `ral-bench table {source} --update {os.path.basename(path)}` -->\n\n" \
            f"{table.rstrip()}\n\n{END}"
    if BEGIN in text and END in text and text.index(BEGIN) < text.index(END):
        text = text[:text.index(BEGIN)] + block + text[text.index(END) + len(END):]
    elif PLACEHOLDER in text:
        text = text.replace(PLACEHOLDER, block, 1)
    else:
        raise ValueError(f"{path} has no '{BEGIN}' ... '{END}' markers and no {PLACEHOLDER} line to replace")
    with open(path, "w") as f:
        f.write(text)
