"""Data parallel: the patched layer and the fused op under torch DDP and under FSDP2
(``fully_shard``; gloo, 2 CPU processes) train a tiny model to the same weights as one
process on the whole batch."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from trainer_helpers import free_port

B, T, R, STEPS = 4, 12, 4, 3


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


def _worker(rank: int, world: int, port: int, out: str, strategy: str = "ddp"):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", rank=rank, world_size=world)
    from ral_trainer import patch_model, tiny_model
    from ral_trainer.losses import grpo_loss, ral_term, token_logprobs

    model = tiny_model("qwen2", seed=0, vocab_size=32, hidden_size=32, num_heads=4, num_kv_heads=2)
    patch = patch_model(model)
    seen = []  # (type, shape) of the q, k, v that the fused op gets under FSDP2
    if world > 1 and strategy == "fsdp2":
        import ral_kernels
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        from ral_trainer.models import decoder_layers

        mesh = init_device_mesh("cpu", (world,))
        for layer in decoder_layers(model):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)  # the root: embeddings (tied to lm_head) and the final norm
        fused = ral_kernels.fused_attn_kl

        def spy(q, k, v, *args, **kwargs):
            seen.append(tuple((type(x).__name__, tuple(x.shape)) for x in (q, k, v)))
            return fused(q, k, v, *args, **kwargs)

        ral_kernels.fused_attn_kl = spy  # this spawned process only
    # The optimizer before any forward: after a no_grad forward FSDP2 leaves the root's
    # parameters unsharded (no backward reshards them), and model.parameters() would then
    # hand the optimizer the unsharded tensors, which it would update to no effect.
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    ids, am, cmask, adv = _batch()
    sl = slice(rank * B // world, (rank + 1) * B // world)
    ids, am, cmask, adv = ids[sl], am[sl], cmask[sl], adv[sl]
    comp = ids[:, -R:]
    rows = torch.zeros_like(am, dtype=torch.bool)
    rows[:, -R - 1:-1] = cmask
    with torch.no_grad(), patch.capture(num_rows=R + 1) as cap:
        old_logp = token_logprobs(model(input_ids=ids, attention_mask=am).logits, comp)
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 and strategy == "ddp" else model
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
    from torch.distributed.tensor import DTensor

    # FSDP2's state dict holds DTensor shards: full_tensor() all-gathers, on every rank
    state = {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone()
             for k, v in model.state_dict().items()}
    if rank == 0:
        torch.save({"state": state, "terms": terms, "seen": seen,
                    "sharded": sorted(k for k, v in model.state_dict().items() if isinstance(v, DTensor))}, out)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


needs_gloo = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed gloo")


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The reference: one process on the whole batch (shared by the DDP and FSDP2 tests)."""
    out = str(tmp_path_factory.mktemp("one") / "one.pt")
    _worker(0, 1, free_port(), out)
    return torch.load(out)


def _assert_match(a, b):
    assert a["terms"][0] == 0.0 or abs(a["terms"][0]) < 1e-7  # θ = θ_old at the first step
    assert any(abs(t) > 1e-7 for t in a["terms"][1:])  # the attention term acts after a step
    moved = 0
    init = __import__("ral_trainer").tiny_model("qwen2", seed=0, vocab_size=32, hidden_size=32, num_heads=4,
                                                num_kv_heads=2).state_dict()
    for k, v in a["state"].items():
        torch.testing.assert_close(b["state"][k], v, rtol=1e-4, atol=1e-5, msg=lambda m: f"{k}: {m}")
        moved += int(not torch.equal(v, init[k]))
    assert moved > 0


@needs_gloo
def test_ddp_two_processes_match_one(one_process, tmp_path):
    two = str(tmp_path / "two.pt")
    mp.spawn(_worker, args=(2, free_port(), two, "ddp"), nprocs=2, join=True)
    _assert_match(one_process, torch.load(two))


@needs_gloo
def test_fsdp2_two_processes_match_one(one_process, tmp_path):
    """FSDP2 (fully_shard on each decoder layer and on the root, CPU mesh, gloo): the
    patched layer's fused op gets the full, unsharded q/k/v (FSDP2 all-gathers the
    parameters before the layer's forward), so training matches one process."""
    two = str(tmp_path / "two.pt")
    mp.spawn(_worker, args=(2, free_port(), two, "fsdp2"), nprocs=2, join=True)
    b = torch.load(two)
    assert len(b["sharded"]) == len(one_process["state"])  # every weight was a DTensor shard
    # the last layer (the patched one) ran the fused op in each update step on plain tensors
    # holding all heads of this rank's half batch: [B/2, H, T, D] q, [B/2, H_kv, T, D] k, v
    half = (B // 2, 4, T, 8), (B // 2, 2, T, 8), (B // 2, 2, T, 8)
    assert b["seen"] == [tuple(("Tensor", s) for s in half)] * STEPS
    _assert_match(one_process, b)
