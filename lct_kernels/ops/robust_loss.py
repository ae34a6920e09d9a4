"""Fused robust losses: Cauchy (sLCT), Pseudo-Huber (iCT) and Geman-McClure.

For a batch pred, target of shape (B, ...) and sample i,
    m_i = mean over the other dimensions of (pred_i - target_i)^2
    Cauchy          rho(m) = ln(1 + m / (2 c^2))   (= ln(m/2 + c^2) - 2 ln c)
    Pseudo-Huber    rho(m) = sqrt(m + c^2) - c
    Geman-McClure   rho(m) = 2 m / (m + 4 c^2)
    loss_i = weight_i * rho(m_i);  reduction "none" -> (B,), "mean", "sum".
With ``elementwise=True`` rho is applied to every squared difference and the
result averaged per sample (the ``*_new`` variants of the paper's code).

This file holds the float64-capable torch reference (the "torch" backend and
the test oracle), the torch.library registrations (fake kernels and autograd)
of the compiled and Triton ops, and the public functions.

The kernels compute the per-sample losses, their weighted reduction, and the
gradient of that reduction with respect to pred in ONE fused forward pass
(weights and 1/B folded in).  The backward multiplies that buffer by the
incoming gradient, per row for ``reduction="none"`` (so any grad_output is
exact), and on CPU skips even that when the gradient is exactly 1 (see
``_fused_grad``).  ``weight`` receives g * rho_i (/ B for "mean").
"""

from typing import Optional

import torch

from .._backend import pick_backend
from .. import _validate as V
from . import _fused_grad

LOSS_KINDS = {"cauchy": 0, "pseudo_huber": 1, "geman_mcclure": 2}
LOSS_ALIASES = {"huber": "pseudo_huber", "gm": "geman_mcclure"}  # the paper code's names


def loss_kind(fn, name):
    """Map a loss name ("cauchy", "pseudo_huber", "geman_mcclure", or the paper
    code's "huber"/"gm") to its kernel id."""
    key = LOSS_ALIASES.get(name, name)
    if key not in LOSS_KINDS:
        raise ValueError(
            f"{fn}: loss must be one of {', '.join(map(repr, LOSS_KINDS))}, got {name!r}"
        )
    return LOSS_KINDS[key]


# ----------------------------------------------------------------------------
# Reference (pure PyTorch, differentiable, float64-capable)
# ----------------------------------------------------------------------------
def rho_reference(kind, m, c):
    """rho(m; c) for a tensor m >= 0 and c (number or tensor broadcastable to m)."""
    c2 = c * c
    if kind == 0:
        return torch.log1p(m / (2 * c2))
    if kind == 1:
        return m / (torch.sqrt(m + c2) + c)  # = sqrt(m + c^2) - c, without cancellation
    if kind == 2:
        # Value 2m/(m + 4c^2); gradient taken from -8c^2/(m + 4c^2), which differs by the
        # constant 2, so autograd gets 8c^2/(m + 4c^2)^2 without the cancellation of
        # differentiating the quotient (which loses everything in float32 for large m).
        surrogate = -8 * c2 / (m + 4 * c2)
        return (2 * m / (m + 4 * c2)).detach() + (surrogate - surrogate.detach())
    raise ValueError(f"unknown loss kind {kind}")


def robust_loss_reference(pred, target, c, kind, elementwise=False):
    """Per-sample rho, shape (B,), computed in float32 (float64 for float64 inputs)."""
    acc = torch.float64 if pred.dtype == torch.float64 else torch.float32
    d = pred.reshape(pred.shape[0], -1).to(acc) - target.reshape(target.shape[0], -1).to(acc)
    c = c.to(acc) if isinstance(c, torch.Tensor) else c
    sq = d * d
    if elementwise:
        return rho_reference(kind, sq, c).mean(dim=1)
    return rho_reference(kind, sq.mean(dim=1), c)


# ----------------------------------------------------------------------------
# Registration: fake kernels and autograd
# ----------------------------------------------------------------------------
REDUCTION_CODES = {"none": 0, "mean": 1, "sum": 2}
OP_NAME = "lct robust loss"


def _fake_robust_loss(pred, target, c, weight, kind, elementwise, reduction, compute_grad):
    B, N = pred.shape
    out = pred.new_empty((B,) if reduction == 0 else (), dtype=torch.float32)
    rho = pred.new_empty((B,), dtype=torch.float32)
    grad = pred.new_empty((B, N) if compute_grad else (0,))
    return out, rho, grad


def _setup_robust_loss(ctx, inputs, output):
    reduction = inputs[6]
    _, rho, grad = output
    ctx.mark_non_differentiable(rho, grad)
    ctx.reduction = reduction
    ctx.batch = rho.shape[0]
    _fused_grad.save_grad_buffer(ctx, grad, rho)  # rho: for the weight's gradient


def _robust_loss_backward(ctx, g_out, _g_rho, _g_grad):
    need_pred, need_target, _, need_weight = ctx.needs_input_grad[:4]
    if g_out is None:
        return (None,) * 8
    grad_pred = grad_target = grad_weight = None
    (rho,) = _fused_grad.saved_others(ctx)
    if need_weight:
        per_row = g_out if ctx.reduction == 0 else g_out.expand(ctx.batch)
        grad_weight = per_row * rho / (ctx.batch if ctx.reduction == 1 else 1)
    if need_pred or need_target:
        g = _fused_grad.scaled_grad(ctx, g_out, OP_NAME)
        grad_pred = g if need_pred else None
        grad_target = g.neg() if need_target else None
    return grad_pred, grad_target, None, grad_weight, None, None, None, None


@torch.library.custom_op("lct::triton_robust_loss", mutates_args=())
def triton_robust_loss(
    pred: torch.Tensor, target: torch.Tensor, c: torch.Tensor, weight: Optional[torch.Tensor],
    kind: int, elementwise: bool, reduction: int, compute_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton backend of lct::robust_loss (same schema and semantics)."""
    from ..triton import robust_loss as kernels

    return kernels.robust_loss_forward(
        pred, target, c, weight, kind, elementwise, reduction, compute_grad
    )


triton_robust_loss.register_fake(_fake_robust_loss)
triton_robust_loss.register_autograd(_robust_loss_backward, setup_context=_setup_robust_loss)

if hasattr(torch.ops.lct, "robust_loss"):
    torch.library.register_fake("lct::robust_loss")(_fake_robust_loss)
    torch.library.register_autograd(
        "lct::robust_loss", _robust_loss_backward, setup_context=_setup_robust_loss
    )


def fused_op(backend):
    """The registered forward op for a non-torch backend."""
    if backend == "triton":
        return torch.ops.lct.triton_robust_loss.default
    return torch.ops.lct.robust_loss.default


# ----------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------
def _robust_loss(fn, kind, pred, target, c, weight, reduction, elementwise, backend):
    V.batched(fn, "pred", pred)
    V.like(fn, "pred", pred, "target", target)
    if weight is not None:
        V.per_sample(fn, "weight", weight, "pred", pred)
    V.choice(fn, "reduction", reduction, V.REDUCTIONS)
    if not isinstance(elementwise, bool):
        raise TypeError(f"{fn}: elementwise must be a bool, got {type(elementwise).__name__}")
    c_t = V.positive_scalar(fn, "c", c, pred.device)
    chosen = pick_backend(fn, "robust_loss", pred, backend)

    if chosen == "torch":
        per_sample = robust_loss_reference(pred, target, c_t, kind, elementwise)
        if weight is not None:
            per_sample = per_sample * weight.to(per_sample.dtype)
        if reduction == "mean":
            return per_sample.mean()
        return per_sample.sum() if reduction == "sum" else per_sample
    compute_grad = torch.is_grad_enabled() and (pred.requires_grad or target.requires_grad)
    weight = V.f32(weight)
    out, _, _ = _fused_grad.call(
        fused_op(chosen), _setup_robust_loss, _robust_loss_backward,
        V.rows(pred), V.rows(target), c_t, weight, kind, elementwise,
        REDUCTION_CODES[reduction], compute_grad,
    )
    return out


_SIGNATURE_DOC = """
    Args:
        pred: (B, ...) float32, float16, bfloat16 (or float64: torch reference).
            The first dimension is the batch; any strides.
        target: same shape, dtype and device as pred.  Receives the negated
            gradient when it requires grad.
        c: robustness scale > 0, a Python number or a 0-d tensor.  Changing it
            never recompiles (it is read on the device).  Treated as a constant.
        weight: optional (B,) per-sample weights (differentiable).
        reduction: "none" -> (B,), "mean" or "sum" -> () over the weighted losses.
        elementwise: apply rho to every squared difference, then average per
            sample (the paper code's ``*_new`` variants).
        backend: None (automatic), "cuda", "triton", "cpu" or "torch".

    Returns:
        float32 loss (float64 for float64 inputs).  Gradients are in the input
        dtype.  A NaN in a sample's inputs gives NaN for that sample.
"""


def cauchy_loss(pred, target, c, weight=None, reduction="mean", elementwise=False, backend=None):
    """sLCT's Cauchy loss: rho(m) = ln(1 + m / (2 c^2)), m = per-sample mean of (pred - target)^2.
    """
    return _robust_loss("cauchy_loss", 0, pred, target, c, weight, reduction, elementwise, backend)


def pseudo_huber_loss(
    pred, target, c, weight=None, reduction="mean", elementwise=False, backend=None
):
    """iCT's Pseudo-Huber loss: rho(m) = sqrt(m + c^2) - c, m = per-sample mean of (pred - target)^2.
    """
    return _robust_loss(
        "pseudo_huber_loss", 1, pred, target, c, weight, reduction, elementwise, backend
    )


def geman_mcclure_loss(
    pred, target, c, weight=None, reduction="mean", elementwise=False, backend=None
):
    """Geman-McClure loss: rho(m) = 2 m / (m + 4 c^2), m = per-sample mean of (pred - target)^2.
    """
    return _robust_loss(
        "geman_mcclure_loss", 2, pred, target, c, weight, reduction, elementwise, backend
    )


for _f in (cauchy_loss, pseudo_huber_loss, geman_mcclure_loss):
    _f.__doc__ += _SIGNATURE_DOC
