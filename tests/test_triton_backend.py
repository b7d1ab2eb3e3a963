"""The Triton kernels' own paths (in Triton's interpreter on the CPU): head dims 64 and 128
in fp32 and fp16, the deterministic backward against the atomic one, key splits of the
divergence passes, the per-head KL / reverse KL fused into the attention passes, and a
GPU-sized tile; plus the work counter on a kernel whose work is known by hand."""

from __future__ import annotations

import functools

import pytest
import torch

from conftest import HAS_TRITON, Case, assert_within_plain_error, make_inputs, op_kwargs, run_op
from ral_kernels import fused_attn_kl

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")


def _check(case, dtype, seed=2, **extra):
    x = make_inputs(case, dtype, seed=seed)
    kw = dict(op_kwargs(case), **extra)
    got, up = run_op(functools.partial(fused_attn_kl, backend="triton"), x, kw)
    x64 = {n: (t.double() if t is not None and t.is_floating_point() else t) for n, t in x.items()}
    exact, _ = run_op(functools.partial(fused_attn_kl, backend="reference"), x64, kw, upstream=up)
    plain, _ = run_op(functools.partial(fused_attn_kl, backend="reference"), x, kw, upstream=up)
    assert_within_plain_error(got, plain, exact, floor=5e-5)
    return got


HEAD_DIM_CASES = [
    Case(b=1, hq=4, hk=2, tq=45, tk=45, d=d, dv=d, ho=4, hko=2, do=d, divergence=dv_, head_reduction=hr,
         exclude_self=ex, key_mask=km)
    for d, dv_, hr, ex, km in ((64, "jsd", "mean", True, True), (128, "kl", "none", False, True),
                               (128, "reverse_kl", "mean", True, False), (64, "reverse_kl", "none", True, False))
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", HEAD_DIM_CASES, ids=lambda c: c.id)
def test_head_dims_64_and_128(case, dtype):
    _check(case, dtype)


@pytest.mark.parametrize("case", [
    Case(b=2, hq=4, hk=2, tq=50, tk=50, d=16, dv=16, ho=4, hko=2, do=16, exclude_self=True, key_mask=True),
    Case(b=1, hq=2, hk=1, tq=50, tk=50, d=16, dv=16, ho=2, hko=1, do=16, head_reduction="none", divergence="jsd"),
    Case(b=1, hq=2, hk=1, tq=50, tk=50, d=16, dv=16, ho=2, hko=1, do=16, head_reduction="none", divergence="kl"),
], ids=lambda c: c.id)
def test_deterministic_backward_is_reproducible_and_agrees(case):
    """``deterministic=True`` (no atomics: dk/dv and dq kernels, key-major divergence pass)
    gives bit-identical gradients on repeated calls and the atomic path's values."""
    a = _check(case, torch.float32, deterministic=True)
    b = _check(case, torch.float32, deterministic=True)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    c = _check(case, torch.float32, deterministic=False)
    for x, y in zip(a, c):
        torch.testing.assert_close(x, y, atol=2e-5, rtol=1e-4)


def test_key_splits_add_up(monkeypatch):
    """Many SMs (so many key splits per row block) and one SM give the same divergence."""
    from ral_kernels.backends.triton import launch

    case = Case(b=1, hq=4, hk=1, tq=96, tk=96, d=16, dv=16, ho=4, hko=1, do=16, exclude_self=True)
    monkeypatch.setattr(launch, "_num_sms", lambda device: 1)
    one = _check(case, torch.float32)
    monkeypatch.setattr(launch, "_num_sms", lambda device: 64)
    many = _check(case, torch.float32)
    assert launch.TritonKernels._splits(launch.INTERPRETER_TILE, 6, 96, torch.device("cpu"))[0] > 1
    for x, y in zip(one, many):
        torch.testing.assert_close(x, y, atol=2e-5, rtol=1e-4)


def test_gpu_tile_in_the_interpreter():
    """The 64 x 64 tile a GPU launches (the work counter's), on an odd size."""
    from ral_kernels.backends.triton import launch

    case = Case(b=1, hq=2, hk=1, tq=150, tk=150, d=32, dv=32, ho=2, hko=1, do=32, n_old=70, exclude_self=True)
    with launch.simulate_gpu(launch.Tile(64, 64, 4, 2), 132):
        _check(case, torch.float16)


def test_work_counter_counts_a_known_kernel():
    """One 16x32 @ 32x8 dot and one exp2 over 16x8 per program, 3 programs: 3 x 2*16*8*32
    FLOPs and 3 x 128 transcendentals, attributed to that kernel."""
    import triton
    import triton.language as tl

    from ral_kernels.tools.work import WorkCounter

    @triton.jit
    def known(X, Y, OUT):
        a = tl.load(X + tl.arange(0, 16)[:, None] * 32 + tl.arange(0, 32)[None, :])
        b = tl.load(Y + tl.arange(0, 32)[:, None] * 8 + tl.arange(0, 8)[None, :])
        c = tl.exp2(tl.dot(a, b))
        tl.store(OUT + tl.program_id(0) * 128 + tl.arange(0, 16)[:, None] * 8 + tl.arange(0, 8)[None, :], c)

    x, y, out = torch.randn(16, 32) * 0.1, torch.randn(32, 8) * 0.1, torch.empty(3, 16, 8)
    counter = WorkCounter()
    with counter.active():
        known[(3,)](x, y, out)
    c = counter.kernels["known"]
    assert (c.launches, c.dot_flops, c.transcendental) == (1, 3 * 2 * 16 * 8 * 32, 3 * 128)
    torch.testing.assert_close(out[1], torch.exp2(x @ y))


def test_fa2_reference_work_by_hand():
    from ral_kernels.tools.work import causal_elements, causal_tile_pairs, fa2_work

    assert causal_tile_pairs(128, 128, 64, 64) == 3  # (0,0), (1,0), (1,1)
    assert causal_elements(4, 4) == 10
    w = fa2_work(1, 2, 128, 128, 32, 32, 64, 64)
    assert w["fwd_flops"] == 3 * 2 * 2 * 64 * 64 * 64  # 3 tiles x 2 heads x (QK^T + PV)
    assert w["bwd_flops"] == 3 * 2 * 2 * 64 * 64 * (3 * 32 + 2 * 32)


def test_gpu_head_dim_limits_are_named_and_every_pass_has_a_tile():
    """On a GPU the dispatcher only takes head dims whose tiles compile without spills
    (test_triton_compile checks them); beyond, the backend says why instead of spilling."""
    from ral_kernels.backends import _triton_reason
    from ral_kernels.backends.triton.launch import KINDS, tile_configs

    gpu = torch.device("cuda")
    assert _triton_reason(gpu, torch.bfloat16, 128) is None and _triton_reason(gpu, torch.float32, 64) is None
    assert "up to 128" in _triton_reason(gpu, torch.bfloat16, 256)
    assert "up to 64" in _triton_reason(gpu, torch.float32, 128)
    for arch in (80, 86, 89, 90, 100):
        for kind in KINDS:
            for dtype, hd in ((torch.float16, 16), (torch.bfloat16, 128), (torch.float32, 64)):
                (tile,) = tile_configs(hd, dtype, arch, kind)
                assert tile.num_stages == 1 or arch not in (86, 89)
    with pytest.raises(ValueError, match="no GPU tile for head dim 128"):
        tile_configs(128, torch.float32, 90, "fwd")
