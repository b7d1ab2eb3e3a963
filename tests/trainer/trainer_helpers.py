"""Helpers for the trainer tests: tiny random models (no downloads) and padded inputs.
Imported by the test modules as ``trainer_helpers`` (a plain module, so that its name
cannot clash with ``tests/conftest.py``)."""

from __future__ import annotations

import torch

from ral_trainer.models import tiny_model, token_type_kwargs
from ral_trainer.visual_search import VisualSearchTask

ARCHS = ["qwen2_5_vl", "qwen2_vl", "qwen2", "qwen3", "llama"]
VL = {"qwen2_5_vl", "qwen2_vl"}


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
