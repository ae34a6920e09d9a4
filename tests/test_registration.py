"""torch.library registration: opcheck on every op, and torch.compile(fullgraph=True)."""

import pytest
import torch

import lct_kernels as L
from helpers import HAS_TRITON_CPU

HAS_CPU_EXT = hasattr(torch.ops.lct, "robust_loss")
C64 = torch.tensor(0.3, dtype=torch.float64)


def _loss_args(requires_grad=True, compute_grad=True, kind=0, elementwise=False, n=37,
               weight=True, reduction=1):
    pred = torch.randn(5, n, requires_grad=requires_grad)
    w = (torch.rand(5) + 0.5).requires_grad_(requires_grad) if weight else None
    return (pred, torch.randn(5, n), C64, w, kind, elementwise, reduction, compute_grad)


def _objective_args(compute_grad=True):
    s = torch.randn(6, 20, requires_grad=compute_grad)
    return (s, torch.randn(6, 20), torch.randn(6, 20), torch.rand(6), torch.rand(6) + 1,
            torch.tensor([1.0, 0, 0, 1, 0, 1]), C64, 0, 5.0, compute_grad)


def _ops():
    ops = []
    if HAS_CPU_EXT:
        ops += [("robust_loss", torch.ops.lct.robust_loss.default),
                ("consistency_objective", torch.ops.lct.consistency_objective.default)]
    if HAS_TRITON_CPU:
        ops += [("robust_loss", torch.ops.lct.triton_robust_loss.default),
                ("consistency_objective", torch.ops.lct.triton_consistency_objective.default)]
    return ops


@pytest.mark.parametrize("family,op", _ops(), ids=lambda v: str(v))
def test_opcheck(family, op):
    if family == "robust_loss":
        cases = [_loss_args(), _loss_args(kind=1, elementwise=True, reduction=0),
                 _loss_args(kind=2, n=1, weight=False, reduction=2),
                 _loss_args(requires_grad=False, compute_grad=False)]
    else:
        cases = [_objective_args(), _objective_args(compute_grad=False)]
    for args in cases:
        torch.library.opcheck(op, args)


@pytest.mark.compile
@pytest.mark.skipif(not HAS_CPU_EXT, reason="compiled CPU extension not built")
def test_compile_fullgraph_losses_and_c_changes_without_recompiling():
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounter()

    def step(pred, target, c, w):
        a = L.cauchy_loss(pred, target, c, weight=w)
        b = L.pseudo_huber_loss(pred, target, c, reduction="none", elementwise=True).sum()
        return a + L.geman_mcclure_loss(pred, target, c, reduction="sum") + b

    compiled = torch.compile(step, fullgraph=True, backend=counter)
    eager_compiled = torch.compile(step, fullgraph=True)
    pred = torch.randn(4, 64, requires_grad=True)
    target = torch.randn(4, 64)
    w = torch.rand(4)
    for c in (0.1, 0.2, 0.05):
        c_t = torch.tensor(c)
        out = compiled(pred, target, c_t, w)
        (g,) = torch.autograd.grad(out, pred)
        ref = step(pred, target, c_t, w)
        (g_ref,) = torch.autograd.grad(ref, pred)
        torch.testing.assert_close(out, ref)
        torch.testing.assert_close(g, g_ref)
    assert counter.frame_count == 1, "changing c recompiled"
    out = eager_compiled(pred, target, torch.tensor(0.1), w)  # full inductor pipeline
    out.backward()
    torch.testing.assert_close(out, step(pred, target, torch.tensor(0.1), w))


@pytest.mark.compile
@pytest.mark.skipif(not HAS_CPU_EXT, reason="compiled CPU extension not built")
def test_compile_fullgraph_objective():
    torch._dynamo.reset()

    def step(s, t, x0, w, dw, mask, c):
        total, cm, diff = L.consistency_objective(s, t, x0, w, dw, mask, c)
        return total, cm, diff

    compiled = torch.compile(step, fullgraph=True)
    args = _objective_args()[:6]
    mask = args[5] > 0
    out = compiled(*args[:5], mask, torch.tensor(0.1))
    out[0].backward()
    g = args[0].grad.clone()
    args[0].grad = None
    ref = step(*args[:5], mask, torch.tensor(0.1))
    ref[0].backward()
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(g, args[0].grad)


@pytest.mark.compile
@pytest.mark.triton
@pytest.mark.skipif(not HAS_TRITON_CPU, reason="Triton interpreter not active")
def test_compile_fullgraph_triton_backend():
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounter()
    fn = torch.compile(lambda p, t, c: L.cauchy_loss(p, t, c, backend="triton"), fullgraph=True,
                       backend=counter)
    pred = torch.randn(3, 40, requires_grad=True)
    target = torch.randn(3, 40)
    out = fn(pred, target, torch.tensor(0.2))
    out.backward()
    p2 = pred.detach().clone().requires_grad_()
    ref = L.cauchy_loss(p2, target, 0.2, backend="torch")
    ref.backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(pred.grad, p2.grad)
    assert counter.frame_count == 1


# ---------------------------------------------------------------------------
# Layer norm family
# ---------------------------------------------------------------------------
def _ln_cases():
    M, D, G = 12, 20, 3
    x = torch.randn(M, D, requires_grad=True)
    w, b = torch.rand(D, requires_grad=True), torch.randn(D, requires_grad=True)
    sh, sc = torch.randn(G, D, requires_grad=True), torch.randn(G, D, requires_grad=True)
    return [
        (x, None, b, None, None, 1e-5, M, False),
        (x, w, b, None, None, 1e-5, M, False),
        (x, None, b, sh, sc, 1e-6, M // G, False),
        (x, None, b, None, None, 1e-5, M, True),
        (x.detach(), None, None, None, None, 1e-5, M, False),
    ]


def _ln_ops():
    ops = []
    if hasattr(torch.ops.lct, "layer_norm_fwd"):
        ops.append(torch.ops.lct.layer_norm_fwd.default)
    if HAS_TRITON_CPU:
        ops.append(torch.ops.lct.triton_layer_norm_fwd.default)
    return ops


@pytest.mark.parametrize("op", _ln_ops(), ids=str)
def test_opcheck_layer_norm(op):
    for args in _ln_cases():
        torch.library.opcheck(op, args)
    bwd = (torch.ops.lct.triton_layer_norm_bwd.default if "triton" in str(op)
           else torch.ops.lct.layer_norm_bwd.default)
    x = torch.randn(12, 20)
    y, mean, rstd = op(x, None, None, None, None, 1e-5, 12, False)
    torch.library.opcheck(bwd, (torch.randn(12, 20), x, mean, rstd, None, None, None, 12, False,
                                True, True))


@pytest.mark.compile
@pytest.mark.skipif(not HAS_CPU_EXT, reason="compiled CPU extension not built")
def test_compile_fullgraph_layer_norm_family():
    torch._dynamo.reset()
    qk = L.nn.NonScalingLayerNorm(16)

    def block(x, shift, scale, bias):
        h = L.nsln_modulate(x, shift, scale)
        h = L.non_scaling_layer_norm(h, 16, bias)
        return qk(h.reshape(2, 5, 4, 16)).sum()

    compiled = torch.compile(block, fullgraph=True)
    args = [torch.randn(2, 20, 16, requires_grad=True), torch.randn(2, 16, requires_grad=True),
            torch.randn(2, 16, requires_grad=True), torch.randn(16, requires_grad=True)]
    out = compiled(*args)
    g = torch.autograd.grad(out, args)
    ref = block(*args)
    g_ref = torch.autograd.grad(ref, args)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-4)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
