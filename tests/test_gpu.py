"""GPU specification: the cuda and triton backends on CUDA tensors (skipped without CUDA).

Run on a GPU machine with ``pytest -m gpu`` (benchmarks/gpu_check.sh does).
"""

import pytest
import torch

import lct_kernels as L
from helpers import ATOL, assert_rule, backends_for, heavy_tailed

pytestmark = pytest.mark.gpu
DEV = "cuda"
LOSS_FNS = {"cauchy": L.cauchy_loss, "pseudo_huber": L.pseudo_huber_loss,
            "geman_mcclure": L.geman_mcclure_loss}


def gpu_backends():
    return [b for b in backends_for("cuda") if b != "torch"] if torch.cuda.is_available() else []


def oracle(name, pred, target, c, elementwise=False):
    d = (pred.double() - target.double()).reshape(pred.shape[0], -1)
    sq = d * d
    c2 = c * c

    def rho(m):
        if name == "cauchy":
            return torch.log1p(m / (2 * c2))
        if name == "pseudo_huber":
            return torch.sqrt(m + c2) - c
        return 2 * m / (m + 4 * c2)

    return rho(sq).mean(1) if elementwise else rho(sq.mean(1))


def test_both_gpu_backends_are_usable():
    assert set(gpu_backends()) == {"cuda", "triton"}, L.format_backend_info()


# (8, 64) launch-bound; 4096 and 16384 the latent sizes; 40000 the looped path; 4097 unaligned.
SHAPES = [(8, 64), (256, 4096), (64, 4, 64, 64), (3, 40000), (5, 4097), (1, 1), (7, 3)]


@pytest.mark.parametrize("backend", gpu_backends())
@pytest.mark.parametrize("name", LOSS_FNS)
@pytest.mark.parametrize("elementwise", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_fp32_against_float64(backend, name, elementwise, shape):
    pred = heavy_tailed(shape, outlier=1e3, frac=0.001).to(DEV).requires_grad_()
    target = torch.randn(shape, device=DEV)
    grad_out = torch.rand(shape[0], device=DEV) + 0.5
    out = LOSS_FNS[name](pred, target, 0.03456, reduction="none", elementwise=elementwise,
                         backend=backend)
    (out * grad_out).sum().backward()
    p64 = pred.detach().double().requires_grad_()
    ref = oracle(name, p64, target, 0.03456, elementwise)
    (ref * grad_out.double()).sum().backward()
    torch.testing.assert_close(out.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pred.grad.double(), p64.grad, rtol=1e-4,
                               atol=1e-6 * p64.grad.abs().max().item())


@pytest.mark.parametrize("backend", gpu_backends())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_rule(backend, dtype):
    shape = (64, 4, 32, 32)
    pred = (0.5 * torch.randn(shape, device=DEV)).to(dtype).requires_grad_()
    target = (pred.detach().float() + 0.1 * torch.randn(shape, device=DEV)).to(dtype)
    out = L.cauchy_loss(pred, target, 0.05, reduction="none", backend=backend)
    out.sum().backward()
    p64 = pred.detach().double().requires_grad_()
    ref = oracle("cauchy", p64, target, 0.05)
    ref.sum().backward()
    p_same = pred.detach().clone().requires_grad_()
    eager = torch.log(((p_same - target) ** 2).reshape(64, -1).mean(1) / 2 + 0.05**2) - 2 * torch.log(
        torch.tensor(0.05, device=DEV))
    eager.sum().backward()
    assert_rule(out, ref, eager, ATOL[dtype], "loss")
    assert_rule(pred.grad, p64.grad, p_same.grad, ATOL[dtype] * p64.grad.abs().max().item(), "grad")


@pytest.mark.parametrize("backend", gpu_backends())
def test_non_contiguous_on_gpu(backend):
    base = torch.randn(16, 8, 130, device=DEV)
    leaf = base.clone().requires_grad_()
    pred = leaf[:, :, 1:129].transpose(1, 2)
    target = torch.randn(16, 128, 8, device=DEV)
    out = L.cauchy_loss(pred, target, 0.1, reduction="none", backend=backend)
    out.sum().backward()
    leaf64 = base.double().requires_grad_()
    ref = oracle("cauchy", leaf64[:, :, 1:129].transpose(1, 2), target, 0.1)
    ref.sum().backward()
    torch.testing.assert_close(out.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(leaf.grad.double(), leaf64.grad, rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("backend", gpu_backends())
@pytest.mark.parametrize("shape", [(128, 4096), (4, 30000), (9, 33)], ids=str)
def test_objective_against_float64(backend, shape):
    B = shape[0]
    s = torch.randn(shape, device=DEV, requires_grad=True)
    t = s.detach() + 0.1 * torch.randn(shape, device=DEV)
    x0 = torch.randn(shape, device=DEV)
    w, dw = torch.rand(B, device=DEV) * 10, torch.rand(B, device=DEV) * 100 + 4
    mask = torch.rand(B, device=DEV) < 0.3
    total, cm, diff = L.consistency_objective(s, t, x0, w, dw, mask, 0.03456, backend=backend)
    total.backward()
    s64 = s.detach().double().requires_grad_()
    m = ((s64 - t.double()) ** 2).mean(1)
    e = ((s64 - x0.double()) ** 2).mean(1)
    cm_ref = w.double() * torch.log1p(m / (2 * 0.03456**2))
    diff_ref = (dw.double()[mask] * e[mask]).mean() if mask.any() else torch.zeros((), device=DEV, dtype=torch.float64)
    total_ref = cm_ref.mean() + 5.0 * diff_ref
    total_ref.backward()
    torch.testing.assert_close(total.double(), total_ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cm.double(), cm_ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(diff.double(), diff_ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s.grad.double(), s64.grad, rtol=1e-4,
                               atol=1e-6 * s64.grad.abs().max().item())


@pytest.mark.parametrize("backend", gpu_backends())
def test_more_than_2_31_elements(backend):
    """65 rows of 2^25 bf16 elements: 2^31 + 2^25 elements in total (int64 offsets)."""
    B, N = 65, 2**25
    pred = torch.randn(B, N, device=DEV, dtype=torch.bfloat16).requires_grad_()
    target = torch.zeros(B, N, device=DEV, dtype=torch.bfloat16)
    out = L.cauchy_loss(pred, target, 0.5, reduction="none", backend=backend)
    out.sum().backward()
    for r in (0, B // 2, B - 1):  # check rows at the start, middle and beyond 2^31
        ref = oracle("cauchy", pred[r : r + 1].detach(), target[r : r + 1], 0.5)
        torch.testing.assert_close(out[r : r + 1].double(), ref, rtol=1e-4, atol=1e-6)
        m = (pred[r].double() ** 2).mean()
        g_ref = pred[r].double() * (2.0 / N) / (m + 2 * 0.25)
        torch.testing.assert_close(pred.grad[r].double(), g_ref, rtol=1e-2, atol=1e-10)


def test_compile_fullgraph_on_gpu():
    torch._dynamo.reset()
    f = torch.compile(lambda p, t, c: L.cauchy_loss(p, t, c), fullgraph=True)
    pred = torch.randn(32, 4096, device=DEV, requires_grad=True)
    target = torch.randn(32, 4096, device=DEV)
    for c in (0.1, 0.05):
        out = f(pred, target, torch.tensor(c, device=DEV))
        ref = L.cauchy_loss(pred, target, c, backend="torch")
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    out.backward()
    assert torch.isfinite(pred.grad).all()


@pytest.mark.parametrize("backend", gpu_backends())
def test_python_c_on_a_side_stream_and_under_graph_capture(backend):
    # The cached device scalar for a Python c is per stream, and never cached while a
    # CUDA graph is captured (there it holds its value only once the graph replays).
    pred = torch.randn(16, 512, device=DEV)
    target = torch.randn(16, 512, device=DEV)
    m = ((pred.double() - target.double()) ** 2).mean(1)
    ref = lambda c: torch.log1p(m / (2 * c * c))  # noqa: E731
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.cuda.stream(side):
        for k in range(300):  # more distinct values than the cache holds: it rebuilds
            c = 0.02 + 0.001 * k
            torch.testing.assert_close(
                L.cauchy_loss(pred, target, c, reduction="none", backend=backend).double(),
                ref(c), rtol=1e-5, atol=0)
        L.cauchy_loss(pred, target, 0.5, reduction="none", backend=backend)  # warm-up
    torch.cuda.current_stream().wait_stream(side)
    c_new = 0.0123457  # first seen inside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        captured = L.cauchy_loss(pred, target, c_new, reduction="none", backend=backend)
    with torch.no_grad():
        eager = L.cauchy_loss(pred, target, c_new, reduction="none", backend=backend)
    torch.testing.assert_close(eager.double(), ref(c_new), rtol=1e-5, atol=0)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(captured.double(), ref(c_new), rtol=1e-5, atol=0)


def test_opcheck_cuda_ops():
    c = torch.tensor(0.3, dtype=torch.float64, device=DEV)
    pred = torch.randn(5, 40, device=DEV, requires_grad=True)
    target = torch.randn(5, 40, device=DEV)
    w = torch.rand(5, device=DEV, requires_grad=True)
    for op in (torch.ops.lct.robust_loss.default, torch.ops.lct.triton_robust_loss.default):
        for reduction in (0, 1, 2):
            torch.library.opcheck(op, (pred, target, c, w, 0, False, reduction, True))
    s = torch.randn(6, 32, device=DEV, requires_grad=True)
    args = (s, torch.randn(6, 32, device=DEV), torch.randn(6, 32, device=DEV),
            torch.rand(6, device=DEV), torch.rand(6, device=DEV),
            torch.tensor([1.0, 0, 1, 0, 0, 1], device=DEV), c, 0, 5.0, True)
    for op in (torch.ops.lct.consistency_objective.default,
               torch.ops.lct.triton_consistency_objective.default):
        torch.library.opcheck(op, args)


# ---------------------------------------------------------------------------
# Layer norm family on the GPU
# ---------------------------------------------------------------------------
def ln_backends():
    if not torch.cuda.is_available():
        return []
    from lct_kernels import _backend

    return [b for b in ("cuda", "triton") if _backend.status("layer_norm", b, "cuda")[0]]


def modulate_oracle(x, shift, scale, bias, eps):
    x64 = x.double()
    mean = x64.mean(-1, keepdim=True)
    var = ((x64 - mean) ** 2).mean(-1, keepdim=True)
    y = (x64 - mean) / torch.sqrt(var + eps)
    if bias is not None:
        y = y + bias.double()
    if shift is None:
        return y
    return y * (1 + scale.double()[:, None]) + shift.double()[:, None]


# D: 64 (qk-norm, warp rows), 768/1152 (DiT), 4097 (unaligned), 16384 and 20000 (block rows).
@pytest.mark.parametrize("backend", ln_backends())
@pytest.mark.parametrize("B,T,D", [(64, 256, 64), (8, 256, 768), (4, 64, 1152), (3, 5, 4097),
                                   (2, 8, 16384), (2, 3, 20000), (2, 3, 33)])
@pytest.mark.parametrize("modulate", [False, True])
def test_layer_norm_family_fp32_against_float64(backend, B, T, D, modulate):
    x = (2 * torch.randn(B, T, D, device=DEV) + 0.5).requires_grad_()
    bias = torch.randn(D, device=DEV, requires_grad=True)
    shift = torch.randn(B, D, device=DEV, requires_grad=True) if modulate else None
    scale = (0.3 * torch.randn(B, D, device=DEV)).requires_grad_() if modulate else None
    if modulate:
        y = L.nsln_modulate(x, shift, scale, bias, eps=1e-6, backend=backend)
        inputs = (x, shift, scale, bias)
    else:
        y = L.non_scaling_layer_norm(x, D, bias, eps=1e-6, backend=backend)
        inputs = (x, bias)
    gy = torch.randn_like(y)
    got = torch.autograd.grad(y, inputs, gy)
    in64 = [t.detach().double().requires_grad_() for t in inputs]
    ref = modulate_oracle(in64[0], *(in64[1:3] if modulate else (None, None)), in64[-1], 1e-6)
    want = torch.autograd.grad(ref, in64, gy.double())
    torch.testing.assert_close(y.double(), ref.detach(), rtol=1e-5, atol=1e-4)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-3 * max(1.0, b.abs().max().item()))


@pytest.mark.parametrize("backend", ln_backends())
def test_layer_norm_bf16_rule_dit_shape(backend):
    import torch.nn.functional as F
    from helpers import ATOL, assert_rule

    B, T, D = 32, 256, 768
    x = torch.randn(B, T, D, device=DEV).bfloat16().requires_grad_()
    shift = torch.randn(B, D, device=DEV).bfloat16().requires_grad_()
    scale = (0.1 * torch.randn(B, D, device=DEV)).bfloat16().requires_grad_()
    y = L.nsln_modulate(x, shift, scale, backend=backend)
    gy = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, shift, scale), gy)
    in64 = [t.detach().double().requires_grad_() for t in (x, shift, scale)]
    ref = modulate_oracle(in64[0], in64[1], in64[2], None, 1e-6)
    want = torch.autograd.grad(ref, in64, gy.double())
    same = [t.detach().clone().requires_grad_() for t in (x, shift, scale)]
    eager = F.layer_norm(same[0], (D,), eps=1e-6) * (1 + same[2][:, None]) + same[1][:, None]
    ref_same = torch.autograd.grad(eager, same, gy)
    assert_rule(y, ref, eager, ATOL[torch.bfloat16], "y")
    for name, a, b, s in zip(("x", "shift", "scale"), got, want, ref_same):
        assert_rule(a, b, s, ATOL[torch.bfloat16] * max(1.0, b.abs().max().item()), name)


@pytest.mark.parametrize("backend", ln_backends())
def test_layer_norm_gpu_parameter_grads_deterministic(backend):
    x = torch.randn(16, 256, 768, device=DEV, requires_grad=True)
    shift = torch.randn(16, 768, device=DEV, requires_grad=True)
    scale = torch.randn(16, 768, device=DEV, requires_grad=True)
    gy = torch.randn(16, 256, 768, device=DEV)
    runs = [torch.autograd.grad(L.nsln_modulate(x, shift, scale, backend=backend),
                                (x, shift, scale), gy) for _ in range(3)]
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


def test_opcheck_layer_norm_cuda_ops():
    x = torch.randn(12, 96, device=DEV, requires_grad=True)
    b = torch.randn(96, device=DEV, requires_grad=True)
    sh = torch.randn(3, 96, device=DEV, requires_grad=True)
    sc = torch.randn(3, 96, device=DEV, requires_grad=True)
    for op in (torch.ops.lct.layer_norm_fwd.default, torch.ops.lct.triton_layer_norm_fwd.default):
        torch.library.opcheck(op, (x, None, b, sh, sc, 1e-6, 4, False))
        torch.library.opcheck(op, (x, None, b, None, None, 1e-5, 12, True))


# ---------------------------------------------------------------------------
# Exact OT assignment on the GPU
# ---------------------------------------------------------------------------
def ot_backends():
    if not torch.cuda.is_available():
        return []
    from lct_kernels import _backend

    return [b for b in ("cuda", "triton") if _backend.status("ot_assign", b, "cuda")[0]]


def _scipy_total(C):
    import numpy as np
    from scipy.optimize import linear_sum_assignment

    Cn = C.double().cpu().numpy()
    r, c = linear_sum_assignment(Cn)
    return Cn[r, c].sum()


@pytest.mark.parametrize("backend", ot_backends())
@pytest.mark.parametrize("n,m", [(1, 1), (7, 7), (64, 64), (256, 256), (512, 512), (30, 41)])
def test_ot_assign_gpu_matches_scipy(backend, n, m):
    x, z = torch.randn(n, 64, dtype=torch.float64), torch.randn(m, 64, dtype=torch.float64)
    C = (torch.cdist(x, z) ** 2).to(DEV)
    cols, u, v = L.ot_assign(C, backend=backend, return_duals=True)
    assert cols.device.type == "cuda" and len(set(cols.tolist())) == n
    got = C.double()[torch.arange(n, device=DEV), cols].sum().item()
    ref = _scipy_total(C)
    assert abs(got - ref) <= 1e-12 * max(1.0, abs(ref))
    reduced = C.double() - u[:, None] - v[None, :]
    assert reduced.min().item() >= -1e-9 * C.abs().max().item()


@pytest.mark.parametrize("backend", ot_backends())
@pytest.mark.parametrize(
    "n,m,dtype",
    [(160, 160, torch.float32), (96, 128, torch.float32), (100, 100, torch.float64),
     (300, 300, torch.float64)],
)
def test_ot_assign_gpu_staged_and_streamed_costs_with_ties(backend, n, m, dtype):
    """CUDA stages a problem's cost in shared memory when it fits: 160^2 float32 (100 KB,
    above the 48 KB default: the opt-in path), 96x128 float32 (exactly 48 KB, just above
    what the default leaves next to the static shared memory) and 100^2 float64 are
    staged, 300^2 float64 is streamed.  Small integer costs give wide levels and tight
    edges."""
    C = torch.randint(0, 4, (2, n, m), device=DEV).to(dtype)
    cols = L.ot_assign(C, backend=backend)
    for b in range(2):
        assert len(set(cols[b].tolist())) == n
        assert C[b].double()[torch.arange(n, device=DEV), cols[b]].sum().item() == _scipy_total(C[b])


@pytest.mark.parametrize("backend", ot_backends())
def test_ot_assign_gpu_batches_ties_and_bad_input(backend):
    C = torch.randint(0, 3, (64, 48, 48), device=DEV).double()
    cols = L.ot_assign(C, backend=backend)
    for b in (0, 31, 63):
        got = C[b][torch.arange(48, device=DEV), cols[b]].sum().item()
        assert got == _scipy_total(C[b])
    bad = torch.randn(2, 5, 5, device=DEV, dtype=torch.float64)
    bad[1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        L.ot_assign(bad, backend=backend)
    infeasible = torch.randn(4, 4, device=DEV, dtype=torch.float64)
    infeasible[:, 0] = float("inf")
    with pytest.raises(ValueError, match="infeasible"):
        L.ot_assign(infeasible, backend=backend)


@pytest.mark.parametrize("backend", ot_backends())
def test_ot_couple_gpu_stays_on_device_and_is_exact(backend):
    x0 = torch.randn(256, 4, 32, 32, device=DEV)
    x1 = torch.randn(256, 4, 32, 32, device=DEV)
    perm = L.ot_couple(x0, x1, backend=backend)
    assert perm.device.type == "cuda"
    C = torch.cdist(x0.reshape(256, -1).double(), x1.reshape(256, -1).double()) ** 2
    got = C[torch.arange(256, device=DEV), perm].sum().item()
    assert abs(got - _scipy_total(C)) <= 1e-6 * _scipy_total(C)
    groups = torch.randint(0, 10, (256,), device=DEV)
    gperm = L.ot_couple(x0, x1, groups=groups, backend=backend)
    assert torch.equal(groups[gperm], groups)
