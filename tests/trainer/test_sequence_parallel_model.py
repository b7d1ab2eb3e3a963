"""A tiny Qwen2.5-VL (vision tower, M-RoPE, GQA) trained 2 RAL steps under Ulysses sequence
parallelism (2 gloo processes: ``ral_trainer.sequence_parallel``) lands on the weights and
losses of the same steps in one process without it."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from trainer_helpers import free_port, make_batch

R, STEPS, LAM, LR = 6, 2, 50.0, 0.5
ADV = torch.tensor([1.0, -1.0, 0.5])


def _train(rank: int, world: int) -> dict:
    """Capture the old policy, then ``STEPS`` SGD steps of ``pg + LAM * ral`` (token means
    over the whole batch); under SP each rank computes its rows' share and the gradients
    are summed over the group (as FSDP over the sequence-parallel ranks does)."""
    from ral_trainer import patch_model, tiny_model
    from ral_trainer.sequence_parallel import sequence_parallel_patch, ulysses_model

    torch.manual_seed(0)
    model = tiny_model("qwen2_5_vl", seed=0)
    patch = patch_model(model)
    inputs, _ = make_batch("qwen2_5_vl")
    ids = inputs["input_ids"]
    b, t = ids.shape
    rows = torch.zeros(b, t, dtype=torch.bool)  # row j produces token j + 1: the response's producers
    rows[:, t - R - 1:t - 1] = True
    rows[1, t - 2] = False  # a shorter response
    n = t // world
    pos = torch.arange(rank * n, (rank + 1) * n)
    if world > 1:
        sp = ulysses_model(model)
        sequence_parallel_patch(patch)
        local_rows = sp.local(rows)
    else:
        local_rows = rows
    labels = ids[:, (pos + 1).clamp(max=t - 1)]
    n_tokens = float(rows.sum())

    def logp_of(logits):
        return torch.log_softmax(logits.float(), -1).gather(-1, labels[..., None])[..., 0]

    with torch.no_grad(), patch.capture(num_rows=R + 1) as cap:
        old_logp = logp_of(model(**inputs).logits)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    losses, terms = [], []
    for _ in range(STEPS):
        with patch.update(cap.old_policy, local_rows) as upd:
            logp = logp_of(model(**inputs).logits)
        adv = ADV[:, None].expand(b, n)
        pg = -(torch.exp(logp - old_logp) * adv * local_rows).sum() / n_tokens
        ral = (upd.divergence * adv * local_rows).sum() / n_tokens
        loss = pg + LAM * ral
        opt.zero_grad()
        loss.backward()
        parts = torch.stack([loss.detach(), ral.detach()])
        if world > 1:
            for p in model.parameters():
                if p.grad is not None:
                    dist.all_reduce(p.grad)
            dist.all_reduce(parts)
        opt.step()
        losses.append(float(parts[0]))
        terms.append(float(parts[1]))
    return {"state": {k: v.detach().clone() for k, v in model.state_dict().items()}, "losses": losses, "terms": terms}


def _worker(rank: int, world: int, port: int, out: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    res = _train(rank, world)
    if rank == 0:
        torch.save(res, out)
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo")
def test_qwen2_5_vl_ulysses_two_ranks_match_one(tmp_path):
    one = _train(0, 1)
    out = str(tmp_path / "sp.pt")
    mp.spawn(_worker, args=(2, free_port(), out), nprocs=2, join=True)
    two = torch.load(out)
    assert one["terms"][0] == pytest.approx(0.0, abs=1e-7)  # θ = θ_old at the first step
    assert abs(one["terms"][1]) > 1e-6  # the attention term acts after a step
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-5, abs=1e-6)
    assert two["terms"] == pytest.approx(one["terms"], rel=1e-4, abs=1e-8)
    init = __import__("ral_trainer").tiny_model("qwen2_5_vl", seed=0).state_dict()
    moved = 0
    for k, v in one["state"].items():
        torch.testing.assert_close(two["state"][k], v, rtol=1e-4, atol=2e-6, msg=lambda m: f"{k}: {m}")
        moved += int(not torch.equal(v, init[k]))
    assert moved > 0
