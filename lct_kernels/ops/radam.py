"""Fused RAdam (+ EMA) step on the CPU: torch.optim.RAdam's update in one pass.

For each parameter p with gradient g, at step t (coupled weight decay wd):

    g   = g + wd p
    m   = beta1 m + (1 - beta1) g                    (torch: m.lerp_(g, 1 - beta1))
    v   = beta2 v + (1 - beta2) g^2
    rho_inf = 2 / (1 - beta2) - 1,   rho_t = rho_inf - 2 t beta2^t / (1 - beta2^t)
    rho_t > 5:  r_t = sqrt((rho_t - 4)(rho_t - 2) rho_inf / ((rho_inf - 4)(rho_inf - 2) rho_t))
                p  -= lr (m / (1 - beta1^t)) sqrt(1 - beta2^t) / (sqrt(v) + eps) r_t
    otherwise:  p  -= lr m / (1 - beta1^t)
    then, with EMA shadows e and weight w:  e = e + w (p - e)   (e.lerp_(p, w))

The step's scalars are computed here in float64 exactly as torch.optim.RAdam
computes them (Python floats); the kernel (``lct::radam_step``, csrc/cpu/radam.cpp)
does the per-element work in float32 in torch's operation order.  See
``lct_kernels.optim.FusedRAdam`` for the optimizer.
"""

import math

import torch


def radam_scalars(step, beta1, beta2):
    """(bias_correction1, sqrt(bias_correction2), r_t, rectified) of step t >= 1:
    torch.optim.RAdam's formulas in float64."""
    bias_correction1 = 1 - beta1 ** step
    bias_correction2 = 1 - beta2 ** step
    rho_inf = 2 / (1 - beta2) - 1
    rho_t = rho_inf - 2 * step * (beta2 ** step) / bias_correction2
    rectified = rho_t > 5.0
    rect = (((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)) ** 0.5
            if rectified else 0.0)
    return bias_correction1, bias_correction2 ** 0.5, rect, rectified


def radam_step(params, grads, exp_avgs, exp_avg_sqs, *, step, lr, betas, eps, weight_decay,
               emas=None, ema_weight=0.0):
    """One fused RAdam update, in place, of lists of contiguous float32 CPU tensors
    (params[i], grads[i], exp_avgs[i], exp_avg_sqs[i] and emas[i] of one shape), all at
    step ``step`` (the count after this update, >= 1); then, when ``emas`` is given,
    ``emas[i].lerp_(params[i], ema_weight)``."""
    if not (isinstance(step, (int, float)) and step >= 1 and math.isfinite(step)):
        raise ValueError(f"radam_step: step must be a finite number >= 1, got {step!r}")
    beta1, beta2 = betas
    bc1, sqrt_bc2, rect, rectified = radam_scalars(step, beta1, beta2)
    torch.ops.lct.radam_step(
        list(params), list(grads), list(exp_avgs), list(exp_avg_sqs), list(emas or []),
        float(lr), float(beta1), float(beta2), float(eps), float(weight_decay), float(bc1),
        float(sqrt_bc2), float(rect), bool(rectified), float(ema_weight))
