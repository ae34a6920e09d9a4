"""GPU specification of the CUDA layer-norm backward's work split (skipped without CUDA).

Contract under test (csrc/ops.cpp, lct::layer_norm_bwd): with xhat = (x - mean) rstd
(or y - bias from y) and g = dy * weight * (1 + scale_group),
    dx = rstd (g - mean_j(g) - xhat mean_j(g xhat)),
    p1[group] = sum over the group's rows of dy,  p2[group] = sum of dy xhat,
against float64 computations, for
  * rows of 1025-2048 bf16/fp16 elements, served by two warps per row (the
    register-pressure split) -- D = 1025 is not a multiple of 8 and takes the
    block-row kernel, 1032 / 1152 / 2048 the split warp kernel;
  * more chunks than CUDA's grid y limit (65535): clamped, chunks grow;
  * D = 0 (empty rows) with M > 0.
Run on a GPU machine with ``pytest -m gpu tests/test_gpu_cuda.py``.
"""

import pytest
import torch
import torch.nn.functional as F

import lct_kernels as L
from helpers import ATOL, assert_rule, layer_norm64
from lct_kernels.ops.layer_norm import layer_norm

pytestmark = pytest.mark.gpu
DEV = "cuda"
EPS = 1e-6


def has_cuda_kernels():
    if not torch.cuda.is_available():
        return False
    from lct_kernels import _backend

    return _backend.status("layer_norm", "cuda", "cuda")[0]


needs_cuda_ext = pytest.mark.skipif(not has_cuda_kernels(), reason="needs the CUDA extension on a GPU")


def ln64(x, weight, bias, shift, scale):
    """float64 layer norm of the trailing dim, with optional affine and adaLN modulate."""
    return layer_norm64(x, weight, bias, shift, scale, EPS)


def eager(x, weight, bias, shift, scale):
    """The same formula in x's dtype with torch's own kernels (the error yardstick)."""
    D = x.shape[-1]
    y = F.layer_norm(x, (D,), weight, bias, eps=EPS)
    return y if shift is None else y * (1 + scale[:, None]) + shift[:, None]


@needs_cuda_ext
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("D", [1025, 1032, 1152, 2048])
@pytest.mark.parametrize("mode", ["weight+bias", "modulate", "from y"])
def test_split_rows_against_float64(dtype, D, mode):
    # 3 x 67 rows: 201 rows = several chunks of 28 rows (D = 1152), the last step of a
    # chunk has idle row slots; modulate: 3 groups of 67 rows.
    B, T = 3, 67
    torch.manual_seed(D)
    x = (2 * torch.randn(B, T, D, device=DEV) + 0.5).to(dtype).requires_grad_()
    bias = torch.randn(D, device=DEV).to(dtype).requires_grad_()
    weight = shift = scale = None
    if mode == "weight+bias":
        weight = (torch.rand(D, device=DEV) + 0.5).to(dtype).requires_grad_()
        y = layer_norm(x, D, weight, bias, eps=EPS, backend="cuda")
        inputs = (x, weight, bias)
    elif mode == "modulate":
        shift = torch.randn(B, D, device=DEV).to(dtype).requires_grad_()
        scale = (0.3 * torch.randn(B, D, device=DEV)).to(dtype).requires_grad_()
        y = L.nsln_modulate(x, shift, scale, bias, eps=EPS, backend="cuda")
        inputs = (x, shift, scale, bias)
    else:
        y = L.non_scaling_layer_norm(x, D, bias, eps=EPS, backend="cuda", memory_efficient=True)
        inputs = (x, bias)
    gy = torch.randn_like(y)
    got = torch.autograd.grad(y, inputs, gy, retain_graph=True)
    again = torch.autograd.grad(y, inputs, gy)  # same launch: bitwise the same (no atomics)
    for a, b in zip(got, again):
        assert torch.equal(a, b)

    def unpack(ts):
        d = dict(zip([n for n, t in zip(("x", "weight", "shift", "scale", "bias"),
                                        (x, weight, shift, scale, bias)) if t is not None], ts))
        return d["x"], d.get("weight"), d["bias"], d.get("shift"), d.get("scale")

    in64 = [t.detach().double().requires_grad_() for t in inputs]
    ref = ln64(*unpack(in64))
    want = torch.autograd.grad(ref, in64, gy.double())
    same = [t.detach().clone().requires_grad_() for t in inputs]
    out_same = eager(*unpack(same))
    ref_same = torch.autograd.grad(out_same, same, gy)
    assert_rule(y, ref, out_same, ATOL[dtype], "y")
    names = [n for n, t in zip(("x", "weight", "shift", "scale", "bias"),
                               (x, weight, shift, scale, bias)) if t is not None]
    assert_rounded(y, ref, dtype, "y")
    for name, a, b, s in zip(names, got, want, ref_same):
        assert_rule(a, b, s, ATOL[dtype] * max(1.0, b.abs().max().item()), f"{mode} d{name}")
        # From y, xhat = y - bias carries y's rounding into every gradient term.
        assert_rounded(a, b, dtype, f"{mode} d{name}", floor=1e-3 if mode == "from y" else 1e-4)


def assert_rounded(got, ref64, dtype, what, floor=1e-4):
    """got = ref64 computed in float32 then rounded to dtype: within twice the rounding
    (2^-7 relative for bf16, 2^-10 for fp16) plus `floor` of the largest value."""
    rel = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}[dtype]
    err = (got.double() - ref64).abs()
    bound = rel * ref64.abs() + floor * ref64.abs().max()
    assert (err <= bound).all(), f"{what}: error exceeds the bound by {(err - bound).max().item():.3e}"


def stats32(x, rows=65536):
    """mean and rstd (float32) of each row of x, computed in float64 a slice at a time."""
    mean = torch.empty(x.shape[0], device=x.device)
    rstd = torch.empty_like(mean)
    for a in range(0, x.shape[0], rows):
        xc = x[a:a + rows].double()
        m = xc.mean(1)
        mean[a:a + rows] = m.float()
        rstd[a:a + rows] = torch.rsqrt(((xc - m[:, None]) ** 2).mean(1) + EPS).float()
    return mean, rstd


# More than 65535 chunks of one group: (2^19 + 5) rows of 4096 (block rows, 8 rows a
# chunk before the clamp) and 1835009 rows of 1152 (split warp rows, 28 a chunk), each
# about 2^31 bf16 elements (4 GiB a tensor).
@needs_cuda_ext
@pytest.mark.parametrize("M,D", [((1 << 19) + 5, 4096), (1835009, 1152)])
def test_more_chunks_than_grid_y_against_float64(M, D):
    free, _total = torch.cuda.mem_get_info()
    if free < 4 * M * D * 2 + (10 << 30):  # x, dy, dx twice in bf16; partials; float64 slices
        pytest.skip(f"needs about {(8 * M * D >> 30) + 10} GiB of GPU memory")
    torch.manual_seed(1)
    x = torch.randn(M, D, device=DEV, dtype=torch.bfloat16)
    dy = torch.randn(M, D, device=DEV, dtype=torch.bfloat16)
    weight = torch.rand(D, device=DEV) + 0.5 if D == 1152 else None
    mean, rstd = stats32(x)
    dx, p1, p2 = torch.ops.lct.layer_norm_bwd(dy, x, mean, rstd, weight, None, None, M, False,
                                              True, True)
    dx2, p1b, p2b = torch.ops.lct.layer_norm_bwd(dy, x, mean, rstd, weight, None, None, M, False,
                                                 True, True)
    assert torch.equal(p1, p1b) and torch.equal(p2, p2b) and torch.equal(dx, dx2)
    del dx2
    # Partials: float64 sums over all rows, with the same float32 statistics.
    s1 = torch.zeros(D, device=DEV, dtype=torch.float64)
    s2, a1, a2 = torch.zeros_like(s1), torch.zeros_like(s1), torch.zeros_like(s1)
    for a in range(0, M, 65536):
        d = dy[a:a + 65536].double()
        xh = (x[a:a + 65536].double() - mean[a:a + 65536, None].double()) * rstd[a:a + 65536, None].double()
        s1 += d.sum(0)
        s2 += (d * xh).sum(0)
        a1 += d.abs().sum(0)
        a2 += (d * xh).abs().sum(0)
    # float32 sums of M terms: error well under 2e-6 of the sum of magnitudes; one
    # chunk of rows dropped or counted twice moves a column by ~ sqrt(rows per chunk).
    assert ((p1[0].double() - s1).abs() <= 2e-6 * a1).all(), (p1[0].double() - s1).abs().max()
    assert ((p2[0].double() - s2).abs() <= 2e-6 * a2).all(), (p2[0].double() - s2).abs().max()
    # dx on rows at the start, the end, chunk seams and a random sample.
    rows = torch.cat([torch.arange(0, 40), torch.arange(M - 40, M),
                      torch.randint(0, M, (400,), generator=torch.Generator().manual_seed(2))]).to(DEV)
    d = dy[rows].double()
    g = d * (weight.double() if weight is not None else 1.0)
    xh = (x[rows].double() - mean[rows, None].double()) * rstd[rows, None].double()
    want = rstd[rows, None].double() * (g - g.mean(1, keepdim=True) - xh * (g * xh).mean(1, keepdim=True))
    # dx is computed in float32 from the given statistics, then rounded to bf16.
    assert_rounded(dx[rows], want, torch.bfloat16, "dx")


@needs_cuda_ext
@pytest.mark.parametrize("need_dx,need_partials", [(True, True), (True, False), (False, True)])
def test_empty_rows_backward(need_dx, need_partials):
    # D = 0, M = 6 rows in 3 groups: dx is (6, 0), the partials (3, 0); no launch, no error.
    z = torch.zeros(6, 0, device=DEV, dtype=torch.bfloat16)
    stats = torch.zeros(6, device=DEV)
    dx, p1, p2 = torch.ops.lct.layer_norm_bwd(z, z, stats, stats, None, None, None, 2, False,
                                              need_dx, need_partials)
    torch.cuda.synchronize()
    assert dx.shape == ((6, 0) if need_dx else (0,))
    assert p1.shape == p2.shape == ((3, 0) if need_partials else (0, 0))
