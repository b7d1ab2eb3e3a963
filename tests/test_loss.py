"""Tests for ral_kernels.loss.ral_loss: every loss_type against a hand-written formula,
shape variants, masking edge cases, sign, gradients and every error path."""

import math
import zlib

import pytest
import torch

from ral_kernels.loss import LOSS_TYPES, ral_loss

TRL = ("grpo", "bnpo", "dr_grpo", "dapo")
VERL = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
ALL = TRL + VERL


@pytest.fixture
def gen(request):
    # Fresh data per test, reproducible per test id.
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


def make_batch(gen, B=6, T=13, H=None, dtype=torch.float64):
    """Random divergences (>= 0), signed advantages and a ragged mask: full, partial,
    one-token, an empty sequence and one with holes (tool tokens). Never all zeros."""
    shape = (B, T) if H is None else (B, H, T)
    div = torch.rand(shape, generator=gen, dtype=dtype)
    adv = torch.randn(B, generator=gen, dtype=dtype)
    lengths = [T, 5, 0, 1, T - 2] + [int(x) for x in torch.randint(1, T + 1, (B - 5,), generator=gen)]
    mask = torch.zeros(B, T, dtype=torch.bool)
    for b, n in enumerate(lengths[:B]):
        mask[b, :n] = True
    holes = torch.rand(T, generator=gen) < 0.3
    holes[0] = False
    mask[4] &= ~holes  # a sequence with gaps inside the response
    assert mask.any() and not mask[2].any()
    return div, adv, mask


def reference(div, adv, mask, loss_type, L=None, n_items=None):
    """The formulas of TRL's GRPOTrainer.compute_loss and verl's agg_loss, written out
    per sequence with Python arithmetic."""
    B, T = mask.shape
    adv = adv[:, None].expand(B, T) if adv.dim() == 1 else adv
    S, n = [], []
    for b in range(B):
        S.append(sum(float(adv[b, t] * div[b, t]) for t in range(T) if mask[b, t]))
        n.append(sum(1 for t in range(T) if mask[b, t]))
    N = sum(n)
    nonempty = sum(1 for x in n if x > 0)
    L = T if L is None else L
    if loss_type == "grpo":
        return sum(s / max(k, 1) for s, k in zip(S, n)) / B
    if loss_type == "bnpo":
        return sum(S) / max(N, 1)
    if loss_type == "dr_grpo":
        return sum(S) / (B * L)
    if loss_type in ("dapo", "token-mean"):
        return sum(S) / (max(N, 1) if n_items is None else n_items)
    if loss_type == "seq-mean-token-sum":
        return sum(S) / max(nonempty, 1)
    if loss_type == "seq-mean-token-mean":
        return sum(s / max(k, 1) for s, k in zip(S, n)) / max(nonempty, 1)
    if loss_type == "seq-mean-token-sum-norm":
        return sum(S) / max(nonempty, 1) / L
    raise AssertionError(loss_type)


def assert_close(actual, expected, rtol=1e-10, atol=1e-12):
    actual = float(actual.detach()) if isinstance(actual, torch.Tensor) else float(actual)
    err = abs(actual - expected)
    assert err <= atol + rtol * abs(expected), f"got {actual!r}, expected {expected!r}, abs err {err:.3e}"


def test_loss_types_listed():
    assert set(LOSS_TYPES) == set(ALL)


# ---------------------------------------------------------------------------------------
# Values


@pytest.mark.parametrize("loss_type", ALL)
def test_matches_formula(gen, loss_type):
    div, adv, mask = make_batch(gen)
    out = ral_loss(div, adv, mask, loss_type=loss_type)
    assert out.shape == () and out.dtype == torch.float64
    assert_close(out, reference(div, adv, mask, loss_type))


@pytest.mark.parametrize("loss_type", ALL)
def test_matches_formula_per_token_advantages(gen, loss_type):
    div, _, mask = make_batch(gen, B=7, T=9)
    adv = torch.randn(7, 9, generator=gen, dtype=torch.float64)
    assert_close(ral_loss(div, adv, mask, loss_type=loss_type), reference(div, adv, mask, loss_type))


@pytest.mark.parametrize(
    "loss_type,kwargs",
    [
        ("dr_grpo", {"max_completion_length": 32}),
        ("seq-mean-token-sum-norm", {"max_completion_length": 32}),
        ("dapo", {"num_items_in_batch": 97}),
        ("dapo", {"num_items_in_batch": torch.tensor(97)}),
        ("dapo", {"num_items_in_batch": 24.5}),  # global count / world size
        ("token-mean", {"num_items_in_batch": 97}),
        ("token-mean", {"num_items_in_batch": torch.tensor([97.0])}),
    ],
    ids=["dr_grpo-L32", "norm-L32", "dapo-N97", "dapo-N97-tensor", "dapo-N24.5",
         "token-mean-N97", "token-mean-N97-tensor"],
)
def test_explicit_normalizers(gen, loss_type, kwargs):
    div, adv, mask = make_batch(gen)
    n_items = kwargs.get("num_items_in_batch")
    n_items = float(n_items) if isinstance(n_items, torch.Tensor) else n_items
    expected = reference(div, adv, mask, loss_type, L=kwargs.get("max_completion_length"), n_items=n_items)
    assert_close(ral_loss(div, adv, mask, loss_type=loss_type, **kwargs), expected)


@pytest.mark.parametrize(
    "loss_type,kwargs",
    [("grpo", {"max_completion_length": 5, "num_items_in_batch": 3}),
     ("dapo", {"max_completion_length": 5}),
     ("dr_grpo", {"num_items_in_batch": 3})],
    ids=["grpo", "dapo", "dr_grpo"],
)
def test_unused_normalizers_ignored(gen, loss_type, kwargs):
    # Trainer adapters pass both normalizers whatever the mode; each mode reads only its own.
    div, adv, mask = make_batch(gen)
    assert_close(ral_loss(div, adv, mask, loss_type=loss_type, **kwargs), reference(div, adv, mask, loss_type))


def test_known_relations(gen):
    div, adv, mask = make_batch(gen)
    f = lambda lt, **kw: float(ral_loss(div, adv, mask, loss_type=lt, **kw))  # noqa: E731
    assert_close(f("bnpo"), f("dapo"))
    assert_close(f("bnpo"), f("token-mean"))
    B, T = mask.shape
    # dr_grpo divides by all B sequences, verl's norm mode by the non-empty ones (one is empty).
    assert_close(f("dr_grpo") * B, f("seq-mean-token-sum-norm") * (B - 1))
    # grpo averages over all B sequences, verl over the non-empty ones (one is empty).
    assert_close(f("grpo") * B, f("seq-mean-token-mean") * (B - 1))


@pytest.mark.parametrize("loss_type", ALL)
def test_per_head_div_is_averaged(gen, loss_type):
    div, adv, mask = make_batch(gen, H=4)
    expected = reference(div.mean(1), adv, mask, loss_type)
    assert_close(ral_loss(div, adv, mask, loss_type=loss_type), expected)


@pytest.mark.parametrize("loss_type", ALL)
def test_broadcast_advantages_equal_per_token(gen, loss_type):
    div, adv, mask = make_batch(gen)
    a = ral_loss(div, adv, mask, loss_type=loss_type)
    b = ral_loss(div, adv[:, None].expand_as(div).contiguous(), mask, loss_type=loss_type)
    assert_close(a, float(b))


@pytest.mark.parametrize("loss_type", ALL)
def test_mask_none_is_all_ones(gen, loss_type):
    div, adv, _ = make_batch(gen)
    ones = torch.ones(div.shape, dtype=torch.bool)
    assert_close(ral_loss(div, adv, None, loss_type=loss_type),
                 float(ral_loss(div, adv, ones, loss_type=loss_type)))


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int64, torch.int32, torch.uint8, torch.float32],
                         ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("loss_type", ALL)
def test_mask_dtypes_agree(gen, loss_type, mask_dtype):
    div, adv, mask = make_batch(gen)
    assert_close(ral_loss(div, adv, mask.to(mask_dtype), loss_type=loss_type),
                 reference(div, adv, mask, loss_type))


@pytest.mark.parametrize("loss_type", ALL)
def test_padding_values_never_leak(gen, loss_type):
    div, _, mask = make_batch(gen)
    adv = torch.randn(div.shape, generator=gen, dtype=torch.float64)
    expected = reference(div, adv, mask, loss_type)
    div = div.masked_fill(~mask, float("nan")).requires_grad_()
    adv = adv.masked_fill(~mask, float("inf")).requires_grad_()
    out = ral_loss(div, adv, mask, loss_type=loss_type)
    assert_close(out, expected)
    out.backward()
    assert torch.isfinite(div.grad).all() and torch.isfinite(adv.grad).all()
    assert (div.grad[~mask] == 0).all() and (adv.grad[~mask] == 0).all()


@pytest.mark.parametrize("loss_type", ALL)
def test_nan_sequence_advantage_on_a_fully_masked_sequence(gen, loss_type):
    """A ``[B]`` advantage that is NaN for a sequence with no response token (e.g. a group
    whose rewards are all missing) must not poison the loss or the other gradients."""
    div, adv, mask = make_batch(gen)  # sequence 2 has no response token
    expected = reference(div, adv, mask, loss_type)
    adv = adv.clone()
    adv[2] = float("nan")
    div.requires_grad_()
    out = ral_loss(div, adv, mask, loss_type=loss_type)
    assert_close(out, expected)
    out.backward()
    assert torch.isfinite(div.grad).all()


@pytest.mark.parametrize("loss_type", ALL)
def test_all_empty_mask_is_zero_not_nan(gen, loss_type):
    div, adv, _ = make_batch(gen)
    div.requires_grad_()
    out = ral_loss(div, adv, torch.zeros(div.shape, dtype=torch.bool), loss_type=loss_type)
    out.backward()
    assert float(out.detach()) == 0.0
    assert torch.isfinite(div.grad).all() and (div.grad == 0).all()


@pytest.mark.parametrize("dtype,expected", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                            (torch.float16, torch.float32), (torch.float64, torch.float64)],
                         ids=["fp32", "bf16", "fp16", "fp64"])
def test_output_dtype(gen, dtype, expected):
    div, adv, mask = make_batch(gen, dtype=dtype)
    out = ral_loss(div, adv, mask)
    assert out.dtype == expected and out.shape == ()
    assert_close(out, reference(div.double(), adv.double(), mask, "grpo"), rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------
# Gradients and sign


@pytest.mark.parametrize("loss_type", ALL)
def test_gradcheck(gen, loss_type):
    div, _, mask = make_batch(gen, B=6, T=5, H=2)
    adv = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    div.requires_grad_()
    adv.requires_grad_()
    assert torch.autograd.gradcheck(lambda d, a: ral_loss(d, a, mask, loss_type=loss_type), (div, adv))


@pytest.mark.parametrize("loss_type", ALL)
def test_gradient_flows_to_response_tokens_only(gen, loss_type):
    div, adv, mask = make_batch(gen)
    adv = adv.abs() + 0.1  # nonzero, so every response token gets a gradient
    div.requires_grad_()
    adv.requires_grad_()
    ral_loss(div, adv, mask, loss_type=loss_type).backward()
    assert (div.grad[mask] != 0).all()
    assert (div.grad[~mask] == 0).all()
    assert adv.grad is not None and torch.isfinite(adv.grad).all()
    assert adv.grad[2] == 0  # the empty sequence
    assert (adv.grad[mask.any(1)] != 0).all()


@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["A>0-pull", "A<0-push"])
@pytest.mark.parametrize("loss_type", ALL)
def test_sign_gradient_descent(gen, loss_type, sign):
    # A > 0: a descent step lowers the divergence (attention pulled toward the rollout);
    # A < 0: it raises it (pushed away).
    div, adv, mask = make_batch(gen)
    adv = sign * (adv.abs() + 0.1)
    div.requires_grad_()
    ral_loss(div, adv, mask, loss_type=loss_type).backward()
    with torch.no_grad():
        stepped = div - 0.1 * div.grad
    change = (stepped - div.detach())[mask]
    assert ((change < 0) if sign > 0 else (change > 0)).all()
    assert float(ral_loss(stepped, adv, mask, loss_type=loss_type)) < float(
        ral_loss(div.detach(), adv, mask, loss_type=loss_type))


def test_distillation_weight_one_is_mean_divergence(gen):
    div, _, mask = make_batch(gen)
    ones = torch.ones(div.shape[0], dtype=div.dtype)
    assert_close(ral_loss(div, ones, mask, loss_type="bnpo"), float(div[mask].mean()))


# ---------------------------------------------------------------------------------------
# Errors


def _inputs(B=3, T=4):
    return torch.rand(B, T), torch.randn(B), torch.ones(B, T, dtype=torch.bool)


@pytest.mark.parametrize("bad", ["ppo", "GRPO", "token_mean", None], ids=["ppo", "GRPO", "token_mean", "None"])
def test_error_unknown_loss_type(bad):
    div, adv, mask = _inputs()
    with pytest.raises(ValueError, match=r"loss_type must be one of .*'grpo'.*'seq-mean-token-sum-norm'"):
        ral_loss(div, adv, mask, loss_type=bad)


@pytest.mark.parametrize(
    "make_div,exc,match",
    [
        (lambda: [[0.1, 0.2]], TypeError, r"div must be a torch.Tensor, got list"),
        (lambda: torch.ones(3, 4, dtype=torch.int64), TypeError, r"div must be a floating-point tensor, got dtype torch.int64"),
        (lambda: torch.ones(3, 4, dtype=torch.complex64), TypeError, r"div must be a floating-point tensor"),
        (lambda: torch.rand(12), ValueError, r"div must have shape \[B, T\] or \[B, H, T\].*\(12,\)"),
        (lambda: torch.rand(3, 2, 2, 4), ValueError, r"div must have shape \[B, T\] or \[B, H, T\].*\(3, 2, 2, 4\)"),
    ],
    ids=["not-tensor", "int", "complex", "1d", "4d"],
)
def test_error_div(make_div, exc, match):
    _, adv, mask = _inputs()
    with pytest.raises(exc, match=match):
        ral_loss(make_div(), adv, mask)


@pytest.mark.parametrize(
    "adv,exc,match",
    [
        ([1.0, 2.0, 3.0], TypeError, r"advantages must be a torch.Tensor, got list"),
        (torch.ones(3, dtype=torch.int64), TypeError, r"advantages must be a floating-point tensor, got dtype torch.int64"),
        (torch.randn(4), ValueError, r"advantages must have shape \[B\]=\[3\] or \[B, T\]=\[3, 4\].*got \[4\]"),
        (torch.randn(3, 5), ValueError, r"advantages must have shape .*got \[3, 5\]"),
        (torch.randn(3, 1), ValueError, r"advantages must have shape .*got \[3, 1\]"),
        (torch.randn(()), ValueError, r"advantages must have shape .*got \[\]"),
        (torch.randn(3, device="meta"), ValueError, r"advantages is on meta but div is on cpu"),
    ],
    ids=["not-tensor", "int", "wrong-B", "wrong-T", "B1", "scalar", "device"],
)
def test_error_advantages(adv, exc, match):
    div, _, mask = _inputs()
    with pytest.raises(exc, match=match):
        ral_loss(div, adv, mask)


@pytest.mark.parametrize(
    "mask,exc,match",
    [
        ([[1, 0]], TypeError, r"mask must be a torch.Tensor or None, got list"),
        (torch.ones(3, 4, dtype=torch.complex64), TypeError, r"mask must be bool or a 0/1 integer/float tensor, got dtype torch.complex64"),
        (torch.ones(3, 5, dtype=torch.bool), ValueError, r"mask must have shape \[B, T\]=\[3, 4\].*got \[3, 5\]"),
        (torch.ones(4, 4, dtype=torch.bool), ValueError, r"mask must have shape .*got \[4, 4\]"),
        (torch.ones(3, dtype=torch.bool), ValueError, r"mask must have shape .*got \[3\]"),
        (torch.ones(3, 2, 4, dtype=torch.bool), ValueError, r"mask must have shape .*got \[3, 2, 4\]"),
        (torch.ones(3, 4, dtype=torch.bool, device="meta"), ValueError, r"mask is on meta but div is on cpu"),
    ],
    ids=["not-tensor", "complex", "wrong-T", "wrong-B", "1d", "3d", "device"],
)
def test_error_mask(mask, exc, match):
    div, adv, _ = _inputs()
    with pytest.raises(exc, match=match):
        ral_loss(div, adv, mask)


@pytest.mark.parametrize("name", ["num_items_in_batch", "max_completion_length"])
@pytest.mark.parametrize(
    "value,exc,match",
    [
        (0, ValueError, r"must be > 0, got 0"),
        (-3, ValueError, r"must be > 0, got -3"),
        (float("nan"), ValueError, r"must be > 0, got nan"),
        (torch.tensor(0), ValueError, r"must be > 0, got 0"),
        (torch.tensor([-1.0]), ValueError, r"must be > 0, got -1"),
        (torch.tensor([3, 4]), TypeError, r"must be a positive number or a one-element real tensor"),
        (True, TypeError, r"must be a positive number, got bool"),
        ("10", TypeError, r"must be a positive number, got str"),
    ],
    ids=["zero", "negative", "nan", "tensor-zero", "tensor-negative", "tensor-2", "bool", "str"],
)
def test_error_normalizers(name, value, exc, match):
    div, adv, mask = _inputs()
    loss_type = "dapo" if name == "num_items_in_batch" else "dr_grpo"
    with pytest.raises(exc, match=name + " " + match):
        ral_loss(div, adv, mask, loss_type=loss_type, **{name: value})


def test_fast_enough_smoke():
    # Large-ish batch stays vectorized (no per-token Python work).
    div = torch.rand(64, 8, 2048)
    adv = torch.randn(64)
    mask = torch.rand(64, 2048) < 0.5
    for lt in ALL:
        assert math.isfinite(float(ral_loss(div, adv, mask, loss_type=lt)))
