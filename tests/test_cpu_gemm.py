"""lct_kernels.ops.cpu_gemm: the fused DiT's large fp32 CPU GEMMs through oneDNN.

Contract: ``linear(x, weight, bias)`` is ``x @ weight^T + bias`` with the gradients of
that formula, whichever GEMM runs (checked against float64 matmuls); ``gemm_path``
routes only large CPU float32 calls outside tracing, autocast and functorch to
oneDNN, and only when ``cpu_gemm_choice`` says so; a bad ``LCT_CPU_GEMM`` raises and
names the variable and the allowed values.
"""

import pytest
import torch
from torch import nn

from lct_kernels import cpu_blas
from lct_kernels.ops import cpu_gemm
from lct_kernels.train import model as dit_model

needs_onednn = pytest.mark.skipif(not cpu_blas._has_onednn(), reason="torch without oneDNN")


@pytest.fixture
def force(monkeypatch):
    """force("onednn" | "aten"): the cached choice, restored afterwards."""
    def set_choice(choice):
        monkeypatch.setattr(cpu_gemm, "_CHOICE", choice)
    return set_choice


@pytest.fixture
def onednn_calls(monkeypatch):
    """Counts the oneDNN GEMM calls (forward and d input)."""
    calls = []
    real = torch.ops.mkldnn._linear_pointwise.default

    def counted(*args):
        calls.append(tuple(args[0].shape))
        return real(*args)
    monkeypatch.setattr(cpu_gemm, "_ONEDNN", counted)
    return calls


def _reference(x, w, b, dy):
    """y = x w^T + b and its gradients (dx = dy w, dw = dy^T x, db = sum dy), in float64."""
    x64, w64 = x.double().reshape(-1, x.shape[-1]), w.double()
    dy64 = dy.double().reshape(-1, w.shape[0])
    y = x64 @ w64.T + (b.double() if b is not None else 0)
    return (y.reshape(dy.shape), (dy64 @ w64).reshape(x.shape), dy64.T @ x64,
            dy64.sum(0) if b is not None else None)


@needs_onednn
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("shape", [(1024, 256), (2, 512, 256), (4, 8, 40, 320)])
def test_linear_is_the_affine_map_and_its_gradients_through_onednn(force, onednn_calls, shape,
                                                                   with_bias):
    force("onednn")
    g = torch.Generator().manual_seed(0)
    K, N = shape[-1], 384
    x = torch.randn(*shape, generator=g, requires_grad=True)
    w = (torch.randn(N, K, generator=g) / K ** 0.5).requires_grad_()
    b = torch.randn(N, generator=g).requires_grad_() if with_bias else None
    dy = torch.randn(*shape[:-1], N, generator=g)
    assert cpu_gemm.gemm_path(x, w, b) == "onednn"
    y = cpu_gemm.linear(x, w, b)
    y.backward(dy)
    assert len(onednn_calls) == 2  # the forward and d input ran in oneDNN
    ref_y, ref_dx, ref_dw, ref_db = _reference(x.detach(), w.detach(), b, dy)
    assert y.shape == (*shape[:-1], N) and y.dtype == torch.float32
    # fp32 GEMM rounding: a few ulps of the terms' magnitude times sqrt(K)
    torch.testing.assert_close(y.double(), ref_y, rtol=0, atol=2e-5 * K ** 0.5)
    torch.testing.assert_close(x.grad.double(), ref_dx, rtol=0, atol=2e-5 * N ** 0.5)
    rows = x.numel() // K
    torch.testing.assert_close(w.grad.double(), ref_dw, rtol=0, atol=2e-5 * rows ** 0.5)
    if with_bias:
        torch.testing.assert_close(b.grad.double(), ref_db, rtol=0, atol=2e-5 * rows ** 0.5)


@needs_onednn
def test_linear_skips_gradients_nobody_asked_for(force, onednn_calls):
    force("onednn")
    x = torch.randn(1024, 256)  # no grad: the input gradient GEMM must not run
    w = torch.randn(256, 256, requires_grad=True)
    cpu_gemm.linear(x, w).sum().backward()
    assert len(onednn_calls) == 1 and x.grad is None and w.grad is not None


@pytest.mark.parametrize("case", ["few rows", "narrow input", "narrow output", "float64",
                                  "bfloat16", "1-d input", "autocast", "aten chosen"])
def test_gemm_path_routes_everything_else_to_aten(force, case):
    force("onednn")
    x, w, b = torch.randn(2048, 256), torch.randn(512, 256), torch.randn(512)
    if case == "few rows":
        x = x[: cpu_gemm.MIN_ROWS - 1]
    elif case == "narrow input":
        x, w = x[:, :128].contiguous(), w[:, :128].contiguous()
    elif case == "narrow output":
        w, b = w[:128], b[:128]
    elif case in ("float64", "bfloat16"):
        x = x.to(getattr(torch, case))
    elif case == "1-d input":
        x = x[0]
    elif case == "aten chosen":
        force("aten")
    if case == "autocast":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert cpu_gemm.gemm_path(x, w, b) == "aten"
        return
    assert cpu_gemm.gemm_path(x, w, b) == "aten"
    if x.dtype == w.dtype:  # and the result is F.linear's, bit for bit
        assert torch.equal(cpu_gemm.linear(x, w, b), torch.nn.functional.linear(x, w, b))


def test_gemm_path_takes_oneDNN_only_for_a_large_float32_cpu_call(force):
    force("onednn")
    x, w = torch.randn(cpu_gemm.MIN_ROWS, cpu_gemm.MIN_FEATURES), torch.randn(256, 256)
    assert cpu_gemm.gemm_path(x, w) == "onednn"


@needs_onednn
def test_torch_compile_traces_the_registered_op_with_its_gradients(force, onednn_calls):
    """fullgraph, Inductor: forward and input gradient in oneDNN (lct::onednn_linear and
    lct::onednn_linear_dinput), the formula's gradients against float64."""
    force("onednn")
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1024, 256, generator=g, requires_grad=True)
    w = (torch.randn(320, 256, generator=g) / 16).requires_grad_()
    b = torch.randn(320, generator=g).requires_grad_()
    dy = torch.randn(1024, 320, generator=g)
    compiled = torch.compile(lambda a, m, c: cpu_gemm.linear(a, m, c), fullgraph=True)
    y = compiled(x, w, b)
    y.backward(dy)
    assert len(onednn_calls) == 2
    ref_y, ref_dx, ref_dw, ref_db = _reference(x.detach(), w.detach(), b, dy)
    torch.testing.assert_close(y.double(), ref_y, rtol=0, atol=2e-5 * 16)
    torch.testing.assert_close(x.grad.double(), ref_dx, rtol=0, atol=2e-5 * 18)
    torch.testing.assert_close(w.grad.double(), ref_dw, rtol=0, atol=2e-5 * 32)
    torch.testing.assert_close(b.grad.double(), ref_db, rtol=0, atol=2e-5 * 32)


@needs_onednn
def test_the_registered_ops_pass_opcheck():
    g = torch.Generator().manual_seed(2)
    x, w, b = (torch.randn(64, 32, generator=g, requires_grad=True),
               torch.randn(48, 32, generator=g, requires_grad=True),
               torch.randn(48, generator=g, requires_grad=True))
    torch.library.opcheck(torch.ops.lct.onednn_linear.default, (x, w, b))
    torch.library.opcheck(torch.ops.lct.onednn_linear.default, (x, w, None))
    torch.library.opcheck(torch.ops.lct.onednn_linear_dinput.default,
                          (torch.randn(64, 48, generator=g), w.detach()))


@pytest.mark.parametrize("vendor,mkl,want", [("AuthenticAMD", True, "onednn"),
                                             ("GenuineIntel", True, "aten"),
                                             ("AuthenticAMD", False, "aten")])
def test_auto_choice_follows_the_cpu_vendor_and_the_blas(monkeypatch, vendor, mkl, want):
    monkeypatch.setattr(cpu_blas, "_vendor", lambda: vendor)
    monkeypatch.setattr(cpu_blas, "_blas_is_mkl", lambda: mkl)
    monkeypatch.setattr(cpu_blas, "_has_onednn", lambda: True)
    choice, reason = cpu_blas.cpu_gemm_choice({})
    assert choice == want and reason


def test_env_forces_the_choice_and_rejects_other_values(monkeypatch):
    monkeypatch.setattr(cpu_blas, "_has_onednn", lambda: True)
    assert cpu_blas.cpu_gemm_choice({"LCT_CPU_GEMM": "aten"})[0] == "aten"
    assert cpu_blas.cpu_gemm_choice({"LCT_CPU_GEMM": "oneDNN"})[0] == "onednn"
    with pytest.raises(ValueError, match="LCT_CPU_GEMM must be one of auto, onednn, aten"):
        cpu_blas.cpu_gemm_choice({"LCT_CPU_GEMM": "mkl"})
    monkeypatch.setattr(cpu_blas, "_has_onednn", lambda: False)
    with pytest.raises(RuntimeError, match="no oneDNN"):
        cpu_blas.cpu_gemm_choice({"LCT_CPU_GEMM": "onednn"})
    assert cpu_blas.cpu_gemm_choice({})[0] == "aten"


def test_a_bad_env_value_raises_at_the_first_large_gemm(monkeypatch):
    monkeypatch.setattr(cpu_gemm, "_CHOICE", None)
    monkeypatch.setenv("LCT_CPU_GEMM", "fast")
    with pytest.raises(ValueError, match="LCT_CPU_GEMM"):
        cpu_gemm.linear(torch.randn(1024, 256), torch.randn(256, 256))


@needs_onednn
def test_the_fused_dit_routes_its_large_gemms_and_keeps_its_gradients(force, onednn_calls):
    """DiT-S width (384), 256 tokens: qkv, proj, fc1 and fc2 of every block go through
    oneDNN; the loss and every parameter gradient match the ATen run (fp32 rounding)."""
    torch.manual_seed(0)
    net = dit_model.DiT(input_size=32, in_channels=4, patch_size=2, hidden_size=384, depth=2,
                        num_heads=6, fused=True)
    with torch.no_grad():
        for p in net.parameters():  # non-zero adaLN-zero layers: every GEMM does real work
            p.add_(torch.randn_like(p) * 0.02)
    x, t = torch.randn(4, 4, 32, 32), torch.rand(4)
    runs = {}
    for choice in ("aten", "onednn"):
        force(choice)
        net.zero_grad()
        out = net(x, t)
        (out.square().mean()).backward()
        runs[choice] = (out.detach(), [p.grad.clone() for p in net.parameters() if p.requires_grad])
    # forward and d input of qkv, proj, fc1, fc2 in each of the 2 blocks
    assert len(onednn_calls) == 2 * 4 * 2
    torch.testing.assert_close(runs["onednn"][0], runs["aten"][0], rtol=1e-4, atol=1e-5)
    for ga, go in zip(runs["aten"][1], runs["onednn"][1]):
        torch.testing.assert_close(go, ga, rtol=1e-3, atol=1e-6)


def test_a_hooked_linear_is_called_as_a_module(force):
    force("onednn")
    lin = nn.Linear(256, 256)
    seen = []
    lin.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    dit_model._apply_linear(lin, torch.randn(1024, 256), fused=True)
    assert seen == [(1024, 256)]
