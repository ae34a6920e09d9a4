"""The fused gated residual (lct_kernels.gated_residual, csrc/cpu/gated_residual.cpp).

Contract: ``gated_residual(x, gate, y, bias=None)`` is adaLN-zero's residual update with
the bias of the Linear that produced y folded in,
    out[b, t, j] = x[b, t, j] + gate[b, j] * (y[b, t, j] + bias[j])
for x, y (B, T, D), gate (B, D) and bias (D,) or None (zero), with the gradients of that
formula
    dx = dout,  dy = dout * gate[:, None],  dgate = sum_t dout * (y + bias),
    dbias = sum_{b, t} dout * gate[:, None]
for any subset requiring grad, checked against float64 autograd of the formula written
out here.  Eager calls record one C++ node (csrc/cpu/pointwise_autograd.cpp); traced
calls (torch.compile) use the registered op's Python formula.  gate may be a column
slice of a wider tensor (adaLN's chunk), read in place.  dgate and dbias are
bit-identical for any thread count; both ISA paths meet the same tolerance; bad arguments raise errors naming
the argument.
"""

import itertools
import warnings

import pytest
import torch

from lct_kernels import _backend, _ext, gated_residual

pytestmark = pytest.mark.skipif(not _ext.CPU_EXT.loaded, reason="needs the C++ CPU extension")


def formula64(x, gate, y, bias=None):
    """x + gate[:, None, :] * (y + bias) in float64, broadcasting written out with expand."""
    x, gate, y = x.double(), gate.double(), y.double()
    if bias is not None:
        y = y + bias.double()[None, None, :].expand_as(y)
    return x + gate[:, None, :].expand_as(y) * y


def make(B, T, D, seed=0, dtype=torch.float32, wide=True, bias=False):
    """x, gate, y (and bias when ``bias``); gate is the third of six column blocks of a
    (B, 6 D) tensor when ``wide`` (the strided slice adaLN's chunk gives)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, D, generator=g).to(dtype)
    y = torch.randn(B, T, D, generator=g).to(dtype)
    if wide:
        gate = torch.randn(B, 6 * D, generator=g).to(dtype)[:, 2 * D:3 * D]
    else:
        gate = torch.randn(B, D, generator=g).to(dtype)
    if bias:
        return x, gate, y, torch.randn(D, generator=g).to(dtype)
    return x, gate, y


def reference(tensors, dout):
    leaves = [t.detach().double().requires_grad_() for t in tensors]
    out = formula64(*leaves)
    return out.detach(), torch.autograd.grad(out, leaves, dout.double())


# D = 37: not a multiple of the 8-lane vectors (masked tail); T = 1; D = 1
SHAPES = [(5, 7, 37), (128, 4, 128), (3, 1, 8), (2, 6, 1)]


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("isa", ["native", "base"])
@pytest.mark.parametrize("B,T,D", SHAPES)
def test_forward_and_gradients_match_float64(monkeypatch, isa, B, T, D, bias):
    if isa == "base":
        monkeypatch.setenv("LCT_CPU_ISA", "base")
    tensors = make(B, T, D, bias=bias)
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = gated_residual(*leaves)
    assert out.shape == (B, T, D) and out.dtype == torch.float32
    dout = torch.randn(B, T, D, generator=torch.Generator().manual_seed(1))
    got = torch.autograd.grad(out, leaves, dout)
    want_out, want = reference(tensors, dout)
    assert (out.double() - want_out).abs().max().item() <= 1e-6 * max(1.0, want_out.abs().max().item())
    for name, g, r in zip(("x", "gate", "y", "bias"), got, want):
        assert g.shape == r.shape, name
        err = (g.double() - r).abs().max().item()
        assert err <= 1e-5 * max(1.0, r.abs().max().item()), (name, err)


def test_eager_calls_record_one_cpp_node_and_dx_is_dout():
    x, gate, y = (t.requires_grad_() for t in make(2, 3, 8, wide=False))
    out = gated_residual(x, gate, y)
    assert "GatedResidualFunction" in out.grad_fn.name()  # CppNode<...GatedResidualFunction>
    dout = torch.randn(2, 3, 8)
    (dx,) = torch.autograd.grad(out, [x], dout)
    assert torch.equal(dx, dout)  # d out / d x is the identity: dout itself


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_every_subset_requiring_grad(k):
    for wanted in itertools.combinations(range(4), k):
        tensors = list(make(4, 5, 11, seed=k, bias=True))
        plain = [t.clone() for t in tensors]
        for i in wanted:
            tensors[i].requires_grad_()
        dout = torch.randn(4, 5, 11)
        out = gated_residual(*tensors)
        got = torch.autograd.grad(out, [tensors[i] for i in wanted], dout)
        _, want = reference(plain, dout)
        for i, g in zip(wanted, got):
            torch.testing.assert_close(g.double(), want[i], rtol=1e-5, atol=1e-5, msg=str(wanted))


@pytest.mark.parametrize("wanted,bias", [
    ((0,), False), ((1,), False), ((2,), False), ((1, 2), False), ((0, 1, 2), False),
    ((0,), True), ((1,), True), ((2,), True), ((3,), True), ((2, 3), True), ((0, 1, 2, 3), True)])
def test_the_registered_formula_for_each_subset_requiring_grad(wanted, bias):
    # the raw op's autograd formula (ops/gated_residual.py _backward: what torch.compile
    # traces); eager gated_residual calls use the C++ node instead
    tensors = list(make(4, 5, 11, seed=7, wide=False, bias=bias))
    plain = [t.clone() for t in tensors]
    for i in wanted:
        tensors[i].requires_grad_()
    dout = torch.randn(4, 5, 11)
    out = torch.ops.lct.gated_residual_fwd(*tensors, *(() if bias else (None,)))
    got = torch.autograd.grad(out, [tensors[i] for i in wanted], dout)
    _, want = reference(plain, dout)
    for i, g in zip(wanted, got):
        torch.testing.assert_close(g.double(), want[i], rtol=1e-5, atol=1e-5)


def test_the_registered_formula_matches_under_torch_compile():
    tensors = make(3, 4, 10, bias=True)
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    fn = torch.compile(lambda a, g, b, c: gated_residual(a, g, b, c).square().sum(), fullgraph=True)
    fn(*leaves).backward()
    ref = [t.detach().double().requires_grad_() for t in tensors]
    formula64(*ref).square().sum().backward()
    for got, want in zip(leaves, ref):
        torch.testing.assert_close(got.grad.double(), want.grad, rtol=1e-5, atol=1e-5)


def test_gate_and_bias_gradients_are_the_same_for_any_thread_count():
    x, gate, y, bias = make(64, 300, 40, seed=5, bias=True)
    dout = torch.randn(64, 300, 40)
    old = torch.get_num_threads()
    try:
        out = []
        for n in (1, 2):
            torch.set_num_threads(n)
            out.append(torch.ops.lct.gated_residual_bwd(dout, gate, y, bias, True, True, True))
    finally:
        torch.set_num_threads(old)
    assert all(torch.equal(a, b) for a, b in zip(out[0], out[1]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision(dtype):
    x, gate, y = (t.requires_grad_() for t in make(6, 9, 19, dtype=dtype, wide=False))
    out = gated_residual(x, gate, y)
    assert out.dtype == dtype
    dout = torch.randn(6, 9, 19).to(dtype)
    got = torch.autograd.grad(out, (x, gate, y), dout)
    want_out, want = reference((x, gate, y), dout)
    tol = 1e-2 if dtype == torch.bfloat16 else 2e-3  # one rounding of each result
    assert (out.double() - want_out).abs().max().item() <= tol * max(1.0, want_out.abs().max().item())
    for g, r in zip(got, want):
        assert g.dtype == dtype
        assert (g.double() - r).abs().max().item() <= 2 * tol * max(1.0, r.abs().max().item())


def test_mixed_dtypes_promote_and_each_gradient_keeps_its_inputs_dtype():
    x, gate, y = make(3, 4, 8, wide=False)
    gate, y = gate.bfloat16().requires_grad_(), y.bfloat16().requires_grad_()
    x.requires_grad_()
    out = gated_residual(x, gate, y)
    assert out.dtype == torch.float32  # as x + gate[:, None] * y promotes
    torch.testing.assert_close(out.double(), formula64(x, gate, y).detach(), rtol=1e-6, atol=1e-6)
    gx, gg, gy = torch.autograd.grad(out.sum(), (x, gate, y))
    assert (gx.dtype, gg.dtype, gy.dtype) == (torch.float32, torch.bfloat16, torch.bfloat16)


def test_float64_and_the_torch_backend_run_the_formula():
    x, gate, y = make(2, 3, 5)
    x64, g64, y64 = x.double(), gate.double(), y.double()
    assert torch.equal(gated_residual(x64, g64, y64), x64 + g64[:, None] * y64)
    assert torch.equal(gated_residual(x, gate, y, backend="torch"), x + gate[:, None] * y)


def test_no_grad_and_inference_mode_run_the_forward_only():
    x, gate, y = make(4, 3, 9)
    gate = gate.detach().requires_grad_()
    with torch.no_grad():
        a = gated_residual(x, gate, y)
    assert a.grad_fn is None
    with torch.inference_mode():
        b = gated_residual(x, gate.detach(), y)
    assert torch.equal(a, b)
    torch.testing.assert_close(a.double(), formula64(x, gate, y).detach(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_opcheck(bias):
    x, gate, y, b = make(3, 4, 9, bias=True)
    b = b.requires_grad_() if bias else None
    args = (x.requires_grad_(), gate.detach().requires_grad_(), y.requires_grad_(), b)
    torch.library.opcheck(torch.ops.lct.gated_residual_fwd.default, args)
    torch.library.opcheck(torch.ops.lct.gated_residual_bwd.default,
                          (torch.randn(3, 4, 9), gate.detach(), y.detach(),
                           None if b is None else b.detach(), True, True, bias))


def test_cuda_tensors_run_the_torch_path_and_forcing_a_gpu_backend_raises():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _backend.select("gated_residual", torch.device("cuda")) == "torch"
    for forced in ("cuda", "triton"):
        ok, reason = _backend.status("gated_residual", forced, "cuda")
        assert not ok and "CPU kernel only" in reason


@pytest.mark.parametrize("args,match", [
    (lambda x, g, y: (x[0], g, y[0]), r"x must be \(B, T, D\)"),
    (lambda x, g, y: (x, g, y[:, :2]), "y must have x's shape"),
    (lambda x, g, y: (x, g[:, :3], y), r"gate must be \(B, D\) = \(2, 5\)"),
    (lambda x, g, y: (x, g.long(), y), "gate must be a floating-point tensor"),
    (lambda x, g, y: (x, [1.0], y), "gate must be a torch.Tensor"),
    (lambda x, g, y: (x, g, y.to("meta")), "one device"),
    (lambda x, g, y: (x, g, y, torch.zeros(4)), r"bias must be \(D,\) = \(5,\)"),
    (lambda x, g, y: (x, g, y, torch.zeros(5, dtype=torch.int32)), "bias must be a floating-point"),
    (lambda x, g, y: (x, g, y, torch.zeros(5, device="meta")), "one device"),
])
def test_bad_arguments_name_the_argument(args, match):
    x, gate, y = make(2, 3, 5)
    with pytest.raises((ValueError, TypeError), match=match):
        gated_residual(*args(x, gate, y))


def test_raw_op_checks_its_contract():
    x = torch.randn(2, 3, 4)
    with pytest.raises(RuntimeError, match="gate must be"):
        torch.ops.lct.gated_residual_fwd(x, torch.randn(2, 5), x, None)
    with pytest.raises(RuntimeError, match="gate must be"):  # a column stride of 2
        torch.ops.lct.gated_residual_fwd(x, torch.randn(2, 8)[:, ::2], x, None)
    with pytest.raises(RuntimeError, match="y must be a contiguous"):
        torch.ops.lct.gated_residual_fwd(x, torch.randn(2, 4), x.transpose(0, 1).contiguous().transpose(0, 1), None)
    with pytest.raises(RuntimeError, match="bias must be a contiguous"):
        torch.ops.lct.gated_residual_fwd(x, torch.randn(2, 4), x, torch.randn(3))
