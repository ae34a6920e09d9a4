"""Fused bias + GELU(tanh): the first half of a transformer MLP, on the CPU.

    linear_gelu(x, weight, bias) = gelu_tanh(x @ weight^T + bias)
    gelu_tanh(u) = 0.5 u (1 + tanh(sqrt(2 / pi) (u + 0.044715 u^3)))

x (..., K) float32/bfloat16/float16 (or float64: the reference), weight (N, K),
bias (N,) -> (..., N) in the GEMM's dtype.  The GEMM is torch's (``torch.mm``,
no bias; oneDNN's for large fp32 shapes on CPUs where MKL is slow, see
``lct_kernels.ops.cpu_gemm``); one C++ pass then adds the bias and applies GELU
(``lct::bias_gelu_fwd``), and one pass of the backward writes dh and the bias
gradient (``lct::bias_gelu_bwd``).  Saved for backward: the GEMM's output h (M, N), what
eager ``F.gelu(F.linear(...))`` saves too.

Why a kernel: on the CPU ATen's tanh-GELU costs about as much as the GEMM feeding
it at a DiT MLP's shapes (2026-12-02, 2-core AMD EPYC: 0.49 ms forward and 0.51 ms
backward at 512 x 512 fp32, where a multiply takes 0.06 ms), and addmm first
copies the broadcast bias into its output.  CUDA tensors run the torch path
(``F.gelu(F.linear(...))``): there ATen's GELU is memory-bound already and
addmm's epilogue adds the bias; see ``lct_kernels._backend`` (CPU-only families).
"""

import torch
import torch.nn.functional as F

from .._backend import pick_backend
from . import _fused_grad
from . import cpu_gemm


def bias_gelu_reference(h, bias):
    """gelu_tanh(h + bias) in eager PyTorch (any dtype, differentiable)."""
    return F.gelu(h + bias, approximate="tanh")


def _fake_fwd(h, bias):
    return torch.empty_like(h, memory_format=torch.contiguous_format)


def _fake_bwd(dy, h, bias, need_dh, need_dbias):
    dh = torch.empty_like(h) if need_dh else h.new_empty((0,))
    db = h.new_empty((h.shape[1] if need_dbias else 0,), dtype=torch.float32)
    return dh, db


def _setup(ctx, inputs, output):
    h, bias = inputs
    ctx.save_for_backward(h, bias)


def _backward(ctx, dy):
    h, bias = ctx.saved_tensors
    need_dh, need_db = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if dy is None or not (need_dh or need_db):
        return None, None
    dh, db = torch.ops.lct.bias_gelu_bwd(dy.contiguous().to(h.dtype), h, bias, need_dh, need_db)
    return (dh if need_dh else None), (db.to(bias.dtype) if need_db else None)


_FWD = None
if hasattr(torch.ops.lct, "bias_gelu_fwd"):
    torch.library.register_fake("lct::bias_gelu_fwd")(_fake_fwd)
    torch.library.register_fake("lct::bias_gelu_bwd")(_fake_bwd)
    torch.library.register_autograd("lct::bias_gelu_fwd", _backward, setup_context=_setup)
    _FWD = torch.ops.lct.bias_gelu_fwd.default
# lct::bias_gelu_autograd (the same kernels, its autograd node in C++), when built
_CPP_AUTOGRAD = (torch.ops.lct.bias_gelu_autograd.default
                 if hasattr(torch.ops.lct, "bias_gelu_autograd") else None)


def _check(x, weight, bias):
    fn = "linear_gelu"
    for name, t in (("x", x), ("weight", weight), ("bias", bias)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{fn}: {name} must be a floating-point tensor, got {t.dtype}")
    if x.dim() < 1:
        raise ValueError(f"{fn}: x must be (..., K), got a 0-d tensor")
    if weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(f"{fn}: weight must be (N, K) with K = x.shape[-1] = {x.shape[-1]}, got "
                         f"{tuple(weight.shape)}")
    if bias.dim() != 1 or bias.shape[0] != weight.shape[0]:
        raise ValueError(f"{fn}: bias must be (N,) = ({weight.shape[0]},), got {tuple(bias.shape)}")
    if not (x.device == weight.device == bias.device):
        raise ValueError(f"{fn}: x, weight and bias must be on one device, got {x.device}, "
                         f"{weight.device} and {bias.device}")


def linear_gelu(x, weight, bias, backend=None):
    """``F.gelu(F.linear(x, weight, bias), approximate="tanh")`` with the bias and GELU
    in one fused CPU pass (and one in the backward).

    x (..., K), weight (N, K), bias (N,) floating -> (..., N): the dtype of
    ``F.linear``'s output (autocast and type promotion apply to the GEMM as usual;
    the bias is cast to it).  ``backend``: None (auto: the C++ kernel for CPU
    float32/bfloat16/float16 tensors, torch otherwise), "cpu" or "torch"."""
    _check(x, weight, bias)
    chosen = pick_backend("linear_gelu", "bias_gelu", x, backend)
    if chosen == "torch" or _FWD is None:
        return F.gelu(F.linear(x, weight, bias), approximate="tanh")
    K, N = weight.shape[1], weight.shape[0]
    x2 = x if x.dim() == 2 else x.reshape(-1, K)
    # torch.mm, or oneDNN for a large fp32 GEMM where MKL is slow (ops/cpu_gemm.py)
    h = cpu_gemm.linear(x2, weight)
    if h.dtype == torch.float64:  # float64 (promoted GEMM): the reference
        y = bias_gelu_reference(h, bias.to(h.dtype))
    else:
        args = (h, bias.to(h.dtype))
        if _CPP_AUTOGRAD is not None and _fused_grad.eager_call(*args):
            # eager call (any grad mode): the autograd node in C++ (csrc/cpu/pointwise_autograd.cpp)
            y = _CPP_AUTOGRAD(*args)
        else:
            y = _fused_grad.call(_FWD, _setup, _backward, *args)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], N)
