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

Backends compute rho(m_i) and the unscaled gradient d rho(m_i) / d pred in ONE
fused forward pass; the backward only scales that buffer row by row with the
incoming per-sample gradient (``scale_rows``), so ``reduction="none"`` with any
grad_output is exact.  Weights and the reduction are tiny (B,) torch ops on top.
"""

import torch

from .. import _backend
from .. import _validate as V

LOSS_KINDS = {"cauchy": 0, "pseudo_huber": 1, "geman_mcclure": 2}
LOSS_ALIASES = {"huber": "pseudo_huber", "gm": "geman_mcclure"}  # the paper code's names
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


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
def _fake_robust_loss(pred, target, c, kind, elementwise, compute_grad):
    B, N = pred.shape
    loss = pred.new_empty((B,), dtype=torch.float32)
    grad = pred.new_empty((B, N) if compute_grad else (0,))
    return loss, grad


def _fake_scale_rows(x, scale):
    return x.new_empty(x.shape)


def _setup_robust_loss(ctx, inputs, output):
    _, grad = output
    ctx.save_for_backward(grad)
    ctx.mark_non_differentiable(grad)


def _make_robust_loss_backward(scale_rows):
    def backward(ctx, grad_loss, _grad_of_grad):
        (grad,) = ctx.saved_tensors
        if grad.numel() == 0 and grad_loss.numel() != 0:
            raise RuntimeError(
                "lct robust loss: backward called but the forward ran with compute_grad=False "
                "(no input required grad at call time)"
            )
        need_pred, need_target = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_pred or need_target):
            return None, None, None, None, None, None
        g = scale_rows(grad, grad_loss.to(torch.float32).contiguous())
        return (g if need_pred else None), (g.neg() if need_target else None), None, None, None, None

    return backward


@torch.library.custom_op("lct::triton_robust_loss", mutates_args=())
def triton_robust_loss(
    pred: torch.Tensor, target: torch.Tensor, c: torch.Tensor, kind: int, elementwise: bool,
    compute_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton backend of lct::robust_loss (same schema and semantics)."""
    from ..triton import robust_loss as kernels

    return kernels.robust_loss_forward(pred, target, c, kind, elementwise, compute_grad)


@torch.library.custom_op("lct::triton_scale_rows", mutates_args=())
def triton_scale_rows(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Triton backend of lct::scale_rows."""
    from ..triton import robust_loss as kernels

    return kernels.scale_rows(x, scale)


triton_robust_loss.register_fake(_fake_robust_loss)
triton_scale_rows.register_fake(_fake_scale_rows)
triton_robust_loss.register_autograd(
    _make_robust_loss_backward(triton_scale_rows), setup_context=_setup_robust_loss
)

COMPILED_OPS_REGISTERED = hasattr(torch.ops.lct, "robust_loss")
if COMPILED_OPS_REGISTERED:
    torch.library.register_fake("lct::robust_loss")(_fake_robust_loss)
    torch.library.register_fake("lct::scale_rows")(_fake_scale_rows)
    torch.library.register_autograd(
        "lct::robust_loss",
        _make_robust_loss_backward(torch.ops.lct.scale_rows.default),
        setup_context=_setup_robust_loss,
    )


def fused_op(backend):
    """The registered forward op for a non-torch backend."""
    if backend == "triton":
        return torch.ops.lct.triton_robust_loss.default
    return torch.ops.lct.robust_loss.default


def scale_rows_op(backend):
    if backend == "triton":
        return torch.ops.lct.triton_scale_rows.default
    return torch.ops.lct.scale_rows.default


# ----------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------
def pick_backend(fn, family, x, backend):
    """Backend for x; float64 runs the torch reference (the kernels are fp32/fp16/bf16)."""
    if x.dtype not in KERNEL_DTYPES:
        forced = _backend.requested_backend(backend, fn)
        if forced not in (None, "torch"):
            raise TypeError(
                f"{fn}: the {forced} backend takes float32, float16 or bfloat16 inputs, got "
                f"{x.dtype}; use backend='torch' (float64 reference) or cast the inputs"
            )
        return "torch"
    return _backend.select(family, x.device, backend, fn)


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
    else:
        compute_grad = torch.is_grad_enabled() and (pred.requires_grad or target.requires_grad)
        per_sample, _ = fused_op(chosen)(
            V.rows(pred), V.rows(target), c_t, kind, elementwise, compute_grad
        )
    if weight is not None:
        per_sample = per_sample * weight.to(per_sample.dtype)
    if reduction == "mean":
        return per_sample.mean()
    if reduction == "sum":
        return per_sample.sum()
    return per_sample


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
