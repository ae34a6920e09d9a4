"""Batched exact optimal-transport assignment and minibatch OT coupling.

With uniform weights and equal batch sizes the exact OT plan between two
minibatches is a permutation, so the coupling is a linear assignment problem:

    ot_assign(cost)   -> cols, with cols[i] the column of row i, all distinct,
                         minimising sum_i cost[i, cols[i]] exactly (N <= M)
    ot_couple(x0, x1) -> perm, (x0[i], x1[perm[i]]) the exact coupling under
                         squared Euclidean cost, from the cost -2 x0 x1^T (the
                         squared norms are per-row / per-column constants and
                         do not change the optimal permutation)

Solvers: C++ CPU (csrc/include/lct/lap.h), CUDA (csrc/cuda/ot_assign.cu), Triton
(lct_kernels/triton/ot_assign.py) and the PyTorch reference below.  All return
the dual potentials (u, v): u_i + v_j <= c_ij everywhere with equality on the
matched pairs (and, when N < M, v <= 0 with v_j = 0 on unused columns) -- the
optimality certificate, which every solver checks before returning.
"""

import math
from typing import Optional

import torch

from .. import _backend
from .. import _validate as V

STATUS_MESSAGES = {
    1: "is infeasible: some row or column has only forbidden (+inf) pairs, or no assignment "
       "avoids them",
    2: "contains NaN",
    3: "contains -inf (an unbounded problem)",
    4: "failed the optimality certificate (the cost range exceeds float64 precision)",
    5: "exceeded the solver's step bound",
    6: "has more rows than columns",
}


# ----------------------------------------------------------------------------
# Reference solver (pure PyTorch, float64, any device)
# ----------------------------------------------------------------------------
def lap_reference(cost):
    """Exact assignment of one (n, m) problem, n <= m, by shortest augmenting paths.

    Returns (cols (n,) int64, u (n,) float64, v (m,) float64, status int)."""
    C = cost.to(torch.float64)
    n, m = C.shape
    dev = C.device
    inf = math.inf
    if n > m:
        return None, None, None, 6
    if torch.isnan(C).any():
        return None, None, None, 2
    if (C == -inf).any():
        return None, None, None, 3
    v = torch.zeros(m, dtype=torch.float64, device=dev)
    y = torch.full((m,), -1, dtype=torch.int64, device=dev)
    if n == 0:
        return torch.empty(0, dtype=torch.int64, device=dev), torch.empty(0, dtype=torch.float64, device=dev), v, 0
    if (C.min(dim=1).values == inf).any():
        return None, None, None, 1
    cols = torch.arange(m, device=dev)
    for f in range(n):
        d = C[f] - v
        pred = torch.full((m,), f, dtype=torch.int64, device=dev)
        settled = torch.zeros(m, dtype=torch.bool, device=dev)
        while True:
            reach = ~settled
            mu = torch.where(reach, d, torch.full_like(d, inf)).min()
            if mu == inf:
                return None, None, None, 1
            level = reach & (d == mu)
            free_hit = level & (y < 0)
            if free_hit.any():
                end = int(cols[free_hit][0])
                break
            j = int(cols[level][0])
            settled[j] = True
            i = int(y[j])
            h = C[i] - v - (C[i, j] - v[j] - mu)
            better = (~settled) & (h < d)
            d = torch.where(better, h, d)
            pred = torch.where(better, torch.full_like(pred, i), pred)
        v = v + torch.where(settled, d - mu, torch.zeros_like(d))
        j = end
        while True:
            i = int(pred[j])
            held = (y == i).nonzero()
            y[j] = i
            if i == f:
                break
            j = int(held[0])
    x = torch.full((n,), -1, dtype=torch.int64, device=dev)
    x[y[y >= 0]] = cols[y >= 0]
    u = C[torch.arange(n, device=dev), x] - v[x]
    return x, u, v, 0


# ----------------------------------------------------------------------------
# Registration
# ----------------------------------------------------------------------------
def _fake_ot_assign(cost, sizes):
    B, N, M = cost.shape
    return (cost.new_empty((B, N), dtype=torch.int64), cost.new_empty((B, N), dtype=torch.float64),
            cost.new_empty((B, M), dtype=torch.float64), cost.new_empty((B,), dtype=torch.int32))


@torch.library.custom_op("lct::triton_ot_assign", mutates_args=())
def triton_ot_assign(
    cost: torch.Tensor, sizes: Optional[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton backend of lct::ot_assign (same schema and semantics)."""
    from ..triton import ot_assign as kernels

    return kernels.ot_assign(cost, sizes)


triton_ot_assign.register_fake(_fake_ot_assign)
if hasattr(torch.ops.lct, "ot_assign"):
    torch.library.register_fake("lct::ot_assign")(_fake_ot_assign)


def _reference_batch(cost, sizes):
    B, N, M = cost.shape
    x = torch.full((B, N), -1, dtype=torch.int64, device=cost.device)
    u = torch.zeros((B, N), dtype=torch.float64, device=cost.device)
    v = torch.zeros((B, M), dtype=torch.float64, device=cost.device)
    status = torch.zeros((B,), dtype=torch.int32, device=cost.device)
    for b in range(B):
        n, m = (int(sizes[b, 0]), int(sizes[b, 1])) if sizes is not None else (N, M)
        xb, ub, vb, st = lap_reference(cost[b, :n, :m])
        status[b] = st
        if st == 0:
            x[b, :n], u[b, :n], v[b, :m] = xb, ub, vb
    return x, u, v, status


def _solve(cost, sizes, backend, fn):
    """(x, u, v, status) for a (B, N, M) cost from the chosen backend."""
    chosen = _backend.select("ot_assign", cost.device, backend, fn)
    if chosen == "torch":
        return _reference_batch(cost, sizes)
    if chosen == "triton":
        return torch.ops.lct.triton_ot_assign(cost, sizes)
    return torch.ops.lct.ot_assign(cost, sizes)


def _raise_on_status(fn, status, batched, what="cost"):
    if not bool(status.any()):  # one host sync, as before; the common path stays short
        return
    bad = (status != 0).nonzero()
    b = int(bad[0])
    code = int(status[b])
    where = f"problem {b} of the batch" if batched else "the problem"
    raise ValueError(f"{fn}: {what}: {where} {STATUS_MESSAGES.get(code, f'failed (status {code})')}")


# ----------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------
def ot_assign(cost, backend=None, return_duals=False):
    """Exact linear assignment of every row to a distinct column.

    Args:
        cost: (N, M) or (B, N, M) float32/float64 tensor with N <= M, on CPU or CUDA.
            ``+inf`` marks forbidden pairs.
        backend: None (automatic), "cuda", "triton", "cpu" or "torch".
        return_duals: also return the float64 dual potentials (u, v).

    Returns:
        cols: int64 (N,) or (B, N) on cost's device: cols[i] is row i's column,
        all distinct, minimising the total cost exactly for the given matrix (any
        optimum when there are ties).  With return_duals: (cols, u, v), the
        optimality certificate u_i + v_j <= c_ij, with equality on matched pairs.

    Raises ValueError for NaN, -inf, N > M, or an infeasible problem (all
    assignments use a forbidden pair).
    """
    fn = "ot_assign"
    V.tensor(fn, "cost", cost)
    if cost.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{fn}: cost must be float32 or float64, got {cost.dtype}")
    if cost.dim() not in (2, 3):
        raise ValueError(f"{fn}: cost must be (N, M) or (B, N, M), got shape {tuple(cost.shape)}")
    batched = cost.dim() == 3
    c3 = (cost if batched else cost.unsqueeze(0)).contiguous()
    if c3.shape[1] > c3.shape[2]:
        raise ValueError(
            f"{fn}: cost must have N <= M (rows <= columns), got {tuple(cost.shape)}; "
            "transpose it and invert the result"
        )
    x, u, v, status = _solve(c3, None, backend, fn)
    _raise_on_status(fn, status, batched)
    if not return_duals:
        return x if batched else x[0]
    return (x, u, v) if batched else (x[0], u[0], v[0])


# Multiply-adds up to which the CPU cost GEMM runs on the calling thread (about
# 1 ms of serial work).  torch's GEMM forks for any size, and a forked region
# whose second thread is not running (another process holds the core) waits for
# a time slice: at N = 128, D = 32 the GEMM took 40 us alone but 20 ms at the
# 90th percentile beside one busy process, against 0.2 ms on one thread.
SERIAL_GEMM_MAX = 1 << 22


def _gemm_nt(a, b):
    """a @ b.T, on the calling thread when it is a small CPU product."""
    small = a.shape[0] * b.shape[0] * a.shape[1] <= SERIAL_GEMM_MAX
    threads = torch.get_num_threads() if small and a.device.type == "cpu" else 1
    if threads == 1 or torch.compiler.is_compiling():
        return a @ b.T
    # torch's thread count is process-wide: another Python thread running torch
    # ops during these few microseconds runs them on one thread too.
    torch.set_num_threads(1)
    try:
        return a @ b.T
    finally:
        torch.set_num_threads(threads)


def coupling_cost(x0, x1):
    """The (B, B) cost -2 x0 x1^T in float32 with IEEE float32 products (no TF32 or
    reduced-precision GEMM), x0 and x1 flattened per sample.  It differs from the
    squared Euclidean distance by per-row and per-column constants only.  A small
    CPU product (B0 B1 D <= SERIAL_GEMM_MAX) runs on the calling thread."""
    a = x0.reshape(x0.shape[0], -1).to(torch.float32)
    b = x1.reshape(x1.shape[0], -1).to(torch.float32)
    prev = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        return _gemm_nt(a, b).mul_(-2.0)
    finally:
        torch.set_float32_matmul_precision(prev)


def ot_couple(x0, x1, groups=None, backend=None, *, return_status=False):
    """Exact minibatch OT coupling under squared Euclidean cost.

    Args:
        x0, x1: (B, ...) tensors on one device with the same per-sample size.
        groups: optional int tensor (B,): one coupling per group (e.g. class
            labels): x0[i] is only paired with an x1[j] of the same group.  All
            groups are solved in one batched call.  It may live on x0's device or
            on the CPU; on the CPU (labels the host already has) the padded batch
            is sized without reading the device.
        backend: None (automatic), "cuda", "triton", "cpu" or "torch".
        return_status: False (default): a failed solve (NaN or -inf cost, no
            feasible pairing) raises ValueError, which reads the solver's status
            from the device (one sync on a GPU).  True: no check and no sync;
            returns (perm, status) with status an int32 tensor on the device, one
            code per solved problem (0 = optimal; the codes of
            ``ops.ot.STATUS_MESSAGES``), for callers that check it later (the
            trainer does at its logging steps).  A failed problem's rows get -1.

    Returns:
        perm: int64 (B,) on the inputs' device, such that (x0[i], x1[perm[i]]) is
        the exact OT coupling.  The cost is computed on the device and never
        copied to the host.
    """
    fn = "ot_couple"
    for name, t in (("x0", x0), ("x1", x1)):
        V.tensor(fn, name, t)
        if t.dim() < 1 or t.shape[0] == 0:
            raise ValueError(f"{fn}: {name} must be a non-empty (B, ...) batch, got {tuple(t.shape)}")
    V.same_device(fn, "x0", x0, "x1", x1)
    B = x0.shape[0]
    if x1.shape[0] != B:
        raise ValueError(f"{fn}: x0 and x1 must have the same batch size, got {B} and {x1.shape[0]}")
    per0, per1 = math.prod(x0.shape[1:]), math.prod(x1.shape[1:])  # no per-call views
    if per0 != per1:
        raise ValueError(
            f"{fn}: x0 and x1 must have the same number of elements per sample, got "
            f"{per0} and {per1}"
        )
    cost = coupling_cost(x0, x1)
    if groups is None:
        x, _, _, status = _solve(cost.unsqueeze(0).contiguous(), None, backend, fn)
        if return_status:
            return x[0], status
        _raise_on_status(fn, status, False, "coupling cost")
        return x[0]
    if not isinstance(groups, torch.Tensor) or groups.dtype.is_floating_point or groups.dtype == torch.bool:
        raise TypeError(f"{fn}: groups must be an integer tensor of shape ({B},)")
    if groups.shape != (B,):
        raise ValueError(f"{fn}: groups must have shape ({B},), got {tuple(groups.shape)}")
    if groups.device.type != "cpu":
        V.same_device(fn, "x0", x0, "groups", groups)
    return _couple_groups(fn, cost, groups, backend, return_status)


def _couple_groups(fn, cost, groups, backend, return_status=False):
    """Pad every group's block of the cost into one (G, K, K) batch and solve it.

    The group structure (unique labels, sizes, members) is computed where
    ``groups`` lives: its sizes fix the padded shape, so on a GPU a device-resident
    ``groups`` costs one sync, host labels none."""
    dev = cost.device
    labels, inverse, counts = torch.unique(groups, return_inverse=True, return_counts=True)
    G, K = labels.numel(), int(counts.max())
    order = torch.argsort(inverse, stable=True)  # samples sorted by group
    starts = torch.cumsum(counts, 0) - counts
    pos = torch.arange(groups.shape[0], device=groups.device) - starts[inverse[order]]  # rank in group
    members = torch.full((G, K), -1, dtype=torch.int64, device=groups.device)
    members[inverse[order], pos] = order
    if members.device != dev:  # host labels: one asynchronous copy to the device
        counts = counts.pin_memory().to(dev, non_blocking=True) if dev.type == "cuda" else counts.to(dev)
        members = members.pin_memory().to(dev, non_blocking=True) if dev.type == "cuda" else members.to(dev)
    valid = members >= 0
    idx = members.clamp_min(0)
    block = cost[idx[:, :, None], idx[:, None, :]]  # (G, K, K)
    block = torch.where(valid[:, :, None] & valid[:, None, :], block, torch.zeros((), device=dev))
    sizes = torch.stack([counts, counts], dim=1).to(torch.int64)
    x, _, _, status = _solve(block.contiguous(), sizes, backend, fn)
    if not return_status:
        _raise_on_status(fn, status, True, "a group's coupling cost")
    # rows of a failed problem get -1 (their x is -1), never a wrong partner
    partner = torch.where(x >= 0, torch.gather(members, 1, x.clamp_min(0)), -1)
    # scatter through a spill slot (index B) instead of boolean indexing, whose
    # data-dependent size would read the device
    B = cost.shape[0]
    perm = torch.empty(B + 1, dtype=torch.int64, device=dev)
    perm[torch.where(valid, members, B).reshape(-1)] = partner.reshape(-1)
    perm = perm[:B]
    return (perm, status) if return_status else perm
