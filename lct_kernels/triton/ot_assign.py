"""Triton kernel for batched exact linear assignment: one program per problem.

The portable GPU variant of the solver in csrc/include/lct/lap.h (same
mathematics, no augmenting row reduction), written as a level-synchronous
shortest augmenting path search over register vectors of the M columns:

* Initialisation.  Square problems: row minima r_i, column reduction
  v_j = min_i (c_ij - r_i), and each row takes the highest-index column that
  chose it.  Rectangular problems: v = 0 and rows take their cheapest free
  column in order.
* For each free row: distances d = c_f - v over the columns; then levels: mu =
  min d over unreached columns; if an unassigned column sits at mu the path
  ends there; otherwise every column at mu is settled and the rows matched to
  them are relaxed, one row load each.  The settled columns' duals then move by
  d_j - mu and the path is flipped (scalar reads done as masked reductions).
* Certificate on the device: u_i = c_{i,x(i)} - v_{x(i)} and every reduced cost
  c - u - v >= -tol (plus v <= tol, v = 0 on unassigned columns, when N < M).
* Bounded: every level settles at least one column; a step budget turns any
  runaway (it cannot happen in exact arithmetic) into status 5.

Costs are read as float64 (duals float64).  M is limited to MAX_M columns (the
register vectors); larger problems belong to the CPU or CUDA solvers.
Status codes follow lct::lap_status.  Runs under TRITON_INTERPRET=1.
"""

import triton
import triton.language as tl

from ._launch import device_guard

MAX_M = 8192
WARPS_CAP = 8  # warps per program (block_config)
# Status codes (lct::lap_status).  tl.constexpr globals: the compiler rejects plain
# Python globals read inside a @triton.jit function (the interpreter does not).
OK = tl.constexpr(0)
INFEASIBLE = tl.constexpr(1)
NAN = tl.constexpr(2)
NEG_INF = tl.constexpr(3)
CERTIFICATE_FAILED = tl.constexpr(4)
ITERATION_LIMIT = tl.constexpr(5)
BAD_SHAPE = tl.constexpr(6)


@triton.jit
def _pick(vec, cols, j):
    """vec[j] for a register vector (a masked reduction)."""
    return tl.sum(tl.where(cols == j, vec, tl.zeros_like(vec)), axis=0)


@triton.jit
def _lap_kernel(
    cost_ptr,  # (B, N, M) contiguous, float32 or float64
    sizes_ptr,  # (B, 2) int64: rows, columns of each problem (if HAS_SIZES)
    x_ptr,  # (B, N) int64 out: column of each row
    u_ptr,  # (B, N) float64 out
    v_ptr,  # (B, M) float64 out
    status_ptr,  # (B,) int32 out
    N,
    M,
    HAS_SIZES: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    if HAS_SIZES:
        n = tl.load(sizes_ptr + 2 * b)
        m = tl.load(sizes_ptr + 2 * b + 1)
    else:  # unpadded batch: no sizes tensor, so no host-to-device copy per call
        n = tl.full((), N, tl.int64)
        m = tl.full((), M, tl.int64)
    status = tl.full((), 0, tl.int32)
    if (n < 0) | (m < 0) | (n > N) | (m > M) | (n > m):  # as the CPU and CUDA kernels
        status = BAD_SHAPE
        n = tl.full((), 0, tl.int64)  # an empty problem: every loop below is skipped
        m = tl.full((), 0, tl.int64)
    base = cost_ptr + b * N * M
    cols = tl.arange(0, BLOCK_M)
    cmask = cols < m
    inf = float("inf")
    INF = tl.full([BLOCK_M], inf, tl.float64)

    # ---- validation and scale ----
    scale = tl.full((), 0.0, tl.float64)
    bad_nan = tl.full((), 0, tl.int32)
    bad_neg = tl.full((), 0, tl.int32)
    for i in range(0, n):
        c = tl.load(base + i * M + cols, mask=cmask, other=0.0).to(tl.float64)
        bad_nan += tl.sum((c != c).to(tl.int32), axis=0)
        bad_neg += tl.sum((c == -inf).to(tl.int32), axis=0)
        scale = tl.maximum(scale, tl.max(tl.where(c == inf, 0.0, tl.abs(c)), axis=0))
    if bad_nan > 0:
        status = NAN
    elif bad_neg > 0:
        status = NEG_INF

    v = tl.zeros([BLOCK_M], tl.float64)
    # Row and column indices are int32 throughout (N <= M <= MAX_M): every branch that
    # reassigns one keeps its type (the compiler requires it), and int32 vectors halve
    # the registers of the int64 ones.  Loop counters over int64 bounds are int64 in
    # the compiler (Python ints under the interpreter), hence the tl.full casts.
    y = tl.full([BLOCK_M], -1, tl.int32)  # row of each column
    # ---- initialisation ----
    if status == 0:
        if n == m:
            colmin = INF
            argrow = tl.full([BLOCK_M], -1, tl.int32)
            for i in range(0, n):
                c = tl.load(base + i * M + cols, mask=cmask, other=inf).to(tl.float64)
                r = tl.min(c, axis=0)
                if r == inf:
                    status = INFEASIBLE
                rc = c - r
                better = rc < colmin
                colmin = tl.where(better, rc, colmin)
                argrow = tl.where(better, tl.full((), i, tl.int32), argrow)
            if tl.sum(((argrow < 0) & cmask).to(tl.int32), axis=0) > 0:
                status = INFEASIBLE
            v = tl.where(cmask, colmin, 0.0)
            for i in range(0, n):  # row i takes the highest-index column that chose it
                i32 = tl.full((), i, tl.int32)
                jmax = tl.max(tl.where(argrow == i32, cols, -1), axis=0)
                y = tl.where((cols == jmax) & (jmax >= 0), i32, y)
        else:
            for i in range(0, n):
                c = tl.load(base + i * M + cols, mask=cmask, other=inf).to(tl.float64)
                r = tl.min(c, axis=0)
                if r == inf:
                    status = INFEASIBLE
                jmin = tl.min(tl.where((c == r) & cmask, cols, BLOCK_M), axis=0)
                if _pick(y, cols, jmin) < 0:
                    y = tl.where(cols == jmin, tl.full((), i, tl.int32), y)

    # ---- shortest augmenting paths ----
    budget = 4 * n * (m + 2) + 64
    for f in range(0, n):
        n_held = tl.sum((y == f).to(tl.int32), axis=0)
        if (status == 0) & (n_held == 0):
            cf = tl.load(base + f * M + cols, mask=cmask, other=inf).to(tl.float64)
            d = tl.where(cmask, cf - v, INF)
            f32 = tl.full((), f, tl.int32)
            pred = tl.full([BLOCK_M], f32, tl.int32)
            settled = cols < 0  # all False
            end = tl.full((), -1, tl.int32)
            mu = tl.full((), 0.0, tl.float64)
            searching = tl.full((), 1, tl.int32)
            while searching == 1:
                budget -= 1
                reach = (~settled) & cmask
                mu = tl.min(tl.where(reach, d, INF), axis=0)
                if mu == inf:
                    status = INFEASIBLE
                    searching = 0
                elif budget < 0:
                    status = ITERATION_LIMIT
                    searching = 0
                else:
                    level = reach & (d == mu)
                    free_hit = level & (y < 0)
                    if tl.sum(free_hit.to(tl.int32), axis=0) > 0:
                        end = tl.min(tl.where(free_hit, cols, BLOCK_M), axis=0)
                        searching = 0
                    else:
                        # settle one column at mu and relax its row; the remaining
                        # columns at mu are taken by the next iterations (same level)
                        j = tl.min(tl.where(level, cols, BLOCK_M), axis=0)
                        settled = settled | (cols == j)
                        r = _pick(y, cols, j)  # the row matched to column j
                        ci = tl.load(base + r * M + cols, mask=cmask, other=inf).to(tl.float64)
                        cij = tl.sum(tl.where(cols == j, ci, 0.0), axis=0)
                        vj = _pick(v, cols, j)
                        h = ci - v - (cij - vj - mu)
                        better = (~settled) & cmask & (h < d)
                        d = tl.where(better, h, d)
                        pred = tl.where(better, r, pred)
            if status == 0:
                v = v + tl.where(settled, d - mu, 0.0)
                j = end
                flipping = tl.full((), 1, tl.int32)
                while flipping == 1:
                    r = _pick(pred, cols, j)
                    # the column row r held before (none for the free row f)
                    prev = tl.max(tl.where(y == r, cols, -1), axis=0)
                    y = tl.where(cols == j, r, y)
                    if r == f32:
                        flipping = 0
                    else:
                        j = prev

    # ---- certificate and outputs ----
    vmax = tl.max(tl.where(cmask, tl.abs(v), 0.0), axis=0)
    tol = 1e-9 * (scale + vmax) + 1e-300
    for i in range(0, N):
        if i < n:
            xi = tl.max(tl.where(y == i, cols, -1), axis=0)
            c = tl.load(base + i * M + cols, mask=cmask, other=inf).to(tl.float64)
            ui = tl.sum(tl.where(cols == xi, c - v, 0.0), axis=0)
            if status == 0:
                viol = tl.where((c != inf) & cmask, c - ui - v, 0.0)
                if tl.min(viol, axis=0) < -tol:
                    status = CERTIFICATE_FAILED
            tl.store(x_ptr + b * N + i, tl.where(status == 0, xi, -1))
            tl.store(u_ptr + b * N + i, tl.where(status == 0, ui, 0.0))
        else:
            tl.store(x_ptr + b * N + i, -1)
            tl.store(u_ptr + b * N + i, 0.0)
    if status == 0 and n < m:
        unassigned = (y < 0) & cmask
        if tl.sum(((v > tol) & cmask).to(tl.int32), axis=0) > 0:
            status = CERTIFICATE_FAILED
        if tl.sum((unassigned & (v != 0.0)).to(tl.int32), axis=0) > 0:
            status = CERTIFICATE_FAILED
    tl.store(v_ptr + b * M + cols, tl.where(status == 0, v, 0.0), mask=cols < M)
    tl.store(status_ptr + b, status)


def block_config(M):
    """(BLOCK_M, num_warps) of the launch for problems of M columns (1 <= M <= MAX_M).

    BLOCK_M is the register vector length (M rounded up to a power of two, >= 16),
    with one warp per 256 columns, at most WARPS_CAP.  The search keeps about
    eight 32-bit registers per column live (d, v float64; y, pred int32; settled
    and column masks), besides temporaries and load addresses: at BLOCK_M = 8192
    the state alone fills an SM's 64K registers whatever the warp count, and at
    4096 it reaches the per-thread cap, so ptxas spills (about 1-1.6 KB and 12-28 B
    per thread; more warps only lower the per-thread register cap): accepted, see
    docs/gpu_resources.md."""
    if not 1 <= M <= MAX_M:
        raise ValueError(f"ot_assign: block_config: M must be in [1, {MAX_M}], got {M}")
    block = max(16, triton.next_power_of_2(M))
    return block, max(1, min(WARPS_CAP, block // 256))


def ot_assign(cost, sizes):
    """Triton implementation of lct::ot_assign (schema in csrc/ops.cpp).

    cost: (B, N, M) float32/float64 contiguous; sizes: (B, 2) int64 or None.
    Returns x (B, N) int64, u (B, N) float64, v (B, M) float64, status (B,) int32."""
    import torch

    B, N, M = cost.shape
    if M > MAX_M:
        raise ValueError(f"ot_assign: the triton backend handles at most {MAX_M} columns, got {M}")
    dev = cost.device
    x = torch.empty((B, N), dtype=torch.int64, device=dev)
    u = torch.empty((B, N), dtype=torch.float64, device=dev)
    v = torch.zeros((B, M), dtype=torch.float64, device=dev)
    status = torch.empty((B,), dtype=torch.int32, device=dev)
    if B == 0:
        return x, u, v, status
    block, warps = block_config(max(M, 1))
    has_sizes = sizes is not None
    if has_sizes:  # the kernel reads sizes[b, 0], sizes[b, 1] at 2 b, 2 b + 1 (as the CUDA op)
        if tuple(sizes.shape) != (B, 2) or sizes.dtype != torch.int64:
            raise ValueError(f"ot_assign: sizes must be an int64 ({B}, 2) tensor of (rows, "
                             f"columns), got {sizes.dtype} {tuple(sizes.shape)}")
        sizes = sizes.to(dev).contiguous()
    cost = cost.contiguous()  # the kernel indexes b N M + i M + j
    with device_guard(cost):
        _lap_kernel[(B,)](cost, sizes if has_sizes else status, x, u, v, status, N, M,
                          HAS_SIZES=has_sizes, BLOCK_M=block, num_warps=warps)
    return x, u, v, status
