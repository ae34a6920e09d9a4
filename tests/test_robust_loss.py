"""Specification of the fused robust losses: cauchy_loss, pseudo_huber_loss, geman_mcclure_loss."""

import math

import pytest
import torch

import lct_kernels as L
from helpers import ATOL, CPU_BACKENDS, assert_rule, heavy_tailed

LOSSES = {
    "cauchy": (L.cauchy_loss, lambda m, c: math.log1p(m / (2 * c * c))),
    "pseudo_huber": (L.pseudo_huber_loss, lambda m, c: math.sqrt(m + c * c) - c),
    "geman_mcclure": (L.geman_mcclure_loss, lambda m, c: 2 * m / (m + 4 * c * c)),
}


def rho64(name, sq, c):
    """Closed-form rho in float64 on a tensor of (mean) squared errors."""
    c2 = c * c
    if name == "cauchy":
        return torch.log1p(sq / (2 * c2))
    if name == "pseudo_huber":
        return torch.sqrt(sq + c2) - c
    return 2 * sq / (sq + 4 * c2)


def loss64(name, pred, target, c, weight=None, reduction="mean", elementwise=False):
    """Independent float64 oracle written straight from the definitions in the issue."""
    d = (pred.double() - target.double()).reshape(pred.shape[0], -1)
    per = rho64(name, d * d, c).mean(1) if elementwise else rho64(name, (d * d).mean(1), c)
    if weight is not None:
        per = per * weight.double()
    return {"none": per, "mean": per.mean(), "sum": per.sum()}[reduction]


def paper_expression(name, pred, target, c):
    """The paper code's eager expression, in the input dtype (PyTorch's own error)."""
    d2 = ((pred - target) ** 2).reshape(pred.shape[0], -1).mean(1)
    if name == "cauchy":
        return torch.log(d2 / 2 + c**2) - 2 * math.log(c)
    if name == "pseudo_huber":
        return torch.sqrt(d2 + c**2) - c
    return 2 * d2 / (d2 + 4 * c**2)


# ---------------------------------------------------------------------------
# The formulas
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_constant_residual_gives_closed_form(name, backend):
    fn, closed = LOSSES[name]
    c, a = 0.3, 0.7
    pred = torch.full((3, 5, 4), a)
    target = torch.zeros(3, 5, 4)
    out = fn(pred, target, c, reduction="none", backend=backend)
    expected = closed(a * a, c)
    assert out.dtype == torch.float32 and out.shape == (3,)
    torch.testing.assert_close(out, torch.full((3,), expected), rtol=1e-6, atol=1e-7)


def test_cauchy_equals_log_form():
    m = torch.rand(100, dtype=torch.float64) * 10
    c = 0.0345
    assert torch.allclose(torch.log1p(m / (2 * c * c)), torch.log(m / 2 + c * c) - 2 * math.log(c))


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("elementwise", [False, True])
def test_torch_reference_gradcheck(name, elementwise):
    fn = LOSSES[name][0]
    pred = torch.randn(3, 2, 5, dtype=torch.float64, requires_grad=True)
    target = torch.randn(3, 2, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.rand(3, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(
        lambda p, t, w: fn(p, t, 0.4, weight=w, reduction="none", elementwise=elementwise,
                           backend="torch"),
        (pred, target, weight),
    )


# ---------------------------------------------------------------------------
# Every backend against the float64 oracle
# ---------------------------------------------------------------------------
# (1, 70000): fewer rows than threads, so the CPU kernel splits the row across threads.
SHAPES = [(1, 1), (4, 1), (1, 7), (5, 3, 5, 7), (2, 4, 8, 8), (3, 1000), (2, 20000), (1, 70000)]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("elementwise", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_backward_fp32(backend, name, elementwise, shape):
    fn = LOSSES[name][0]
    pred = torch.randn(shape, requires_grad=True)
    target = torch.randn(shape, requires_grad=True)
    weight = torch.rand(shape[0]) + 0.5
    grad_out = torch.randn(shape[0])
    c = 0.25
    out = fn(pred, target, c, weight=weight, reduction="none", elementwise=elementwise,
             backend=backend)
    (out * grad_out).sum().backward()

    p64 = pred.detach().double().requires_grad_()
    ref = loss64(name, p64, target.detach(), c, weight, "none", elementwise)
    (ref * grad_out.double()).sum().backward()
    torch.testing.assert_close(out.double(), ref.detach(), rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(pred.grad.double(), p64.grad, rtol=2e-4, atol=1e-7)
    torch.testing.assert_close(target.grad, -pred.grad)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("name", LOSSES)
def test_reductions_weights_and_weight_grad(backend, reduction, name):
    fn = LOSSES[name][0]
    pred = torch.randn(6, 33, requires_grad=True)
    target = torch.randn(6, 33)
    weight = (torch.rand(6) + 0.1).requires_grad_()
    out = fn(pred, target, 0.5, weight=weight, reduction=reduction, backend=backend)
    grad_out = torch.randn(out.shape)
    (out * grad_out).sum().backward()

    p64 = pred.detach().double().requires_grad_()
    w64 = weight.detach().double().requires_grad_()
    ref = loss64(name, p64, target, 0.5, w64, reduction)
    (ref * grad_out.double()).sum().backward()
    assert out.shape == ref.shape
    torch.testing.assert_close(out.double(), ref.detach(), rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(pred.grad.double(), p64.grad, rtol=2e-4, atol=1e-7)
    torch.testing.assert_close(weight.grad.double(), w64.grad, rtol=2e-5, atol=1e-6)
    assert target.grad is None


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", LOSSES)
def test_half_precision_against_float64(backend, dtype, name):
    fn = LOSSES[name][0]
    shape = (8, 4, 8, 8)
    base = torch.randn(shape) * 0.5
    pred = base.to(dtype).requires_grad_()
    target = (base + 0.1 * torch.randn(shape)).to(dtype)
    c, grad_out = 0.05, torch.rand(8) + 0.5
    out = fn(pred, target, c, reduction="none", backend=backend)
    (out * grad_out).sum().backward()
    assert out.dtype == torch.float32 and pred.grad.dtype == dtype

    p64 = pred.detach().double().requires_grad_()
    ref = loss64(name, p64, target, c, reduction="none")
    (ref * grad_out.double()).sum().backward()
    p_same = pred.detach().clone().requires_grad_()
    eager = paper_expression(name, p_same, target, c)
    (eager * grad_out.to(dtype)).sum().backward()
    assert_rule(out, ref, eager, ATOL[dtype], f"{name} {dtype} loss")
    assert_rule(pred.grad, p64.grad, p_same.grad, ATOL[dtype] * p64.grad.abs().max().item(),
                f"{name} {dtype} grad")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("elementwise", [False, True])
def test_heavy_tailed_outliers(backend, name, elementwise):
    fn = LOSSES[name][0]
    pred = heavy_tailed((16, 256), outlier=1e4).requires_grad_()
    target = heavy_tailed((16, 256), outlier=1e4)
    out = fn(pred, target, 0.03456, reduction="none", elementwise=elementwise, backend=backend)
    out.sum().backward()
    p64 = pred.detach().double().requires_grad_()
    ref = loss64(name, p64, target, 0.03456, reduction="none", elementwise=elementwise)
    ref.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(pred.grad).all()
    torch.testing.assert_close(out.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pred.grad.double(), p64.grad, rtol=1e-4,
                               atol=1e-6 * p64.grad.abs().max().item())


NON_CONTIGUOUS = {
    "column_slice": lambda x: x[:, ::2],
    "row_slice": lambda x: x[::2],
    "transposed": lambda x: x.transpose(1, 2),
    "expanded": lambda x: x[:1].expand_as(x),
}


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("layout", NON_CONTIGUOUS)
def test_non_contiguous_inputs(backend, layout):
    make = NON_CONTIGUOUS[layout]
    base_p = torch.randn(6, 10, 12)
    base_t = torch.randn(6, 10, 12)
    target = make(base_t)
    leaf = base_p.clone().requires_grad_()
    pred = make(leaf)
    out = L.cauchy_loss(pred, target, 0.2, reduction="none", backend=backend)
    (out * torch.arange(1.0, out.shape[0] + 1)).sum().backward()
    leaf64 = base_p.double().requires_grad_()
    ref = loss64("cauchy", make(leaf64), target, 0.2, reduction="none")
    (ref * torch.arange(1.0, ref.shape[0] + 1, dtype=torch.float64)).sum().backward()
    torch.testing.assert_close(out.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(leaf.grad.double(), leaf64.grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_nan_poisons_only_its_sample(backend):
    pred = torch.randn(4, 50, requires_grad=True)
    target = torch.randn(4, 50)
    target[2, 7] = float("nan")
    out = L.cauchy_loss(pred, target, 0.1, reduction="none", backend=backend)
    out.sum().backward()
    assert torch.isnan(out[2]) and torch.isfinite(out[[0, 1, 3]]).all()
    assert torch.isnan(pred.grad[2]).any() and torch.isfinite(pred.grad[[0, 1, 3]]).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_tensor_c_equals_float_c_and_c_can_change(backend):
    pred, target = torch.randn(3, 40), torch.randn(3, 40)
    a = L.cauchy_loss(pred, target, 0.1, backend=backend)
    b = L.cauchy_loss(pred, target, torch.tensor(0.1), backend=backend)
    c = L.cauchy_loss(pred, target, torch.tensor(0.2, dtype=torch.float64), backend=backend)
    assert a.item() == pytest.approx(b.item(), rel=1e-6)
    assert c.item() < a.item()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_each_python_c_gives_its_own_loss_past_the_scalar_cache(backend):
    # a Python c becomes a cached 0-d tensor (lct_kernels._validate); 300 distinct values
    # overflow the cache (256) and the first ones come back after it was rebuilt
    pred, target = torch.randn(2, 24), torch.randn(2, 24)
    m = ((pred.double() - target.double()) ** 2).mean(1)
    cs = [0.01 + 0.003 * k for k in range(300)] + [0.01, 0.013]
    for c in cs:
        got = L.cauchy_loss(pred, target, c, reduction="none", backend=backend)
        torch.testing.assert_close(got.double(), torch.log1p(m / (2 * c * c)), rtol=1e-5, atol=0)


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b != "torch"])
def test_no_gradient_work_without_grad(backend):
    from lct_kernels.ops.robust_loss import fused_op

    pred, target = torch.randn(3, 40), torch.randn(3, 40)
    c = torch.tensor(0.1, dtype=torch.float64)
    loss, rho, grad = fused_op(backend)(pred, target, c, None, 0, False, 0, False)
    assert grad.numel() == 0 and loss.shape == (3,) and rho.shape == (3,)
    with torch.no_grad():
        out = L.cauchy_loss(pred.requires_grad_(), target, 0.1, backend=backend)
    assert not out.requires_grad


def test_gradient_never_written_into_inputs():
    pred = torch.randn(4, 64, requires_grad=True)
    target = torch.randn(4, 64)
    snapshot = (pred.detach().clone(), target.clone())
    L.cauchy_loss(pred, target, 0.1, backend="cpu").backward()
    assert torch.equal(pred.detach(), snapshot[0]) and torch.equal(target, snapshot[1])


def test_large_row_offsets_use_int64():
    """Rows 2^31 elements apart: offsets past the int32 range must address correctly."""
    n = 64
    storage = torch.empty(2**31 + 4 * n, dtype=torch.bfloat16)  # untouched pages stay unbacked
    pred = storage.as_strided((2, n), (2**31, 1))
    target = storage.as_strided((2, n), (2**31, 1), storage_offset=2 * n)
    pred.copy_(torch.randn(2, n))
    target.copy_(torch.randn(2, n))
    out = L.cauchy_loss(pred, target, 0.3, reduction="none", backend="cpu")
    ref = loss64("cauchy", pred, target, 0.3, reduction="none")
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)


def test_float64_inputs_run_the_reference_exactly():
    pred = torch.randn(3, 17, dtype=torch.float64)
    target = torch.randn(3, 17, dtype=torch.float64)
    out = L.cauchy_loss(pred, target, 0.2, reduction="none")
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, loss64("cauchy", pred, target, 0.2, reduction="none"),
                               rtol=1e-14, atol=0)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        L.cauchy_loss(pred, target, 0.2, backend="cpu")


# ---------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------
def test_modules_wrap_the_functions_and_c_can_be_updated():
    pred, target = torch.randn(5, 30), torch.randn(5, 30)
    for cls, fn in [(L.nn.CauchyLoss, L.cauchy_loss), (L.nn.PseudoHuberLoss, L.pseudo_huber_loss),
                    (L.nn.GemanMcClureLoss, L.geman_mcclure_loss)]:
        module = cls(0.1, reduction="sum")
        assert module(pred, target).item() == pytest.approx(
            fn(pred, target, 0.1, reduction="sum").item(), rel=1e-6)
        module.c = 0.3
        assert module(pred, target).item() == pytest.approx(
            fn(pred, target, 0.3, reduction="sum").item(), rel=1e-6)
        with pytest.raises(ValueError, match="c must be a finite number > 0"):
            module.c = -1.0
        assert "c=0.3" in repr(module)


# ---------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------
BAD_CALLS = [
    (lambda p, t: L.cauchy_loss(p, t[:, :-1], 0.1), ValueError, "target must have the shape"),
    (lambda p, t: L.cauchy_loss(p, t, 0.0), ValueError, "c must be a finite number > 0"),
    (lambda p, t: L.cauchy_loss(p, t, -1.0), ValueError, "c must be a finite number > 0, got -1.0"),
    (lambda p, t: L.cauchy_loss(p, t, float("nan")), ValueError, "c must be a finite"),
    (lambda p, t: L.cauchy_loss(p, t, float("inf")), ValueError, "c must be a finite"),
    (lambda p, t: L.cauchy_loss(p, t, torch.tensor(-0.5)), ValueError, "c must be a finite"),
    (lambda p, t: L.cauchy_loss(p, t, "0.1"), TypeError, "c must be a finite number"),
    (lambda p, t: L.cauchy_loss(p, t, torch.ones(2)), TypeError, "c must be"),
    (lambda p, t: L.cauchy_loss(p, t, 0.1, weight=torch.ones(3)), ValueError, "weight must have shape"),
    (lambda p, t: L.cauchy_loss(p, t, 0.1, weight=torch.ones(4, dtype=torch.int64)), TypeError, "weight"),
    (lambda p, t: L.cauchy_loss(p, t.to("meta"), 0.1), ValueError, "target is on meta"),
    (lambda p, t: L.cauchy_loss(p.long(), t.long(), 0.1), TypeError, "pred must be float32"),
    (lambda p, t: L.cauchy_loss(p, t.half(), 0.1), TypeError, "target must have pred's dtype"),
    (lambda p, t: L.cauchy_loss(p, t, 0.1, reduction="avg"), ValueError, "reduction must be one of"),
    (lambda p, t: L.cauchy_loss(p, t, 0.1, backend="gpu"), ValueError, "backend must be one of"),
    (lambda p, t: L.cauchy_loss(p, t, 0.1, elementwise=1), TypeError, "elementwise must be a bool"),
    (lambda p, t: L.cauchy_loss(p[0, 0], t[0, 0], 0.1), ValueError, "batch dimension"),
    (lambda p, t: L.cauchy_loss(p[:0], t[:0], 0.1), ValueError, "at least one sample"),
    (lambda p, t: L.cauchy_loss(p.numpy(), t, 0.1), TypeError, "pred must be a torch.Tensor"),
    (lambda p, t: L.pseudo_huber_loss(p, t, 0.1, backend="cuda"), L.BackendUnavailable, "backend 'cuda'"),
]


@pytest.mark.parametrize("call,exc,message", BAD_CALLS, ids=[m for _, _, m in BAD_CALLS])
def test_bad_input_raises_naming_the_argument(call, exc, message):
    pred, target = torch.randn(4, 10), torch.randn(4, 10)
    with pytest.raises(exc, match=message):
        call(pred, target)


def test_c_requiring_grad_is_refused():
    with pytest.raises(ValueError, match="c must not require grad"):
        L.cauchy_loss(torch.randn(2, 3), torch.randn(2, 3), torch.tensor(0.1, requires_grad=True))


def test_error_messages_name_the_function():
    with pytest.raises(ValueError, match=r"^geman_mcclure_loss: c must"):
        L.geman_mcclure_loss(torch.randn(2, 3), torch.randn(2, 3), 0)



# ---------------------------------------------------------------------------
# The fused-gradient hand-off (ops/_fused_grad.py)
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b != "torch"])
def test_gradients_accumulate_across_backward_calls(backend):
    pred = torch.randn(4, 30, requires_grad=True)
    target = torch.randn(4, 30)
    L.cauchy_loss(pred, target, 0.2, backend=backend).backward()
    once = pred.grad.clone()
    (2.0 * L.cauchy_loss(pred, target, 0.2, backend=backend)).backward()
    torch.testing.assert_close(pred.grad, 3 * once)


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b != "torch"])
def test_second_backward_through_the_same_graph_raises_clearly(backend):
    pred = torch.randn(4, 30, requires_grad=True)
    loss = L.cauchy_loss(pred, torch.randn(4, 30), 0.2, backend=backend)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice through the same graph"):
        loss.backward()


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b != "torch"])
def test_loss_inside_a_larger_graph(backend):
    """The hand-off must be correct when the loss is not the last node (grad_output != 1)."""
    x = torch.randn(6, 20, requires_grad=True)
    lin = torch.nn.Linear(20, 20).double()
    target = torch.randn(6, 20)
    pred = torch.tanh(x @ lin.weight.float().T)
    total = 3.0 * L.cauchy_loss(pred, target, 0.3, backend=backend) + pred.square().mean()
    total.backward()
    x64 = x.detach().double().requires_grad_()
    p64 = torch.tanh(x64 @ lin.weight.T)
    ref = 3.0 * loss64("cauchy", p64, target, 0.3) + p64.square().mean()
    ref.backward()
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-4, atol=1e-7)


@pytest.mark.skipif("cpu" not in CPU_BACKENDS, reason="compiled CPU extension not built")
def test_recycled_cpu_gradient_buffers_never_alias_live_gradients():
    """Gradients >= 1 MiB come from a recycling pool (csrc/cpu/buffer_pool.h)."""
    pred = torch.randn(64, 4096, requires_grad=True)  # 1 MiB of float32 gradient
    targets = [torch.randn(64, 4096) for _ in range(3)]
    grads = [torch.autograd.grad(L.cauchy_loss(pred, t, 0.2, backend="cpu"), pred)[0]
             for t in targets]
    assert len({g.data_ptr() for g in grads}) == 3
    expected = [torch.autograd.grad(L.cauchy_loss(pred, t, 0.2, backend="torch"), pred)[0]
                for t in targets]
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-9)
    ptr = grads[0].data_ptr()
    del grads[0]
    again = torch.autograd.grad(L.cauchy_loss(pred, targets[0], 0.2, backend="cpu"), pred)[0]
    assert again.data_ptr() == ptr  # the freed buffer was recycled ...
    torch.testing.assert_close(again, expected[0], rtol=1e-5, atol=1e-9)  # ... and fully rewritten
