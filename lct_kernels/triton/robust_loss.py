"""Triton kernels for the fused robust losses and the fused consistency objective.

Design
------
One program per sample (row).  Rows are the flattened per-sample elements, so a
latent batch (B, 4, 32, 32) is B rows of N = 4096.

* Per-sample form (``ELEMENTWISE=False``): the loss needs the row mean
  m = mean((pred - target)^2) before any gradient element can be written.
  When the row fits in one block (N <= MAX_ONE_BLOCK) the difference d stays in
  registers: pred and target are read once, the gradient rho'(m) * 2 d / N is
  written once.  Longer rows loop over BLOCK-sized tiles twice (sum, then
  gradient), re-reading pred and target; there is no hard cap on N.
* Elementwise form: one pass; loss and gradient are local to each element.
* Consistency objective: the same pattern over three inputs (student, teacher,
  x0) with two sums per row and the gradient a_i (s - t) + b_i (s - x0).
* Arithmetic in float32; inputs are float32, float16 or bfloat16 (float64 is
  left to the CUDA and CPU kernels); gradients are stored in the input dtype.  Row offsets are int64 (row * stride), so more than 2^31
  elements in total are fine.
* ``c`` is read from a device scalar, so changing it never recompiles.

The per-row factor (weight_i, and 1/B for "mean") is folded into the gradient,
so the backward only multiplies it by the incoming scalar gradient
(lct_kernels/ops/_fused_grad.py), or skips that when the gradient is exactly 1.

Bytes moved, B x N elements of size s (one-block rows):
    robust loss forward (with gradient):  read 2 s B N, write s B N (+ 8 B)
    consistency objective forward:        read 3 s B N, write s B N

The float64 references live in ``lct_kernels/ops/robust_loss.py``.
Everything here also runs under ``TRITON_INTERPRET=1`` on CPU tensors.
"""

import triton
import triton.language as tl

from ._launch import device_guard

MAX_ONE_BLOCK = 16384  # elements kept on chip per row
LOOP_BLOCK = 4096


@triton.jit
def _log1p(x):
    # log(1 + x) without losing small x (no libdevice under the interpreter):
    # log(u) * x / (u - 1) with u = fl(1 + x) cancels the rounding of u.
    u = 1.0 + x
    safe = tl.where(u == 1.0, 2.0, u)
    return tl.where(u == 1.0, x, tl.where(u == float("inf"), u, tl.log(safe) * (x / (safe - 1.0))))


@triton.jit
def _rho(m, c, c2, KIND: tl.constexpr):
    # KIND: 0 Cauchy, 1 Pseudo-Huber, 2 Geman-McClure (see csrc/include/lct/robust_loss.h).
    if KIND == 0:
        return _log1p(m / (2.0 * c2))
    elif KIND == 1:
        return m / (tl.sqrt(m + c2) + c)
    else:
        return 2.0 * m / (m + 4.0 * c2)


@triton.jit
def _drho(m, c2, KIND: tl.constexpr):
    if KIND == 0:
        return 1.0 / (m + 2.0 * c2)
    elif KIND == 1:
        return 0.5 / tl.sqrt(m + c2)
    else:
        den = m + 4.0 * c2
        return 8.0 * c2 / (den * den)


@triton.jit
def _robust_loss_kernel(
    pred_ptr,  # (B, N), column stride 1, row stride stride_pred
    target_ptr,  # (B, N), column stride 1, row stride stride_target
    c_ptr,  # () float64
    weight_ptr,  # (B,) float32 (unused unless HAS_WEIGHT)
    loss_ptr,  # (B,) out: rho per sample (unweighted)
    grad_ptr,  # (B, N) contiguous out: weight_i * inv_b * d rho_i / d pred (if COMPUTE_GRAD)
    N,
    stride_pred,
    stride_target,
    inv_b,  # 1/B for reduction "mean", else 1
    HAS_WEIGHT: tl.constexpr,
    KIND: tl.constexpr,
    ELEMENTWISE: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    ONE_BLOCK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    p_row = pred_ptr + row * stride_pred
    t_row = target_ptr + row * stride_target
    g_row = grad_ptr + row * N
    acc_t = tl.float32
    c = tl.load(c_ptr).to(acc_t)
    c2 = c * c
    cols = tl.arange(0, BLOCK)
    factor = inv_b
    if HAS_WEIGHT:
        factor = factor * tl.load(weight_ptr + row).to(tl.float32)
    two_over_n = factor * 2.0 / N  # the per-row factor is folded into the gradient
    if ONE_BLOCK:
        mask = cols < N
        d = tl.load(p_row + cols, mask=mask, other=0.0).to(acc_t) - tl.load(
            t_row + cols, mask=mask, other=0.0
        ).to(acc_t)
        if ELEMENTWISE:
            m = d * d
            tl.store(loss_ptr + row, tl.sum(_rho(m, c, c2, KIND), axis=0) / N)
            if COMPUTE_GRAD:
                g = _drho(m, c2, KIND) * two_over_n * d
                tl.store(g_row + cols, g.to(grad_ptr.dtype.element_ty), mask=mask)
        else:
            m = tl.sum(d * d, axis=0) / N
            tl.store(loss_ptr + row, _rho(m, c, c2, KIND))
            if COMPUTE_GRAD:
                k = _drho(m, c2, KIND) * two_over_n
                tl.store(g_row + cols, (k * d).to(grad_ptr.dtype.element_ty), mask=mask)
    else:
        acc = tl.zeros([BLOCK], dtype=acc_t)
        for start in range(0, N, BLOCK):
            offs = start + cols
            mask = offs < N
            d = tl.load(p_row + offs, mask=mask, other=0.0).to(acc_t) - tl.load(
                t_row + offs, mask=mask, other=0.0
            ).to(acc_t)
            if ELEMENTWISE:
                m = d * d
                acc += _rho(m, c, c2, KIND)
                if COMPUTE_GRAD:
                    g = _drho(m, c2, KIND) * two_over_n * d
                    tl.store(g_row + offs, g.to(grad_ptr.dtype.element_ty), mask=mask)
            else:
                acc += d * d
        total = tl.sum(acc, axis=0) / N
        if ELEMENTWISE:
            tl.store(loss_ptr + row, total)
        else:
            tl.store(loss_ptr + row, _rho(total, c, c2, KIND))
            if COMPUTE_GRAD:
                k = _drho(total, c2, KIND) * two_over_n
                for start in range(0, N, BLOCK):
                    offs = start + cols
                    mask = offs < N
                    d = tl.load(p_row + offs, mask=mask, other=0.0).to(acc_t) - tl.load(
                        t_row + offs, mask=mask, other=0.0
                    ).to(acc_t)
                    tl.store(g_row + offs, (k * d).to(grad_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _consistency_objective_kernel(
    s_ptr,  # student (B, N), column stride 1
    t_ptr,  # teacher (B, N), column stride 1
    x_ptr,  # x0 (B, N), column stride 1
    w_ptr,  # (B,) float32 consistency weights
    dw_ptr,  # (B,) float32 diffusion weights
    mask_ptr,  # (B,) float32 0/1 diffusion mask
    count_ptr,  # () float32 number of masked samples
    c_ptr,  # () float64
    cm_ptr,  # (B,) out: w_i rho(m_i)
    diff_ptr,  # (B,) out: mask_i dw_i e_i
    grad_ptr,  # (B, N) contiguous out: d total / d student
    B,
    N,
    stride_s,
    stride_t,
    stride_x,
    diff_coef,
    KIND: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    ONE_BLOCK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * stride_s
    t_row = t_ptr + row * stride_t
    x_row = x_ptr + row * stride_x
    g_row = grad_ptr + row * N
    acc_t = tl.float32
    c = tl.load(c_ptr).to(acc_t)
    c2 = c * c
    w = tl.load(w_ptr + row).to(acc_t)
    dw = tl.load(dw_ptr + row).to(acc_t)
    in_mask = tl.load(mask_ptr + row) != 0
    count = tl.maximum(tl.load(count_ptr).to(acc_t), 1.0)
    cols = tl.arange(0, BLOCK)
    if ONE_BLOCK:
        mask = cols < N
        s = tl.load(s_row + cols, mask=mask, other=0.0).to(acc_t)
        u = s - tl.load(t_row + cols, mask=mask, other=0.0).to(acc_t)
        v = s - tl.load(x_row + cols, mask=mask, other=0.0).to(acc_t)
        m = tl.sum(u * u, axis=0) / N
        e = tl.sum(v * v, axis=0) / N
    else:
        acc_u = tl.zeros([BLOCK], dtype=acc_t)
        acc_v = tl.zeros([BLOCK], dtype=acc_t)
        for start in range(0, N, BLOCK):
            offs = start + cols
            mask = offs < N
            s = tl.load(s_row + offs, mask=mask, other=0.0).to(acc_t)
            u = s - tl.load(t_row + offs, mask=mask, other=0.0).to(acc_t)
            v = s - tl.load(x_row + offs, mask=mask, other=0.0).to(acc_t)
            acc_u += u * u
            acc_v += v * v
        m = tl.sum(acc_u, axis=0) / N
        e = tl.sum(acc_v, axis=0) / N
    tl.store(cm_ptr + row, w * _rho(m, c, c2, KIND))
    tl.store(diff_ptr + row, tl.where(in_mask, dw * e, 0.0))
    if COMPUTE_GRAD:
        a = w * _drho(m, c2, KIND) * 2.0 / N / B
        b = tl.where(in_mask, diff_coef * dw * 2.0 / (count * N), 0.0)
        if ONE_BLOCK:
            tl.store(g_row + cols, (a * u + b * v).to(grad_ptr.dtype.element_ty), mask=mask)
        else:
            for start in range(0, N, BLOCK):
                offs = start + cols
                mask = offs < N
                s = tl.load(s_row + offs, mask=mask, other=0.0).to(acc_t)
                u = s - tl.load(t_row + offs, mask=mask, other=0.0).to(acc_t)
                v = s - tl.load(x_row + offs, mask=mask, other=0.0).to(acc_t)
                tl.store(g_row + offs, (a * u + b * v).to(grad_ptr.dtype.element_ty), mask=mask)


def row_config(n):
    """(ONE_BLOCK, BLOCK, num_warps) of the launch for rows of n >= 0 elements.

    Rows up to MAX_ONE_BLOCK stay in registers (BLOCK = next power of two >= 16,
    one warp per 512 elements, at most 16); longer rows loop over LOOP_BLOCK tiles
    with 8 warps.  Both kernels of this module use it."""
    if n <= MAX_ONE_BLOCK:
        block = max(triton.next_power_of_2(n), 16)
        return True, block, max(1, min(16, block // 512))
    return False, LOOP_BLOCK, 8


def robust_loss_forward(pred, target, c, weight, kind, elementwise, reduction, compute_grad):
    """Triton implementation of lct::robust_loss (schema in csrc/ops.cpp).

    pred, target: (B, N) with unit column stride; c: () float64 on the same device;
    weight: (B,) float32 or None; reduction: 0 none, 1 mean, 2 sum.
    Returns (out, rho (B,) float32, grad (B, N) in pred's dtype or (0,))."""
    import torch

    B, N = pred.shape
    rho = torch.empty(B, dtype=torch.float32, device=pred.device)
    grad = torch.empty((B, N) if compute_grad else (0,), dtype=pred.dtype, device=pred.device)
    one_block, block, warps = row_config(N)
    inv_b = 1.0 / B if reduction == 1 else 1.0
    with device_guard(pred):
        _robust_loss_kernel[(B,)](
            pred, target, c, weight if weight is not None else rho, rho,
            grad if compute_grad else rho, N, pred.stride(0), target.stride(0), inv_b,
            HAS_WEIGHT=weight is not None, KIND=kind, ELEMENTWISE=bool(elementwise),
            COMPUTE_GRAD=bool(compute_grad), ONE_BLOCK=one_block, BLOCK=block, num_warps=warps,
        )
    weighted = rho if weight is None else rho * weight
    out = weighted.clone() if reduction == 0 else weighted.sum() * inv_b
    return out, rho, grad


def consistency_objective_forward(
    student, teacher, x0, weight, diff_weight, diff_mask, c, kind, diff_coef, compute_grad
):
    """See lct::consistency_objective in csrc/ops.cpp for shapes; returns
    (total (), cm_loss (B,), diff_loss (), grad (B, N) or (0,))."""
    import torch

    B, N = student.shape
    cm = torch.empty(B, dtype=torch.float32, device=student.device)
    diff_rows = torch.empty(B, dtype=torch.float32, device=student.device)
    count = diff_mask.sum()
    grad = torch.empty(
        (B, N) if compute_grad else (0,), dtype=student.dtype, device=student.device
    )
    one_block, block, warps = row_config(N)
    with device_guard(student):
        _consistency_objective_kernel[(B,)](
            student, teacher, x0, weight, diff_weight, diff_mask, count, c,
            cm, diff_rows, grad if compute_grad else cm,
            B, N, student.stride(0), teacher.stride(0), x0.stride(0), float(diff_coef),
            KIND=kind, COMPUTE_GRAD=bool(compute_grad), ONE_BLOCK=one_block, BLOCK=block,
            num_warps=warps,
        )
    diff_loss = diff_rows.sum() / count.clamp_min(1).to(torch.float32)
    total = cm.sum() / B + diff_coef * diff_loss
    return total, cm, diff_loss, grad
