"""Validation, backend selection and torch.compile of the public op."""

import pytest
import torch

from conftest import HAS_TRITON, Case, assert_close, make_inputs
from ral_kernels import (BackendUnavailableError, available_backends, fused_attn_kl, make_old_policy_cache,
                         resolve_backend)

CASE = Case(b=2, hq=4, hk=2, tq=12, tk=12, d=8, dv=8, ho=4, hko=2, do=8)


def inputs(**over):
    x = make_inputs(CASE, torch.float32, seed=1)
    x.update(over)
    return x


def call(x, **kw):
    return fused_attn_kl(x["q"], x["k"], x["v"], x["q_old"], x["k_old"], query_mask=x["query_mask"],
                         key_mask=x["key_mask"], **kw)


BAD = [
    ("q-ndim", dict(q=torch.randn(2, 4, 12)), {}, ValueError, r"q must have 4 dims"),
    ("q-type", dict(q=[[1.0]]), {}, TypeError, r"q must be a torch.Tensor"),
    ("q-int", dict(q=torch.ones(2, 4, 12, 8, dtype=torch.int32)), {}, TypeError, r"q must be float16"),
    ("gqa", dict(k=torch.randn(2, 3, 12, 8), v=torch.randn(2, 3, 12, 8)), {}, ValueError, r"Hq=4 must be a multiple of the KV heads Hk=3"),
    ("old-gqa", dict(q_old=torch.randn(2, 5, 12, 8)), {}, ValueError, r"Ho=5 must be a multiple of k_old heads Hko=2"),
    ("none-heads", dict(q_old=torch.randn(2, 6, 12, 8), k_old=torch.randn(2, 2, 12, 8)), dict(head_reduction="none"),
     ValueError, r'head_reduction="none" needs as many old heads'),
    ("batch", dict(k_old=torch.randn(3, 2, 12, 8)), {}, ValueError, r"k_old has batch size 3 but q has 2"),
    ("old-len", dict(k_old=torch.randn(2, 2, 11, 8)), {}, ValueError, r"k_old has 11 keys but k has Tk=12"),
    ("old-rows", dict(q_old=torch.randn(2, 4, 13, 8)), {}, ValueError, r"q_old has 13 rows but q has Tq=12"),
    ("head-dim", dict(k=torch.randn(2, 2, 12, 7)), {}, ValueError, r"k has head dim 7 but q has 8"),
    ("old-head-dim", dict(k_old=torch.randn(2, 2, 12, 7)), {}, ValueError, r"k_old has head dim 7 but q_old has 8"),
    ("v-shape", dict(v=torch.randn(2, 2, 11, 8)), {}, ValueError, r"v must be \[B, Hk=2, Tk=12, Dv\]"),
    ("dtype", dict(k=torch.randn(2, 2, 12, 8, dtype=torch.float64)), {}, TypeError, r"k has dtype torch.float64 but q has torch.float32"),
    ("device", dict(q_old=torch.randn(2, 4, 12, 8, device="meta")), {}, ValueError, r"q_old is on meta"),
    ("qmask-dtype", dict(query_mask=torch.ones(2, 12)), {}, TypeError, r"query_mask must have dtype torch.bool"),
    ("qmask-shape", dict(query_mask=torch.ones(2, 11, dtype=torch.bool)), {}, ValueError, r"query_mask must have shape \(2, 12\)"),
    ("kmask-shape", dict(key_mask=torch.ones(12, dtype=torch.bool)), {}, ValueError, r"key_mask must have shape \(2, 12\)"),
    ("divergence", {}, dict(divergence="js"), ValueError, r"divergence must be one of \('jsd', 'kl', 'reverse_kl'\), got 'js'"),
    ("reduction", {}, dict(head_reduction="sum"), ValueError, r"head_reduction must be one of"),
    ("backend", {}, dict(backend="flash"), ValueError, r"backend must be one of"),
    ("scale", {}, dict(sm_scale=float("nan")), ValueError, r"sm_scale must be a finite positive number"),
    ("old-scale", {}, dict(old_sm_scale=-1.0), ValueError, r"old_sm_scale must be a finite positive number"),
    ("lse-shape", {}, dict(lse_old=torch.zeros(2, 4, 11)), ValueError, r"lse_old must have shape \(2, 4, 12\)"),
    ("empty", dict(q=torch.randn(2, 4, 0, 8), q_old=torch.randn(2, 4, 0, 8)), {}, ValueError, r"sequence lengths must be positive"),
    ("qmask-before-cache", dict(q_old=torch.randn(2, 4, 5, 8), query_mask=torch.ones(2, 12, dtype=torch.bool)), {},
     ValueError, r"query_mask marks rows before the cached old rows"),
]


@pytest.mark.parametrize("over,kw,exc,match", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_is_named(over, kw, exc, match):
    with pytest.raises(exc, match=match):
        call(inputs(**over), **kw)


def test_backend_resolution_on_cpu(monkeypatch):
    assert resolve_backend("auto", "cpu") == "torch"  # the interpreter is never picked automatically
    assert "torch" in available_backends("cpu") and "reference" in available_backends("cpu")
    with pytest.raises(BackendUnavailableError, match="backend='cuda' cannot run: .*float16 or bfloat16"):
        call(inputs(), backend="cuda")  # float64 inputs
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("RAL_CUDA_EMULATION", raising=False)
    assert available_backends("cpu") == ["torch", "reference"]
    with pytest.raises(BackendUnavailableError, match="backend='cuda' cannot run: .*CUDA tensors.*RAL_CUDA_EMULATION"):
        call(inputs(), backend="cuda")
    with pytest.raises(BackendUnavailableError, match="backend='triton' cannot run: .*(CUDA tensors|not installed)"):
        call(inputs(), backend="triton")
    if HAS_TRITON:
        with pytest.raises(BackendUnavailableError, match="float16, bfloat16 or float32"):
            resolve_backend("triton", "cuda", torch.float64)
        with pytest.raises(BackendUnavailableError, match="head dims up to 256, got 320"):
            resolve_backend("triton", "cuda", torch.float16, 320)
    with pytest.raises(BackendUnavailableError, match="float16 or bfloat16 inputs, got torch.float32"):
        resolve_backend("cuda", "cuda", torch.float32)
    with pytest.raises(BackendUnavailableError, match="head dims up to 128, got 160"):
        resolve_backend("cuda", "cuda", torch.float16, 160)
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_backend("eager")


def test_defaults_match_explicit_arguments():
    x = inputs()
    a = call(x)
    b = call(x, causal=True, sm_scale=8 ** -0.5, old_sm_scale=8 ** -0.5, divergence="jsd", head_reduction="mean",
             exclude_self=False, backend="torch")
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_cache_errors():
    x = inputs()
    with pytest.raises(ValueError, match=r"num_rows must be an int in \[1, 12\]"):
        make_old_policy_cache(x["q_old"], x["k_old"], 13)
    with pytest.raises(ValueError, match="does not match q_old"):
        make_old_policy_cache(x["q_old"], x["k_old"][..., :4], 3)
