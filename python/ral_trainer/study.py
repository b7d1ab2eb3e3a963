"""``ral-study``: does RAL's gain over GRPO grow with the number of visual tokens?

The paper (SPEC section 1) reports that RAL's gain over GRPO grows with image resolution
(V*: +1.6 points at 512 visual tokens, +6.3 at 2048). This study measures the same question,
under control, on the synthetic visual-search task (:mod:`ral_trainer.visual_search`) with a
tiny random Qwen2.5-VL (the ``ral-train`` model):

- grid sizes ``--grids`` (default 4, 6, 8 cells per side: 16, 36, 64 visual tokens, a 4x
  range like the paper's 512 -> 2048), with distractors that grow with the board
  (``VisualSearchTask.scaled``: a quarter of the cells hold an object). The default fits
  about an hour on an idle 2-core CPU with every grid learnable within the 80-step budget;
  at 12 x 12 (144 tokens) GRPO was still at chance after 80 steps, so larger grids need
  more steps: ``--device cuda --workers 1 --grids 8,12,16,24 --steps 300`` (24 x 24 = 576
  tokens; not yet run, no GPU has been lent);
- four methods per grid and seed, all with the same budget and hyperparameters:
  ``grpo`` / ``ral`` (the think-then-answer prompt) and ``grpo_zero`` / ``ral_zero`` (the
  direct-answer prompt: RAL-zero against GRPO in the same format);
- λ (``ral_coef``) chosen once by a sweep at the smallest grid on seeds of its own
  (``--sweep``; best mean area under the eval-accuracy curve), then fixed for every grid;
  ``--ral-coef`` skips the sweep;
- every RAL run records, per rollout step, the norm of the attention term's gradient over
  the token loss's (``ral_grad_ratio_raw``, without λ; ``ral_grad_ratio``, as applied).
  That raw ratio (means of 6e-3 to 1.4e-2 per grid and method in the committed study,
  ``benchmarks/results/ral_scaling_cpu``) varies tenfold from step to step, so a raw λ
  means something else from step to step and grid to grid; the study therefore uses
  ``--ral-norm grad`` by default (the term's gradient rescaled to ``λ ×`` the token loss's
  gradient norm per optimizer step: λ is the term's relative gradient size at every grid);
  ``--ral-norm none`` is the paper's plain ``L_tok + λ·L_RAL``;
- statistics: RAL − GRPO per grid as a paired (same seed: same initial model, same problem
  stream) 95 % t interval over seeds, and the trend as the change of that gap from the
  smallest to the largest grid, with its own paired interval.

Writes to ``--out``: ``results.md`` (setup, conclusion, λ sweep, table per grid, gaps with
intervals, per-seed numbers, wall time), ``gap.png`` (the gap against visual tokens),
``curves.png`` (eval accuracy and gradient ratio per step), ``metrics.json`` (every run),
and ``runs/`` (one JSON per finished run: rerunning the same command resumes from there;
``--fresh`` ignores it). Runs go to ``--workers`` processes (default 2 on the CPU, one
thread each); ``--quick`` is a one-minute smoke run of the whole pipeline.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import datetime
import json
import math
import multiprocessing as mp
import os
import platform
import queue
import statistics
import subprocess
import time
import warnings
from typing import Callable, Optional

import torch

# method -> prompt style, and whether it carries the RAL term (λ > 0)
METHODS = {
    "grpo": ("think", False),
    "ral": ("think", True),
    "grpo_zero": ("direct", False),
    "ral_zero": ("direct", True),
}
PAIRS = (("ral", "grpo"), ("ral_zero", "grpo_zero"))  # (treatment, control), same prompt format
EVAL_SEED = 12345  # held-out problems: per grid, the same for every method and seed
SWEEP_SEED0 = 1000  # the λ sweep's seeds are disjoint from the comparison's (no selection bias)
HISTORY_KEYS = ("step", "reward", "accuracy", "attn_target_mass", "attn_divergence", "time_s",
                "grad_norm_token", "grad_norm_ral", "ral_grad_ratio", "ral_grad_ratio_raw")

QUICK = dict(grids="2,3,4", seeds=2, steps=4, sweep="1,10", sweep_seeds=1, prompts=4, generations=4,
             eval_size=16, eval_every=2)
FULL = dict(grids="4,6,8", seeds=6, steps=80, sweep="0.1,0.3,1,3", sweep_seeds=2, prompts=8, generations=8,
            eval_size=128, eval_every=10)


def _floats(ap: argparse.ArgumentParser, text: str, name: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        ap.error(f"{name} must be comma-separated numbers, got {text!r}")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="ral-study", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--out", default="ral_study_report", help="report folder (created; runs/ inside is the resume cache)")
    ap.add_argument("--quick", action="store_true", help="smoke run of the whole pipeline on tiny grids (about a minute)")
    ap.add_argument("--grids", help=f"cells per side, comma-separated (default {FULL['grids']}; visual tokens = grid²)")
    ap.add_argument("--density", type=float, default=0.25, help="share of cells holding an object (default 0.25)")
    ap.add_argument("--seeds", type=int, help=f"seeds per grid and method (default {FULL['seeds']})")
    ap.add_argument("--steps", type=int, help=f"rollout steps per run (default {FULL['steps']})")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    ap.add_argument("--ral-coef", type=float, default=None, help="λ for every grid (skips the sweep)")
    ap.add_argument("--sweep", help=f"λ values of the sweep at the smallest grid (default {FULL['sweep']})")
    ap.add_argument("--sweep-seeds", type=int, help=f"seeds per λ in the sweep (default {FULL['sweep_seeds']})")
    ap.add_argument("--ral-norm", default="grad", choices=["none", "grad"],
                    help="grad (default): the term's gradient scaled to λ × the token loss's gradient norm per "
                         "optimizer step, so λ means the same at every grid; none: loss + λ·term (the paper's form)")
    ap.add_argument("--divergence", default="jsd", choices=["jsd", "kl", "reverse_kl"])
    ap.add_argument("--prompts", type=int, help="prompts per rollout step (default 8)")
    ap.add_argument("--generations", type=int, help="G, samples per prompt (default 8)")
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--eval-size", type=int, help="held-out problems per evaluation (default 128)")
    ap.add_argument("--eval-every", type=int, help="rollout steps between evaluations (default 10)")
    ap.add_argument("--threshold", type=float, default=0.5, help="eval accuracy for 'steps to threshold' (chance 0.25)")
    ap.add_argument("--device", default="cpu",
                    help="cpu or cuda (e.g. --device cuda --workers 1 --grids 8,12,16,24 --steps 300)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--workers", type=int, default=None,
                    help="parallel runs (processes); default: 2 on a CPU with >= 2 cores, else 1")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads per worker (default 1)")
    ap.add_argument("--fresh", action="store_true", help="ignore finished runs in OUT/runs")
    ap.add_argument("--report-only", action="store_true",
                    help="train nothing: write the report from the finished runs in OUT/runs")
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    preset = QUICK if a.quick else FULL
    for k, v in preset.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    a.grids = sorted({int(g) for g in _floats(ap, a.grids, "--grids")})
    a.sweep = sorted(set(_floats(ap, a.sweep, "--sweep")))
    a.methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    for m in a.methods:
        if m not in METHODS:
            ap.error(f"--methods: unknown method {m!r}; choose from {', '.join(METHODS)}")
    if not a.grids or min(a.grids) < 2:
        ap.error(f"--grids must list sizes >= 2 cells per side, got {a.grids}")
    for name in ("seeds", "steps", "sweep_seeds", "prompts", "generations", "eval_size", "eval_every", "threads"):
        if getattr(a, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    if a.ral_coef is None and (not a.sweep or min(a.sweep) <= 0):
        ap.error(f"--sweep must list λ values > 0 (λ = 0 is GRPO, always in the sweep), got {a.sweep}")
    if a.workers is None:
        a.workers = 2 if a.device == "cpu" and (os.cpu_count() or 1) >= 2 else 1
    if a.workers < 1:
        ap.error(f"--workers must be >= 1, got {a.workers}")
    return a


# --------------------------------------------------------------------------- one run

def make_job(args, *, phase: str, grid: int, method: str, seed: int, ral_coef: float) -> dict:
    """Everything that determines one training run (also its cache key)."""
    return dict(phase=phase, grid=grid, method=method, seed=seed, ral_coef=ral_coef if METHODS[method][1] else 0.0,
                ral_norm=args.ral_norm, divergence=args.divergence, density=args.density, steps=args.steps,
                prompts=args.prompts, generations=args.generations, lr=args.lr, eval_size=args.eval_size,
                eval_every=args.eval_every, device=args.device, dtype=args.dtype)


def job_name(job: dict) -> str:
    return f"{job['phase']}-g{job['grid']}-{job['method']}-lam{job['ral_coef']:g}-s{job['seed']}"


def run_job(job: dict, progress: Optional[Callable[[int], None]] = None) -> dict:
    """Train one model as ``job`` says; evaluate greedy accuracy and the answer token's
    attention mass on the target every ``eval_every`` steps on a fixed held-out set."""
    from .models import tiny_model
    from .trainer import RALTrainer, TrainConfig
    from .visual_search import WORDS, VisualSearchTask

    t0 = time.perf_counter()
    style, with_ral = METHODS[job["method"]]
    task = VisualSearchTask.scaled(job["grid"], density=job["density"], style=style)
    # the ral-train model: initializer_range 0.1 leaves the random model's long plateau within ~20 steps
    model = tiny_model("qwen2_5_vl", vocab_size=len(WORDS), hidden_size=64, num_layers=2, seed=job["seed"],
                       initializer_range=0.1)
    cfg = TrainConfig(ral_coef=job["ral_coef"], ral_norm=job["ral_norm"], track_grad_norms=with_ral,
                      divergence=job["divergence"], seed=job["seed"], prompts_per_step=job["prompts"],
                      num_generations=job["generations"], lr=job["lr"], num_iterations=2, num_minibatches=2,
                      dtype=job["dtype"], max_completion_length=4 if style == "think" else 2, progress=False)
    trainer = RALTrainer(model, task, cfg, device=job["device"])
    problems = task.sample(job["eval_size"], torch.Generator().manual_seed(EVAL_SEED + job["grid"]))

    def evaluate(step):
        ev = trainer.evaluate(problems)
        return {"step": step, "accuracy": ev["accuracy"], "attn_target_mass": ev["attn_target_mass"]}

    evals = [evaluate(0)]

    def on_step(rec):
        if rec["step"] % job["eval_every"] == 0 or rec["step"] == job["steps"]:
            evals.append(evaluate(rec["step"]))
        if progress is not None:
            progress(1)

    trainer.train(job["steps"], callback=on_step)
    trainer.patch.unpatch()
    history = [{k: rec[k] for k in HISTORY_KEYS if k in rec} for rec in trainer.history]
    return {"job": job, "evals": evals, "history": history, "seconds": time.perf_counter() - t0,
            "visual_tokens": task.num_image_tokens, "num_objects": task.num_objects,
            "seq_len": len(task.prompt_ids())}


_QUEUE = None


def _init_worker(threads: int, q) -> None:
    global _QUEUE
    _QUEUE = q
    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore", message=".*requires_grad=True to a scalar.*")


def _run_in_worker(job: dict) -> dict:
    return run_job(job, progress=lambda n: _QUEUE.put(n))


class Runner:
    """Runs jobs (in ``workers`` processes, or in this one) and keeps each result as
    ``cache/<name>.json``: a finished run with the same job is not run again."""

    def __init__(self, cache: str, workers: int, threads: int, fresh: bool, bar, report_only: bool = False,
                 on_finish: Optional[Callable[[int], None]] = None):
        self.cache, self.workers, self.bar, self.on_finish = cache, workers, bar, on_finish
        os.makedirs(cache, exist_ok=True)
        self.fresh, self.report_only = fresh, report_only
        self.trained = 0
        self.pool = None
        if workers > 1 and not report_only:
            ctx = mp.get_context("spawn")  # fork after torch has started threads can deadlock
            self.queue = ctx.Manager().Queue()
            self.pool = cf.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                                               initargs=(threads, self.queue))
        else:
            torch.set_num_threads(threads)
        self.pending: dict = {}
        self.done: dict[str, dict] = {}

    def _path(self, job):
        return os.path.join(self.cache, job_name(job) + ".json")

    def submit(self, jobs: list[dict]) -> None:
        for job in jobs:
            name = job_name(job)
            if name in self.done or any(n == name for n in self.pending.values()):
                continue
            path = self._path(job)
            if not self.fresh and os.path.exists(path):
                with open(path) as f:
                    res = json.load(f)
                if res["job"] == job:
                    self.done[name] = res
                    self.bar.update(job["steps"])
                    continue
            if self.report_only:
                continue
            if self.pool is None:
                self.pending[name] = job
            else:
                self.pending[self.pool.submit(_run_in_worker, job)] = name

    def _finish(self, name: str, res: dict) -> None:
        with open(self._path(res["job"]) + ".tmp", "w") as f:
            json.dump(res, f)
        os.replace(self._path(res["job"]) + ".tmp", self._path(res["job"]))
        self.done[name] = res
        self.trained += 1
        if self.on_finish is not None:
            self.on_finish(self.trained)
        j = res["job"]
        self.bar.write(f"[ral-study] {job_name(j)}: eval accuracy {res['evals'][0]['accuracy']:.3f} -> "
                       f"{res['evals'][-1]['accuracy']:.3f} ({res['seconds']:.0f} s)")

    def wait(self, names: Optional[set] = None) -> None:
        """Run / wait for the submitted jobs until those in ``names`` (default: all) are done."""
        def satisfied():
            return not self.pending or (names is not None and names <= self.done.keys())

        while not satisfied():
            if self.pool is None:  # in submission order
                name = next(iter(self.pending))
                self._finish(name, run_job(self.pending.pop(name), progress=self.bar.update))
                continue
            finished, _ = cf.wait(list(self.pending), timeout=0.5, return_when=cf.FIRST_COMPLETED)
            self._drain()
            for fut in finished:
                self._finish(self.pending.pop(fut), fut.result())
        if self.pool is not None:
            self._drain()

    def _drain(self) -> None:
        while True:
            try:
                self.bar.update(self.queue.get_nowait())
            except queue.Empty:
                return

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()


# --------------------------------------------------------------------------- statistics

def t_interval(diffs: list[float], level: float = 0.95) -> dict:
    """Mean of ``diffs`` with a two-sided Student-t interval (``lo``/``hi`` are NaN for n < 2)."""
    from scipy import stats

    n = len(diffs)
    mean = statistics.fmean(diffs) if n else math.nan
    if n < 2:
        return {"mean": mean, "lo": math.nan, "hi": math.nan, "n": n}
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * statistics.stdev(diffs) / math.sqrt(n)
    return {"mean": mean, "lo": mean - half, "hi": mean + half, "n": n}


def final_accuracy(run: dict) -> float:
    return run["evals"][-1]["accuracy"]


def curve_area(run: dict) -> float:
    """Mean eval accuracy over the evaluations after step 0 (rewards learning early)."""
    return statistics.fmean(e["accuracy"] for e in run["evals"][1:])


def steps_to(run: dict, threshold: float) -> Optional[int]:
    return next((e["step"] for e in run["evals"] if e["accuracy"] >= threshold), None)


def mean_grad_ratio(run: dict, key: str = "ral_grad_ratio_raw") -> Optional[float]:
    xs = [h[key] for h in run["history"] if key in h and math.isfinite(h[key])]
    return statistics.fmean(xs) if xs else None


def paired_gaps(runs: dict, grid: int, treat: str, ctrl: str, metric=final_accuracy) -> dict[int, float]:
    """seed -> metric(treat) − metric(ctrl) at ``grid``, over seeds that have both."""
    a = {r["job"]["seed"]: metric(r) for r in runs.values() if r["job"]["grid"] == grid and r["job"]["method"] == treat}
    b = {r["job"]["seed"]: metric(r) for r in runs.values() if r["job"]["grid"] == grid and r["job"]["method"] == ctrl}
    return {s: a[s] - b[s] for s in sorted(a.keys() & b.keys())}


def trend(runs: dict, grids: list[int], treat: str, ctrl: str) -> dict:
    """Paired interval of (gap at the largest grid − gap at the smallest) over seeds."""
    lo, hi = paired_gaps(runs, grids[0], treat, ctrl), paired_gaps(runs, grids[-1], treat, ctrl)
    return t_interval([hi[s] - lo[s] for s in sorted(lo.keys() & hi.keys())])


def verdict(gaps: dict[int, dict], tr: dict, grids: list[int]) -> str:
    """One plain sentence on whether the gain grows with visual tokens, from the per-grid
    gap intervals ``gaps`` and the trend interval ``tr`` (see :func:`trend`)."""
    pts = ", ".join(f"{g * g} tokens {gaps[g]['mean']:+.3f}" for g in grids)
    if len(grids) < 2 or tr["n"] < 2:
        return f"Not enough grids or seeds for a trend (gaps: {pts})."
    change = (f"change from {grids[0] ** 2} to {grids[-1] ** 2} tokens {tr['mean']:+.3f}, "
              f"95% CI [{tr['lo']:+.3f}, {tr['hi']:+.3f}]")
    sig = [f"{g * g} ({'+' if gaps[g]['lo'] > 0 else '−'})" for g in grids if gaps[g]["lo"] > 0 or gaps[g]["hi"] < 0]
    sig = f" Gaps whose 95% CI excludes 0: {', '.join(sig) if sig else 'none'}."
    if tr["lo"] > 0 and gaps[grids[-1]]["lo"] > 0:
        return f"Reproduced: the gain grows with visual tokens (gaps: {pts}; {change}).{sig}"
    if tr["hi"] < 0:
        return f"Reversed: the gap shrinks as visual tokens grow (gaps: {pts}; {change}).{sig}"
    return (f"Not reproduced: no growth of the gain with visual tokens is detected (gaps: {pts}; {change}, "
            f"which includes 0).{sig}")


# --------------------------------------------------------------------------- report

def _fmt(x, fmt=".3f") -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:{fmt}}"


def _ms(xs, fmt=".3f") -> str:
    xs = [x for x in xs if x is not None]
    if not xs:
        return "n/a"
    return f"{statistics.fmean(xs):{fmt}}" + (f" ± {statistics.stdev(xs):{fmt}}" if len(xs) > 1 else "")


def _ci(iv: dict, fmt="+.3f") -> str:
    if math.isnan(iv["lo"]):
        return f"{_fmt(iv['mean'], fmt)} (n={iv['n']}, no interval)"
    return f"{iv['mean']:{fmt}} [{iv['lo']:{fmt}}, {iv['hi']:{fmt}}]"


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores"


def _commit() -> str:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        return subprocess.run(["git", "-C", here, "describe", "--always", "--dirty"], capture_output=True, text=True,
                              timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def summarize(args, runs: dict, lam: float, lam_source: str) -> dict:
    """Every number the report shows, as plain data (also written to metrics.json)."""
    main = {k: r for k, r in runs.items() if r["job"]["phase"] == "main"}
    rows = []
    for g in args.grids:
        for m in args.methods:
            rs = sorted((r for r in main.values() if r["job"]["grid"] == g and r["job"]["method"] == m),
                        key=lambda r: r["job"]["seed"])
            if not rs:
                continue
            st = [steps_to(r, args.threshold) for r in rs]
            rows.append({"grid": g, "visual_tokens": g * g, "objects": rs[0]["num_objects"], "method": m,
                         "seq_len": rs[0]["seq_len"], "seeds": [r["job"]["seed"] for r in rs],
                         "final_accuracy": [final_accuracy(r) for r in rs], "curve_area": [curve_area(r) for r in rs],
                         "steps_to_threshold": st,
                         "mass_before": [r["evals"][0]["attn_target_mass"] for r in rs],
                         "mass_after": [r["evals"][-1]["attn_target_mass"] for r in rs],
                         "grad_ratio_raw": [mean_grad_ratio(r) for r in rs],
                         "grad_ratio": [mean_grad_ratio(r, "ral_grad_ratio") for r in rs],
                         "seconds": [r["seconds"] for r in rs]})
    gaps = {}
    for treat, ctrl in PAIRS:
        if treat not in args.methods or ctrl not in args.methods:
            continue
        per = {}
        for g in args.grids:
            d = paired_gaps(main, g, treat, ctrl)
            da = paired_gaps(main, g, treat, ctrl, curve_area)
            per[g] = {"final": t_interval(list(d.values())), "area": t_interval(list(da.values())),
                      "per_seed": d, "per_seed_area": da}
        tr = trend(main, args.grids, treat, ctrl)
        gaps[f"{treat}-{ctrl}"] = {"per_grid": per, "trend": tr,
                                   "verdict": verdict({g: per[g]["final"] for g in args.grids}, tr, args.grids)}
    sweep = []
    sw = [r for r in runs.values() if r["job"]["phase"] == "sweep"]
    for lv in sorted({r["job"]["ral_coef"] for r in sw}):
        rs = [r for r in sw if r["job"]["ral_coef"] == lv]
        sweep.append({"ral_coef": lv, "seeds": [r["job"]["seed"] for r in rs],
                      "final_accuracy": [final_accuracy(r) for r in rs], "curve_area": [curve_area(r) for r in rs],
                      "grad_ratio_raw": [mean_grad_ratio(r) for r in rs],
                      "grad_ratio": [mean_grad_ratio(r, "ral_grad_ratio") for r in rs]})
    return {"rows": rows, "gaps": gaps, "sweep": sweep, "ral_coef": lam, "ral_coef_source": lam_source}


def choose_lambda(runs: list[dict]) -> float:
    """The swept λ > 0 with the best mean learning-curve area (ties: the smaller λ)."""
    by = {}
    for r in runs:
        if r["job"]["ral_coef"] > 0:
            by.setdefault(r["job"]["ral_coef"], []).append(curve_area(r))
    return max(sorted(by), key=lambda lv: round(statistics.fmean(by[lv]), 9))  # first max: the smaller λ


def write_report(args, runs: dict, summary: dict, out: str, log: list[dict], expected: int) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grids, lam = args.grids, summary["ral_coef"]
    tokens = [g * g for g in grids]
    colors = {"grpo": "tab:gray", "ral": "tab:blue", "grpo_zero": "black", "ral_zero": "tab:orange"}

    # gap against visual tokens
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric, title in ((axes[0], "final", "final eval accuracy"), (axes[1], "area", "learning-curve area")):
        for i, (key, gp) in enumerate(summary["gaps"].items()):
            off = 1 + 0.04 * (i - 0.5)
            mu = [gp["per_grid"][g][metric]["mean"] for g in grids]
            err = [[m - gp["per_grid"][g][metric]["lo"] for g, m in zip(grids, mu)],
                   [gp["per_grid"][g][metric]["hi"] - m for g, m in zip(grids, mu)]]
            c = colors[key.split("-")[0]]
            ax.errorbar([t * off for t in tokens], mu, yerr=err, fmt="o-", color=c, capsize=4,
                        label=f"{key.replace('-', ' − ')} (mean, 95% CI)")
            per = gp["per_grid"]
            for g, t in zip(grids, tokens):
                ys = list(per[g]["per_seed" if metric == "final" else "per_seed_area"].values())
                ax.scatter([t * off] * len(ys), ys, color=c, alpha=0.3, s=12)
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlim(tokens[0] / 1.4, tokens[-1] * 1.4)  # also when no pair has finished yet
        ax.set_xticks(tokens, [str(t) for t in tokens])
        ax.set_xlabel("visual tokens (grid²)")
        ax.set_ylabel(f"gap in {title}")
        ax.set_title(f"gap in {title} (λ={lam:g}; dots: seeds)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "gap.png"), dpi=110)
    plt.close(fig)

    # curves: eval accuracy per grid, and the RAL runs' gradient ratio per step
    main = [r for r in runs.values() if r["job"]["phase"] == "main"]
    fig, axes = plt.subplots(2, len(grids), figsize=(4.2 * len(grids), 7), squeeze=False)
    for j, g in enumerate(grids):
        ax, axr = axes[0, j], axes[1, j]
        for m in args.methods:
            rs = [r for r in main if r["job"]["grid"] == g and r["job"]["method"] == m]
            if not rs:
                continue
            steps = [e["step"] for e in rs[0]["evals"]]
            ys = torch.tensor([[e["accuracy"] for e in r["evals"]] for r in rs])
            mu = ys.mean(0)
            sd = ys.std(0) if len(rs) > 1 else torch.zeros_like(mu)
            ax.plot(steps, mu, "o-", ms=3, color=colors[m], label=m)
            ax.fill_between(steps, mu - sd, mu + sd, color=colors[m], alpha=0.15)
            if METHODS[m][1]:
                for r in rs:
                    pts = [(h["step"], h["ral_grad_ratio_raw"]) for h in r["history"]
                           if h.get("ral_grad_ratio_raw", 0) > 0]
                    if pts:
                        x, y = zip(*pts)
                        k = min(5, len(y))  # the per-step ratio swings tenfold: a running mean shows its level
                        y = torch.nn.functional.avg_pool1d(torch.tensor([y]), k, 1, padding=k // 2,
                                                           count_include_pad=False)[0, :len(y)]
                        axr.plot(x, y, color=colors[m], alpha=0.6, lw=0.9, label=m if r is rs[0] else None)
        ax.set_title(f"{g}x{g} grid ({g * g} visual tokens): eval accuracy")
        ax.set_ylim(-0.02, 1.02)
        ax.axhline(args.threshold, color="k", ls=":", lw=0.8)
        if axr.lines:  # a study stopped early may have no RAL run at this grid yet
            axr.set_yscale("log")
        axr.set_title("‖∇ term‖ / ‖∇ token loss‖, raw (5-step mean)")
        for a in (ax, axr):
            a.set_xlabel("rollout step")
            a.grid(alpha=0.3)
            a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "curves.png"), dpi=100)
    plt.close(fig)

    seeds = sorted({r["job"]["seed"] for r in main})
    L = ["# ral-study: does RAL's gain over GRPO grow with the number of visual tokens?", ""]
    L += [f"Tiny random Qwen2.5-VL (2 layers, hidden 64; `ral-train`'s model) on synthetic visual search "
          f"(`VisualSearchTask.scaled`: a {args.density:g} share of cells hold an object, the target is the big "
          f"marked one, chance 0.25). Grids {', '.join(f'{g}x{g}' for g in grids)} = "
          f"{', '.join(map(str, tokens))} visual tokens. Per run: {args.steps} rollout steps x {args.prompts} "
          f"prompts x G={args.generations}, 4 optimizer steps per rollout batch (2 epochs x 2 minibatches), "
          f"lr {args.lr:g}, {args.divergence} divergence, seeds {seeds} (paired: same initial model and problem "
          f"stream for every method of a seed); eval: greedy accuracy and the answer token's attention mass on "
          f"the target on {args.eval_size} held-out problems every {args.eval_every} steps.",
          "",
          f"λ (`ral_coef`) = **{lam:g}** ({summary['ral_coef_source']}), the same for every grid; term "
          f"normalization: `--ral-norm {args.ral_norm}` ("
          + ("loss = L_tok + λ·L_RAL, as in the paper" if args.ral_norm == "none" else
             "the term's gradient scaled to λ × the token loss's gradient norm per optimizer step") + ").",
          "",
          f"Device {args.device} ({_machine()}), {args.workers} worker process(es) x {args.threads} thread(s), "
          f"torch {torch.__version__}, commit {_commit()}, {datetime.date.today().isoformat()}. "
          f"**Wall time** {sum(x['wall_seconds'] for x in log) / 60:.1f} min over {len(log)} invocation(s) "
          f"(sum of the runs' own times {sum(r['seconds'] for r in runs.values()) / 60:.1f} min). "
          + (f"**Incomplete: {len(runs)} of {expected} runs finished.**" if len(runs) < expected else
             f"All {expected} runs finished."), ""]
    L += ["## Conclusion", ""]
    for key, gp in summary["gaps"].items():
        L.append(f"- **{key.replace('-', ' − ')}** (final eval accuracy): {gp['verdict']}")
    L += [""]
    if summary["sweep"]:
        g0 = grids[0]
        L += [f"## λ sweep ({g0}x{g0} grid, think prompt, seeds "
              f"{sorted({s for row in summary['sweep'] for s in row['seeds']})}, disjoint from the comparison's)", "",
              "Selection: the λ > 0 with the best mean learning-curve area (mean eval accuracy over the "
              "evaluations after step 0); λ = 0 is GRPO. Gradient ratios are means over rollout steps of "
              "‖∇ term‖ / ‖∇ token loss‖ (raw: without λ; applied: as it entered the update).", "",
              "| λ | final accuracy | learning-curve area | grad ratio raw | grad ratio applied |",
              "|---:|---|---|---|---|"]
        for row in summary["sweep"]:
            mark = " **(chosen)**" if row["ral_coef"] == lam and summary["ral_coef_source"].startswith("sweep") else ""
            L.append(f"| {row['ral_coef']:g}{mark} | {_ms(row['final_accuracy'])} | {_ms(row['curve_area'])} | "
                     f"{_ms(row['grad_ratio_raw'], '.2e')} | {_ms(row['grad_ratio'], '.2e')} |")
        L += [""]
    L += ["## Results per grid", "",
          f"Mean ± sd over seeds. Steps to {args.threshold:g}: first evaluation at or above it (seeds that reached "
          "it). Attention mass: the answer token's last-layer attention on the target cell's visual token, before "
          "→ after training (uniform attention over the prompt would give 1/T, T its length).", "",
          f"| visual tokens | objects | method | final accuracy | learning-curve area | steps to {args.threshold:g} | "
          "attention mass on target | grad ratio raw / applied | s per run |",
          "|---:|---:|---|---|---|---|---|---|---:|"]
    for row in summary["rows"]:
        st = [s for s in row["steps_to_threshold"] if s is not None]
        gr = ("" if not METHODS[row["method"]][1] else
              f"{_ms(row['grad_ratio_raw'], '.2e')} / {_ms(row['grad_ratio'], '.2e')}")
        L.append(f"| {row['visual_tokens']} | {row['objects']} | {row['method']} | {_ms(row['final_accuracy'])} | "
                 f"{_ms(row['curve_area'])} | {(_ms(st, '.0f') if st else 'not reached')} ({len(st)}/"
                 f"{len(row['seeds'])}) | {_ms(row['mass_before'])} → {_ms(row['mass_after'])} (1/T = "
                 f"{1 / row['seq_len']:.3f}) | {gr} | {statistics.fmean(row['seconds']):.0f} |")
    L += ["", "## Gaps (paired over seeds, mean [95% t interval])", "",
          "| visual tokens | " + " | ".join(f"{k.replace('-', ' − ')} final acc | {k.replace('-', ' − ')} area"
                                            for k in summary["gaps"]) + " |",
          "|---:|" + "---|---|" * len(summary["gaps"])]
    for g in grids:
        L.append(f"| {g * g} | " + " | ".join(f"{_ci(gp['per_grid'][g]['final'])} | {_ci(gp['per_grid'][g]['area'])}"
                                              for gp in summary["gaps"].values()) + " |")
    L.append(f"| change {grids[0] ** 2} → {grids[-1] ** 2} | " + " | ".join(
        f"{_ci(gp['trend'])} | " for gp in summary["gaps"].values()) + "|")
    L += ["", "![gap](gap.png)", "", "## Per seed (final eval accuracy)", "",
          "| visual tokens | seed | " + " | ".join(args.methods) + " | s (all methods) |",
          "|---:|---:|" + "---:|" * len(args.methods) + "---:|"]
    for g in grids:
        for s in seeds:
            rs = {r["job"]["method"]: r for r in main if r["job"]["grid"] == g and r["job"]["seed"] == s}
            L.append(f"| {g * g} | {s} | " + " | ".join(_fmt(final_accuracy(rs[m])) if m in rs else "–"
                                                        for m in args.methods)
                     + f" | {sum(r['seconds'] for r in rs.values()):.0f} |")
    L += ["", "![curves](curves.png)", ""]
    text = "\n".join(L)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(text)
    return text


# --------------------------------------------------------------------------- main

def main(argv=None) -> int:
    args = parse_args(argv)
    from tqdm.auto import tqdm

    warnings.filterwarnings("ignore", message=".*requires_grad=True to a scalar.*")
    t0 = time.perf_counter()
    os.makedirs(args.out, exist_ok=True)
    g0 = args.grids[0]
    sweep = [] if args.ral_coef is not None else [
        make_job(args, phase="sweep", grid=g0, method="ral" if lv else "grpo", seed=SWEEP_SEED0 + s, ral_coef=lv)
        for lv in [0.0] + args.sweep for s in range(args.sweep_seeds)]
    # seed by seed, largest grid first: a study stopped early still holds complete seeds
    main_jobs = [(g, m, s) for s in range(args.seeds) for g in reversed(args.grids) for m in args.methods]
    total = args.steps * (len(sweep) + len(main_jobs))
    bar = tqdm(total=total, desc="ral-study (steps)", disable=args.no_progress, dynamic_ncols=True, smoothing=0.05)
    log = InvocationLog(args.out, args.fresh, args.workers)
    runner = Runner(os.path.join(args.out, "runs"), args.workers, args.threads, args.fresh, bar,
                    report_only=args.report_only, on_finish=log.update)
    try:
        runner.submit(sweep)
        runner.wait()  # the sweep is short (smallest grid): λ is fixed before the comparison starts
        if args.ral_coef is not None:
            lam, src = args.ral_coef, "given with --ral-coef"
        elif not any(METHODS[m][1] for m in args.methods):
            lam, src = 0.0, "no RAL method in --methods"
        else:
            done = [runner.done[n] for n in map(job_name, sweep) if n in runner.done]
            if not any(r["job"]["ral_coef"] > 0 for r in done):
                raise SystemExit(f"ral-study: no finished sweep run with λ > 0 in {runner.cache}; run the study "
                                 "(without --report-only) or give --ral-coef")
            lam = choose_lambda(done)
            src = f"sweep at {g0}x{g0}" + ("" if len(done) == len(sweep) else f", {len(done)}/{len(sweep)} runs")
        bar.write(f"[ral-study] λ = {lam:g} ({src})")
        runner.submit([make_job(args, phase="main", grid=g, method=m, seed=s, ral_coef=lam) for g, m, s in main_jobs])
        runner.wait()
    finally:
        runner.close()
        bar.close()
    runs = dict(runner.done)
    wall = time.perf_counter() - t0
    summary = summarize(args, runs, lam, src)
    text = write_report(args, runs, summary, args.out, log.log, expected=len(sweep) + len(main_jobs))
    with open(os.path.join(args.out, "metrics.json"), "w") as f:  # 4 significant digits: a third of the size
        json.dump(_round({"args": vars(args), "summary": summary, "invocations": log.log,
                          "runs": [runs[k] for k in sorted(runs)]}), f)
    print(text.split("\n## λ sweep")[0].split("\n## Results")[0])
    print(f"[ral-study] report written to {os.path.abspath(args.out)} in {wall / 60:.1f} min")
    return 0


def _round(x, digits: int = 4):
    if isinstance(x, float):
        return float(f"{x:.{digits}g}")
    if isinstance(x, dict):
        return {k: _round(v, digits) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_round(v, digits) for v in x]
    return x


class InvocationLog:
    """``OUT/invocations.json``: one entry per invocation that trained something, rewritten
    after every finished run, so that a study stopped midway still accounts for its time."""

    def __init__(self, out: str, fresh: bool, workers: int):
        self.path, self.workers = os.path.join(out, "invocations.json"), workers
        self.t0, self.started = time.perf_counter(), datetime.datetime.now().isoformat(timespec="seconds")
        self.log, self.entry = [], None
        if os.path.exists(self.path) and not fresh:
            with open(self.path) as f:
                self.log = json.load(f)

    def update(self, trained: int) -> None:
        if not trained:
            return
        if self.entry is None:
            self.entry = {"started": self.started, "workers": self.workers, "machine": _machine()}
            self.log.append(self.entry)
        self.entry.update(finished=datetime.datetime.now().isoformat(timespec="seconds"),
                          wall_seconds=time.perf_counter() - self.t0, runs_trained=trained)
        with open(self.path + ".tmp", "w") as f:
            json.dump(self.log, f, indent=1)
        os.replace(self.path + ".tmp", self.path)


if __name__ == "__main__":
    raise SystemExit(main())
