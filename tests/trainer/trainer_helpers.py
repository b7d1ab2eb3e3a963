"""Helpers for the trainer tests: tiny random models (no downloads) and padded inputs.
Imported by the test modules as ``trainer_helpers`` (a plain module, so that its name
cannot clash with ``tests/conftest.py``)."""

from __future__ import annotations

import json
import math
import socket

import torch
import torch.multiprocessing as mp

from ral_trainer.models import tiny_model, token_type_kwargs
from ral_trainer.visual_search import VisualSearchTask

ARCHS = ["qwen2_5_vl", "qwen2_vl", "qwen3_vl", "qwen2", "qwen3", "qwen3_moe", "llama", "mistral", "gemma3_text"]
VL = {"qwen2_5_vl", "qwen2_vl", "qwen3_vl"}


def make_batch(arch: str, *, seed: int = 0, pads=(3, 0, 5), width: int = 30, vocab: int = 64):
    """Left-padded prompts (lengths ``width - pad``) whose last 6 tokens act as the
    response; VL archs get one 64x64 image (16 visual tokens) per sequence."""
    g = torch.Generator().manual_seed(seed)
    b = len(pads)
    ids = torch.randint(8, vocab, (b, width), generator=g)
    attn = torch.ones(b, width, dtype=torch.long)
    extras = {}
    if arch in VL:
        task = VisualSearchTask()
        probs = task.sample(b, g)
        pv, thw = zip(*(task.pixel_values(p["image"]) for p in probs))
        extras = {"pixel_values": torch.cat(pv), "image_grid_thw": torch.cat(thw)}
    for i, p in enumerate(pads):
        ids[i, :p] = 0
        attn[i, :p] = 0
        if arch in VL:
            ids[i, p: p + 18] = torch.tensor([3] + [5] * 16 + [4])
    rows = torch.zeros(b, width, dtype=torch.bool)
    rows[:, -6:] = True
    if arch in VL:
        extras.update(token_type_kwargs(tiny_model_cache(arch), ids))
    return {"input_ids": ids, "attention_mask": attn, **extras}, rows


_MODELS = {}


def tiny_model_cache(arch):
    if arch not in _MODELS:
        _MODELS[arch] = tiny_model(arch)
    return _MODELS[arch]


# --------------------------------------------------------------------------- several processes

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_ranks(worker, world: int, out) -> list[dict]:
    """Run ``worker(rank, port, out)`` in ``world`` processes; each writes ``out/rank{r}.json``."""
    mp.spawn(worker, args=(free_port(), str(out)), nprocs=world, join=True)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


def assert_trl_ranks_in_sync(ranks: list[dict], steps: int) -> None:
    """TRL multi-process runs: every rank saw the same weight sums after each of ``steps``
    optimizer steps, logged only finite values, and the attention term was non-zero."""
    for r in ranks:
        assert len(r["sums"]) == steps
        for a, b in zip(ranks[0]["sums"], r["sums"]):
            assert math.isclose(a, b, rel_tol=0, abs_tol=1e-9), (a, b)
    logged = [h for h in ranks[0]["history"] if "loss" in h]
    assert logged and all(math.isfinite(v) for h in logged for v in h.values() if isinstance(v, float))
    att = [h[k] for h in logged for k in h if "attention" in k and "loss" in k]
    assert att and max(abs(v) for v in att) > 0, logged
