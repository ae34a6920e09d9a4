"""The fused bias + GELU(tanh) (lct_kernels.ops.bias_gelu, csrc/cpu/bias_gelu.cpp).

Contract: ``linear_gelu(x, weight, bias)`` is
    y = gelu_tanh(u),  u = x @ weight^T + bias,
    gelu_tanh(u) = 0.5 u (1 + tanh(sqrt(2/pi) (u + 0.044715 u^3)))
with the gradients of that formula for x, weight and bias (any subset requiring
grad), checked against float64 autograd of the formula written out here; the bias
gradient is bit-identical for any thread count; both ISA paths (AVX2 and the
baseline) meet the same tolerance; bad arguments raise errors naming the argument.
"""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from lct_kernels import _backend, _ext
from lct_kernels.ops.bias_gelu import linear_gelu

pytestmark = pytest.mark.skipif(not _ext.CPU_EXT.loaded, reason="needs the C++ CPU extension")


def gelu64(u):
    """The tanh-GELU formula in float64, written from its definition."""
    u = u.double()
    return 0.5 * u * (1 + torch.tanh(math.sqrt(2 / math.pi) * (u + 0.044715 * u ** 3)))


def make(M, K, N, seed=0, dtype=torch.float32, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    x = (scale * torch.randn(M, K, generator=g)).to(dtype)
    w = (torch.randn(N, K, generator=g) / K ** 0.5).to(dtype)
    b = torch.randn(N, generator=g).to(dtype)
    return x, w, b


def reference(x, w, b, dy):
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    y = gelu64(x64 @ w64.t() + b64)
    grads = torch.autograd.grad(y, (x64, w64, b64), dy.double())
    return y.detach(), grads


# N = 37: not a multiple of the 8-lane vectors (the masked tail); M = 130: blocks of
# 64 rows for the bias sum plus a short one
SHAPES = [(130, 24, 37), (512, 128, 512), (3, 5, 8), (1, 7, 1)]


@pytest.mark.parametrize("isa", ["native", "base"])
@pytest.mark.parametrize("M,K,N", SHAPES)
def test_forward_and_gradients_match_float64(monkeypatch, isa, M, K, N):
    if isa == "base":
        monkeypatch.setenv("LCT_CPU_ISA", "base")
    x, w, b = make(M, K, N, scale=2.0)
    x, w, b = (t.requires_grad_() for t in (x, w, b))
    dy = torch.randn(M, N, generator=torch.Generator().manual_seed(1))
    y = linear_gelu(x, w, b, backend="cpu")
    assert y.grad_fn is not None and y.dtype == torch.float32 and y.shape == (M, N)
    got = torch.autograd.grad(y, (x, w, b), dy)
    y64, want = reference(x, w, b, dy)
    scale = max(1.0, y64.abs().max().item())
    assert (y.double() - y64).abs().max().item() <= 2e-6 * scale
    for name, g, r in zip("xwb", got, want):
        err = (g.double() - r).abs().max().item()
        assert err <= 2e-5 * max(1.0, r.abs().max().item()), (name, err)


def test_leading_dims_and_the_torch_backend():
    x, w, b = make(12, 16, 20)
    x3 = x.reshape(3, 4, 16)
    y = linear_gelu(x3, w, b)
    assert y.shape == (3, 4, 20)
    assert torch.allclose(y, F.gelu(F.linear(x3, w, b), approximate="tanh"), atol=2e-6)
    yt = linear_gelu(x3, w, b, backend="torch")
    assert torch.equal(yt, F.gelu(F.linear(x3, w, b), approximate="tanh"))


@pytest.mark.parametrize("wanted", [("x",), ("w",), ("b",), ("x", "b"), ("w", "b")])
def test_each_subset_requiring_grad(wanted):
    x, w, b = make(70, 9, 11, seed=3)
    named = {"x": x, "w": w, "b": b}
    for k in wanted:
        named[k].requires_grad_()
    dy = torch.randn(70, 11)
    y = linear_gelu(x, w, b)
    got = torch.autograd.grad(y, [named[k] for k in wanted], dy)
    _, want = reference(x, w, b, dy)
    for k, g in zip(wanted, got):
        r = want["xwb".index(k)]
        assert (g.double() - r).abs().max().item() <= 2e-5 * max(1.0, r.abs().max().item()), k


@pytest.mark.parametrize("wanted", [("h",), ("b",), ("h", "b")])
def test_the_registered_formula_for_each_subset_requiring_grad(wanted):
    # the raw op's autograd formula (ops/bias_gelu.py _backward: what torch.compile
    # traces); eager linear_gelu calls use the C++ node instead
    g = torch.Generator().manual_seed(4)
    h, b = torch.randn(70, 11, generator=g), torch.randn(11, generator=g)
    named = {"h": h, "b": b}
    for k in wanted:
        named[k].requires_grad_()
    dy = torch.randn(70, 11, generator=g)
    y = torch.ops.lct.bias_gelu_fwd(h, b)
    got = torch.autograd.grad(y, [named[k] for k in wanted], dy)
    h64, b64 = h.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    want = dict(zip("hb", torch.autograd.grad(gelu64(h64 + b64), (h64, b64), dy.double())))
    for k, got_k in zip(wanted, got):
        torch.testing.assert_close(got_k.double(), want[k], rtol=2e-5, atol=2e-5, msg=k)


def test_tails_and_special_values():
    # the sigmoid form keeps relative accuracy for negative u, where 1 + tanh z cancels
    u = torch.tensor([-30.0, -12.0, -9.5, -5.0, -1e-3, 0.0, 1e-3, 3.0, 12.0, 30.0, 1e20, -1e20])
    h = u.reshape(1, -1)
    bias = torch.zeros(u.numel())
    y = torch.ops.lct.bias_gelu_fwd(h, bias)[0]
    want = gelu64(u)
    assert torch.allclose(y.double(), want, rtol=1e-5, atol=1e-30)
    dh, _ = torch.ops.lct.bias_gelu_bwd(torch.ones_like(h), h, bias, True, False)
    u64 = u.double().requires_grad_()
    (d64,) = torch.autograd.grad(gelu64(u64).sum(), u64)
    d64 = torch.nan_to_num(d64, nan=0.0)  # u^3 overflows float64's autograd at |u| = 1e20
    assert torch.allclose(dh[0].double(), d64, rtol=1e-5, atol=1e-6)
    special = torch.tensor([[float("inf"), float("-inf"), float("nan")]])
    y = torch.ops.lct.bias_gelu_fwd(special, torch.zeros(3))[0]
    assert y[0] == float("inf") and y[1].isnan() and y[2].isnan()  # as ATen's 0.5 u (1 + tanh)
    dh, _ = torch.ops.lct.bias_gelu_bwd(torch.ones(1, 3), special, torch.zeros(3), True, False)
    assert dh[0, 2].isnan()  # NaN propagates into the gradient


def test_bias_gradient_is_the_same_for_any_thread_count():
    x, w, b = make(1000, 32, 333, seed=5)
    h = x @ w.t()
    dy = torch.randn_like(h)
    old = torch.get_num_threads()
    try:
        out = []
        for n in (1, 2):
            torch.set_num_threads(n)
            out.append(torch.ops.lct.bias_gelu_bwd(dy, h, b, True, True))
    finally:
        torch.set_num_threads(old)
    assert torch.equal(out[0][0], out[1][0]) and torch.equal(out[0][1], out[1][1])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision(dtype):
    x, w, b = make(66, 16, 19, dtype=dtype)
    x, w, b = (t.requires_grad_() for t in (x, w, b))
    y = linear_gelu(x, w, b)
    assert y.dtype == dtype
    dy = torch.randn(66, 19).to(dtype)
    got = torch.autograd.grad(y, (x, w, b), dy)
    # the reference: the kernel's input h (the GEMM rounded to dtype), in float64
    h = (x.detach() @ w.detach().t()).double().requires_grad_()
    b64 = b.detach().double().requires_grad_()
    y64 = gelu64(h + b64)
    tol = 1e-2 if dtype == torch.bfloat16 else 2e-3
    assert (y.double() - y64).abs().max().item() <= tol * max(1.0, y64.abs().max().item())
    dh64, db64 = torch.autograd.grad(y64, (h, b64), dy.double())
    assert got[2].dtype == dtype
    assert (got[2].double() - db64).abs().max().item() <= 2 * tol * max(1.0, db64.abs().max().item())


def test_no_grad_runs_the_forward_only():
    x, w, b = make(8, 4, 5)
    w.requires_grad_()
    with torch.no_grad():
        y = linear_gelu(x, w, b)
    assert y.grad_fn is None
    with torch.inference_mode():
        y2 = linear_gelu(x, w, b)
    assert torch.equal(y, y2)


def test_opcheck():
    h = torch.randn(9, 13, requires_grad=True)
    b = torch.randn(13, requires_grad=True)
    torch.library.opcheck(torch.ops.lct.bias_gelu_fwd.default, (h, b))
    torch.library.opcheck(torch.ops.lct.bias_gelu_bwd.default,
                          (torch.randn(9, 13), h.detach(), b.detach(), True, True))


def test_compiles_fullgraph():
    x, w, b = make(16, 8, 12)
    w.requires_grad_()
    fn = torch.compile(lambda x, w, b: linear_gelu(x, w, b).square().sum(), fullgraph=True)
    loss = fn(x, w, b)
    loss.backward()
    w64 = w.detach().double().requires_grad_()
    gelu64(x.double() @ w64.t() + b.double()).square().sum().backward()
    assert torch.allclose(w.grad.double(), w64.grad, rtol=1e-4, atol=1e-5)


def test_cuda_tensors_run_the_torch_path_and_forcing_a_gpu_backend_raises():
    # a CPU-only family: on CUDA the auto choice is torch (no warning), cuda/triton refuse
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _backend.select("bias_gelu", torch.device("cuda")) == "torch"
    for forced in ("cuda", "triton"):
        ok, reason = _backend.status("bias_gelu", forced, "cuda")
        assert not ok and "CPU kernel only" in reason
    with pytest.raises(_backend.BackendUnavailable, match="no triton kernel"):
        _backend.select("bias_gelu", torch.device("cpu"), "triton")


@pytest.mark.parametrize("args,match", [
    (lambda x, w, b: (x, w[:, :3], b), r"weight must be \(N, K\) with K = x.shape\[-1\]"),
    (lambda x, w, b: (x, w, b[:2]), r"bias must be \(N,\)"),
    (lambda x, w, b: (x.long(), w, b), "x must be a floating-point tensor"),
    (lambda x, w, b: (x, w, [1.0]), "bias must be a torch.Tensor"),
    (lambda x, w, b: (x, w, b.to("meta")), "one device"),
])
def test_bad_arguments_name_the_argument(args, match):
    x, w, b = make(4, 6, 5)
    with pytest.raises((ValueError, TypeError), match=match):
        linear_gelu(*args(x, w, b))


def test_raw_op_checks_its_contract():
    with pytest.raises(RuntimeError, match="bias must be a contiguous"):
        torch.ops.lct.bias_gelu_fwd(torch.randn(3, 4), torch.randn(5))
    with pytest.raises(RuntimeError, match="h must be a contiguous 2-D"):
        torch.ops.lct.bias_gelu_fwd(torch.randn(4, 3).t(), torch.randn(4))
