"""Specification of non_scaling_layer_norm, layer_norm and nsln_modulate (all backends)."""

import pytest
import torch
import torch.nn.functional as F

import lct_kernels as L
from helpers import ATOL, CPU_BACKENDS, assert_rule


def nsln64(x, D, bias=None, eps=1e-5, weight=None):
    """Float64 oracle from the definition: (x - mean) / sqrt(var + eps) * weight + bias."""
    x64 = x.double()
    shape = x64.shape
    rows = x64.reshape(-1, D)
    mean = rows.mean(-1, keepdim=True)
    var = ((rows - mean) ** 2).mean(-1, keepdim=True)
    y = (rows - mean) / torch.sqrt(var + eps)
    if weight is not None:
        y = y * weight.double().reshape(D)
    if bias is not None:
        y = y + bias.double().reshape(D)
    return y.reshape(shape)


def modulate64(x, shift, scale, bias=None, eps=1e-6):
    D = x.shape[-1]
    y = nsln64(x, D, bias, eps)
    extra = (1,) * (x.dim() - 2)
    B = x.shape[0]
    return y * (1 + scale.double().reshape(B, *extra, D)) + shift.double().reshape(B, *extra, D)


def grads(out, inputs, grad_out):
    return torch.autograd.grad(out, inputs, grad_out, allow_unused=True)


# ---------------------------------------------------------------------------
# non_scaling_layer_norm
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("D", [1, 3, 32, 33, 64, 1000, 4097, 20000])
def test_nsln_against_float64(backend, D):
    M = 6 if D < 10000 else 2
    x = (torch.randn(M, D) * 3 + 1).requires_grad_()
    bias = torch.randn(D, requires_grad=True)
    y = L.non_scaling_layer_norm(x, D, bias=bias, backend=backend)
    gy = torch.randn_like(y)
    dx, db = grads(y, (x, bias), gy)
    x64 = x.detach().double().requires_grad_()
    b64 = bias.detach().double().requires_grad_()
    ref = nsln64(x64, D, b64)
    rdx, rdb = grads(ref, (x64, b64), gy.double())
    assert y.dtype == x.dtype and y.shape == x.shape
    torch.testing.assert_close(y.double(), ref.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx.double(), rdx, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(db.double(), rdb, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_nsln_equals_layer_norm_with_unit_weight(backend):
    x = torch.randn(4, 5, 48)
    bias = torch.randn(48)
    y = L.non_scaling_layer_norm(x, (48,), bias=bias, eps=1e-5, backend=backend)
    torch.testing.assert_close(y, F.layer_norm(x, (48,), torch.ones(48), bias, 1e-5),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_multi_dim_normalized_shape_and_no_bias(backend):
    x = torch.randn(3, 4, 5, 6, requires_grad=True)
    y = L.non_scaling_layer_norm(x, (5, 6), backend=backend)
    ref = F.layer_norm(x, (5, 6))
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    (dx,) = grads(y, (x,), torch.ones_like(y) * torch.arange(6.0))
    (rdx,) = grads(ref, (x,), torch.ones_like(y) * torch.arange(6.0))
    torch.testing.assert_close(dx, rdx, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_general_layer_norm_with_weight(backend):
    x = torch.randn(10, 33, requires_grad=True)
    w = torch.randn(33, requires_grad=True)
    b = torch.randn(33, requires_grad=True)
    y = L.ops.layer_norm.layer_norm(x, 33, w, b, backend=backend)
    ref = F.layer_norm(x, (33,), w, b)
    gy = torch.randn_like(y)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    for a, r in zip(grads(y, (x, w, b), gy), grads(ref, (x, w, b), gy)):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_memory_efficient_mode_saves_y_and_matches(backend):
    x = torch.randn(7, 40, requires_grad=True)
    bias = torch.randn(40, requires_grad=True)
    gy = torch.randn(7, 40)
    y1 = L.non_scaling_layer_norm(x, 40, bias, backend=backend, memory_efficient=True)
    y2 = L.non_scaling_layer_norm(x, 40, bias, backend=backend)
    torch.testing.assert_close(y1, y2)
    for a, b in zip(grads(y1, (x, bias), gy), grads(y2, (x, bias), gy)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_rule(backend, dtype):
    x = (torch.randn(16, 96) * 2).to(dtype).requires_grad_()
    bias = torch.randn(96).to(dtype).requires_grad_()
    gy = torch.randn(16, 96).to(dtype)
    y = L.non_scaling_layer_norm(x, 96, bias, backend=backend)
    dx, db = grads(y, (x, bias), gy)
    assert y.dtype == dtype and dx.dtype == dtype and db.dtype == dtype
    x64, b64 = x.detach().double().requires_grad_(), bias.detach().double().requires_grad_()
    ref = nsln64(x64, 96, b64)
    rdx, rdb = grads(ref, (x64, b64), gy.double())
    # PyTorch's own error: F.layer_norm in the same dtype.
    xs, bs = x.detach().clone().requires_grad_(), bias.detach().clone().requires_grad_()
    same = F.layer_norm(xs, (96,), None, bs)
    sdx, sdb = grads(same, (xs, bs), gy)
    assert_rule(y, ref, same, ATOL[dtype], "y")
    assert_rule(dx, rdx, sdx, ATOL[dtype], "dx")
    assert_rule(db, rdb, sdb, ATOL[dtype] * 10, "dbias")


NON_CONTIGUOUS = {
    "row_slice": lambda t: t[::2],
    "transposed_tokens": lambda t: t.transpose(0, 1),
    "column_slice": lambda t: t[..., ::2],
}


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("layout", NON_CONTIGUOUS)
def test_non_contiguous_inputs(backend, layout):
    base = torch.randn(8, 6, 66)
    leaf = base.clone().requires_grad_()
    x = NON_CONTIGUOUS[layout](leaf)
    D = x.shape[-1]
    bias = torch.randn(D)
    y = L.non_scaling_layer_norm(x, D, bias, backend=backend)
    gy = torch.randn(y.shape)
    (dx,) = grads(y, (leaf,), gy)
    leaf64 = base.double().requires_grad_()
    ref = nsln64(NON_CONTIGUOUS[layout](leaf64), D, bias)
    (rdx,) = grads(ref, (leaf64,), gy.double())
    torch.testing.assert_close(y.double(), ref.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx.double(), rdx, rtol=1e-4, atol=1e-4)


def test_torch_reference_gradcheck():
    x = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(5, dtype=torch.float64, requires_grad=True)
    shift = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    scale = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(
        lambda *a: L.nsln_modulate(*a, backend="torch"), (x, shift, scale, bias))
    torch.autograd.gradcheck(
        lambda x, b: L.non_scaling_layer_norm(x, 5, b, backend="torch"), (x, bias))


# ---------------------------------------------------------------------------
# nsln_modulate
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shape", [(2, 5, 48), (3, 7, 33), (4, 64), (2, 3, 4, 40), (1, 1, 1)],
                         ids=str)
@pytest.mark.parametrize("with_bias", [False, True])
def test_modulate_against_float64(backend, shape, with_bias):
    B, D = shape[0], shape[-1]
    x = torch.randn(shape, requires_grad=True)
    shift = torch.randn(B, D, requires_grad=True)
    scale = (0.5 * torch.randn(B, D)).requires_grad_()
    bias = torch.randn(D, requires_grad=True) if with_bias else None
    y = L.nsln_modulate(x, shift, scale, bias, backend=backend)
    gy = torch.randn_like(y)
    inputs = (x, shift, scale) + ((bias,) if with_bias else ())
    got = grads(y, inputs, gy)
    in64 = tuple(t.detach().double().requires_grad_() for t in inputs)
    ref = modulate64(in64[0], in64[1], in64[2], in64[3] if with_bias else None)
    want = grads(ref, in64, gy.double())
    torch.testing.assert_close(y.double(), ref.detach(), rtol=1e-5, atol=1e-5)
    for name, a, b in zip(("x", "shift", "scale", "bias"), got, want):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4, msg=name)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_modulate_dit_block_shape_bf16(backend):
    B, T, D = 4, 16, 96
    x = torch.randn(B, T, D).bfloat16().requires_grad_()
    shift = torch.randn(B, D).bfloat16().requires_grad_()
    scale = (0.1 * torch.randn(B, D)).bfloat16().requires_grad_()
    y = L.nsln_modulate(x, shift, scale, backend=backend)
    gy = torch.randn(B, T, D).bfloat16()
    got = grads(y, (x, shift, scale), gy)
    in64 = tuple(t.detach().double().requires_grad_() for t in (x, shift, scale))
    ref = modulate64(*in64)
    want = grads(ref, in64, gy.double())
    same_in = tuple(t.detach().clone().requires_grad_() for t in (x, shift, scale))
    eager = F.layer_norm(same_in[0], (D,), eps=1e-6) * (1 + same_in[2][:, None]) + same_in[1][:, None]
    same = grads(eager, same_in, gy)
    assert_rule(y, ref, eager, ATOL[torch.bfloat16], "y")
    for name, a, b, s in zip(("x", "shift", "scale"), got, want, same):
        assert a.dtype == torch.bfloat16
        assert_rule(a, b, s, ATOL[torch.bfloat16] * max(1.0, b.abs().max().item()), name)


def test_parameter_gradients_are_deterministic():
    x = torch.randn(64, 128, 64, requires_grad=True)  # several backward chunks per sample
    shift, scale = torch.randn(64, 64, requires_grad=True), torch.randn(64, 64, requires_grad=True)
    gy = torch.randn(64, 128, 64)
    runs = [grads(L.nsln_modulate(x, shift, scale), (x, shift, scale), gy) for _ in range(3)]
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


# ---------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------
BAD = [
    (lambda x: L.non_scaling_layer_norm(x, 7), ValueError, "normalized_shape"),
    (lambda x: L.non_scaling_layer_norm(x, 8, bias=torch.zeros(7)), ValueError, "bias must have shape"),
    (lambda x: L.non_scaling_layer_norm(x, 8, eps=0.0), ValueError, "eps must be a finite number > 0"),
    (lambda x: L.non_scaling_layer_norm(x, 8, eps=-1e-5), ValueError, "eps must be"),
    (lambda x: L.non_scaling_layer_norm(x, 8, bias=torch.zeros(8).double()), TypeError, "dtype"),
    (lambda x: L.non_scaling_layer_norm(x, 8, bias=torch.zeros(8, device="meta")), ValueError, "bias is on meta"),
    (lambda x: L.non_scaling_layer_norm(x.long(), 8), TypeError, "x must be float32"),
    (lambda x: L.nsln_modulate(x[0, 0], torch.zeros(1, 8), torch.zeros(1, 8)), ValueError, "x must be"),
    (lambda x: L.nsln_modulate(x, torch.zeros(3, 8), torch.zeros(2, 8)), ValueError, "shift must have shape"),
    (lambda x: L.nsln_modulate(x, torch.zeros(2, 8), torch.zeros(2, 7)), ValueError, "scale must have shape"),
    (lambda x: L.nsln_modulate(x, torch.zeros(2, 8), torch.zeros(2, 8), bias=torch.zeros(9)), ValueError, "bias must have shape"),
    (lambda x: L.nsln_modulate(x, torch.zeros(2, 8).half(), torch.zeros(2, 8)), TypeError, "shift has dtype"),
    (lambda x: L.nsln_modulate(x, torch.zeros(2, 8), torch.zeros(2, 8), eps=0), ValueError, "eps"),
    (lambda x: L.nsln_modulate(x, None, torch.zeros(2, 8)), TypeError, "shift must be a torch.Tensor"),
]


@pytest.mark.parametrize("call,exc,message", BAD, ids=[m for _, _, m in BAD])
def test_bad_input_raises_naming_the_argument(call, exc, message):
    with pytest.raises(exc, match=message):
        call(torch.randn(2, 3, 8))


def test_mixed_dtypes_are_accepted_under_autocast():
    x = torch.randn(2, 3, 8, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = L.nsln_modulate(x, torch.zeros(2, 8), torch.zeros(2, 8), bias=torch.zeros(8))
    assert y.dtype == torch.bfloat16


@pytest.mark.skipif("cpu" not in CPU_BACKENDS, reason="compiled CPU extension not built")
@pytest.mark.parametrize("isa", ["base", "auto"])
def test_cpu_isa_variants_agree_with_float64(monkeypatch, isa):
    """float32 rows run ISA-specific kernels (csrc/cpu/isa/); LCT_CPU_ISA=base forces SSE2."""
    if isa == "base":
        monkeypatch.setenv("LCT_CPU_ISA", "base")
    B, T, D = 3, 9, 77
    x = torch.randn(B, T, D, requires_grad=True)
    shift, scale = torch.randn(B, D, requires_grad=True), torch.randn(B, D, requires_grad=True)
    bias = torch.randn(D, requires_grad=True)
    y = L.nsln_modulate(x, shift, scale, bias, backend="cpu")
    gy = torch.randn_like(y)
    got = grads(y, (x, shift, scale, bias), gy)
    in64 = tuple(t.detach().double().requires_grad_() for t in (x, shift, scale, bias))
    ref = modulate64(*in64)
    want = grads(ref, in64, gy.double())
    torch.testing.assert_close(y.double(), ref.detach(), rtol=1e-5, atol=1e-5)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4)
    y2 = L.non_scaling_layer_norm(x, D, bias, backend="cpu", memory_efficient=True)
    (dx,) = grads(y2, (x,), gy)
    x64 = x.detach().double().requires_grad_()
    (rdx,) = grads(nsln64(x64, D, bias), (x64,), gy.double())
    torch.testing.assert_close(dx.double(), rdx, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif("cpu" not in CPU_BACKENDS, reason="compiled CPU extension not built")
@pytest.mark.parametrize("isa", ["base", "auto"])
@pytest.mark.parametrize("D", [16, 24, 32, 64])
@pytest.mark.parametrize("case", ["plain", "groups", "row_strided", "memory_efficient", "streamed"])
def test_short_rows_against_float64(monkeypatch, isa, D, case):
    """The qk-norm's head_dim rows (D = 16, 32, 64 take register-resident AVX2 kernels,
    forward in blocks of 16 rows; D = 24 the generic loop): row counts that are not a
    multiple of the block, group (modulation) boundaries inside a block, a row stride
    wider than D, the y-saving backward, and outputs big enough (>= 4 MiB) for
    non-temporal stores all match the float64 definition."""
    if isa == "base":
        monkeypatch.setenv("LCT_CPU_ISA", "base")
    M = {"streamed": (4 << 20) // (4 * D) + 5}.get(case, 37)
    if case == "groups":  # 3 tokens per sample: boundaries fall mid-block
        B, T = 13, 3
        x = torch.randn(B, T, D, requires_grad=True)
        shift = torch.randn(B, D, requires_grad=True)
        scale = torch.randn(B, D, requires_grad=True)
        bias = torch.randn(D, requires_grad=True)
        y = L.nsln_modulate(x, shift, scale, bias, backend="cpu")
        inputs = (x, shift, scale, bias)
        in64 = tuple(t.detach().double().requires_grad_() for t in inputs)
        ref = modulate64(*in64)
    else:
        wide = torch.randn(M, D + 8 if case == "row_strided" else D) * 2 + 0.5
        leaf = wide.requires_grad_()
        x = leaf[:, :D]
        bias = torch.randn(D, requires_grad=True)
        y = L.non_scaling_layer_norm(x, D, bias, backend="cpu",
                                     memory_efficient=case == "memory_efficient")
        inputs = (leaf, bias)
        in64 = tuple(t.detach().double().requires_grad_() for t in inputs)
        ref = nsln64(in64[0][:, :D], D, in64[1])
    gy = torch.randn(y.shape)
    got = grads(y, inputs, gy)
    want = grads(ref, in64, gy.double())
    torch.testing.assert_close(y.double(), ref.detach(), rtol=1e-5, atol=1e-5)
    for a, b in zip(got, want):
        tol = 1e-4 * max(1.0, b.abs().max().item() / 100)  # d bias sums M rows
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=tol)
