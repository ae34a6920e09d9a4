"""Non-scaling LayerNorm (NsLN), general LayerNorm, and the fused NsLN + adaLN modulate.

Over the trailing D = prod(normalized_shape) elements of each row (biased variance):
    xhat = (x - mean) / sqrt(var + eps)
    NsLN:           y = xhat + bias                                  (scale fixed at 1)
    LayerNorm:      y = xhat * weight + bias                         (FusedLayerNorm modules)
    nsln_modulate:  y = (xhat + bias) * (1 + scale[b]) + shift[b]    (DiT's adaLN, x (B, ..., D))

One registered op family serves all three: ``lct::layer_norm_fwd`` (y plus fp32
mean and rstd) and ``lct::layer_norm_bwd`` (dx plus fp32 per-group partial sums
p1 = sum dy and p2 = sum dy * xhat, from which every parameter gradient
follows in a few (G, D) operations here).  Statistics and accumulation are fp32.

``memory_efficient=True`` (NsLN only) saves y instead of x for the backward and
rebuilds xhat = y - bias.

dtypes: x float32, float16 or bfloat16 (float64 runs the reference); bias,
shift and scale must have x's dtype, except under autocast, where they may
differ (everything is computed in float32 and y has x's dtype).
"""

import math
import numbers
from typing import Optional

import torch

from .. import _validate as V
from . import _fused_grad
from .._backend import pick_backend


# ----------------------------------------------------------------------------
# Reference (pure PyTorch, differentiable, float64-capable)
# ----------------------------------------------------------------------------
def layer_norm_reference(x2, weight, bias, shift, scale, eps, group_rows):
    """x2: (M, D); weight, bias: (D,) or None; shift, scale: (M // group_rows, D) or None.

    Computed in float32 (float64 for float64 inputs); returns y in x2's dtype."""
    acc = torch.float64 if x2.dtype == torch.float64 else torch.float32
    x = x2.to(acc)
    mean = x.mean(dim=-1, keepdim=True)
    var = (x - mean).square().mean(dim=-1, keepdim=True)
    z = (x - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        z = z * weight.to(acc)
    if bias is not None:
        z = z + bias.to(acc)
    if shift is not None:
        M, D = z.shape
        z = z.view(-1, group_rows, D) * (1 + scale.to(acc)[:, None]) + shift.to(acc)[:, None]
        z = z.view(M, D)
    return z.to(x2.dtype)


# ----------------------------------------------------------------------------
# Registration
# ----------------------------------------------------------------------------
def _fake_fwd(x, weight, bias, shift, scale, eps, group_rows, save_y):
    M = x.shape[0]
    f32 = dict(dtype=torch.float32)
    return x.new_empty(x.shape), x.new_empty((M,), **f32), x.new_empty((M,), **f32)


def _fake_bwd(dy, xy, mean, rstd, weight, bias, scale, group_rows, xy_is_y, need_dx,
              need_partials):
    M, D = dy.shape
    G = M // group_rows if need_partials else 0
    dx = dy.new_empty((M, D) if need_dx else (0,))
    return dx, dy.new_empty((G, D), dtype=torch.float32), dy.new_empty((G, D), dtype=torch.float32)


def _setup_fwd(ctx, inputs, output):
    x, weight, bias, shift, scale, eps, group_rows, save_y = inputs
    y, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.set_materialize_grads(False)
    ctx.group_rows = group_rows
    ctx.save_y = save_y
    ctx.save_for_backward(y if save_y else x, mean, rstd, weight, bias, scale)


def _make_backward(bwd_op):
    def backward(ctx, dy, _g_mean, _g_rstd):
        if dy is None:
            return (None,) * 8
        xy, mean, rstd, weight, bias, scale = ctx.saved_tensors
        need_x, need_w, need_b, need_shift, need_scale = ctx.needs_input_grad[:5]
        need_partials = need_w or need_b or need_shift or need_scale
        if not (need_x or need_partials):
            return (None,) * 8
        if dy.shape[-1] > 1 and dy.stride(-1) != 1:
            dy = dy.contiguous()
        dx, p1, p2 = bwd_op(dy, xy, mean, rstd, weight, bias, scale, ctx.group_rows, ctx.save_y,
                            need_x, need_partials)
        grads = [dx if need_x else None, None, None, None, None]
        if need_partials:
            grads[1:] = parameter_grads(p1, p2, weight, bias, scale, need_w, need_b, need_shift,
                                        need_scale)
        return (*grads, None, None, None)

    return backward


def parameter_grads(p1, p2, weight, bias, scale, need_w, need_b, need_shift, need_scale):
    """(d weight, d bias, d shift, d scale) from the per-group partials p1, p2 (G, D)."""
    gain = None if scale is None else 1 + scale

    def over_groups(p):  # sum_g (1 + scale_g) p_g
        return (p if gain is None else gain * p).sum(0)

    d_w = over_groups(p2) if need_w else None
    d_b = over_groups(p1) if need_b else None
    d_shift = p1 if need_shift else None
    d_scale = None
    if need_scale:
        d_scale = (p2 * weight if weight is not None else p2) + (p1 * bias if bias is not None else 0)
    return d_w, d_b, d_shift, d_scale


@torch.library.custom_op("lct::triton_layer_norm_fwd", mutates_args=())
def triton_layer_norm_fwd(
    x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
    shift: Optional[torch.Tensor], scale: Optional[torch.Tensor], eps: float, group_rows: int,
    save_y: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton backend of lct::layer_norm_fwd (same schema and semantics)."""
    from ..triton import layer_norm as kernels

    return kernels.layer_norm_forward(x, weight, bias, shift, scale, eps, group_rows)


@torch.library.custom_op("lct::triton_layer_norm_bwd", mutates_args=())
def triton_layer_norm_bwd(
    dy: torch.Tensor, xy: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
    weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], scale: Optional[torch.Tensor],
    group_rows: int, xy_is_y: bool, need_dx: bool, need_partials: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton backend of lct::layer_norm_bwd (same schema and semantics)."""
    from ..triton import layer_norm as kernels

    return kernels.layer_norm_backward(dy, xy, mean, rstd, weight, bias, scale, group_rows,
                                       xy_is_y, need_dx, need_partials)


triton_layer_norm_fwd.register_fake(_fake_fwd)
triton_layer_norm_bwd.register_fake(_fake_bwd)
_triton_backward = _make_backward(torch.ops.lct.triton_layer_norm_bwd.default)
triton_layer_norm_fwd.register_autograd(_triton_backward, setup_context=_setup_fwd)

_compiled_backward = None
if hasattr(torch.ops.lct, "layer_norm_fwd"):
    torch.library.register_fake("lct::layer_norm_fwd")(_fake_fwd)
    torch.library.register_fake("lct::layer_norm_bwd")(_fake_bwd)
    _compiled_backward = _make_backward(torch.ops.lct.layer_norm_bwd.default)
    torch.library.register_autograd(
        "lct::layer_norm_fwd", _compiled_backward, setup_context=_setup_fwd
    )


# lct::layer_norm_autograd (the same kernels, its autograd node in C++), when built
_CPP_AUTOGRAD = (torch.ops.lct.layer_norm_autograd.default
                 if hasattr(torch.ops.lct, "layer_norm_autograd") else None)


def fused_ops(backend):
    """(forward op, its backward function) of a non-torch backend."""
    if backend == "triton":
        return torch.ops.lct.triton_layer_norm_fwd.default, _triton_backward
    return torch.ops.lct.layer_norm_fwd.default, _compiled_backward


# ----------------------------------------------------------------------------
# Validation and dispatch
# ----------------------------------------------------------------------------
def _normalized_size(fn, x, normalized_shape):
    # the modules' case first: a 1-tuple of int matching x's last dimension (or the int)
    if type(normalized_shape) is int and x.dim() >= 1 and x.shape[-1] == normalized_shape:
        return (normalized_shape,), normalized_shape
    if (type(normalized_shape) is tuple and len(normalized_shape) == 1
            and type(normalized_shape[0]) is int and x.dim() >= 1
            and x.shape[-1] == normalized_shape[0]):
        return normalized_shape, normalized_shape[0]
    if isinstance(normalized_shape, numbers.Integral) and not isinstance(normalized_shape, bool):
        normalized_shape = (int(normalized_shape),)
    try:
        shape = tuple(int(s) for s in normalized_shape)
    except TypeError:
        raise TypeError(
            f"{fn}: normalized_shape must be an int or a sequence of ints, got {normalized_shape!r}"
        ) from None
    if len(shape) == 0 or x.dim() < len(shape) or tuple(x.shape[x.dim() - len(shape):]) != shape:
        raise ValueError(
            f"{fn}: normalized_shape {shape} must match the trailing dimensions of x "
            f"{tuple(x.shape)}"
        )
    return shape, math.prod(shape)


def _check_param(fn, name, p, x, shape):
    if p is None:
        return
    V.tensor(fn, name, p)
    if p.shape != shape:
        raise ValueError(f"{fn}: {name} must have shape {tuple(shape)}, got {tuple(p.shape)}")
    V.same_device(fn, "x", x, name, p)
    if p.dtype != x.dtype and not torch.is_autocast_enabled(x.device.type):
        raise TypeError(
            f"{fn}: {name} has dtype {p.dtype} but x has {x.dtype}; use one dtype "
            "(mixed dtypes are accepted under torch.autocast only)"
        )


def _check_eps(fn, eps):
    if type(eps) is float and 0.0 < eps < math.inf:  # the common case
        return
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"{fn}: eps must be a number > 0, got {type(eps).__name__}")
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"{fn}: eps must be a finite number > 0, got {eps}")


_f32 = V.f32


def _flat(p, D):
    """A parameter of normalized_shape as (D,) (itself when it already is: no view node)."""
    return p if p is None or p.dim() == 1 else p.reshape(D)


def _layer_norm(fn, x, D, weight, bias, shift, scale, eps, backend, memory_efficient):
    """Shared path after validation: x (..., D) -> y (..., D)."""
    M = x.numel() // D if D else 0
    group_rows = M // shift.shape[0] if shift is not None and shift.shape[0] else max(M, 1)
    # no reshape (an autograd view node each way) when x already is (M, D)
    flat = x.dim() == 2 and x.shape[1] == D
    x2 = V.rows(x if flat else x.reshape(M, D)) if M else x.reshape(0, D)
    chosen = pick_backend(fn, "layer_norm", x, backend)
    if chosen == "torch" or M == 0:
        y2 = layer_norm_reference(x2, weight, bias, shift, scale, eps, group_rows)
        return y2 if flat else y2.reshape(x.shape)
    args = (x2, weight if weight is None else _f32(weight), bias if bias is None else _f32(bias),
            shift if shift is None else _f32(shift), scale if scale is None else _f32(scale),
            float(eps), group_rows, bool(memory_efficient))
    if chosen == "cpu" and _CPP_AUTOGRAD is not None and _fused_grad.eager_call(*args):
        # eager call on CPU: the autograd node in C++ (see
        # csrc/cpu/layer_norm_autograd.cpp), no Python in the backward, and under
        # no_grad no Python autograd kernel in the forward
        y2 = _CPP_AUTOGRAD(*args)
    else:
        op, backward = fused_ops(chosen)
        y2, _, _ = _fused_grad.call(op, _setup_fwd, backward, *args)
    return y2 if flat else y2.reshape(x.shape)


# ----------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------
def non_scaling_layer_norm(x, normalized_shape, bias=None, eps=1e-5, backend=None,
                           memory_efficient=False):
    """Non-scaling LayerNorm: y = (x - mean) / sqrt(var + eps) + bias.

    Args:
        x: (..., *normalized_shape) float32/float16/bfloat16 (float64: torch reference).
        normalized_shape: int or tuple, the trailing dimensions normalized (as F.layer_norm).
        bias: optional tensor of shape normalized_shape (learnable; gets a gradient).
        eps: > 0, added to the biased variance.
        backend: None (automatic), "cuda", "triton", "cpu" or "torch".
        memory_efficient: keep y instead of x for the backward (xhat = y - bias).

    Returns y with x's shape and dtype.  Statistics are fp32."""
    fn = "non_scaling_layer_norm"
    V.tensor(fn, "x", x)
    shape, D = _normalized_size(fn, x, normalized_shape)
    _check_param(fn, "bias", bias, x, shape)
    _check_eps(fn, eps)
    return _layer_norm(fn, x, D, None, _flat(bias, D), None, None, eps,
                       backend, memory_efficient)


def layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5, backend=None,
               memory_efficient=False):
    """General LayerNorm on the same kernels: y = xhat * weight + bias (F.layer_norm semantics).

    ``memory_efficient`` requires weight=None (it rebuilds xhat = y - bias)."""
    fn = "layer_norm"
    V.tensor(fn, "x", x)
    shape, D = _normalized_size(fn, x, normalized_shape)
    _check_param(fn, "weight", weight, x, shape)
    _check_param(fn, "bias", bias, x, shape)
    _check_eps(fn, eps)
    if memory_efficient and weight is not None:
        raise ValueError(f"{fn}: memory_efficient=True needs weight=None (xhat = y - bias)")
    return _layer_norm(fn, x, D, _flat(weight, D),
                       _flat(bias, D), None, None, eps, backend,
                       memory_efficient)


def nsln_modulate(x, shift, scale, bias=None, eps=1e-6, backend=None):
    """Fused NsLN + adaLN modulate: y = (NsLN(x) + bias) * (1 + scale[:, None]) + shift[:, None].

    Args:
        x: (B, T, D) (or (B, D), or (B, ..., D)) float32/float16/bfloat16.
        shift, scale: (B, D), per-sample modulation broadcast over the tokens.
        bias: optional (D,) NsLN bias.
        eps: > 0 (DiT uses 1e-6).
        backend: None (automatic), "cuda", "triton", "cpu" or "torch".

    Gradients go to x, shift, scale and bias."""
    fn = "nsln_modulate"
    V.tensor(fn, "x", x)
    if x.dim() < 2:
        raise ValueError(f"{fn}: x must be (B, T, D) or (B, D), got a {x.dim()}-D tensor")
    B, D = x.shape[0], x.shape[-1]
    if D == 0:
        raise ValueError(f"{fn}: x's last dimension must be >= 1")
    for name, p in (("shift", shift), ("scale", scale)):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"{fn}: {name} must be a torch.Tensor of shape ({B}, {D})")
        _check_param(fn, name, p, x, (B, D))
    _check_param(fn, "bias", bias, x, (D,))
    _check_eps(fn, eps)
    return _layer_norm(fn, x, D, None, bias, shift, scale, eps, backend, False)
