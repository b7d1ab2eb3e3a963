"""``torch.compile(fullgraph=True)`` on every backend that runs here, with the layouts users
pass (Hugging Face's transposed ``[B, T, H, D]`` views, odd head dims), the varlen op, and
``torch.library.opcheck`` of the registered ops."""

import pytest
import torch

from conftest import HAS_TRITON, Case, assert_close, make_inputs
from ral_kernels import fused_attn_kl, fused_attn_kl_varlen, ops
from ral_kernels.backends import unavailable_reason

# (backend, dtype, head dim): the Triton kernels pad head dims to powers of two and the
# CUDA kernels to 64, so an odd head dim exercises the sliced, padded gradients.
COMPILE_CASES = [("torch", torch.float32, 8)]
if HAS_TRITON:
    COMPILE_CASES.append(("triton", torch.float32, 24))
if unavailable_reason("cuda", torch.device("cpu")) is None:
    COMPILE_CASES.append(("cuda", torch.float16, 24))


def hf_layout(x: torch.Tensor) -> torch.Tensor:
    """``x`` as the transposed view Hugging Face attention layers pass: ``[B, T, H, D]``
    storage seen as ``[B, H, T, D]``."""
    return x.transpose(1, 2).contiguous().transpose(1, 2)


def _run(fn, x, names=("q", "k", "v")):
    q, k, v = (hf_layout(x[n]).detach().requires_grad_() for n in names)
    loss = fn(q, k, v)
    loss.backward()
    return loss.detach(), q.grad, k.grad, v.grad


@pytest.fixture
def fresh_compile():
    """No graph or FX cache from an earlier run: what is compiled is what this code traces."""
    torch._dynamo.reset()
    with torch._inductor.config.patch(force_disable_caches=True):
        yield
    torch._dynamo.reset()


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("backend,dtype,d", COMPILE_CASES, ids=lambda v: str(v).replace("torch.", ""))
def test_fullgraph_hf_layout(fresh_compile, backend, dtype, d, compile_backend):
    """Forward and backward compile as one opaque op with no graph break, give the eager
    numbers, and the gradients keep the strides inductor was promised."""
    if compile_backend == "aot_eager" and backend != "torch":
        pytest.skip("aot_eager does not check strides; the kernels' compile path is checked under inductor")
    case = Case(b=2, hq=4, hk=2, tq=19, tk=19, d=d, dv=d, ho=4, hko=2, do=d, n_old=7, key_mask=True,
                query_mask=True)
    x = make_inputs(case, dtype, seed=3)

    def step(q, k, v):
        out, div = fused_attn_kl(q, k, v, x["q_old"], x["k_old"], query_mask=x["query_mask"],
                                 key_mask=x["key_mask"], exclude_self=True, backend=backend)
        return (out.float().square().mean() + 3.0 * div.sum()).sin()

    eager = _run(step, x)
    compiled = _run(torch.compile(step, fullgraph=True, backend=compile_backend), x)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    for name, a, b in zip(("loss", "dq", "dk", "dv"), compiled, eager):
        assert_close(a, b, atol=tol, rtol=tol, name=name)


def test_varlen_fullgraph(fresh_compile):
    """The packed op compiles with fullgraph (no data-dependent ``.tolist()``) once the
    longest sequences are given, and matches eager."""
    lens = [5, 1, 9]
    cu = torch.tensor([0, 5, 6, 15], dtype=torch.int32)
    g = torch.Generator().manual_seed(0)
    x = {n: torch.randn(15, h, 8, generator=g) for n, h in (("q", 4), ("k", 2), ("v", 2), ("k_old", 2))}
    q_old = torch.randn(15, 4, 8, generator=g)

    def step(q, k, v):
        out, div = fused_attn_kl_varlen(q, k, v, q_old, x["k_old"], cu, cu, max_seqlen_q=max(lens),
                                        max_seqlen_k=max(lens), backend="torch", exclude_self=True)
        return out.square().sum() + 5.0 * div.sum()

    results = []
    for fn in (step, torch.compile(step, fullgraph=True, backend="aot_eager")):
        q, k, v = (x[n].clone().requires_grad_() for n in ("q", "k", "v"))
        loss = fn(q, k, v)
        loss.backward()
        results.append((loss.detach(), q.grad, k.grad, v.grad))
    for a, b in zip(*results):
        assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_varlen_under_compile_needs_max_seqlen(fresh_compile):
    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    q = torch.randn(7, 2, 4)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(q):
        return fused_attn_kl_varlen(q, q, q, q, q, cu, cu, backend="torch")[1]

    with pytest.raises(Exception, match="max_seqlen"):
        step(q)


def test_opcheck_registered_ops():
    """``torch.library.opcheck``: schema, fake kernels (shapes and strides, with HF's
    transposed inputs), autograd registration and ``torch.compile`` of both ops."""
    case = Case(b=1, hq=2, hk=1, tq=9, tk=9, d=8, dv=8, ho=2, hko=1, do=8, n_old=4, key_mask=True)
    x = make_inputs(case, torch.float32, seed=7)
    q, k, v = (hf_layout(x[n]).requires_grad_() for n in ("q", "k", "v"))
    args = (q, k, v, x["q_old"], x["k_old"], None, None, x["key_mask"], True, 0.35, 0.35, "jsd", "mean",
            True, False, "torch")
    torch.library.opcheck(ops.fused_attn_kl_fwd, args)
    res = [r.detach() for r in ops.fused_attn_kl_fwd(*args)]
    dout = hf_layout(torch.randn_like(res[0]))
    bwd_args = (dout, torch.randn_like(res[1]), q.detach(), k.detach(), v.detach(), x["q_old"], x["k_old"],
                *res, x["key_mask"], True, 0.35, 0.35, "jsd", "mean", True, False,
                "torch")
    torch.library.opcheck(ops.fused_attn_kl_bwd, bwd_args)
