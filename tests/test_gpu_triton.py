"""GPU specification of the Triton launchers (skipped without CUDA; not run here, no GPU).

* Device guard: tensors on cuda:1 while cuda:0 is current (needs >= 2 GPUs).
* Layer-norm backward grid: CUDA's grid-y limit (65535 chunks per group), once
  forced small through the module constant and once at the issue's size
  (524288 rows of D = 4096), against float64 references.
"""

import pytest
import torch

import lct_kernels as L
from lct_kernels.ops.layer_norm import layer_norm

pytestmark = pytest.mark.gpu
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")


def _ln64(x, weight, bias, eps=1e-5):
    x = x.double()
    mean = x.mean(-1, keepdim=True)
    z = (x - mean) / torch.sqrt(((x - mean) ** 2).mean(-1, keepdim=True) + eps)
    return z * weight.double() + bias.double()


@two_gpus
def test_triton_kernels_run_on_the_second_gpu():
    torch.cuda.set_device(0)
    dev = torch.device("cuda", 1)
    x = torch.randn(64, 256, device=dev, requires_grad=True)
    w = torch.randn(256, device=dev, requires_grad=True)
    b = torch.randn(256, device=dev, requires_grad=True)
    y = layer_norm(x, 256, weight=w, bias=b, backend="triton")
    gy = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, w, b), gy)
    leaves = [t.detach().cpu().double().requires_grad_() for t in (x, w, b)]
    ref = _ln64(*leaves)
    want = torch.autograd.grad(ref, leaves, gy.cpu().double())
    torch.testing.assert_close(y.cpu().double(), ref.detach(), atol=1e-4, rtol=1e-4)
    for g, r in zip(got, want):
        assert g.device == dev
        torch.testing.assert_close(g.cpu().double(), r, atol=1e-3, rtol=1e-4)

    pred, target = torch.randn(8, 1024, device=dev), torch.randn(8, 1024, device=dev)
    loss = L.cauchy_loss(pred, target, 0.5, backend="triton")
    m = ((pred.double() - target.double()) ** 2).mean(1)
    torch.testing.assert_close(loss.double().cpu(), torch.log1p(m / (2 * 0.25)).mean().cpu(),
                               atol=1e-5, rtol=1e-5)
    total, _, _ = L.consistency_objective(pred, target, target, None, None, None, 0.5,
                                          backend="triton")
    torch.testing.assert_close(total.double().cpu(), torch.log1p(m / 0.5).mean().cpu(),
                               atol=1e-5, rtol=1e-5)
    cost = torch.rand(5, 5, dtype=torch.float64, device=dev)
    cols = L.ot_assign(cost, backend="triton")
    want_cols = L.ot_assign(cost.cpu(), backend="torch")
    assert cost.cpu().gather(1, cols.cpu()[:, None]).sum() == pytest.approx(
        cost.cpu().gather(1, want_cols[:, None]).sum().item(), abs=1e-12)
    assert torch.cuda.current_device() == 0  # the guard restored the current device


def _check_layer_norm_backward(M, D, dtype, chunk_rows):
    """dx, d weight, d bias of layer_norm on (M, D) rows against float64, in row chunks."""
    x = torch.randn(M, D, device="cuda", dtype=dtype).requires_grad_()
    w = torch.randn(D, device="cuda", dtype=dtype, requires_grad=True)
    b = torch.randn(D, device="cuda", dtype=dtype, requires_grad=True)
    gy = torch.randn(M, D, device="cuda", dtype=dtype)
    y = layer_norm(x, D, weight=w, bias=b, backend="triton")
    dx, dw, db = torch.autograd.grad(y, (x, w, b), gy)
    del y
    dw64 = torch.zeros(D, dtype=torch.float64, device="cuda")
    db64 = torch.zeros_like(dw64)
    for r in range(0, M, chunk_rows):
        xs = x[r:r + chunk_rows].detach().double().requires_grad_()
        ref = _ln64(xs, w.detach(), b.detach())
        g = gy[r:r + chunk_rows].double()
        xhat = _ln64(xs.detach(), torch.ones_like(w), torch.zeros_like(b))
        dw64 += (g * xhat).sum(0)
        db64 += g.sum(0)
        (dxs,) = torch.autograd.grad(ref, xs, g)
        torch.testing.assert_close(dx[r:r + chunk_rows].double(), dxs,
                                   atol=5e-2 if dtype != torch.float32 else 1e-3, rtol=2e-2)
    # fp32 accumulation, then one rounding to the parameters' dtype (2^-8 for bf16)
    rtol = 1e-4 if dtype == torch.float32 else 1e-2
    for got, want in ((dw, dw64), (db, db64)):
        scale = max(1.0, want.abs().max().item())
        torch.testing.assert_close(got.double(), want, atol=rtol * scale, rtol=rtol)


def test_layer_norm_backward_with_a_forced_small_grid_y(monkeypatch):
    from lct_kernels.triton import layer_norm as LN
    monkeypatch.setattr(LN, "MAX_GRID_Y", 7)
    assert LN.backward_grid(10_000, 64)[0] <= 7
    _check_layer_norm_backward(10_000, 64, torch.float32, 10_000)


def test_layer_norm_backward_past_65535_chunks():
    """524288 rows of D = 4096 (2^31 elements, 4 GiB per bf16 tensor): 65536 chunks of
    8 rows before the clamp."""
    from lct_kernels.triton import layer_norm as LN
    M, D = 524_288, 4096
    assert -(-M // (LN.TASK_ELEMS // D)) > 65535
    if torch.cuda.get_device_properties(0).total_memory < 40 * 2**30:
        pytest.skip("needs 40 GiB of GPU memory")
    _check_layer_norm_backward(M, D, torch.bfloat16, 32_768)
