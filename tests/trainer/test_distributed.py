"""Data parallel: the patched layer and the fused op under torch DDP (gloo, 2 CPU
processes) train a tiny model to the same weights as one process on the whole batch."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

B, T, R, STEPS = 4, 12, 4, 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(8, 32, (B, T), generator=g)
    am = torch.ones(B, T, dtype=torch.long)
    pads = [2, 0, 3, 1]
    for i, p in enumerate(pads):
        ids[i, :p] = 0
        am[i, :p] = 0
    cmask = torch.ones(B, R, dtype=torch.bool)
    cmask[1, -1] = False  # a shorter completion (right-padded)
    am[1, -1] = 0
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    return ids, am, cmask, adv


def _worker(rank: int, world: int, port: int, out: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", rank=rank, world_size=world)
    from ral_trainer import patch_model, tiny_model
    from ral_trainer.losses import grpo_loss, ral_term, token_logprobs

    model = tiny_model("qwen2", seed=0, vocab_size=32, hidden_size=32, num_heads=4, num_kv_heads=2)
    patch = patch_model(model)
    ids, am, cmask, adv = _batch()
    sl = slice(rank * B // world, (rank + 1) * B // world)
    ids, am, cmask, adv = ids[sl], am[sl], cmask[sl], adv[sl]
    comp = ids[:, -R:]
    rows = torch.zeros_like(am, dtype=torch.bool)
    rows[:, -R - 1:-1] = cmask
    with torch.no_grad(), patch.capture(num_rows=R + 1) as cap:
        old_logp = token_logprobs(model(input_ids=ids, attention_mask=am).logits, comp)
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    terms = []
    for _ in range(STEPS):
        with patch.update(cap.old_policy, rows) as upd:
            logits = net(input_ids=ids, attention_mask=am).logits
        pg, _ = grpo_loss(token_logprobs(logits, comp), old_logp, adv, cmask, loss_type="grpo")
        term = ral_term(upd.divergence[:, -R - 1:-1], adv, cmask, loss_type="grpo")
        (pg + 100.0 * term).backward()
        opt.step()
        opt.zero_grad()
        terms.append(float(term.detach()))
    if rank == 0:
        torch.save({"state": {k: v.detach().clone() for k, v in model.state_dict().items()}, "terms": terms}, out)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo")
def test_ddp_two_processes_match_one(tmp_path):
    one, two = str(tmp_path / "one.pt"), str(tmp_path / "two.pt")
    _worker(0, 1, _free_port(), one)
    mp.spawn(_worker, args=(2, _free_port(), two), nprocs=2, join=True)
    a, b = torch.load(one), torch.load(two)
    assert a["terms"][0] == 0.0 or abs(a["terms"][0]) < 1e-7  # θ = θ_old at the first step
    assert any(abs(t) > 1e-7 for t in a["terms"][1:])  # the attention term acts after a step
    moved = 0
    init = __import__("ral_trainer").tiny_model("qwen2", seed=0, vocab_size=32, hidden_size=32, num_heads=4,
                                                num_kv_heads=2).state_dict()
    for k, v in a["state"].items():
        torch.testing.assert_close(b["state"][k], v, rtol=1e-4, atol=1e-5, msg=lambda m: f"{k}: {m}")
        moved += int(not torch.equal(v, init[k]))
    assert moved > 0
