"""The fused consistency + diffusion objective of sLCT.

For a batch of B samples (flattened to N elements each):
    m_i   = mean((student_i - teacher_i)^2)
    e_i   = mean((student_i - x0_i)^2)
    cm_i  = weight_i * rho_c(m_i)                       (rho: Cauchy, Pseudo-Huber, Geman-McClure)
    diff  = sum_{i: mask_i} diff_weight_i * e_i / #{i: mask_i}     (0 when the mask is empty)
    total = mean_i(cm_i) + diff_coef * diff

One kernel pass reads student, teacher and x0 once and writes d total / d student;
the backward scales that buffer by the incoming scalar gradient (``_fused_grad``).  The gradient
goes to ``student`` only: teacher (the stop-gradient target) and x0 (data) are
constants.  ``cm_loss_per_sample`` and ``diff_loss`` are returned for logging and
carry no gradient; backpropagate through ``total``.  For a differentiable
per-sample robust loss use ``cauchy_loss(..., reduction="none")``.
"""

import torch

from .. import _validate as V
from . import _fused_grad
from .._backend import pick_backend
from .robust_loss import loss_kind, rho_reference


def consistency_objective_reference(
    student, teacher, x0, weight, diff_weight, diff_mask, c, kind, diff_coef
):
    """Pure-PyTorch objective, float32 (float64 for float64 inputs); differentiable in all inputs.

    Returns (total, cm_loss_per_sample, diff_loss)."""
    acc = torch.float64 if student.dtype == torch.float64 else torch.float32
    B = student.shape[0]
    s = student.reshape(B, -1).to(acc)
    m = (s - teacher.reshape(B, -1).to(acc)).pow(2).mean(dim=1)
    e = (s - x0.reshape(B, -1).to(acc)).pow(2).mean(dim=1)
    c = c.to(acc) if isinstance(c, torch.Tensor) else c
    cm = weight.to(acc) * rho_reference(kind, m, c)
    mask = diff_mask.to(acc)
    count = mask.sum()
    diff = (mask * diff_weight.to(acc) * e).sum() / count.clamp_min(1)
    return cm.mean() + diff_coef * diff, cm, diff


def _fake(student, teacher, x0, weight, diff_weight, diff_mask, c, kind, diff_coef, compute_grad):
    B, N = student.shape
    f32 = dict(dtype=torch.float32)
    return (
        student.new_empty((), **f32),
        student.new_empty((B,), **f32),
        student.new_empty((), **f32),
        student.new_empty((B, N) if compute_grad else (0,)),
    )


def _setup(ctx, inputs, output):
    _, cm, diff, grad = output
    ctx.mark_non_differentiable(cm, diff, grad)
    _fused_grad.save_grad_buffer(ctx, grad)


def _backward(ctx, grad_total, _g_cm, _g_diff, _g_grad):
    if grad_total is None or not ctx.needs_input_grad[0]:
        return (None,) * 10
    return (_fused_grad.scaled_grad(ctx, grad_total, "consistency_objective"),) + (None,) * 9


@torch.library.custom_op("lct::triton_consistency_objective", mutates_args=())
def triton_consistency_objective(
    student: torch.Tensor, teacher: torch.Tensor, x0: torch.Tensor, weight: torch.Tensor,
    diff_weight: torch.Tensor, diff_mask: torch.Tensor, c: torch.Tensor, kind: int,
    diff_coef: float, compute_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton backend of lct::consistency_objective (same schema and semantics)."""
    from ..triton import robust_loss as kernels

    return kernels.consistency_objective_forward(
        student, teacher, x0, weight, diff_weight, diff_mask, c, kind, diff_coef, compute_grad
    )


triton_consistency_objective.register_fake(_fake)
triton_consistency_objective.register_autograd(_backward, setup_context=_setup)

if hasattr(torch.ops.lct, "consistency_objective"):
    torch.library.register_fake("lct::consistency_objective")(_fake)
    torch.library.register_autograd("lct::consistency_objective", _backward, setup_context=_setup)


def consistency_objective(
    student, teacher, x0, weight, diff_weight, diff_mask, c, loss="cauchy", diff_coef=5.0,
    backend=None,
):
    """sLCT's training objective in one fused pass.

    Args:
        student: (B, ...) f_theta(x + sigma_i n, sigma_i); float32/float16/bfloat16
            (float64 runs the torch reference).  The only input that gets a gradient.
        teacher: same shape/dtype/device: the stop-gradient target f_theta-(x + sigma_{i+1} n).
        x0: same shape/dtype/device: the clean (OT-paired) data, target of the diffusion loss.
        weight: (B,) consistency weights, e.g. 1 / (sigma_i - sigma_{i+1}); None means 1.
        diff_weight: (B,) diffusion weights, e.g. 1/sigma^2 + 1/sigma_data^2; None means 1.
        diff_mask: (B,) bool (or 0/1): samples that take the diffusion loss; None means none.
        c: robust-loss scale > 0 (number or 0-d tensor; changing it never recompiles).
        loss: "cauchy", "pseudo_huber" or "geman_mcclure" (also the paper code's "huber", "gm").
        diff_coef: coefficient of the diffusion loss (5 in sLCT).
        backend: None (automatic), "cuda", "triton", "cpu" or "torch".

    Returns:
        (total () float32, cm_loss_per_sample (B,) float32, diff_loss () float32):
        total = mean_i(weight_i rho(m_i)) + diff_coef * diff_loss.  Only ``total``
        is differentiable (w.r.t. student).  float64 inputs give float64 outputs.
    """
    fn = "consistency_objective"
    V.batched(fn, "student", student)
    V.like(fn, "student", student, "teacher", teacher)
    V.like(fn, "student", student, "x0", x0)
    kind = loss_kind(fn, loss)
    acc = torch.float64 if student.dtype == torch.float64 else torch.float32
    B = student.shape[0]

    def vector(name, value, default, allow_bool=False):
        if value is None:
            return torch.full((B,), default, dtype=acc, device=student.device)
        V.per_sample(fn, name, value, "student", student, allow_bool=allow_bool)
        return value.detach().to(acc).contiguous()

    weight_v = vector("weight", weight, 1.0)
    diff_weight_v = vector("diff_weight", diff_weight, 1.0)
    mask_v = vector("diff_mask", diff_mask, 0.0, allow_bool=True)
    if diff_mask is not None and diff_mask.dtype != torch.bool:
        mask_v = (mask_v != 0).to(acc)
    if isinstance(diff_coef, bool) or not isinstance(diff_coef, (int, float)):
        raise TypeError(f"{fn}: diff_coef must be a number, got {type(diff_coef).__name__}")
    c_t = V.positive_scalar(fn, "c", c, student.device)
    chosen = pick_backend(fn, "consistency_objective", student, backend)

    if chosen == "torch":
        total, cm, diff = consistency_objective_reference(
            student, teacher.detach(), x0.detach(), weight_v, diff_weight_v, mask_v, c_t, kind,
            float(diff_coef),
        )
        return total, cm.detach(), diff.detach()
    op = (
        torch.ops.lct.triton_consistency_objective.default
        if chosen == "triton"
        else torch.ops.lct.consistency_objective.default
    )
    compute_grad = torch.is_grad_enabled() and student.requires_grad
    total, cm, diff, _ = _fused_grad.call(
        op, _setup, _backward,
        V.rows(student), V.rows(teacher.detach()), V.rows(x0.detach()),
        weight_v, diff_weight_v, mask_v, c_t, kind, float(diff_coef), compute_grad,
    )
    return total, cm, diff


__all__ = ["consistency_objective", "consistency_objective_reference"]
