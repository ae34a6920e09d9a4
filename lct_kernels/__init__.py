"""lct_kernels: fused kernels for latent consistency training (sLCT, iCT).

Public API:
    cauchy_loss, pseudo_huber_loss, geman_mcclure_loss   fused robust losses
    consistency_objective                                 fused consistency + diffusion objective
    non_scaling_layer_norm, nsln_modulate                 NsLN and the fused NsLN + adaLN modulate
    ot_assign, ot_couple, ot.OTPlanSampler                exact minibatch OT (assignment) and torchcfm drop-in
    ot.patch_torchcfm, ot.unpatch_torchcfm                make torchcfm build our OTPlanSampler
    linear_gelu                                           gelu_tanh(x W^T + b), bias + GELU fused (CPU)
    gated_residual                                        x + gate[:, None] * (y + bias), adaLN-zero's update fused (CPU)
    optim.FusedRAdam                                      torch's RAdam + the EMA in one CPU pass
    nn                                                    thin modules over the ops
    nn.patch_dit, nn.unpatch_dit                          fuse a DiT's modulate(norm(x)) in place
    backend_info()                                        what loaded, and why anything did not
    tune_cpu_heap(), cpu_heap_status()                    keep freed CPU activations in the heap (no page faults)

Importing never fails because a compiled extension is missing; backend_info()
(or ``python -m lct_kernels``) says what is usable.
"""

from . import _ext  # noqa: F401  (loads the compiled libraries first)
from ._backend import BackendUnavailable, backend_info, format_backend_info
from .ops.consistency_objective import consistency_objective
from .ops.bias_gelu import linear_gelu
from .ops.gated_residual import gated_residual
from .ops.layer_norm import non_scaling_layer_norm, nsln_modulate
from .ops.ot import ot_assign, ot_couple
from .ops.robust_loss import cauchy_loss, geman_mcclure_loss, pseudo_huber_loss
from . import nn  # noqa: E402
# ot is public API (lct_kernels.ot.OTPlanSampler); it needs only numpy (already loaded by
# torch) and ops.ot, so importing it here costs a few ms and creates no cycle.
from . import ot  # noqa: E402
from . import optim  # noqa: E402  (FusedRAdam: ops.radam and _backend only)
from .cpu_heap import cpu_heap_status, tune_cpu_heap  # noqa: E402  (stdlib only)

__version__ = "0.1.0"

__all__ = [
    "cauchy_loss",
    "pseudo_huber_loss",
    "geman_mcclure_loss",
    "consistency_objective",
    "non_scaling_layer_norm",
    "nsln_modulate",
    "linear_gelu",
    "gated_residual",
    "optim",
    "ot_assign",
    "ot_couple",
    "ot",
    "nn",
    "backend_info",
    "format_backend_info",
    "BackendUnavailable",
    "tune_cpu_heap",
    "cpu_heap_status",
]
