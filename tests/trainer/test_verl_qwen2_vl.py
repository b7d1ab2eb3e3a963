"""verl's default Qwen2.5-VL path (``use_remove_padding=True``): verl's monkey patch swaps
the attention class's forward for one that calls flash-attention itself, bypassing
``ALL_ATTENTION_FUNCTIONS``. Patching such a model is refused with a clear error; the verl
adapter routes those modules through the patch, and the packed (padding-free) capture and
update then give the divergence and logits of the same sequences left-padded through
transformers' own forward. Runs in the verl environment (``test_verl_env.py``)."""

from __future__ import annotations

import pytest
import torch

verl = pytest.importorskip("verl", reason="runs in the verl environment built by tests/trainer/test_verl_env.py")

from ral_trainer import UnsupportedArchitectureError, patch_model  # noqa: E402
from ral_trainer.models import tiny_model, token_type_kwargs  # noqa: E402
from ral_trainer.visual_search import VisualSearchTask  # noqa: E402

import ral_trainer.adapters.verl as va  # noqa: E402

TEXT, RESP = [6, 9, 4], [5, 3, 6]  # text tokens after the image, response tokens, per sequence


@pytest.fixture
def restore_verl_patch(monkeypatch):
    """verl's monkey patch replaces class attributes; put them back after the test."""
    import transformers.models.qwen2_5_vl.modeling_qwen2_5_vl as m25
    import transformers.models.qwen2_vl.modeling_qwen2_vl as m2
    from verl.models.transformers import monkey_patch as vmp

    for mod in (m25, m2):
        for name in dir(mod):
            cls = getattr(mod, name)
            if isinstance(cls, type) and cls.__module__ == mod.__name__ and "forward" in cls.__dict__:
                monkeypatch.setattr(cls, "forward", cls.__dict__["forward"])
    import transformers.integrations.flash_attention as fa
    import verl.models.transformers.qwen2_vl as vq

    monkeypatch.setattr(fa, "_flash_attention_forward", fa._flash_attention_forward)
    # verl's forward calls flash-attn's varlen kernel (CUDA only): a CPU stand-in with its semantics
    monkeypatch.setattr(vq, "_custom_flash_attention_forward", _cpu_varlen_flash)
    monkeypatch.setattr(vq, "_flash_use_top_left_mask", False, raising=False)
    # verl's patch also touches TRL's value-head model, which TRL 1.x no longer has
    monkeypatch.setattr(vmp, "is_trl_available", lambda: False)
    return vmp


def _cpu_varlen_flash(q, k, v, attention_mask, query_length, is_causal, dropout=0.0, sliding_window=None,
                      use_top_left_mask=False, position_ids=None, **kwargs):
    """flash-attn's packed causal attention on [1, total, H, D] (sequences start where the
    position ids restart at 0), with SDPA per sequence."""
    assert attention_mask is None and q.shape[0] == 1 and is_causal and not dropout and sliding_window is None
    pos = position_ids[0]
    bounds = (pos == 0).nonzero().flatten().tolist() + [q.shape[1]]
    outs = [torch.nn.functional.scaled_dot_product_attention(
        *(x[:, a:b].transpose(1, 2) for x in (q, k, v)), is_causal=True).transpose(1, 2)
        for a, b in zip(bounds, bounds[1:])]
    return torch.cat(outs, dim=1)


def _sequences(model):
    g = torch.Generator().manual_seed(0)
    task = VisualSearchTask()
    probs = task.sample(len(TEXT), g)
    seqs, pvs, thws = [], [], []
    for p, n_text, n_resp in zip(probs, TEXT, RESP):
        pv, thw = task.pixel_values(p["image"])
        ids = torch.cat([torch.tensor([1, 3] + [5] * 16 + [4]), torch.randint(8, 64, (n_text + n_resp,), generator=g)])
        seqs.append(ids)
        pvs.append(pv)
        thws.append(thw)
    return seqs, torch.cat(pvs), torch.cat(thws)


def _padded(model, seqs, pv, thw):
    t = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), t, dtype=torch.long)
    am = torch.zeros_like(ids)
    rows = torch.zeros(len(seqs), t, dtype=torch.bool)
    for i, (s, r) in enumerate(zip(seqs, RESP)):
        ids[i, t - len(s):] = s
        am[i, t - len(s):] = 1
        rows[i, t - r - 1:t - 1] = True  # row t-1 produces response token t
    kw = {"input_ids": ids, "attention_mask": am, "pixel_values": pv, "image_grid_thw": thw,
          **token_type_kwargs(model, ids)}
    return kw, rows


def _packed(model, seqs, pv, thw):
    """verl's padding-free form: one row, (4, 1, total) position ids (text positions first,
    then M-RoPE's three), no attention mask."""
    pos = []
    for s, g in zip(seqs, thw):
        vision, _ = model.model.get_rope_index(input_ids=s[None], image_grid_thw=g[None],
                                               attention_mask=torch.ones(1, len(s), dtype=torch.long),
                                               mm_token_type_ids=(s[None] == model.config.image_token_id).int())
        pos.append(torch.cat([torch.arange(len(s))[None, None], vision]))  # (4, 1, L)
    rows = torch.zeros(1, sum(len(s) for s in seqs), dtype=torch.bool)
    off = 0
    for s, r in zip(seqs, RESP):
        off += len(s)
        rows[0, off - r - 1:off - 1] = True
    kw = {"input_ids": torch.cat(seqs)[None], "position_ids": torch.cat(pos, dim=2), "pixel_values": pv,
          "image_grid_thw": thw, "attention_mask": None}
    return kw, rows


def _run(model, kw, rows, layers=None):
    w = model.model.language_model.layers[-1].self_attn.q_proj.weight
    w0 = w.detach().clone()
    patch = patch_model(model, layers)
    with torch.no_grad(), patch.capture(num_rows=max(RESP) + 1) as cap:
        old_logits = model(**kw).logits
    with torch.no_grad():
        w.mul_(1.3)
    with patch.update(cap.old_policy, rows) as upd:
        logits = model(**kw).logits
    upd.divergence.sum().backward()
    grad = w.grad.clone()
    with torch.no_grad():
        w.copy_(w0)
    w.grad = None
    patch.unpatch()
    return old_logits.detach(), logits.detach(), upd.divergence.detach(), grad


def test_verl_qwen2_5_vl_remove_padding_computes_the_term(restore_verl_patch):
    vmp = restore_verl_patch
    model = tiny_model("qwen2_5_vl").eval()
    seqs, pv, thw = _sequences(model)
    kw, rows = _padded(model, seqs, pv, thw)
    ref_old, ref, ref_div, ref_grad = _run(model, kw, rows)  # transformers' own forward, left-padded
    assert ref_div[rows].min() > 0

    vmp.apply_monkey_patch(model, use_remove_padding=True)
    from verl.models.transformers.qwen2_vl import qwen2_vl_attn_forward

    assert type(model.model.language_model.layers[-1].self_attn).forward is qwen2_vl_attn_forward
    with pytest.raises(UnsupportedArchitectureError, match="bypassed"):
        patch_model(model)  # never a silent zero: refused at setup
    assert va.route_verl_attention(model) == 2 and va.route_verl_attention(model) == 0

    pk, prow = _packed(model, seqs, pv, thw)
    old, logits, div, grad = _run(model, pk, prow)
    t = kw["input_ids"].shape[1]
    off = 0
    for i, s in enumerate(seqs):
        n = len(s)
        torch.testing.assert_close(old[0, off:off + n], ref_old[i, t - n:], atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(logits[0, off:off + n], ref[i, t - n:], atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(div[0, off:off + n], ref_div[i, t - n:], atol=1e-7, rtol=1e-4)
        off += n
    torch.testing.assert_close(grad, ref_grad, atol=1e-6, rtol=1e-4)
    # outside RAL's blocks the routed layers run verl's own forward
    with torch.no_grad():
        torch.testing.assert_close(model(**pk).logits[0], torch.cat(
            [ref_old[i, t - len(s):] for i, s in enumerate(seqs)]), atol=2e-5, rtol=1e-4)
