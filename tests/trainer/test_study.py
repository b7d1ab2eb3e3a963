"""The scaling study (``ral-study``): its statistics against scipy's paired t-test, the
verdict, the scaled task, the trainer's gradient-norm hook and ``--ral-norm grad``, and
``ral-study --quick`` end to end (report, numbers that match the runs, resume)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import types

import pytest
import torch
from scipy import stats

from ral_trainer import RALTrainer, TrainConfig
from ral_trainer import study
from ral_trainer.models import tiny_model
from ral_trainer.visual_search import WORDS, VisualSearchTask


# --------------------------------------------------------------------------- statistics

@pytest.mark.parametrize("diffs", [[0.1, 0.3, -0.05, 0.2], [0.0, 0.5, 0.25], [-0.2, -0.1, -0.3, -0.15, -0.25]],
                         ids=["n4", "n3", "n5-negative"])
def test_t_interval_matches_scipy_paired_ttest(diffs):
    treat = [0.5 + d for d in diffs]
    ctrl = [0.5] * len(diffs)
    ci = stats.ttest_rel(treat, ctrl).confidence_interval(0.95)
    iv = study.t_interval(diffs)
    assert iv["n"] == len(diffs)
    assert iv["mean"] == pytest.approx(sum(diffs) / len(diffs))
    assert (iv["lo"], iv["hi"]) == pytest.approx((ci.low, ci.high), abs=1e-12)


def test_t_interval_by_hand():
    # n = 4: t(0.975, 3) = 3.182446; sd of 1..4 = 1.290994
    iv = study.t_interval([1.0, 2.0, 3.0, 4.0])
    half = 3.182446305284263 * 1.2909944487358056 / 2
    assert (iv["mean"], iv["lo"], iv["hi"]) == pytest.approx((2.5, 2.5 - half, 2.5 + half), rel=1e-9)
    one = study.t_interval([0.3])
    assert one["mean"] == 0.3 and math.isnan(one["lo"]) and math.isnan(one["hi"])


def _run(grid, method, seed, accs, phase="main", lam=0.0):
    return {"job": {"phase": phase, "grid": grid, "method": method, "seed": seed, "ral_coef": lam},
            "evals": [{"step": 10 * i, "accuracy": a, "attn_target_mass": 0.1} for i, a in enumerate(accs)],
            "history": [], "seconds": 1.0, "num_objects": 4, "seq_len": 20}


def test_paired_gaps_trend_and_verdict():
    runs = {}
    # gap RAL - GRPO: 0.0 at grid 4 and 0.2 / 0.3 / 0.25 / 0.35 at grid 8 (seed by seed)
    for s, (d4, d8) in enumerate([(0.0, 0.2), (0.05, 0.3), (-0.05, 0.25), (0.0, 0.35)]):
        for g, d in ((4, d4), (8, d8)):
            runs[f"g{g}-grpo-{s}"] = _run(g, "grpo", s, [0.25, 0.4, 0.5])
            runs[f"g{g}-ral-{s}"] = _run(g, "ral", s, [0.25, 0.4, 0.5 + d])
    gaps = study.paired_gaps(runs, 8, "ral", "grpo")
    assert gaps == pytest.approx({0: 0.2, 1: 0.3, 2: 0.25, 3: 0.35})
    tr = study.trend(runs, [4, 8], "ral", "grpo")
    ci = stats.ttest_1samp([0.2, 0.25, 0.3, 0.35], 0).confidence_interval(0.95)
    assert (tr["mean"], tr["lo"], tr["hi"]) == pytest.approx((0.275, ci.low, ci.high))
    per = {g: study.t_interval(list(study.paired_gaps(runs, g, "ral", "grpo").values())) for g in (4, 8)}
    assert study.verdict(per, tr, [4, 8]).startswith("Reproduced")
    # the same gaps with the sign flipped: reversed
    flip = {g: {**iv, "mean": -iv["mean"], "lo": -iv["hi"], "hi": -iv["lo"]} for g, iv in per.items()}
    assert study.verdict(flip, {**tr, "mean": -0.275, "lo": -tr["hi"], "hi": -tr["lo"]}, [4, 8]).startswith("Reversed")
    # an interval that straddles 0: not reproduced
    wide = {**tr, "lo": -0.1, "hi": 0.6}
    assert study.verdict(per, wide, [4, 8]).startswith("Not reproduced")
    assert study.curve_area(runs["g8-ral-1"]) == pytest.approx((0.4 + 0.8) / 2)
    assert study.steps_to(runs["g8-ral-1"], 0.75) == 20 and study.steps_to(runs["g8-grpo-1"], 0.75) is None


def test_choose_lambda_best_area_ties_to_smaller():
    runs = [_run(4, "ral", 1000 + s, [0.2, a], phase="sweep", lam=lam)
            for lam, accs in ((0.0, (0.9, 0.9)), (1.0, (0.5, 0.7)), (3.0, (0.8, 0.4)), (10.0, (0.3, 0.2)))
            for s, a in enumerate(accs)]
    assert study.choose_lambda(runs) == 1.0  # λ = 0 (GRPO) is never chosen; 1 and 3 tie at 0.6
    runs.append(_run(4, "ral", 1002, [0.2, 1.0], phase="sweep", lam=10.0))
    assert study.choose_lambda(runs) == 1.0


# --------------------------------------------------------------------------- task and trainer hooks

def test_scaled_task_grows_distractors_with_the_grid():
    objs = {g: VisualSearchTask.scaled(g).num_objects for g in (2, 4, 8, 12, 24)}
    assert objs == {2: 4, 4: 4, 8: 16, 12: 36, 24: 144}
    t = VisualSearchTask.scaled(8, style="direct")
    p = t.sample(3, torch.Generator().manual_seed(0))
    assert p[0]["image"].shape == (3, 128, 128) and t.num_image_tokens == 64
    assert p[0]["input_ids"].count(5) == 64  # <image> placeholders: one per cell
    with pytest.raises(ValueError, match="num_objects"):
        VisualSearchTask(grid=2, num_objects=5)
    with pytest.raises(ValueError, match="density"):
        VisualSearchTask.scaled(4, density=0.0)
    with pytest.raises(ValueError, match="num_colors"):
        VisualSearchTask(num_colors=9)


def test_mix_ral_grads_float64():
    g_tok = [torch.tensor([3.0, 0.0], dtype=torch.float64), torch.tensor([[4.0]], dtype=torch.float64)]
    g_ral = [torch.tensor([0.0, 1.0], dtype=torch.float64), None]  # ‖g_tok‖ = 5, ‖g_ral‖ = 1
    for norm, at_old, w in (("none", False, 2.0), ("none", True, 2.0), ("grad", False, 2.0 * 5), ("grad", True, 0.0)):
        params = [torch.nn.Parameter(torch.zeros_like(g)) for g in g_tok]
        for p, g in zip(params, g_tok):
            p.grad = g.clone()
        fake = types.SimpleNamespace(cfg=TrainConfig(ral_coef=2.0, ral_norm=norm), device=torch.device("cpu"))
        rec = RALTrainer._mix_ral_grads(fake, params, g_ral, at_old)
        assert (rec["grad_norm_token"], rec["grad_norm_ral"], rec["ral_grad_ratio_raw"]) == pytest.approx((5, 1, 0.2))
        assert rec["ral_grad_ratio"] == pytest.approx(w * 0.2), (norm, at_old)
        assert torch.equal(params[0].grad, torch.tensor([3.0, w], dtype=torch.float64))
        assert torch.equal(params[1].grad, g_tok[1])


def _trainer(**cfg):
    model = tiny_model("qwen2_5_vl", vocab_size=len(WORDS), seed=0)
    base = dict(prompts_per_step=2, num_generations=4, max_completion_length=2, progress=False, seed=0, ral_coef=50.0)
    base.update(cfg)
    # a reward that varies within every group, so the advantages (and the term) are not zero
    return RALTrainer(model, VisualSearchTask(style="direct"), TrainConfig(**base),
                      reward_fn=lambda comps, probs: [float(i % 2) for i in range(len(comps))])


def test_tracked_gradients_give_the_same_update():
    """Two backward passes (token loss, then the term apart) update the model like one."""
    torch.set_num_threads(1)
    recs = []
    for t in (_trainer(), _trainer(track_grad_norms=True)):
        torch.manual_seed(0)  # sampling and minibatch order use the global generator
        recs.append((t, t.train_step()))
    (plain, rp), (tracked, rt) = recs
    assert "ral_grad_ratio" not in rp
    assert rt["grad_norm_token"] > 0 and rt["grad_norm_ral"] > 0, rt
    assert rt["ral_grad_ratio"] == pytest.approx(50.0 * rt["ral_grad_ratio_raw"])
    for a, b in zip(plain.model.parameters(), tracked.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_grad_normalization_sets_the_applied_ratio():
    torch.set_num_threads(1)
    t = _trainer(ral_norm="grad", ral_coef=0.5)
    rec = t.train_step()
    assert rec["grad_norm_ral"] > 0
    assert rec["ral_grad_ratio"] == pytest.approx(0.5)  # every step after θ_old: ‖λ'·g_ral‖ = 0.5 ‖g_tok‖
    with pytest.raises(ValueError, match="ral_norm"):
        _trainer(ral_norm="token")


# --------------------------------------------------------------------------- the command

def test_study_quick(tmp_path, monkeypatch):
    out = tmp_path / "study"
    assert study.main(["--quick", "--out", str(out), "--no-progress"]) == 0
    for f in ("results.md", "gap.png", "curves.png", "metrics.json"):
        assert (out / f).stat().st_size > 0, f
    text = (out / "results.md").read_text()
    for section in ("## Conclusion", "## λ sweep", "## Results per grid", "## Gaps", "## Per seed", "Wall time"):
        assert section in text, section
    m = json.loads((out / "metrics.json").read_text())
    runs = {study.job_name(r["job"]): r for r in m["runs"]}
    args = m["args"]
    n_main = len(args["grids"]) * args["seeds"] * len(study.METHODS)
    n_sweep = (1 + len(args["sweep"])) * args["sweep_seeds"]
    assert len(runs) == n_main + n_sweep
    assert all(len(r["history"]) == args["steps"] for r in runs.values())
    # λ is the sweep's choice, and every main RAL run used it
    lam = m["summary"]["ral_coef"]
    assert lam == study.choose_lambda([r for r in runs.values() if r["job"]["phase"] == "sweep"])
    assert {r["job"]["ral_coef"] for r in runs.values()
            if r["job"]["phase"] == "main" and study.METHODS[r["job"]["method"]][1]} == {lam}
    # RAL runs recorded the gradient ratio; GRPO runs did not pay for it
    assert any("ral_grad_ratio_raw" in h for r in runs.values() if r["job"]["method"] == "ral" for h in r["history"])
    assert not any("ral_grad_ratio_raw" in h for r in runs.values() if r["job"]["method"] == "grpo"
                   for h in r["history"])
    # each gap interval is scipy's paired t-test on the runs' final accuracies
    for g in args["grids"]:
        fin = {(r["job"]["method"], r["job"]["seed"]): r["evals"][-1]["accuracy"]
               for r in runs.values() if r["job"]["phase"] == "main" and r["job"]["grid"] == g}
        seeds = range(args["seeds"])
        a, b = [fin["ral", s] for s in seeds], [fin["grpo", s] for s in seeds]
        iv = m["summary"]["gaps"]["ral-grpo"]["per_grid"][str(g)]["final"]
        close = dict(rel=1e-3, abs=1e-4)  # metrics.json keeps 4 significant digits
        assert iv["mean"] == pytest.approx(sum(a) / len(a) - sum(b) / len(b), **close)
        if len(set(x - y for x, y in zip(a, b))) > 1:
            ci = stats.ttest_rel(a, b).confidence_interval(0.95)
            assert (iv["lo"], iv["hi"]) == pytest.approx((ci.low, ci.high), **close)
        per_seed = " | ".join(f"{fin[mm, 0]:.3f}" for mm in study.METHODS)
        assert f"| {g * g} | 0 | {per_seed} |" in text

    # a second invocation reuses every finished run (none is trained again)
    def no_training(*a, **k):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(study, "run_job", no_training)
    assert study.main(["--quick", "--out", str(out), "--no-progress", "--workers", "1"]) == 0
    # --report-only reports what finished, says what did not, and trains nothing
    gone = next((out / "runs").glob("main-*-ral-*.json"))
    gone.unlink()
    assert study.main(["--quick", "--out", str(out), "--no-progress", "--report-only"]) == 0
    assert not gone.exists()
    n = n_main + n_sweep
    assert f"Incomplete: {n - 1} of {n} runs finished" in (out / "results.md").read_text()


@pytest.mark.parametrize("argv, msg", [
    (["--grids", "1,4"], "--grids"), (["--sweep", "0,1"], "--sweep"), (["--methods", "grpo,dpo"], "unknown method"),
    (["--seeds", "0"], "--seeds"), (["--workers", "0"], "--workers"), (["--grids", "4,x"], "--grids"),
])
def test_study_rejects_bad_arguments(argv, msg, capsys):
    with pytest.raises(SystemExit):
        study.parse_args(argv)
    captured = capsys.readouterr()
    assert msg in captured.err + captured.out


def test_study_help_is_a_console_script():
    r = subprocess.run([sys.executable, "-m", "ral_trainer.study", "--help"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and "--quick" in r.stdout and "--ral-norm" in r.stdout
