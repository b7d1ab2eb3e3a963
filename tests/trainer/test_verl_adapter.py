"""The verl adapter against the real verl package (``verl>=0.9,<0.10``), CPU only.

What runs for real: verl's ``FSDPEngineWithLMHead`` (built by its own ``__init__`` in a
one-process gloo group), its ``infer_batch`` / ``forward_backward_batch`` /
``forward_step`` / ``prepare_model_inputs`` (padded and ``use_remove_padding`` packed
paths) / ``prepare_model_outputs``, verl's ``ppo_loss`` and ``agg_loss``, and verl's
``left_right_2_no_padding`` batch conversion. What does not: ``engine.initialize()``
(FSDP wrapping, optimizer; verl's monkey patch imports a TRL class that TRL 1.x removed
and FSDP needs an accelerator), so the tiny model is set as ``engine.module`` unwrapped,
and verl's device helpers are pointed at the CPU (verl's platform registry only knows
accelerators). The Ray route is in test_verl_ray.py, Qwen2.5-VL packed in test_verl_qwen2_vl.py;
all three run in the verl environment that test_verl_env.py builds.
"""

from __future__ import annotations

import functools
import os

import pytest
import torch

verl = pytest.importorskip("verl", reason="runs in the verl environment built by tests/trainer/test_verl_env.py")

import ral_kernels  # noqa: E402
from ral_trainer.adapters import UnsupportedVersionError  # noqa: E402
from ral_trainer.models import UnsupportedArchitectureError, tiny_model  # noqa: E402
from ral_trainer.patch import PatchError  # noqa: E402

import ral_trainer.adapters.verl as va  # noqa: E402

from tensordict import TensorDict  # noqa: E402
from verl.trainer.ppo.core_algos import agg_loss  # noqa: E402
from verl.utils import tensordict_utils as tu  # noqa: E402
from verl.workers.utils.losses import ppo_loss  # noqa: E402
from verl.workers.utils.padding import left_right_2_no_padding, no_padding_2_padding  # noqa: E402

B, P, R = 4, 7, 6
PLEN, RLEN = [7, 5, 6, 4], [6, 3, 5, 2]


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    import torch.distributed as dist

    own_group = not dist.is_initialized()
    if own_group:  # verl's engine reads rank / world size from the default group
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29561")
        dist.init_process_group("gloo", rank=0, world_size=1)
    import verl.workers.engine.fsdp.transformer_impl as ti

    mp = pytest.MonkeyPatch()
    mp.setattr(ti, "get_device_id", lambda: "cpu")  # verl's platform registry has no CPU device
    mp.setattr(ti, "get_device_name", lambda: "cpu")
    eng, model = _make_engine(tmp_path_factory.mktemp("tiny_qwen2"))
    adapter = va.RALVerlAdapter(eng, ral_coef=1.0)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    yield eng, adapter, model, state
    adapter.detach()
    mp.undo()
    if own_group:
        dist.destroy_process_group()


def _make_engine(path, arch="qwen2", **kw):
    """verl's FSDPEngineWithLMHead built by its own __init__ around a tiny model, left
    unwrapped (FSDP wrapping needs an accelerator)."""
    import verl.workers.engine.fsdp.transformer_impl as ti
    from verl.trainer.config import CheckpointConfig
    from verl.workers.config import FSDPEngineConfig, FSDPOptimizerConfig, HFModelConfig

    model = tiny_model(arch, **kw)
    model.config._attn_implementation = "sdpa"
    model.save_pretrained(path)
    mc = HFModelConfig(path=str(path), load_tokenizer=False, override_config={"attn_implementation": "sdpa"})
    eng = ti.FSDPEngineWithLMHead(mc, FSDPEngineConfig(strategy="fsdp2"), FSDPOptimizerConfig(lr=1e-3),
                                  CheckpointConfig())
    eng.module = model
    eng._autocast_dtype = torch.float32  # fp32 mixed precision, as _build_fsdp_module would set
    return eng, model


def _batch(remove_padding: bool, mb: int = 2):
    """A verl rollout batch (left-padded prompts, right-padded responses) converted as
    verl's trainer does before compute_log_prob / update_actor."""
    g = torch.Generator().manual_seed(0)
    prompts = torch.zeros(B, P, dtype=torch.long)
    resp = torch.zeros(B, R, dtype=torch.long)
    am = torch.zeros(B, P + R, dtype=torch.long)
    for i in range(B):
        prompts[i, P - PLEN[i]:] = torch.randint(8, 64, (PLEN[i],), generator=g)
        resp[i, :RLEN[i]] = torch.randint(8, 64, (RLEN[i],), generator=g)
        am[i, P - PLEN[i]:P + RLEN[i]] = 1
    adv = torch.randn(B, 1, generator=torch.Generator().manual_seed(1)).expand(B, R).clone()
    td = TensorDict({"prompts": prompts, "responses": resp, "input_ids": torch.cat([prompts, resp], 1),
                     "attention_mask": am, "position_ids": (am.cumsum(1) - 1).clamp(min=0),
                     "response_mask": am[:, P:].clone(), "advantages": adv}, batch_size=B)
    td = left_right_2_no_padding(td)
    tu.assign_non_tensor(td, temperature=1.0, use_remove_padding=remove_padding, use_dynamic_bsz=False,
                         micro_batch_size_per_gpu=mb, calculate_entropy=False, compute_loss=False,
                         use_fused_kernels=False)
    return td


def _actor_cfg(mode="token-mean"):
    from verl.workers.config import FSDPActorConfig

    return FSDPActorConfig(strategy="fsdp2", ppo_mini_batch_size=B, ppo_micro_batch_size_per_gpu=2, rollout_n=1,
                           loss_agg_mode=mode)


def _compact(ids_nested):
    """Left-padded [B, T] ids + mask of the sequences (for the hand computation)."""
    offs = ids_nested.offsets().tolist()
    vals = ids_nested.values()
    t = max(b - a for a, b in zip(offs, offs[1:]))
    ids = torch.zeros(B, t, dtype=torch.long)
    am = torch.zeros(B, t, dtype=torch.long)
    for i, (a, b) in enumerate(zip(offs, offs[1:])):
        ids[i, t - (b - a):] = vals[a:b]
        am[i, t - (b - a):] = 1
    return ids, am


def _perturb(model):
    with torch.no_grad():
        w = model.model.layers[-1].self_attn.q_proj.weight
        w.add_(0.5 * torch.randn(w.shape, generator=torch.Generator().manual_seed(3)))


def test_version_range_is_named():
    for bad in ("0.8.5", "0.10.0", "1.0"):
        with pytest.raises(UnsupportedVersionError, match=r"verl>=0\.9,<0\.10"):
            va._check_verl_version(bad)
    va._check_verl_version(verl.__version__)


def test_unsupported_model_and_engine(engine):
    import transformers as tf
    import verl.workers.engine.fsdp.transformer_impl as ti

    eng = engine[0]
    other = object.__new__(ti.FSDPEngineWithLMHead)
    other.__dict__.update({k: v for k, v in eng.__dict__.items() if k not in ("forward_step", "infer_batch",
                                                                              "disable_adapter", "_ral_adapter")})
    other.module = tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=64))
    with pytest.raises(UnsupportedArchitectureError):
        va.RALVerlAdapter(other)
    with pytest.raises(PatchError, match="FSDPEngineWithLMHead"):
        va.RALVerlAdapter(object())


def test_capture_packed_matches_padded(engine):
    eng, ad, model, state = engine
    model.load_state_dict(state)
    eng.infer_batch(_batch(True))
    packed = {k: {li: tuple(t.clone() for t in v) for li, v in c.items()} for k, c in ad._store.items()}
    eng.infer_batch(_batch(False, mb=4))  # other micro-batching, padded path
    assert packed.keys() == ad._store.keys() and len(packed) == B
    for k, caps in packed.items():
        for li, (q, kk) in caps.items():
            q2, k2 = ad._store[k][li]
            n_tok, _ = k
            assert kk.shape[1] == n_tok and q.shape[1] in [r + 1 for r in RLEN]
            torch.testing.assert_close(q, q2, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(kk, k2, atol=1e-5, rtol=1e-5)


def _update(eng, ad, model, state, remove_padding, coef=1.0, mode="token-mean"):
    model.load_state_dict(state)
    out = eng.infer_batch(_batch(remove_padding))  # compute_log_prob: old log-probs + capture
    td = _batch(remove_padding)
    td["old_log_probs"] = no_padding_2_padding(out["model_output"]["log_probs"], td)
    tu.assign_non_tensor(td, global_batch_size=B)
    _perturb(model)
    model.zero_grad()
    ad.config.ral_coef = coef
    try:
        res = eng.forward_backward_batch(td, functools.partial(ppo_loss, config=_actor_cfg(mode)), forward_only=False)
    finally:
        ad.config.ral_coef = 1.0
    return res, model.model.layers[-1].self_attn.q_proj.weight.grad.clone()


@pytest.mark.parametrize("remove_padding", [True, False], ids=["packed", "padded"])
def test_update_term_matches_ral_loss_by_hand(engine, remove_padding):
    eng, ad, model, state = engine
    res, grad = _update(eng, ad, model, state, remove_padding)
    got = sum(float(v) for v in res["metrics"]["actor/ral_attention_loss"].values)
    # by hand: the same old/new weights on a left-padded batch through ral_trainer's patch
    td = _batch(True)
    ids, am = _compact(td["input_ids"])
    t = ids.shape[1]
    rows = torch.zeros(B, t, dtype=torch.bool)
    for i, r in enumerate(RLEN):
        rows[i, t - r - 1:t - 1] = True
    model.load_state_dict(state)
    with torch.no_grad(), ad.patch.capture(num_rows=max(RLEN) + 1) as cap:
        model(input_ids=ids, attention_mask=am)
    _perturb(model)
    with torch.no_grad(), ad.patch.update(cap.old_policy, rows) as upd:
        model(input_ids=ids, attention_mask=am)
    div = torch.zeros(B, R)
    for i, r in enumerate(RLEN):
        div[i, :r] = upd.divergence[i, t - r - 1:t - 1]
    mask = td["response_mask"].bool()
    want = ral_kernels.ral_loss(div, td["advantages"], mask, loss_type="token-mean",
                                num_items_in_batch=float(sum(RLEN)))
    assert abs(want.item()) > 1e-6
    assert got == pytest.approx(want.item(), rel=1e-4, abs=1e-7)
    # ... and the term reaches the gradient (coef 0 runs verl's loss alone)
    _, grad0 = _update(eng, ad, model, state, remove_padding, coef=0.0)
    assert not torch.allclose(grad, grad0)


def test_zero_at_theta_old_and_missing_capture(engine):
    eng, ad, model, state = engine
    model.load_state_dict(state)
    out = eng.infer_batch(_batch(True))
    td = _batch(True)
    td["old_log_probs"] = no_padding_2_padding(out["model_output"]["log_probs"], td)
    tu.assign_non_tensor(td, global_batch_size=B)
    res = eng.forward_backward_batch(td, functools.partial(ppo_loss, config=_actor_cfg()), forward_only=False)
    assert abs(sum(float(v) for v in res["metrics"]["actor/ral_attention_loss"].values)) < 1e-6
    ad._store.clear()
    with pytest.raises(PatchError, match="compute_log_prob"):
        eng.forward_backward_batch(td, functools.partial(ppo_loss, config=_actor_cfg()), forward_only=False)


@pytest.mark.parametrize("mode", list(va.VERL_LOSS_AGG_MODES))
def test_normalization_matches_verl_agg_loss(mode):
    g = torch.Generator().manual_seed(5)
    div = torch.rand(5, 7, generator=g)
    adv = torch.randn(5, generator=g)
    mask = torch.rand(5, 7, generator=g) > 0.3
    mask[2] = False  # an empty response
    for info in (dict(), dict(dp_size=2, batch_num_tokens=40, global_batch_size=12, loss_scale_factor=None),
                 dict(dp_size=1, batch_num_tokens=int(mask.sum()), global_batch_size=5, loss_scale_factor=16)):
        want = agg_loss(adv[:, None] * div, mask, mode, **info)
        got = va.verl_normalized_ral_loss(div, adv, mask, mode, **info)
        assert got.item() == pytest.approx(float(want), rel=1e-5), (mode, info)


def test_ral_term_through_the_real_loss_modes(engine):
    eng, ad, model, state = engine
    res, _ = _update(eng, ad, model, state, True, mode="seq-mean-token-mean")
    assert "actor/ral_attention_div" in res["metrics"]
    assert abs(sum(float(v) for v in res["metrics"]["actor/ral_attention_loss"].values)) > 1e-7


def test_zero_term_schedule_warns(engine):
    from ral_trainer.trainer import ZeroAttentionTermWarning

    ad = engine[1]
    ad._warned_zero = False
    with pytest.warns(ZeroAttentionTermWarning, match="ppo_epochs"):
        assert ad.check_schedule(train_batch_size=8, rollout_n=4, ppo_mini_batch_size=8, ppo_epochs=1)
    ad._warned_zero = False
    assert not ad.check_schedule(train_batch_size=8, rollout_n=4, ppo_mini_batch_size=4, ppo_epochs=1)


def test_cache_offload_gives_the_same_term(engine):
    eng, ad, model, state = engine
    res, grad = _update(eng, ad, model, state, True)
    ad.config.cache_offload = "cpu"
    try:
        res2, grad2 = _update(eng, ad, model, state, True)
    finally:
        ad.config.cache_offload = None
    assert all(q.device.type == "cpu" for c in ad._store.values() for q, _ in c.values())
    got = [float(v) for v in res["metrics"]["actor/ral_attention_loss"].values]
    assert got == [float(v) for v in res2["metrics"]["actor/ral_attention_loss"].values]
    torch.testing.assert_close(grad2, grad, atol=0, rtol=0)


def test_deprecated_and_misplaced_settings(tmp_path):
    from omegaconf import OmegaConf
    from types import SimpleNamespace

    with pytest.warns(DeprecationWarning, match="ral_coef"):
        assert va.RALVerlConfig(attention_coef=0.5).ral_coef == 0.5
    with pytest.raises(ValueError, match="cache_offload"):
        va.RALVerlConfig(cache_offload="disk")
    worker = SimpleNamespace(role="actor_rollout", config=OmegaConf.create({"actor": {"ral": {"ral_coef": 1.0}}}))
    with pytest.raises(PatchError, match="actor_rollout_ref.ral, not actor_rollout_ref.actor.ral"):
        va.attach_to_worker(worker)
    worker.config = OmegaConf.create({"actor": {}})
    assert va.attach_to_worker(worker) is None  # no RAL block: plain verl
    rollout = SimpleNamespace(role="rollout", config=OmegaConf.create({"ral": {"ral_coef": 1.0}}))
    assert va.attach_to_worker(rollout) is None


def test_worker_hook_attaches_after_init_model(engine, tmp_path, monkeypatch):
    """install_worker_hook wraps verl's ActorRolloutRefWorker.init_model (keeping verl's
    dispatch registration): after init_model the adapter is on the actor engine."""
    from omegaconf import OmegaConf
    from verl.single_controller.base.decorator import MAGIC_ATTR
    from verl.workers import engine_workers as ew

    cls = ew.ActorRolloutRefWorker
    real = cls.init_model
    monkeypatch.setattr(cls, "init_model", real)  # whatever the hook installs is undone after the test
    va.install_worker_hook()
    assert cls.init_model._ral_hooked and getattr(cls.init_model, MAGIC_ATTR) == getattr(real, MAGIC_ATTR)
    assert cls.init_model.__wrapped__ is real
    hooked = cls.init_model
    assert va.install_worker_hook().init_model is hooked  # idempotent

    # verl's real init_model builds FSDP on GPUs; a stand-in builds the engine, the hook does the rest
    eng2, model2 = _make_engine(tmp_path / "m2")

    def init_model(self):
        self.actor = type("TrainingWorker", (), {"engine": eng2})()

    monkeypatch.setattr(cls, "init_model", init_model)
    va.install_worker_hook()
    worker = object.__new__(cls)
    worker.role = "actor_rollout"
    worker.config = OmegaConf.create({"actor": {}, "ral": {"ral_coef": 2.0, "cache_offload": "cpu"}})
    worker.init_model()
    ad = worker.ral_adapter
    assert ad.engine is eng2 and ad.config.ral_coef == 2.0 and ad.config.cache_offload == "cpu"
    assert ad.patch.model is model2 and eng2.forward_step == ad._forward_step
    ad.detach()
