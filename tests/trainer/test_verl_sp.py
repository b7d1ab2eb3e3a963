"""The verl adapter under Ulysses sequence parallelism, against the real verl 0.9 engine
(2 gloo processes, ``ulysses_sequence_parallel_size=2``, CPU).

What runs for real: verl's ``FSDPEngineWithLMHead`` built by its own ``__init__`` with an
``(dp=1, sp=2)`` device mesh, its padding-free ``prepare_model_inputs`` (packing, Ulysses
pad and slice), ``prepare_model_outputs`` (gather of the log-probs across the group),
``infer_batch`` / ``forward_backward_batch`` and ``ppo_loss``. What does not: verl's
Ulysses attention is its patched *flash* attention, which needs a GPU; here every layer
runs ``ral_trainer.sequence_parallel.ulysses_model``'s SDPA between the same all-to-alls
(``slice_inputs=False``: verl slices the inputs). FSDP wrapping and Ray are not started, as
in ``test_verl_adapter.py``. The reference is the same update with one process and no
sequence parallelism.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytest.importorskip("verl", reason="verl is not a test dependency (see test_verl_adapter.py for how to install it)")

from trainer_helpers import free_port  # noqa: E402


def _worker(rank: int, world: int, port: int, out: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    import verl.workers.engine.fsdp.transformer_impl as ti
    from verl.trainer.config import CheckpointConfig
    from verl.utils.ulysses import set_ulysses_sequence_parallel_group
    from verl.workers.config import FSDPEngineConfig, FSDPOptimizerConfig, HFModelConfig

    import ral_trainer.adapters.verl as va
    from ral_trainer.models import tiny_model
    from ral_trainer.sequence_parallel import ulysses_model
    from test_verl_adapter import _update

    ti.get_device_id = lambda: "cpu"  # verl's platform registry has no CPU device (this process only)
    ti.get_device_name = lambda: "cpu"
    model = tiny_model("qwen2")
    model.config._attn_implementation = "sdpa"
    path = os.path.join(out, "model")
    if rank == 0:  # (transformers writes from the main process only)
        model.save_pretrained(path)
    dist.barrier()
    mc = HFModelConfig(path=path, load_tokenizer=False, override_config={"attn_implementation": "sdpa"})
    eng = ti.FSDPEngineWithLMHead(mc, FSDPEngineConfig(strategy="fsdp2", ulysses_sequence_parallel_size=world),
                                  FSDPOptimizerConfig(lr=1e-3), CheckpointConfig())
    eng.module = model
    eng._autocast_dtype = torch.float32
    if world > 1:
        assert eng.use_ulysses_sp
        ulysses_model(model, eng.ulysses_parallel_group, slice_inputs=False)  # verl's flash Ulysses, on SDPA
        set_ulysses_sequence_parallel_group(eng.ulysses_parallel_group)  # what verl's engine contexts set
    adapter = va.RALVerlAdapter(eng, attention_coef=1.0)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    res, grad = _update(eng, adapter, model, state, remove_padding=True)
    res2, grad2 = _update(eng, adapter, model, state, remove_padding=True, mode="seq-mean-token-mean")
    stored = sum((p[1] if isinstance(p, tuple) else p).numel()  # SP pieces are (position, tensor)
                 for caps in adapter._store.values() for c in caps.values() for p in c if p is not None)
    for g in (grad, grad2):  # FSDP averages the ranks' gradients (verl scales its gathers by the degree)
        dist.all_reduce(g)
        g /= world
    terms = [sum(float(v) for v in r["metrics"]["actor/ral_attention_loss"].values) for r in (res, res2)]
    torch.save({"terms": terms, "grads": [grad, grad2], "stored": stored}, os.path.join(out, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def _run(world: int, out) -> list:
    out.mkdir()
    mp.spawn(_worker, args=(world, free_port(), str(out)), nprocs=world, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(world)]


def test_ulysses_two_ranks_match_one(tmp_path):
    (one,) = _run(1, tmp_path / "one")
    two = _run(2, tmp_path / "two")
    assert all(abs(t) > 1e-6 for t in one["terms"])
    for r in two:
        assert r["terms"] == pytest.approx(one["terms"], rel=1e-5, abs=1e-8)
        for g, g1 in zip(r["grads"], one["grads"]):
            torch.testing.assert_close(g, g1, rtol=1e-4, atol=1e-7)
    # the old-policy store is split between the ranks, not copied
    assert sum(r["stored"] for r in two) == one["stored"]
    assert all(r["stored"] < one["stored"] for r in two)
