"""The fused DiT's large fp32 CPU GEMMs through oneDNN where ATen's BLAS (MKL) is slow.

    linear(x, weight, bias) = x @ weight^T + bias
    x (..., K) float32, weight (N, K) float32, bias (N,) float32 or None -> (..., N) float32

Why: torch's x86 wheels do fp32 GEMMs in MKL, and MKL takes its generic code path on a
non-Intel CPU: on the 2-core AMD EPYC (Zen 4, AVX-512) development host, ``MKL_VERBOSE=1``
names no AVX-512 path, while oneDNN, which the same wheel carries, runs its
``brg_matmul:avx512_core`` kernel there.  Measured side by side (2026-12-03, 2 threads,
fp32, median of 12 interleaved calls, ms, MKL -> oneDNN):

================  ===========  ===========  ============
(M, K, N)          forward      d input      d weight
================  ===========  ===========  ============
4096, 384, 1152   19.3 -> 17.2  19.2 -> 17.3  18.7 (MKL)
4096, 1536, 384   25.8 -> 22.3  33.2 -> 23.2  26.5 (MKL)
4096, 384, 1536   29.2 -> 23.9  31.2 -> 24.0  27.6 (MKL)
================  ===========  ===========  ============

(DiT-S/2's qkv, fc2 and fc1 at batch 64 on 4x16x16 latents).  The weight gradient
(a reduction over the M rows) stays in MKL: oneDNN's was slower at three of the
four shapes measured.  The whole DiT-S/2 training step: 4529 -> 4315 ms (-4.7 %,
median of 8 steps each, interleaved in one process).  At the demo's shapes
(hidden size 128) oneDNN gained nothing, hence the size floor below.

Where ``linear`` takes oneDNN (``gemm_path`` says which): CPU float32 x, weight and
bias, at least ``MIN_ROWS`` rows and ``MIN_FEATURES`` input and output features, no
autocast, no functorch transform (``torch.compile`` traces the registered
``lct::onednn_linear`` op), and the host's choice is oneDNN
(``lct_kernels.cpu_blas.cpu_gemm_choice``: ``LCT_CPU_GEMM=onednn|aten``, else
oneDNN on a non-Intel CPU where torch's BLAS is MKL).  Everywhere else it is
``F.linear``, the same math.

``python -m lct_kernels`` prints the choice and its reason.  Results differ from
MKL's by fp32 rounding only (another summation order); the tests compare both
against float64.
"""

from typing import Optional

import torch
import torch.nn.functional as F

from ..cpu_blas import CHOICES, ENV, cpu_gemm_choice  # noqa: F401 - re-exported
from . import _fused_grad

MIN_ROWS = 1024
MIN_FEATURES = 256

_CHOICE = None


def _choice():
    global _CHOICE
    if _CHOICE is None:
        _CHOICE = cpu_gemm_choice()[0]
    return _CHOICE


def reset_choice():
    """Forget the cached choice (after changing ``LCT_CPU_GEMM`` in this process)."""
    global _CHOICE
    _CHOICE = None


_ONEDNN = None


def _onednn():
    global _ONEDNN
    if _ONEDNN is None:
        _ONEDNN = torch.ops.mkldnn._linear_pointwise.default
    return _ONEDNN


# The GEMMs as registered ops (fake + autograd): compiled graphs call them as extern
# kernels, with the weight gradient and the bias reduction left as ATen ops Inductor
# may fuse; eager calls take _fused_grad.call's shortcut around the same formula.
@torch.library.custom_op("lct::onednn_linear", mutates_args=())
def _onednn_linear_op(x2: torch.Tensor, weight: torch.Tensor,
                      bias: Optional[torch.Tensor]) -> torch.Tensor:
    """x2 (M, K) @ weight (N, K)^T + bias (N,) in oneDNN: (M, N) float32."""
    return _onednn()(x2.contiguous(), weight, bias, "none", [], "")


@_onednn_linear_op.register_fake
def _(x2, weight, bias):
    return x2.new_empty((x2.shape[0], weight.shape[0]))


@torch.library.custom_op("lct::onednn_linear_dinput", mutates_args=())
def _onednn_dinput_op(dy: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """dy (M, N) @ weight (N, K) in oneDNN: (M, K) float32."""
    return _onednn()(dy.contiguous(), weight.t(), None, "none", [], "")


@_onednn_dinput_op.register_fake
def _(dy, weight):
    return dy.new_empty((dy.shape[0], weight.shape[1]))


def _setup(ctx, inputs, output):
    x2, weight, bias = inputs
    ctx.save_for_backward(x2, weight)
    ctx.has_bias = bias is not None


def _backward(ctx, dy):
    x2, weight = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad
    dx = _onednn_dinput_op(dy, weight) if need_x else None  # dy @ W, oneDNN
    dw = dy.t().mm(x2) if need_w else None  # dy^T @ x, ATen (MKL): see the header
    db = dy.sum(0) if (need_b and ctx.has_bias) else None
    return dx, dw, db


_onednn_linear_op.register_autograd(_backward, setup_context=_setup)
_FWD = torch.ops.lct.onednn_linear.default


@torch.compiler.assume_constant_result
def _traced_choice():
    # read once at trace time (a file and the environment): a constant of the graph
    return _choice()


def gemm_path(x, weight, bias=None):
    """"onednn" or "aten": which GEMM ``linear(x, weight, bias)`` runs (see the header)."""
    if not (type(x) is torch.Tensor or type(x) is torch.nn.Parameter):
        return "aten"
    if (x.dtype != torch.float32 or weight.dtype != torch.float32 or not x.is_cpu
            or not weight.is_cpu or x.dim() < 2 or weight.dim() != 2
            or (bias is not None and (bias.dtype != torch.float32 or not bias.is_cpu))):
        return "aten"
    K = x.shape[-1]
    if (K < MIN_FEATURES or weight.shape[0] < MIN_FEATURES or weight.shape[1] != K
            or x.numel() < MIN_ROWS * K):
        return "aten"
    if torch.is_autocast_enabled("cpu"):
        return "aten"
    if torch.compiler.is_compiling():
        return _traced_choice()
    if torch._C._are_functorch_transforms_active():
        return "aten"
    return _choice()


def linear(x, weight, bias=None):
    """``F.linear(x, weight, bias)``; large fp32 CPU GEMMs through oneDNN where that is
    the CPU's faster GEMM (see the header and :func:`gemm_path`).

    x (..., K), weight (N, K), bias (N,) or None -> (..., N).  Differentiable in all
    three; the weight gradient is ATen's ``mm``."""
    if gemm_path(x, weight, bias) != "onednn":
        return F.linear(x, weight, bias)
    y = _fused_grad.call(_FWD, _setup, _backward, x.reshape(-1, x.shape[-1]), weight, bias)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], weight.shape[0])
