"""pytest-benchmark suite: every benchmark provider at a small size, in every mode.

Runs in CI and records timings (``pytest tests/benchmarks --benchmark-autosave`` keeps
them), but asserts only correctness-type facts: each provider that can run here ran, its
outputs have the right shapes and are finite, its gradients are finite, and the eager
baseline computes the same numbers as the dense reference. Providers that cannot run on
this machine (triton and cuda on the CPU, flash-attn without the package) are skipped
with the reason the harness reports.

``eager_compiled`` compiles with the ``aot_eager`` backend here (dynamo + AOTAutograd,
the same graph capture, without inductor's C++ code generation, which takes ~20 s cold on
2 cores); ``ral-bench`` uses inductor.
"""

from __future__ import annotations

import pytest
import torch

import ral_kernels
from ral_kernels.bench.config import MODES, Shape
from ral_kernels.bench.harness import Task, flops, measure
from ral_kernels.bench.providers import PROVIDERS, Problem, eager_attn_kl

SHAPE = Shape(batch=1, heads=4, kv_heads=2, seq_len=96, head_dim=16, div_frac=0.25)
_RUNNERS: dict = {}


def _runner(name: str):
    """One runner per provider for the whole module (eager_compiled compiles once)."""
    if name not in _RUNNERS:
        _RUNNERS[name] = PROVIDERS[name].build(Problem(SHAPE, "cpu"), compile_backend="aot_eager")
    return _RUNNERS[name]


def _check_outputs(name: str, outs) -> None:
    s = SHAPE
    assert outs[0].shape == (s.batch, s.heads, s.seq_len, s.head_dim), name
    assert torch.isfinite(outs[0]).all(), f"{name}: non-finite attention output"
    if PROVIDERS[name].divergence:
        assert outs[1].shape == (s.batch, s.seq_len), name
        assert outs[1].dtype == torch.float32
        assert torch.isfinite(outs[1]).all(), f"{name}: non-finite divergence"
        assert (outs[1][:, : s.seq_len - s.rows] == 0).all(), f"{name}: divergence before the response rows"
        assert (outs[1][:, s.seq_len - s.rows:] > 0).all(), f"{name}: zero divergence on a response row"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(PROVIDERS))
def test_provider(benchmark, name, mode):
    why = PROVIDERS[name].unavailable("cpu", SHAPE)
    if why:
        pytest.skip(why)
    runner = _runner(name)
    fn, setup = runner.mode(mode)

    def prepare():
        for x in runner.leaves:
            x.grad = None
        if setup is not None:
            setup()

    benchmark.extra_info.update(shape=SHAPE.id, gflop=flops(SHAPE, mode, PROVIDERS[name].divergence) / 1e9)
    result = benchmark.pedantic(fn, setup=prepare, rounds=3, iterations=1, warmup_rounds=0)
    if mode != "backward":
        _check_outputs(name, result)
    if mode != "forward":
        for label, x in zip("qkv", runner.leaves):
            assert x.grad is not None and torch.isfinite(x.grad).all(), f"{name}: bad d{label}"


@pytest.mark.parametrize("head_reduction", ["mean", "none"])
@pytest.mark.parametrize("divergence", ["jsd", "kl", "reverse_kl"])
def test_eager_matches_reference(divergence, head_reduction):
    """The eager baseline computes the op's exact quantity (float64, with gradients)."""
    shape = Shape(batch=2, heads=4, kv_heads=2, seq_len=37, head_dim=8, div_rows=11, divergence=divergence,
                  head_reduction=head_reduction, dtype="float64")
    p = Problem(shape, "cpu", seed=3)
    results = []
    for fn in (lambda *a: eager_attn_kl(*a, divergence=divergence, head_reduction=head_reduction),
               lambda *a: ral_kernels.fused_attn_kl(*a, divergence=divergence, head_reduction=head_reduction,
                                                    backend="reference")):
        q, k, v = (x.detach().clone().requires_grad_() for x in (p.q, p.k, p.v))
        out, div = fn(q, k, v, p.q_old, p.k_old)
        g = torch.Generator().manual_seed(0)
        ((out * torch.randn(out.shape, generator=g, dtype=out.dtype)).sum()
         + (div * torch.randn(div.shape, generator=g, dtype=div.dtype)).sum()).backward()
        results.append((out, div, q.grad, k.grad, v.grad))
    for name, a, b in zip(("out", "div", "dq", "dk", "dv"), *results):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=lambda m: f"{name}: {m}")


def test_fused_providers_agree_with_eager():
    """At the suite's size every provider that ran gives eager's numbers (float32)."""
    ref = _runner("eager").forward()
    for name, prov in PROVIDERS.items():
        if prov.unavailable("cpu", SHAPE) or name == "eager":
            continue
        outs = _runner(name).forward()
        torch.testing.assert_close(outs[0], ref[0], rtol=1e-4, atol=1e-5, msg=lambda m: f"{name} out: {m}")
        if prov.divergence:
            torch.testing.assert_close(outs[1], ref[1], rtol=1e-3, atol=1e-6, msg=lambda m: f"{name} div: {m}")


def test_flop_count():
    """Causal pairs summed exactly; backward = 5/2 of the attention forward plus the old scores."""
    s = Shape(batch=2, heads=4, kv_heads=2, seq_len=10, head_dim=8, div_rows=3)
    pairs = sum(i + 1 for i in range(10))
    div_pairs = sum(i + 1 for i in range(7, 10))
    attn, old = 2 * 2 * 4 * 8 * pairs, 2 * 2 * 4 * 8 * div_pairs
    assert flops(s, "forward") == 2 * attn + old
    assert flops(s, "backward") == 5 * attn + old
    assert flops(s, "full") == 7 * attn + 2 * old
    assert flops(s, "full", with_divergence=False) == 7 * attn


def test_measure_records_skip_oom_and_numbers(monkeypatch):
    ok = measure(Task("torch", SHAPE, ("forward", "full"), "cpu", "both", repeats=2))
    for m in ("forward", "full"):
        assert ok[m]["status"] == "ok" and ok[m]["median_ms"] > 0 and ok[m]["p20_ms"] <= ok[m]["p80_ms"]
    skipped = measure(Task("cuda", SHAPE, ("full",), "cpu", "both"))
    assert skipped["full"]["status"].startswith("skipped: ") and "cuda" in skipped["full"]["status"]

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 GiB")
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", oom)
    assert measure(Task("sdpa", SHAPE, ("forward", "full"), "cpu", "both"))["full"]["status"] == "OOM"


def test_measure_helpers():
    """The timing and memory helpers the harness shares (no timing thresholds)."""
    from ral_kernels.tools.measure import bench_ms, peak_memory_split_mb, time_split_ms

    calls = []
    med, p20, p80 = bench_ms(lambda: calls.append("fn"), "cpu", warmup=1, repeats=3,
                             setup=lambda: calls.append("setup"))
    assert calls == ["setup", "fn"] * 4 and p20 <= med <= p80
    times = time_split_ms(lambda: torch.ones(8), lambda x: x.sum(), "cpu", repeats=4)
    assert len(times) == 3 and all(p20 <= med <= p80 for med, p20, p80 in times)
    assert len(time_split_ms(lambda: 1, None, "cpu", repeats=2)) == 1

    mib = 2**20 // 4  # float32 elements per MiB
    first, second, both = peak_memory_split_mb(lambda: torch.ones(64 * mib),
                                               lambda x: torch.ones(32 * mib).sum(), "cpu", pin=False)
    if first is not None:  # None where /proc/self/clear_refs cannot be written
        assert 60 <= first <= 80 and 28 <= second <= 48 and first <= both <= 120
