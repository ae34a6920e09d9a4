"""Specification of consistency_objective: the fused consistency + diffusion loss of sLCT."""

import pytest
import torch

import lct_kernels as L
from helpers import ATOL, CPU_BACKENDS, assert_rule, heavy_tailed

KIND_NAMES = ["cauchy", "pseudo_huber", "geman_mcclure"]


def rho64(name, m, c):
    if name == "cauchy":
        return torch.log1p(m / (2 * c * c))
    if name == "pseudo_huber":
        return torch.sqrt(m + c * c) - c
    return 2 * m / (m + 4 * c * c)


def objective64(student, teacher, x0, weight, diff_weight, diff_mask, c, loss, diff_coef):
    """Float64 oracle written from the issue's definitions."""
    B = student.shape[0]
    s = student.double().reshape(B, -1)
    m = ((s - teacher.double().reshape(B, -1)) ** 2).mean(1)
    e = ((s - x0.double().reshape(B, -1)) ** 2).mean(1)
    cm = weight.double() * rho64(loss, m, c)
    sel = diff_mask.bool()
    diff = (diff_weight.double()[sel] * e[sel]).mean() if sel.any() else torch.zeros((), dtype=torch.float64)
    return cm.mean() + diff_coef * diff, cm, diff


def make_inputs(shape, dtype=torch.float32, mask=None):
    B = shape[0]
    student = torch.randn(shape).to(dtype).requires_grad_()
    teacher = (student.detach().float() + 0.3 * torch.randn(shape)).to(dtype)
    x0 = torch.randn(shape).to(dtype)
    weight = torch.rand(B) * 10 + 0.1  # like 1 / (sigma_i - sigma_{i+1})
    diff_weight = torch.rand(B) * 100 + 4.0  # like 1/sigma^2 + 1/sigma_data^2
    diff_mask = torch.rand(B) < 0.4 if mask is None else mask
    return student, teacher, x0, weight, diff_weight, diff_mask


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("loss", KIND_NAMES)
@pytest.mark.parametrize("shape", [(1, 1), (7, 3, 5), (16, 4, 8, 8), (3, 20000), (1, 70000)],
                         ids=str)
def test_matches_float64_definition(backend, loss, shape):
    student, teacher, x0, w, dw, mask = make_inputs(shape)
    c, coef = 0.03456, 5.0
    total, cm, diff = L.consistency_objective(student, teacher, x0, w, dw, mask, c, loss=loss,
                                              diff_coef=coef, backend=backend)
    total.backward()
    s64 = student.detach().double().requires_grad_()
    t_ref, cm_ref, diff_ref = objective64(s64, teacher, x0, w, dw, mask, c, loss, coef)
    t_ref.backward()
    assert total.shape == () and cm.shape == (shape[0],) and diff.shape == ()
    assert total.dtype == cm.dtype == diff.dtype == torch.float32
    torch.testing.assert_close(total.double(), t_ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cm.double(), cm_ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(diff.double(), diff_ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(student.grad.double(), s64.grad, rtol=1e-4,
                               atol=1e-6 * s64.grad.abs().max().item())


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_empty_mask_gives_zero_diffusion_loss_not_nan(backend):
    student, teacher, x0, w, dw, _ = make_inputs((6, 10))
    mask = torch.zeros(6, dtype=torch.bool)
    total, cm, diff = L.consistency_objective(student, teacher, x0, w, dw, mask, 0.1,
                                              backend=backend)
    total.backward()
    assert diff.item() == 0.0 and torch.isfinite(total) and torch.isfinite(student.grad).all()
    torch.testing.assert_close(total, cm.mean())


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gradient_goes_to_student_only(backend):
    student, teacher, x0, w, dw, mask = make_inputs((5, 12))
    teacher.requires_grad_()
    x0.requires_grad_()
    w.requires_grad_()
    total, cm, diff = L.consistency_objective(student, teacher, x0, w, dw, mask, 0.1,
                                              backend=backend)
    assert total.requires_grad and not cm.requires_grad and not diff.requires_grad
    total.backward()
    assert student.grad is not None
    assert teacher.grad is None and x0.grad is None and w.grad is None


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_total_gradient_scales_with_grad_output(backend):
    student, teacher, x0, w, dw, mask = make_inputs((4, 9))
    total, _, _ = L.consistency_objective(student, teacher, x0, w, dw, mask, 0.2, backend=backend)
    (3.5 * total).backward()
    g35 = student.grad.clone()
    student.grad = None
    total, _, _ = L.consistency_objective(student, teacher, x0, w, dw, mask, 0.2, backend=backend)
    total.backward()
    torch.testing.assert_close(g35, 3.5 * student.grad)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_against_float64(backend, dtype):
    student, teacher, x0, w, dw, mask = make_inputs((8, 4, 8, 8), dtype)
    total, cm, _ = L.consistency_objective(student, teacher, x0, w, dw, mask, 0.05,
                                           backend=backend)
    total.backward()
    assert student.grad.dtype == dtype
    s64 = student.detach().double().requires_grad_()
    t_ref, cm_ref, _ = objective64(s64, teacher, x0, w, dw, mask, 0.05, "cauchy", 5.0)
    t_ref.backward()
    # PyTorch's own error: the same objective evaluated eagerly in the input dtype.
    s_same = student.detach().clone().requires_grad_()
    B = s_same.shape[0]
    m = ((s_same - teacher) ** 2).reshape(B, -1).mean(1)
    e = ((s_same - x0) ** 2).reshape(B, -1).mean(1)
    eager = (w * torch.log1p(m / (2 * 0.05**2))).mean() + 5.0 * (dw[mask] * e[mask]).mean()
    eager.backward()
    assert_rule(total, t_ref, eager, ATOL[dtype], "total")
    assert_rule(student.grad, s64.grad, s_same.grad, ATOL[dtype] * s64.grad.abs().max().item(),
                "grad")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_outliers_and_non_contiguous_inputs(backend):
    base = heavy_tailed((8, 6, 10), outlier=1e4)
    leaf = base.clone().requires_grad_()
    student = leaf.transpose(1, 2)
    teacher = heavy_tailed((8, 10, 6))[:, :, :]
    x0 = torch.randn(16, 10, 6)[::2]
    w, dw = torch.rand(8) + 0.5, torch.rand(8) + 1.0
    mask = torch.tensor([1, 0, 1, 1, 0, 0, 1, 0])  # integer 0/1 masks are accepted
    total, _, _ = L.consistency_objective(student, teacher, x0, w, dw, mask, 0.03, backend=backend)
    total.backward()
    leaf64 = base.double().requires_grad_()
    t_ref, _, _ = objective64(leaf64.transpose(1, 2), teacher, x0, w, dw, mask, 0.03, "cauchy", 5.0)
    t_ref.backward()
    torch.testing.assert_close(total.double(), t_ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(leaf.grad.double(), leaf64.grad, rtol=1e-4,
                               atol=1e-6 * leaf64.grad.abs().max().item())


def test_none_weights_mean_ones_and_none_mask_means_no_diffusion():
    student, teacher, x0, *_ = make_inputs((4, 8))
    total, cm, diff = L.consistency_objective(student, teacher, x0, None, None, None, 0.1)
    ref = L.cauchy_loss(student.detach(), teacher, 0.1, reduction="none")
    torch.testing.assert_close(cm, ref)
    assert diff.item() == 0.0


BAD = [
    (dict(weight=torch.ones(3)), ValueError, "weight must have shape"),
    (dict(diff_weight=torch.ones(4, 1)), ValueError, "diff_weight must have shape"),
    (dict(diff_mask=torch.ones(5, dtype=torch.bool)), ValueError, "diff_mask must have shape"),
    (dict(c=0.0), ValueError, "c must be a finite number > 0"),
    (dict(loss="l2"), ValueError, "loss must be one of"),
    (dict(teacher=torch.randn(4, 9)), ValueError, "teacher must have the shape"),
    (dict(x0=torch.randn(4, 8).double()), TypeError, "x0 must have student's dtype"),
    (dict(diff_coef="5"), TypeError, "diff_coef must be a number"),
    (dict(weight=torch.ones(4, dtype=torch.int32)), TypeError, "weight must be a floating"),
]


@pytest.mark.parametrize("override,exc,message", BAD, ids=[m for _, _, m in BAD])
def test_bad_input_raises_naming_the_argument(override, exc, message):
    student, teacher, x0, w, dw, mask = make_inputs((4, 8))
    args = dict(student=student, teacher=teacher, x0=x0, weight=w, diff_weight=dw,
                diff_mask=mask, c=0.1)
    args.update(override)
    with pytest.raises(exc, match=message):
        L.consistency_objective(**args)
