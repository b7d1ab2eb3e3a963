"""The training loop: zero-term warning, exact resume, gradient accumulation, bf16, a
short run that improves reward, and the ral-train command."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch

from ral_trainer import RALTrainer, TrainConfig, ZeroAttentionTermWarning
from ral_trainer.models import tiny_model
from ral_trainer.visual_search import WORDS, VisualSearchTask


def _trainer(style="direct", **cfg):
    task = VisualSearchTask(style=style)
    model = tiny_model("qwen2_5_vl", vocab_size=len(WORDS), seed=0)
    base = dict(prompts_per_step=2, num_generations=4, max_completion_length=2, progress=False, seed=0)
    base.update(cfg)
    return RALTrainer(model, task, TrainConfig(**base))


def test_warns_when_attention_term_is_zero():
    with pytest.warns(ZeroAttentionTermWarning, match="identically zero"):
        _trainer(num_iterations=1, num_minibatches=1, ral_coef=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ZeroAttentionTermWarning)
        _trainer(num_iterations=1, num_minibatches=1, ral_coef=0.0)
        _trainer(num_iterations=2, num_minibatches=1, ral_coef=1.0)


def test_resume_is_bit_for_bit(tmp_path):
    a = _trainer(checkpoint_dir=str(tmp_path), checkpoint_every=2)
    a.train(4)
    b = _trainer()
    b.load_checkpoint(str(tmp_path / "step-2"))
    assert b.step == 2
    b.train(4)
    for (n, pa), (_, pb) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert torch.equal(pa, pb), n
    strip = lambda h: [{k: v for k, v in r.items() if k != "time_s"} for r in h]
    assert strip(a.history) == strip(b.history)
    assert a.history[-1]["attn_divergence"] > 0  # the RAL term was active


def test_grad_accum_matches_one_big_step():
    a = _trainer(grad_accum=1)
    b = _trainer(grad_accum=2)
    a.train_step()
    b.train_step()
    for (n, pa), (_, pb) in zip(a.model.named_parameters(), b.model.named_parameters()):
        torch.testing.assert_close(pa, pb, atol=2e-6, rtol=1e-5, msg=lambda m: f"{n}: {m}")


def test_bf16_step_runs():
    t = _trainer(dtype="bfloat16")
    rec = t.train_step()
    assert next(t.model.parameters()).dtype == torch.bfloat16
    assert all(v == v for v in rec.values())  # no NaN


def test_short_run_improves_reward():
    """The demo's settings: the policy learns to look at the marked square."""
    torch.set_num_threads(1)
    task = VisualSearchTask(style="think")
    model = tiny_model("qwen2_5_vl", vocab_size=len(WORDS), seed=0, initializer_range=0.1)
    t = RALTrainer(model, task, TrainConfig(prompts_per_step=8, num_generations=8, max_completion_length=4,
                                            lr=5e-4, progress=False, seed=0))
    hist = t.train(30)
    first = sum(h["reward"] for h in hist[:5]) / 5
    last = sum(h["reward"] for h in hist[-5:]) / 5
    print(f"reward first 5 steps {first:.3f}, last 5 steps {last:.3f}")
    assert last > first + 0.2, (first, last)
    assert hist[-1]["attn_target_mass"] > 2 * hist[0]["attn_target_mass"]
    for key in ("reward", "accuracy", "token_loss", "attn_divergence", "attn_entropy", "attn_target_mass"):
        assert key in hist[-1]


def test_ral_train_command(tmp_path):
    from ral_trainer.demo import main

    out = tmp_path / "report"
    assert main(["--quick", "--steps", "3", "--eval-size", "8", "--eval-every", "3", "--prompts", "2",
                 "--generations", "4", "--out", str(out), "--no-progress"]) == 0
    for f in ("curves.png", "attention.png", "results.md", "metrics.json"):
        assert (out / f).stat().st_size > 0, f
    text = (out / "results.md").read_text()
    assert "| grpo |" in text and "| ral |" in text and "| ral_zero |" in text


def test_ral_train_help():
    r = subprocess.run([sys.executable, "-m", "ral_trainer.demo", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "--quick" in r.stdout


def test_on_policy_distillation_step():
    task = VisualSearchTask(style="direct")
    student = tiny_model("qwen2_5_vl", vocab_size=len(WORDS), seed=0)
    teacher = tiny_model("qwen2_5_vl", vocab_size=len(WORDS), num_heads=8, num_kv_heads=2, head_dim=8, num_layers=3,
                         seed=5)
    cfg = TrainConfig(prompts_per_step=2, num_generations=4, max_completion_length=2, progress=False,
                      num_iterations=1, num_minibatches=1, ral_coef=0.0)
    t = RALTrainer(student, task, cfg, teacher=teacher)
    before = {n: p.detach().clone() for n, p in t.model.named_parameters()}
    rec = t.train_step()
    assert rec["token_kd"] > 0 and rec["teacher_attn_divergence"] > 0
    assert any(not torch.equal(before[n], p) for n, p in t.model.named_parameters())


def test_offload_setting_reaches_the_capture(monkeypatch):
    """TrainConfig.offload_cache goes to every capture (that an offloaded capture trains the
    same is tests/trainer/test_patch.py::test_offloaded_cache_gives_the_same_update)."""
    t = _trainer(offload_cache="cpu")
    seen = []
    orig = t.patch.capture

    def spy(*a, **k):
        seen.append(k.get("offload"))
        return orig(*a, **k)

    monkeypatch.setattr(t.patch, "capture", spy)
    t.train_step()
    assert seen and all(o == "cpu" for o in seen)


def test_runtime_guard_warns_when_weights_cannot_move():
    t = _trainer(lr=0.0)
    t.zero_guard.patience = 2
    with pytest.warns(ZeroAttentionTermWarning, match="0 to rounding .* on 2 consecutive updates"):
        while not t.zero_guard.warned and t.step < 4:  # a step whose rewards are all equal is not judged
            t.train_step()
    assert t.zero_guard.warned


def test_cli_ral_coef_and_deprecated_lam():
    from ral_trainer.demo import _parse

    assert _parse(["--ral-coef", "0.5"]).ral_coef == 0.5
    with pytest.warns(DeprecationWarning, match="--ral-coef"):
        assert _parse(["--lam", "2"]).ral_coef == 2.0
