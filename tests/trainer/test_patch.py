"""Patching: patched == unpatched (logits and gradients), capture / update, divergence
at θ = θ_old, gradient routing, unpatch, packed inputs, teachers with other shapes."""

from __future__ import annotations


import dataclasses

import pytest
import torch

from trainer_helpers import ARCHS, make_batch
from ral_trainer import PatchError, UnsupportedArchitectureError, apply_ral, patch_model
from ral_trainer.losses import TeacherMisalignmentError, check_teacher_alignment
from ral_trainer.models import decoder_layers, tiny_model


def _grads(model):
    return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in model.named_parameters()}


def _logit_loss(logits, attn, seed=3):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(logits.shape, generator=g)
    return (logits * w * attn[..., None]).sum()


# every family on its last layer; several layers at once on the families with distinct code paths
# (M-RoPE VL, plain RoPE, GQA); Gemma 3's sliding layers are refused (test_sliding_window_layers_are_refused)
_CASES = [(a, None) for a in ARCHS] + [(a, [0, 1]) for a in ("qwen2_5_vl", "qwen2_vl", "qwen2", "qwen3", "llama")]


@pytest.mark.parametrize("arch,layers", _CASES, ids=[f"{a}-{'all' if l else 'last'}" for a, l in _CASES])
def test_patched_matches_unpatched(arch, layers):
    model = tiny_model(arch).eval()
    kw, rows = make_batch(arch)
    attn = kw["attention_mask"]
    ref = model(**kw).logits
    _logit_loss(ref, attn).backward()
    g_ref = _grads(model)
    model.zero_grad(set_to_none=True)

    patch = patch_model(model, layers)
    with torch.no_grad(), patch.capture(num_rows=6) as cap:
        cap_logits = model(**kw).logits
    with patch.update(cap.old_policy, rows) as upd:
        logits = model(**kw).logits
    _logit_loss(logits, attn).backward()
    g = _grads(model)
    valid = attn.bool()
    assert torch.equal(cap_logits[valid], ref[valid])  # capture runs the layer's own implementation
    torch.testing.assert_close(logits[valid], ref[valid], atol=2e-5, rtol=1e-5)
    for n in g_ref:
        torch.testing.assert_close(g[n], g_ref[n], atol=5e-5, rtol=1e-4, msg=lambda m: f"{n}: {m}")
    assert set(upd.per_layer) == set(patch.layers)
    assert upd.divergence.shape == rows.shape
    # θ = θ_old: zero divergence (up to rounding)
    assert upd.divergence.abs().max() < 1e-6
    assert torch.all(upd.divergence[~rows] == 0)
    patch.unpatch()
    for layer in decoder_layers(model):
        assert layer.self_attn.config._attn_implementation == "sdpa"
        assert not hasattr(layer.self_attn, "_ral_state")
    assert torch.equal(model(**kw).logits, ref.detach())


@pytest.mark.parametrize("arch", ["qwen2_5_vl", "qwen2"])
def test_divergence_nonzero_after_one_step(arch):
    model = tiny_model(arch)
    kw, rows = make_batch(arch)
    patch = patch_model(model)
    with torch.no_grad(), patch.capture(num_rows=6, with_lse=True) as cap:
        model(**kw)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    with patch.update(cap.old_policy, rows) as upd:
        model(**kw).logits.float().pow(2).mean().backward()
    assert upd.divergence.abs().max() < 1e-6
    opt.step()
    with patch.update(cap.old_policy, rows) as upd:
        model(**kw)
    d = upd.divergence
    assert d[rows].min() > 0 and torch.all(d[~rows] == 0)


def test_attention_gradient_reaches_only_patched_layer():
    model = tiny_model("qwen2")
    kw, rows = make_batch("qwen2")
    patch = patch_model(model, [0])
    with torch.no_grad(), patch.capture(num_rows=6) as cap:
        model(**kw)
    with torch.no_grad():  # move away from θ_old so the divergence has a gradient
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    with patch.update(cap.old_policy, rows) as upd:
        model(**kw)
    upd.divergence.sum().backward()
    names_with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().max() > 0}
    attn0 = "model.layers.0.self_attn."
    assert attn0 + "q_proj.weight" in names_with_grad and attn0 + "k_proj.weight" in names_with_grad
    # the divergence depends on layer 0's queries and keys only: no value / output / later-layer gradient
    for n in names_with_grad:
        assert n.startswith(("model.embed_tokens", attn0 + "q_proj", attn0 + "k_proj", "model.layers.0.input_layernorm")), n
    assert not any(n.startswith("model.layers.1") for n in names_with_grad)


def test_packed_matches_padded():
    model = tiny_model("qwen2").eval()
    g = torch.Generator().manual_seed(0)
    lens = [9, 14, 7]
    ids = torch.randint(8, 64, (1, sum(lens)), generator=g)
    pos = torch.cat([torch.arange(n) for n in lens])[None]
    ref = model(input_ids=ids, position_ids=pos, use_cache=False).logits  # sdpa builds a block-diagonal mask
    rows = torch.zeros(1, sum(lens), dtype=torch.bool)
    ends = torch.tensor(lens).cumsum(0)
    for e in ends:
        rows[0, e - 3: e] = True  # each sequence's last 3 tokens are its response
    patch = patch_model(model)
    with torch.no_grad(), patch.capture(num_rows=3) as cap:
        model(input_ids=ids, position_ids=pos, use_cache=False)
    with patch.update(cap.old_policy, rows) as upd:
        out = model(input_ids=ids, position_ids=pos, use_cache=False).logits
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)
    assert upd.divergence.shape == (1, sum(lens))
    assert upd.divergence.abs().max() < 1e-6
    # each packed sequence alone gives the same logits
    for s, n in zip((ends - torch.tensor(lens)).tolist(), lens):
        one = model(input_ids=ids[:, s:s + n]).logits
        torch.testing.assert_close(out[:, s:s + n], one, atol=2e-5, rtol=1e-5)


def test_packed_update_runs_varlen_and_matches_padded(monkeypatch):
    """Padding-free (packed) inputs go through ``fused_attn_kl_varlen`` and give, after a
    parameter change, the divergences of the same sequences left-padded."""
    import ral_kernels

    model = tiny_model("qwen2").eval()
    g = torch.Generator().manual_seed(1)
    lens, r = [9, 14, 7], 3
    ids = torch.randint(8, 64, (1, sum(lens)), generator=g)
    pos = torch.cat([torch.arange(n) for n in lens])[None]
    rows = torch.zeros(1, sum(lens), dtype=torch.bool)
    width = max(lens)
    pids, ppos = torch.zeros(3, width, dtype=torch.long), torch.zeros(3, width, dtype=torch.long)
    amask, prows = torch.zeros(3, width, dtype=torch.long), torch.zeros(3, width, dtype=torch.bool)
    for s, (start, n) in enumerate(zip((torch.tensor(lens).cumsum(0) - torch.tensor(lens)).tolist(), lens)):
        rows[0, start + n - r: start + n] = True
        pids[s, width - n:], ppos[s, width - n:] = ids[0, start:start + n], torch.arange(n)
        amask[s, width - n:], prows[s, width - r:] = 1, True
    packed = dict(input_ids=ids, position_ids=pos, use_cache=False)
    padded = dict(input_ids=pids, position_ids=ppos, attention_mask=amask, use_cache=False)
    patch = patch_model(model)
    with torch.no_grad(), patch.capture(num_rows=r, with_lse=True) as cap_pk:
        model(**packed)
    with torch.no_grad(), patch.capture(num_rows=r, with_lse=True) as cap_pd:
        model(**padded)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    calls = []
    varlen = ral_kernels.fused_attn_kl_varlen
    monkeypatch.setattr(ral_kernels, "fused_attn_kl_varlen", lambda *a, **kw: calls.append(1) or varlen(*a, **kw))
    with patch.update(cap_pk.old_policy, rows) as up_pk:
        model(**packed)
    assert len(calls) == len(patch.layers)
    with patch.update(cap_pd.old_policy, prows) as up_pd:
        model(**padded)
    assert len(calls) == len(patch.layers)  # the padded pass does not use it
    d_pk, d_pd = up_pk.divergence[rows], up_pd.divergence[prows]
    assert d_pd.min() > 0
    torch.testing.assert_close(d_pk, d_pd, atol=1e-6, rtol=1e-4)


def test_teacher_with_other_heads_and_head_dim():
    student = tiny_model("qwen2_5_vl", num_heads=4, num_kv_heads=2)
    teacher = tiny_model("qwen2_5_vl", num_heads=8, num_kv_heads=4, head_dim=8, num_layers=3, seed=1)
    kw, rows = make_batch("qwen2_5_vl")
    tp = patch_model(teacher)
    sp = patch_model(student)
    with torch.no_grad(), tp.capture(num_rows=6) as tcap:
        teacher(**kw)
    assert tcap.old_policy.layers[2].cache.q_old.shape[1:] == (8, 6, 8)
    with sp.update(tcap.old_policy, rows) as upd:
        student(**kw)
    d = upd.divergence
    assert d[rows].min() > 0
    d[rows].sum().backward()
    assert student.model.language_model.layers[1].self_attn.q_proj.weight.grad.abs().max() > 0


def test_capture_memory_is_response_rows_plus_keys():
    model = tiny_model("qwen2")
    kw, rows = make_batch("qwen2", width=40)
    patch = patch_model(model)
    with torch.no_grad(), patch.capture(num_rows=6, with_lse=True) as cap:
        model(**kw)
    c = cap.old_policy.layers[1].cache
    assert c.q_old.shape == (3, 4, 6, 16) and c.k_old.shape == (3, 2, 40, 16) and c.lse_old.shape == (3, 4, 6)
    sub = cap.old_policy.select([2, 0])
    assert torch.equal(sub.layers[1].cache.q_old[0], c.q_old[2])


# ------------------------------------------------------------------ errors

def test_error_unsupported_architecture():
    from transformers import GPT2Config, GPT2LMHeadModel

    m = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(UnsupportedArchitectureError, match="Qwen2.5-VL.*|supported"):
        patch_model(m)


def test_error_layer_out_of_range():
    m = tiny_model("llama")
    with pytest.raises(IndexError, match="out of range.*2 decoder layers"):
        patch_model(m, [2])
    with pytest.raises(IndexError):
        patch_model(m, [-3])
    p = patch_model(m, [-2])
    assert p.layers == [0]
    with pytest.raises(PatchError, match="already patched"):
        patch_model(m)


def test_error_update_without_capture():
    m = tiny_model("qwen2")
    kw, rows = make_batch("qwen2")
    p = patch_model(m)
    with pytest.raises(PatchError, match="without a captured old policy"):
        with p.update(None, rows):
            m(**kw)


def test_error_response_masks():
    m = tiny_model("qwen2")
    kw, rows = make_batch("qwen2")
    p = patch_model(m)
    with torch.no_grad(), p.capture(num_rows=6) as cap:
        m(**kw)
    with pytest.raises(PatchError, match="response_mask has shape"):
        with p.update(cap.old_policy, rows[:, 1:]):
            m(**kw)
    early = rows.clone()
    early[:, 10] = True
    with pytest.raises(PatchError, match="before the last 6 positions"):
        with p.update(cap.old_policy, early):
            m(**kw)
    on_pad = rows.clone()
    on_pad[0, 0] = True
    with pytest.raises(PatchError, match="marks padding tokens"):
        with p.update(cap.old_policy, on_pad):
            m(**kw)
    with pytest.raises(PatchError, match="does not align"):
        with p.update(cap.old_policy.select([0, 1]), rows):
            m(**kw)


def test_error_teacher_tokens_do_not_align():
    student, teacher = tiny_model("qwen2"), tiny_model("qwen2", seed=2)
    kw, rows = make_batch("qwen2")
    kw_short = {k: v[:, 2:] for k, v in kw.items()}
    tp, sp = patch_model(teacher), patch_model(student)
    with torch.no_grad(), tp.capture(num_rows=6) as tcap:
        teacher(**kw_short)
    with pytest.raises(PatchError, match="does not align"):
        with sp.update(tcap.old_policy, rows):
            student(**kw)
    with pytest.raises(TeacherMisalignmentError, match="do not match"):
        check_teacher_alignment(kw["input_ids"], kw_short["input_ids"])


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_other_layers_keep_their_implementation(impl):
    model = tiny_model("qwen2", attn_implementation=impl).eval()
    kw, rows = make_batch("qwen2")
    ref = model(**kw).logits
    patch = patch_model(model, [1])
    layers = decoder_layers(model)
    assert layers[0].self_attn.config._attn_implementation == impl
    assert layers[1].self_attn.config._attn_implementation == "ral_fused"
    with torch.no_grad(), patch.capture(num_rows=6) as cap:
        model(**kw)
    with patch.update(cap.old_policy, rows):
        out = model(**kw).logits
    valid = kw["attention_mask"].bool()
    torch.testing.assert_close(out[valid], ref[valid], atol=2e-5, rtol=1e-5)


def test_left_and_right_padding():
    """Prompts left-padded, completions right-padded (the RL layout)."""
    model = tiny_model("qwen2_5_vl").eval()
    kw, rows = make_batch("qwen2_5_vl")
    kw["attention_mask"][0, -2:] = 0  # a completion that ended early
    kw["input_ids"][0, -2:] = 0
    rows[0, -2:] = False
    ref = model(**kw).logits
    out, upd = _capture_and_update(patch_model(model), model, kw, rows)
    valid = kw["attention_mask"].bool()
    torch.testing.assert_close(out[valid], ref[valid], atol=2e-5, rtol=1e-5)
    assert torch.all(upd.divergence[0, -2:] == 0)


def _capture_and_update(patch, model, kw, rows):
    """Capture on ``kw``, then the update pass on the same tokens: (logits, update context)."""
    with torch.no_grad(), patch.capture(num_rows=6) as cap:
        model(**kw)
    with patch.update(cap.old_policy, rows) as upd:
        out = model(**kw).logits
    return out, upd


# --------------------------------------------------------------------------- which models can be patched

def _granite(**kw):  # a decoder outside the tested list whose attention uses ALL_ATTENTION_FUNCTIONS
    import transformers as tf

    cfg = tf.GraniteConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa", **kw)
    torch.manual_seed(0)
    return tf.GraniteForCausalLM(cfg).eval()


def test_unlisted_model_by_opt_in():
    model = _granite()
    kw, rows = make_batch("qwen2")
    with pytest.raises(UnsupportedArchitectureError, match="allow_unlisted=True"):
        patch_model(model)
    ref = model(**kw).logits
    patch = patch_model(model, allow_unlisted=True)
    out, upd = _capture_and_update(patch, model, kw, rows)
    valid = kw["attention_mask"].bool()
    torch.testing.assert_close(out[valid], ref[valid], atol=2e-5, rtol=1e-5)
    assert upd.divergence.abs().max() < 1e-6 and set(upd.per_layer) == {1}
    patch.unpatch()
    assert not hasattr(model.model.layers[1].self_attn, "_ral_state")


def test_bypassed_attention_forward_is_refused():
    """Another library replaced the attention forward with one that calls its kernel
    directly (as verl does for Qwen2-VL): the patched layer would never run."""
    model = tiny_model("qwen2")
    attn = model.model.layers[-1].self_attn

    def own_forward(hidden_states, *args, **kwargs):  # stand-in for a direct flash-attn call
        return hidden_states, None

    attn.forward = own_forward
    with pytest.raises(UnsupportedArchitectureError, match="does not look its kernel up.*bypassed"):
        patch_model(model)
    patch_model(model, [0]).unpatch()  # the untouched layer is fine


def test_sliding_window_layers_are_refused():
    from ral_trainer.models import tiny_config
    import transformers as tf

    with pytest.raises(UnsupportedArchitectureError, match=r"layer 0 .*sliding-window.*layers=\[1\]"):
        patch_model(tiny_model("gemma3_text"), [0])
    patch_model(tiny_model("gemma3_text")).unpatch()  # the last layer is a full-attention layer
    cfg = tiny_config("mistral")
    cfg.sliding_window = 16
    with pytest.raises(UnsupportedArchitectureError, match="sliding-window attention \\(window 16\\)"):
        patch_model(tf.MistralForCausalLM(cfg))


def test_apply_ral_one_liner():
    peft = pytest.importorskip("peft")
    model = tiny_model("qwen2")
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj"]))
    patch = apply_ral(wrapped)
    assert patch.model is model and patch.layers == [1]
    assert apply_ral(wrapped) is patch and apply_ral(model, layers=-1) is patch
    with pytest.raises(PatchError, match="already patched at layers \\[1\\]"):
        apply_ral(model, layers=[0])
    patch.unpatch()
    assert apply_ral(model, layers=[0]).layers == [0]


# --------------------------------------------------------------------------- gradient checkpointing

@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_update_under_gradient_checkpointing(reentrant):
    """patch.update under HF gradient checkpointing: the same divergence and gradients as
    without it (the patched layer runs unchekpointed inside the block, the others keep it)."""
    def run(ckpt):
        model = tiny_model("qwen2", num_layers=3).train()
        kw, rows = make_batch("qwen2")
        patch = patch_model(model)
        with torch.no_grad(), patch.capture(num_rows=6) as cap:
            model(**kw)
        with torch.no_grad():
            model.model.layers[-1].self_attn.q_proj.weight.mul_(1.5)  # θ != θ_old
        if ckpt:
            model.gradient_checkpointing_enable({"use_reentrant": reentrant})
        with patch.update(cap.old_policy, rows) as upd:
            logits = model(**kw, use_cache=False).logits
        (_logit_loss(logits, kw["attention_mask"]) + 10 * upd.divergence.sum()).backward()
        layers = model.model.layers
        assert all(layer.gradient_checkpointing == ckpt for layer in layers)  # restored after the block
        return upd.divergence.detach(), _grads(model)

    d0, g0 = run(False)
    d1, g1 = run(True)
    assert d0[d0 != 0].numel() > 0
    torch.testing.assert_close(d1, d0, atol=0, rtol=0)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], atol=1e-6, rtol=1e-5, msg=lambda m: f"{n}: {m}")


# --------------------------------------------------------------------------- the cache: inference mode, offload

def _capture_update(model, kw, rows, grad_mode, **cap_kw):
    patch = patch_model(model)
    w = model.model.layers[-1].self_attn.q_proj.weight
    w0 = w.detach().clone()
    with grad_mode(), patch.capture(num_rows=6, with_lse=True, **cap_kw) as cap:
        model(**kw)
    with torch.no_grad():
        w.mul_(1.5)
    model.zero_grad(set_to_none=True)
    with patch.update(cap.old_policy.select(torch.arange(rows.shape[0])), rows) as upd:
        model(**kw)
    upd.divergence.sum().backward()
    g = model.model.layers[-1].self_attn.q_proj.weight.grad.clone()
    with torch.no_grad():
        w.copy_(w0)
    patch.unpatch()
    return cap.old_policy, upd.divergence.detach(), g


def test_capture_under_inference_mode_trains():
    """vLLM-style scoring passes run under torch.inference_mode(): the cache must still be
    usable in a later update pass with gradients."""
    model = tiny_model("qwen2")
    kw, rows = make_batch("qwen2")
    old_nograd, d0, g0 = _capture_update(model, kw, rows, torch.no_grad)
    old_inf, d1, g1 = _capture_update(model, kw, rows, torch.inference_mode)
    cap = old_inf.layers[1]
    assert not any(t.is_inference() for t in (cap.cache.q_old, cap.cache.k_old, cap.cache.lse_old))
    assert d0[rows].min() > 0
    torch.testing.assert_close(d1, d0, atol=0, rtol=0)
    torch.testing.assert_close(g1, g0, atol=0, rtol=0)


def test_offloaded_cache_gives_the_same_update():
    model = tiny_model("qwen2")
    kw, rows = make_batch("qwen2")
    old0, d0, g0 = _capture_update(model, kw, rows, torch.no_grad)
    old1, d1, g1 = _capture_update(model, kw, rows, torch.no_grad, offload="cpu")
    c1 = old1.layers[1].cache
    assert c1.q_old.device.type == "cpu" and old1.nbytes() == old0.nbytes()  # on a CPU model: kept as is
    torch.testing.assert_close(d1, d0, atol=0, rtol=0)
    torch.testing.assert_close(g1, g0, atol=0, rtol=0)
    # an offloaded capture comes home per minibatch: pretend the model lives on the meta device
    home = dataclasses.replace(old1.layers[1], device=torch.device("meta"))
    assert home.offloaded
    sel = home.select(torch.tensor([2, 0]))
    assert sel.cache.q_old.device.type == "meta" and sel.cache.q_old.shape[0] == 2 and not sel.offloaded
    with pytest.raises(PatchError, match="offload must be None or 'cpu'"):
        with patch_model(model).capture(offload="disk"):
            pass
