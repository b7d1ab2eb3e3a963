"""GRPO / RAL / distillation losses against hand-written formulas."""

from __future__ import annotations

import pytest
import torch

from ral_trainer import losses, patch_model
from ral_trainer.models import tiny_model
from trainer_helpers import make_batch


def _toy(seed=0, b=4, r=5):
    g = torch.Generator().manual_seed(seed)
    logp = torch.randn(b, r, generator=g, dtype=torch.float64) * 0.3 - 1
    old = logp + torch.randn(b, r, generator=g, dtype=torch.float64) * 0.3
    adv = torch.randn(b, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 0]], dtype=torch.bool)
    return logp, old, adv, mask


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_grpo_loss_matches_formula(loss_type):
    logp, old, adv, mask = _toy()
    loss, stats = losses.grpo_loss(logp, old, adv, mask, loss_type=loss_type, epsilon_low=0.2, epsilon_high=0.28,
                                   max_completion_length=5, num_items_in_batch=20)
    ratio = (logp - old).exp()
    per = -torch.min(ratio * adv[:, None], ratio.clamp(0.8, 1.28) * adv[:, None])
    m = mask.double()
    expect = {"grpo": ((per * m).sum(1) / m.sum(1)).mean(), "bnpo": (per * m).sum() / m.sum(),
              "dr_grpo": (per * m).sum() / (4 * 5), "dapo": (per * m).sum() / 20}[loss_type]
    torch.testing.assert_close(loss.double(), expect)
    assert 0 <= stats["clip_ratio"] <= 1


def test_kl_to_reference_is_zero_at_reference():
    logp, old, adv, mask = _toy()
    l0, _ = losses.grpo_loss(logp, old, adv, mask)
    l1, st = losses.grpo_loss(logp, old, adv, mask, ref_logp=logp.clone(), beta=0.5)
    torch.testing.assert_close(l0, l1)
    assert st["kl"] == 0
    l2, st = losses.grpo_loss(logp, old, adv, mask, ref_logp=logp - 0.3, beta=0.5)
    assert st["kl"] > 0 and l2 > l1
    with pytest.raises(ValueError, match="ref_logp"):
        losses.grpo_loss(logp, old, adv, mask, beta=0.1)


def test_group_advantages():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    a = losses.group_advantages(r, 4)
    assert torch.allclose(a[:4], torch.tensor([0.5, -0.5, -0.5, 0.5]) / (0.57735 + 1e-4), atol=1e-3)
    assert torch.all(a[4:] == 0)  # a group with one reward carries no signal
    with pytest.raises(ValueError, match="multiple of group_size"):
        losses.group_advantages(r[:7], 4)


def test_token_logprobs_alignment():
    logits = torch.randn(2, 4, 7)
    comp = torch.tensor([[1, 2, 3], [4, 5, 6]])
    lp = losses.token_logprobs(logits, comp)
    assert torch.allclose(lp[0, 0], logits[0, 0].log_softmax(-1)[1])
    assert torch.allclose(lp[1, 2], logits[1, 2].log_softmax(-1)[6])


def test_ral_term_sign_and_slice():
    div = torch.zeros(2, 8)
    div[:, -3:] = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]])
    mask = torch.ones(2, 3, dtype=torch.bool)
    val = losses.ral_term(div, torch.tensor([1.0, -1.0]), mask)
    torch.testing.assert_close(val, torch.tensor((0.2 - 0.5) / 2))


def test_distillation_with_other_teacher_shape():
    student = tiny_model("qwen2_5_vl")
    teacher = tiny_model("qwen2_5_vl", num_heads=8, num_kv_heads=2, head_dim=8, seed=4)
    kw, rows = make_batch("qwen2_5_vl")
    r = 6
    tp, sp = patch_model(teacher), patch_model(student)
    with torch.no_grad(), tp.capture(num_rows=r) as cap:
        t_logits = teacher(**kw).logits[:, -r:]
    with sp.update(cap.old_policy, rows) as upd:
        s_logits = student(**kw).logits[:, -r:]
    mask = rows[:, -r:]
    loss, st = losses.distillation_loss(s_logits, t_logits, upd.divergence, mask, mu=1.0, gamma=1.0)
    assert st["token_kd"] > 0 and st["attn_div"] > 0
    loss.backward()
    assert student.model.language_model.layers[-1].self_attn.k_proj.weight.grad.abs().max() > 0
    with pytest.raises(losses.TeacherMisalignmentError, match="vocabulary"):
        losses.distillation_loss(s_logits, t_logits[..., :-1], upd.divergence.detach(), mask)
