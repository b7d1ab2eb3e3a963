"""RAL inside TRL's GRPOTrainer (ral_trainer.adapters.trl): capture in the old-log-prob
pass, the loss value against ral_kernels.ral_loss by hand, LoRA, the zero-term warning,
distillation and the input errors. Tiny random models and a local tokenizer, CPU only."""

from __future__ import annotations

import warnings

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("datasets")

import ral_kernels  # noqa: E402
from ral_trainer import UnsupportedArchitectureError, ZeroAttentionTermWarning  # noqa: E402
from ral_trainer.adapters import UnsupportedVersionError  # noqa: E402
from ral_trainer.adapters import trl as ral_trl  # noqa: E402
from ral_trainer.adapters.toy import copy_reward, quick_config, tiny_tokenizer, tiny_trl_model, toy_dataset  # noqa: E402
from ral_trainer.losses import TeacherMisalignmentError  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def make_trainer(tmp_path, *, model=None, teacher=None, teacher_tok=None, **cfg):
    torch.manual_seed(0)
    args = quick_config(str(tmp_path), **cfg)
    return ral_trl.RALGRPOTrainer(model=model if model is not None else tiny_trl_model(), reward_funcs=copy_reward,
                                  args=args, train_dataset=toy_dataset(16), processing_class=tiny_tokenizer(),
                                  teacher_model=teacher, teacher_processing_class=teacher_tok)


def rollout(trainer):
    trainer.model.train()
    batch = next(iter(trainer.get_train_dataloader()))
    return trainer._prepare_inputs(batch)


def perturb(model, scale=0.5, seed=1):
    """Move the last layer's query projection so that θ != θ_old (a stand-in for an optimizer step)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "layers.1.self_attn.q_proj.weight" in n:
                p.add_(scale * torch.randn(p.shape, generator=g))


def by_hand(trainer, inputs):
    """The divergence of the same micro-batch, computed with the patch directly."""
    p, c = inputs["prompt_ids"].shape[1], inputs["completion_ids"].shape[1]
    mask = inputs["completion_mask"]
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    am = torch.cat([inputs["prompt_mask"], mask], 1)
    rows = torch.zeros_like(am, dtype=torch.bool)
    rows[:, p - 1:p + c - 1] = mask.bool()
    old = trainer._ral_old.select(inputs["ral_index"])
    with torch.no_grad(), trainer.ral_patch.update(old, rows) as upd:
        trainer.model(input_ids=ids, attention_mask=am)
    return upd.divergence[:, p - 1:p + c - 1], mask


def test_capture_in_old_logprob_pass(tmp_path):
    tr = make_trainer(tmp_path, num_iterations=2)
    assert tr._ral_needs_old
    calls = []
    orig = tr.ral_patch.capture

    def spy(*a, **k):
        calls.append(k.get("num_rows"))
        return orig(*a, **k)

    tr.ral_patch.capture = spy
    inputs = rollout(tr)
    c = inputs["completion_ids"].shape[1]
    assert calls == [c + 1]  # one capture, in TRL's own old-log-prob forward (one chunk)
    old = tr._ral_old
    assert old.batch_size == 4 and list(old.layers) == [1]
    cap = old.layers[1]
    assert cap.cache.q_old.shape[2] == c + 1 and cap.num_tokens == inputs["prompt_ids"].shape[1] + c
    assert sorted(inputs["ral_index"].tolist()) == [0, 1, 2, 3]
    # at θ = θ_old the divergence is zero
    div, mask = by_hand(tr, inputs)
    assert float((div.abs() * mask).max()) < 1e-5


@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_attention_loss_equals_ral_loss_by_hand(tmp_path, loss_type):
    tr = make_trainer(tmp_path, num_iterations=2, ral_coef=3.0, loss_type=loss_type)
    inputs = rollout(tr)
    inputs["advantages"] = torch.tensor([1.0, -0.5, 2.0, -1.5])  # non-zero whatever the rewards were
    tr.current_gradient_accumulation_steps = 1  # set by TRL's train loop
    perturb(tr.model)
    div, mask = by_hand(tr, inputs)
    assert float((div * mask).abs().sum()) > 1e-4
    if loss_type == "grpo":
        expect = ral_kernels.ral_loss(div, inputs["advantages"], mask, loss_type="grpo")
    else:  # TRL's dapo normalizer: global item count / processes * accumulation / steps_per_generation
        n = inputs["num_items_in_batch"].float() * tr.current_gradient_accumulation_steps / tr.args.steps_per_generation
        expect = ral_kernels.ral_loss(div, inputs["advantages"], mask, loss_type="dapo", num_items_in_batch=n)
    loss = tr._compute_loss(tr.model, inputs)
    logged = tr._metrics["train"]["ral/attention_loss"][-1]
    assert logged == pytest.approx(float(expect), rel=1e-4, abs=1e-7)
    tr.args.ral_coef = 0.0
    loss0 = tr._compute_loss(tr.model, inputs)
    assert float((loss - loss0).detach()) == pytest.approx(3.0 * float(expect), rel=1e-3, abs=1e-6)


def test_zero_term_warns_once_and_names_the_fix(tmp_path):
    with pytest.warns(ZeroAttentionTermWarning, match="num_iterations > 1.*steps_per_generation"):
        tr = make_trainer(tmp_path, num_iterations=1)
    assert not tr._ral_needs_old
    with warnings.catch_warnings():
        warnings.simplefilter("error", ZeroAttentionTermWarning)
        tr._warn_zero()  # already warned: silent


def test_steps_per_generation_enables_the_term(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error", ZeroAttentionTermWarning)
        tr = make_trainer(tmp_path, num_iterations=1, steps_per_generation=2, per_device_train_batch_size=2)
    assert tr._ral_needs_old
    inputs = rollout(tr)
    assert tr._ral_old.batch_size == 4 and inputs["ral_index"].numel() == 2  # two micro-batches of one rollout


def test_lora_trains_with_attention_term(tmp_path):
    peft = pytest.importorskip("peft")
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj"], lora_dropout=0.0)
    model = tiny_trl_model()
    base_q = model.model.layers[1].self_attn.q_proj.weight.detach().clone()
    def length_reward(completions, **kw):  # dense: never all-equal in a group for long
        return [float(len(c)) for c in completions]

    tr = ral_trl.RALGRPOTrainer(model=model, reward_funcs=length_reward,
                                args=quick_config(str(tmp_path), max_steps=3, num_iterations=2, learning_rate=5e-2),
                                train_dataset=toy_dataset(16), processing_class=tiny_tokenizer(), peft_config=cfg)
    assert hasattr(tr.model, "peft_config")
    lora_b = {n: p.detach().clone() for n, p in tr.model.named_parameters() if "lora_B" in n}
    tr.train()
    hist = [h for h in tr.state.log_history if "ral/attention_loss" in h]
    assert len(hist) == 3
    assert any(h["ral/attention_div"] != 0.0 for h in hist[1:])
    changed = [n for n, p in tr.model.named_parameters() if "lora_B" in n and not torch.equal(p, lora_b[n])]
    assert changed
    base = tr.model.get_base_model().model.layers[1].self_attn.q_proj.base_layer.weight
    assert torch.equal(base, base_q)


def test_teacher_attention_distillation(tmp_path):
    teacher = tiny_trl_model(seed=3, num_heads=2, num_kv_heads=1, hidden_size=48)  # other head count / head dim
    tr = make_trainer(tmp_path, teacher=teacher, teacher_tok=tiny_tokenizer(), num_iterations=2,
                      teacher_ral_coef=0.5, max_steps=1)
    tr.train()
    h = [h for h in tr.state.log_history if "ral/teacher_attention_div" in h]
    assert h and h[0]["ral/teacher_attention_div"] > 0  # different models: non-zero divergence


def test_teacher_mismatch_errors(tmp_path):
    with pytest.raises(TeacherMisalignmentError, match="vocab_size"):
        make_trainer(tmp_path, teacher=tiny_trl_model(vocab_size=40), teacher_ral_coef=1.0)
    other = tiny_tokenizer()
    other.add_tokens(["cyan"])
    with pytest.raises(TeacherMisalignmentError, match="tokenizer"):
        make_trainer(tmp_path, teacher=tiny_trl_model(), teacher_tok=other, teacher_ral_coef=1.0)


def test_unsupported_attention_is_refused(tmp_path):
    import transformers as tf

    gpt2 = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=15, n_embd=32, n_layer=1, n_head=2, pad_token_id=0,
                                            eos_token_id=2, bos_token_id=1))
    with pytest.raises(UnsupportedArchitectureError, match="supported"):
        make_trainer(tmp_path, model=gpt2)


def test_trl_version_range(monkeypatch):
    import trl

    monkeypatch.setattr(trl, "__version__", "0.19.1")
    with pytest.raises(UnsupportedVersionError, match=r"trl>=1\.0,<2"):
        ral_trl._check_trl_version()
    monkeypatch.setattr(trl, "__version__", "2.0.0")
    with pytest.raises(UnsupportedVersionError, match="2.0.0"):
        ral_trl._check_trl_version()


def test_bad_config_values(tmp_path):
    with pytest.raises(ValueError, match="head_reduction"):
        quick_config(str(tmp_path), attention_head_reduction="none")
    with pytest.raises(ValueError, match="attention_divergence"):
        quick_config(str(tmp_path), attention_divergence="tv")


# --------------------------------------------------------------------------- settings where the term is zero

def test_vllm_importance_sampling_does_not_hide_a_zero_term(tmp_path, monkeypatch):
    """With vLLM's importance-sampling correction TRL computes old log-probs on every
    rollout, but with one optimizer step per rollout they are the current model's: the
    term is identically zero, so nothing is captured and the trainer warns."""
    from trl import GRPOTrainer

    orig = GRPOTrainer.__init__

    def as_if_vllm(self, *a, **k):  # vLLM cannot run here; its flags are all the adapter reads
        orig(self, *a, **k)
        self.use_vllm, self.vllm_importance_sampling_correction = True, True

    monkeypatch.setattr(GRPOTrainer, "__init__", as_if_vllm)
    with pytest.warns(ZeroAttentionTermWarning, match="vLLM's importance-sampling correction"):
        tr = make_trainer(tmp_path, num_iterations=1)
    assert not tr._ral_needs_old  # no capture on any rollout
    with warnings.catch_warnings():
        warnings.simplefilter("error", ZeroAttentionTermWarning)
        tr = make_trainer(tmp_path, num_iterations=1, steps_per_generation=2, per_device_train_batch_size=2)
    assert tr._ral_needs_old


def test_liger_loss_route_is_refused(tmp_path, monkeypatch):
    """TRL <= 1.9 sends use_liger_kernel=True to compute_liger_loss, which never calls
    _compute_loss (where the term is added): refused. Simulated on the installed TRL with
    the old routing, as in TRL 1.9's source."""
    from trl import GRPOTrainer

    assert not ral_trl._liger_bypasses_compute_loss()  # the installed TRL always calls _compute_loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.use_liger_kernel:
            return self.compute_liger_loss(model, inputs)
        return self._compute_loss(model, inputs)

    monkeypatch.setattr(GRPOTrainer, "compute_loss", compute_loss)
    monkeypatch.setattr(GRPOTrainer, "compute_liger_loss", lambda self, model, inputs: None, raising=False)
    assert ral_trl._liger_bypasses_compute_loss()
    with pytest.raises(ValueError, match="use_liger_kernel=True.*compute_liger_loss"):
        make_trainer(tmp_path, use_liger_kernel=True)
    make_trainer(tmp_path)  # without Liger: fine


def test_runtime_guard_warns_when_the_divergence_stays_zero(tmp_path):
    """lr = 0: the schedule is fine (two steps per rollout), but the weights never move, so
    every update after an optimizer step sees exactly θ_old."""
    tr = make_trainer(tmp_path, num_iterations=2, learning_rate=0.0, max_steps=4)
    tr.ral_zero_guard.patience = 2
    with pytest.warns(ZeroAttentionTermWarning, match="0 to rounding .* on 2 consecutive updates"):
        tr.train()
    assert tr.ral_zero_guard.warned


def test_deprecated_coefficient_names(tmp_path):
    with pytest.warns(DeprecationWarning, match="attention_coef.*ral_coef"):
        args = quick_config(str(tmp_path), attention_coef=2.5)
    assert args.ral_coef == 2.5 and args.attention_coef is None
    with pytest.warns(DeprecationWarning, match="teacher_ral_coef"):
        args = quick_config(str(tmp_path), teacher_attention_coef=0.5)
    assert args.teacher_ral_coef == 0.5


# --------------------------------------------------------------------------- a vision-language model

def test_vl_model_images_reach_the_attention_term(tmp_path):
    """A tiny Qwen2.5-VL through RALGRPOTrainer: pixel_values and image_grid_thw go into the
    capture and the update passes, the old policy covers the visual tokens, and the term is
    non-zero after the first optimizer step of a rollout."""
    from ral_trainer.adapters.toy import tiny_trl_vl_model, tiny_vl_processor, toy_vl_dataset

    proc = tiny_vl_processor()
    model = tiny_trl_vl_model(proc)
    image_id = proc.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    tr = ral_trl.RALGRPOTrainer(model=model, reward_funcs=copy_reward, train_dataset=toy_vl_dataset(8),
                                args=quick_config(str(tmp_path), max_steps=2, num_iterations=2), processing_class=proc)
    seen = {"capture": [], "update": []}

    def record(m, a, kw, out):  # after the forward: the adapter's capture hook has not exited yet
        if tr.ral_patch._mode is not None:  # the capture and update passes (not generation)
            seen[tr.ral_patch._mode].append(
                (kw.get("pixel_values") is not None, kw.get("image_grid_thw"), (kw["input_ids"] == image_id).sum(1)))

    model.register_forward_hook(record, with_kwargs=True)
    tr.train()
    assert len(seen["capture"]) == 1 and len(seen["update"]) == 2  # one rollout, two optimizer steps on it
    for has_pv, grid, n_img in seen["capture"] + seen["update"]:
        assert has_pv
        assert grid.tolist()[0] == [1, 4, 4] and n_img.tolist() == [4] * len(n_img)  # 32 px: 2 x 2 merged tokens
    hist = [h for h in tr.state.log_history if "ral/attention_div" in h]
    assert len(hist) == 2 and hist[0]["ral/attention_div"] < 1e-6 < hist[1]["ral/attention_div"]


# --------------------------------------------------------------------------- torch.compile

def test_torch_compile_trains_two_steps(tmp_path):
    """TRL's torch_compile=True compiles the patched model (HF's transposed q/k/v layout into
    the fused op's fake and real kernels); 2 steps train and the second carries the term."""
    tr = make_trainer(tmp_path, num_iterations=2, max_steps=2, torch_compile=True)
    tr.train()
    hist = [h for h in tr.state.log_history if "ral/attention_div" in h]
    assert len(hist) == 2 and hist[0]["ral/attention_div"] < 1e-6 < hist[1]["ral/attention_div"]
    assert all(torch.isfinite(p).all() for p in tr.model.parameters())
