"""Fused gated residual of adaLN-zero, on the CPU.

    gated_residual(x, gate, y, bias=None) = x + gate[:, None, :] * (y + bias)

x, y (B, T, D), gate (B, D) and bias (D,) or None floating -> (B, T, D) in the promoted
dtype.  ``bias`` is the bias of the Linear that produced y, folded in, so that Linear
runs as a plain GEMM (ATen's addmm copies the broadcast bias into its output first and
the GEMM reads it back).  The forward is one C++ pass (``lct::gated_residual_fwd``);
the backward is one pass that writes dy = dout * gate[:, None], dgate = sum_t dout *
(y + bias) and dbias = sum_{b, t} dy (``lct::gated_residual_bwd``; float32 sums in token
order per sample, the samples' partials combined in order in float64); dx is dout
itself.  Eager calls use the same kernels with the autograd node in C++
(``lct::gated_residual_autograd``).  gate may be a column slice of adaLN's (B, 6 D)
output (``chunk``): it is read in place.  Saved for backward: gate, y and bias.

Why a kernel: a DiT block makes this update twice per block.  Eagerly it is a multiply
into a temporary and an add (the backward: two multiplies and a sum over tokens), five
passes and three allocations where the fused op makes two passes; at the demo's
(128, 4, 128) each ATen pass costs 40-60 us on the 2-core development machine
(2026-12-02), launch and allocation included.  CUDA tensors run the torch path (see
``lct_kernels._backend``: CPU-only families).
"""

import torch

from .. import _validate as V
from .._backend import pick_backend
from . import _fused_grad


def gated_residual_reference(x, gate, y, bias=None):
    """x + gate[:, None, :] * (y + bias) in eager PyTorch (any dtype, differentiable)."""
    return x + gate.unsqueeze(1) * (y if bias is None else y + bias)


def _fake_fwd(x, gate, y, bias):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _fake_bwd(dout, gate, y, bias, need_dgate, need_dy, need_dbias):
    dgate = dout.new_empty((gate.shape if need_dgate else (0,)), dtype=torch.float32)
    dy = torch.empty_like(dout, memory_format=torch.contiguous_format) if need_dy else dout.new_empty((0,))
    dbias = dout.new_empty(((dout.shape[2],) if need_dbias else (0,)), dtype=torch.float32)
    return dgate, dy, dbias


def _setup(ctx, inputs, output):
    x, gate, y, bias = inputs
    ctx.has_bias = bias is not None
    ctx.save_for_backward(gate, y, *((bias,) if bias is not None else ()))


def _backward(ctx, dout):
    gate, y, *rest = ctx.saved_tensors
    bias = rest[0] if ctx.has_bias else None
    need_dx, need_dgate, need_dy = ctx.needs_input_grad[:3]
    need_dbias = ctx.has_bias and ctx.needs_input_grad[3]
    if dout is None:
        return None, None, None, None
    dx = dout if need_dx else None
    if not (need_dgate or need_dy or need_dbias):
        return dx, None, None, None
    dgate, dy, dbias = torch.ops.lct.gated_residual_bwd(dout.contiguous().to(y.dtype), gate, y,
                                                        bias, need_dgate, need_dy, need_dbias)
    return (dx, (dgate.to(gate.dtype) if need_dgate else None), (dy if need_dy else None),
            (dbias.to(bias.dtype) if need_dbias else None))


_FWD = None
if hasattr(torch.ops.lct, "gated_residual_fwd"):
    torch.library.register_fake("lct::gated_residual_fwd")(_fake_fwd)
    torch.library.register_fake("lct::gated_residual_bwd")(_fake_bwd)
    torch.library.register_autograd("lct::gated_residual_fwd", _backward, setup_context=_setup)
    _FWD = torch.ops.lct.gated_residual_fwd.default
# lct::gated_residual_autograd (the same kernels, its autograd node in C++), when built
_CPP_AUTOGRAD = (torch.ops.lct.gated_residual_autograd.default
                 if hasattr(torch.ops.lct, "gated_residual_autograd") else None)


def _check(x, gate, y, bias):
    fn = "gated_residual"
    named = (("x", x), ("gate", gate), ("y", y)) + ((("bias", bias),) if bias is not None else ())
    for name, t in named:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{fn}: {name} must be a floating-point tensor, got {t.dtype}")
    if x.dim() != 3:
        raise ValueError(f"{fn}: x must be (B, T, D), got shape {tuple(x.shape)}")
    if y.shape != x.shape:
        raise ValueError(f"{fn}: y must have x's shape {tuple(x.shape)}, got {tuple(y.shape)}")
    if gate.shape != (x.shape[0], x.shape[2]):
        raise ValueError(f"{fn}: gate must be (B, D) = ({x.shape[0]}, {x.shape[2]}), got "
                         f"{tuple(gate.shape)}")
    if bias is not None and bias.shape != (x.shape[2],):
        raise ValueError(f"{fn}: bias must be (D,) = ({x.shape[2]},), got {tuple(bias.shape)}")
    for name, t in named[1:]:
        V.same_device(fn, "x", x, name, t)


def gated_residual(x, gate, y, bias=None, backend=None):
    """``x + gate[:, None, :] * (y + bias)`` (adaLN-zero's residual update, with the bias
    of the Linear that produced y folded in) in one fused CPU pass, and one pass in the
    backward.

    x (B, T, D), gate (B, D), y (B, T, D), bias (D,) or None, floating -> (B, T, D) in
    the dtype type promotion gives (all are cast to it).  ``backend``: None (auto: the
    C++ kernel for CPU float32/bfloat16/float16, torch otherwise), "cpu" or "torch".
    float64 runs the reference."""
    _check(x, gate, y, bias)
    if not (x.dtype == gate.dtype == y.dtype) or (bias is not None and bias.dtype != x.dtype):
        dtype = torch.promote_types(x.dtype, torch.promote_types(gate.dtype, y.dtype))
        if bias is not None:
            dtype = torch.promote_types(dtype, bias.dtype)
        x, gate, y = x.to(dtype), gate.to(dtype), y.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    chosen = pick_backend("gated_residual", "gated_residual", x, backend)
    if chosen == "torch" or _FWD is None:
        return gated_residual_reference(x, gate, y, bias)
    if gate.shape[1] > 1 and gate.stride(1) != 1:
        gate = gate.contiguous()
    args = (x.contiguous(), gate, y.contiguous(), None if bias is None else bias.contiguous())
    if _CPP_AUTOGRAD is not None and _fused_grad.eager_call(*args):
        # eager call (any grad mode): the autograd node in C++ (csrc/cpu/pointwise_autograd.cpp),
        # no Python in the backward
        return _CPP_AUTOGRAD(*args)
    return _fused_grad.call(_FWD, _setup, _backward, *args)
