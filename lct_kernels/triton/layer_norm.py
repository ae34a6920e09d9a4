"""Triton kernels for the layer norm family: NsLN, LayerNorm and NsLN + adaLN modulate.

Formulas (lct::layer_norm_fwd in csrc/ops.cpp):
    xhat = (x - mean) * rstd,   z = xhat * weight + bias,   y = z * (1 + scale[g]) + shift[g]
with g = row // group_rows the sample of the row, weight/bias/shift/scale optional.

Forward
-------
Rows up to MAX_ONE_BLOCK elements are processed in [ROWS, BLOCK_D] tiles:
several short rows per program (the qk-norm case is millions of rows of
D = 64), one load of x, fp32 mean and (two-pass, centred) variance, one store
of y.  Longer rows take one program each and loop over BLOCK_D tiles (three
reads of x; there is no cap on D).  Bytes: read s M D, write s M D + 8 M.

Backward
--------
The grid is (groups, chunks): each program owns a fixed chunk of one group's
rows, writes their dx and accumulates fp32 partial sums p1 = sum dy and
p2 = sum dy * xhat over them in registers, then stores them to its own slot of
a (G * chunks, 2, D) buffer.  The final reduction over chunks is a plain sum in
chunk order (deterministic, no atomics).  chunks <= MAX_GRID_Y (CUDA's grid-y
limit): past it the chunks grow (backward_grid).  Rows up to BWD_MAX_ONE_BLOCK
are [ROWS, BLOCK_D] tiles of BWD_TILE_ELEMS elements (backward_config); longer
rows loop and keep the partials in that buffer instead (read-modify-write of
the program's own slot).  Bytes: read 2 s M D (+ 8 M), write s M D + 8 G chunks D.

Launches run inside ``device_guard`` (the tensor's CUDA device is made current).

Everything also runs under TRITON_INTERPRET=1 on CPU tensors.  The float64
reference is ``lct_kernels.ops.layer_norm.layer_norm_reference``.
"""

import triton
import triton.language as tl

from ._launch import device_guard

MAX_ONE_BLOCK = 16384
LOOP_BLOCK = 4096
TASK_ELEMS = 32768  # backward elements per program (more chunks = more parallelism)
MAX_GRID_Y = 65535  # CUDA's limit on gridDim.y (the backward's chunks)
BWD_TILE_ELEMS = 2048  # backward [ROWS, BLOCK_D] tile: dy, x, xhat, dx live at once
BWD_MAX_ONE_BLOCK = 8192  # longer rows loop in the backward (16384 on 16 warps spilled)


@triton.jit
def _ln_fwd_kernel(
    x_ptr,  # (M, D), column stride 1, row stride stride_x
    y_ptr,  # (M, D) contiguous out
    w_ptr,  # (D,) float32 (if HAS_W)
    b_ptr,  # (D,) float32 (if HAS_B)
    shift_ptr,  # (G, D) float32 (if HAS_MOD)
    scale_ptr,  # (G, D) float32 (if HAS_MOD)
    mean_ptr,  # (M,) float32 out
    rstd_ptr,  # (M,) float32 out
    M,
    D,
    stride_x,
    group_rows,
    eps,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    HAS_MOD: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ONE_BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    if ONE_BLOCK:
        rows = pid * ROWS + tl.arange(0, ROWS).to(tl.int64)
        row_mask = rows < M
        col_mask = cols < D
        mask = row_mask[:, None] & col_mask[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
        x = x.to(tl.float32)
        mean = tl.sum(x, axis=1) / D
        xc = tl.where(mask, x - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / D + eps)
        z = xc * rstd[:, None]
        if HAS_W:
            z = z * tl.load(w_ptr + cols, mask=col_mask, other=0.0)[None, :]
        if HAS_B:
            z = z + tl.load(b_ptr + cols, mask=col_mask, other=0.0)[None, :]
        if HAS_MOD:
            g = rows // group_rows
            off = g[:, None] * D + cols[None, :]
            z = z * (1.0 + tl.load(scale_ptr + off, mask=mask, other=0.0)) + tl.load(
                shift_ptr + off, mask=mask, other=0.0
            )
        tl.store(y_ptr + rows[:, None] * D + cols[None, :], z.to(y_ptr.dtype.element_ty), mask=mask)
        tl.store(mean_ptr + rows, mean, mask=row_mask)
        tl.store(rstd_ptr + rows, rstd, mask=row_mask)
    else:
        row = pid
        x_row = x_ptr + row * stride_x
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for start in range(0, D, BLOCK_D):
            offs = start + cols
            acc += tl.load(x_row + offs, mask=offs < D, other=0.0).to(tl.float32)
        mean = tl.sum(acc, axis=0) / D
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for start in range(0, D, BLOCK_D):
            offs = start + cols
            m = offs < D
            xc = tl.where(m, tl.load(x_row + offs, mask=m, other=0.0).to(tl.float32) - mean, 0.0)
            acc += xc * xc
        rstd = 1.0 / tl.sqrt(tl.sum(acc, axis=0) / D + eps)
        g = row // group_rows
        for start in range(0, D, BLOCK_D):
            offs = start + cols
            m = offs < D
            z = (tl.load(x_row + offs, mask=m, other=0.0).to(tl.float32) - mean) * rstd
            if HAS_W:
                z = z * tl.load(w_ptr + offs, mask=m, other=0.0)
            if HAS_B:
                z = z + tl.load(b_ptr + offs, mask=m, other=0.0)
            if HAS_MOD:
                z = z * (1.0 + tl.load(scale_ptr + g * D + offs, mask=m, other=0.0)) + tl.load(
                    shift_ptr + g * D + offs, mask=m, other=0.0
                )
            tl.store(y_ptr + row * D + offs, z.to(y_ptr.dtype.element_ty), mask=m)
        tl.store(mean_ptr + row, mean)
        tl.store(rstd_ptr + row, rstd)


@triton.jit
def _bwd_tile(dy_row, xy_row, w_ptr, b_ptr, scale_ptr, g, D, offs, m, mean, rstd,
              HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_MOD: tl.constexpr,
              XY_IS_Y: tl.constexpr):
    """One BLOCK_D tile of a long row: (dy, xhat, gain) in float32, zero outside the row."""
    dy = tl.load(dy_row + offs, mask=m, other=0.0).to(tl.float32)
    xy = tl.load(xy_row + offs, mask=m, other=0.0).to(tl.float32)
    if XY_IS_Y:
        if HAS_B:
            xy = xy - tl.load(b_ptr + offs, mask=m, other=0.0)
        xhat = tl.where(m, xy, 0.0)
    else:
        xhat = tl.where(m, (xy - mean) * rstd, 0.0)
    if HAS_W:
        gain = tl.load(w_ptr + offs, mask=m, other=0.0)
    else:
        gain = tl.where(m, 1.0, 0.0)
    if HAS_MOD:
        gain = gain * (1.0 + tl.load(scale_ptr + g * D + offs, mask=m, other=0.0))
    return dy, xhat, gain


@triton.jit
def _ln_bwd_kernel(
    dy_ptr,  # (M, D), column stride 1, row stride stride_dy
    xy_ptr,  # (M, D) x (or y if XY_IS_Y), column stride 1, row stride stride_xy
    mean_ptr,  # (M,) float32
    rstd_ptr,  # (M,) float32
    w_ptr,  # (D,) float32 (if HAS_W)
    b_ptr,  # (D,) float32 (if HAS_B)
    scale_ptr,  # (G, D) float32 (if HAS_MOD)
    dx_ptr,  # (M, D) contiguous out (if NEED_DX)
    part_ptr,  # (G * chunks, 2, D) float32 out: p1, p2 of each program (if NEED_PARTIALS)
    D,
    stride_dy,
    stride_xy,
    group_rows,
    rows_per_chunk,
    chunks,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    HAS_MOD: tl.constexpr,
    XY_IS_Y: tl.constexpr,
    NEED_DX: tl.constexpr,
    NEED_PARTIALS: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ONE_BLOCK: tl.constexpr,
):
    g = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1).to(tl.int64)
    r_begin = g * group_rows + c * rows_per_chunk
    r_end = tl.minimum(g * group_rows + group_rows, r_begin + rows_per_chunk)
    part = part_ptr + (g * chunks + c) * 2 * D
    cols = tl.arange(0, BLOCK_D)
    if ONE_BLOCK:
        col_mask = cols < D
        w = tl.load(w_ptr + cols, mask=col_mask, other=0.0) if HAS_W else tl.full([BLOCK_D], 1.0, tl.float32)
        b = tl.load(b_ptr + cols, mask=col_mask, other=0.0) if HAS_B else tl.zeros([BLOCK_D], tl.float32)
        if HAS_MOD:
            gain = w * (1.0 + tl.load(scale_ptr + g * D + cols, mask=col_mask, other=0.0))
        else:
            gain = w
        p1 = tl.zeros([BLOCK_D], dtype=tl.float32)
        p2 = tl.zeros([BLOCK_D], dtype=tl.float32)
        for r0 in range(r_begin, r_end, ROWS):
            rows = r0 + tl.arange(0, ROWS).to(tl.int64)
            row_mask = rows < r_end
            mask = row_mask[:, None] & col_mask[None, :]
            dy = tl.load(dy_ptr + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0)
            dy = dy.to(tl.float32)
            xy = tl.load(xy_ptr + rows[:, None] * stride_xy + cols[None, :], mask=mask, other=0.0)
            xy = xy.to(tl.float32)
            rstd = tl.load(rstd_ptr + rows, mask=row_mask, other=0.0)
            if XY_IS_Y:
                xhat = tl.where(mask, xy - b[None, :], 0.0)
            else:
                mean = tl.load(mean_ptr + rows, mask=row_mask, other=0.0)
                xhat = tl.where(mask, (xy - mean[:, None]) * rstd[:, None], 0.0)
            if NEED_PARTIALS:
                p1 += tl.sum(dy, axis=0)
                p2 += tl.sum(dy * xhat, axis=0)
            if NEED_DX:
                gz = dy * gain[None, :]
                c1 = tl.sum(gz, axis=1) / D
                c2 = tl.sum(gz * xhat, axis=1) / D
                dx = rstd[:, None] * (gz - c1[:, None] - xhat * c2[:, None])
                tl.store(dx_ptr + rows[:, None] * D + cols[None, :], dx.to(dx_ptr.dtype.element_ty),
                         mask=mask)
        if NEED_PARTIALS:
            tl.store(part + cols, p1, mask=col_mask)
            tl.store(part + D + cols, p2, mask=col_mask)
    else:
        for r in range(r_begin, r_end):
            dy_row = dy_ptr + r * stride_dy
            xy_row = xy_ptr + r * stride_xy
            rstd = tl.load(rstd_ptr + r)
            mean = tl.load(mean_ptr + r)
            acc1 = tl.zeros([BLOCK_D], dtype=tl.float32)
            acc2 = tl.zeros([BLOCK_D], dtype=tl.float32)
            for start in range(0, D, BLOCK_D):
                offs = start + cols
                m = offs < D
                dy, xhat, gain = _bwd_tile(dy_row, xy_row, w_ptr, b_ptr, scale_ptr, g, D, offs, m,
                                           mean, rstd, HAS_W, HAS_B, HAS_MOD, XY_IS_Y)
                gz = dy * gain
                acc1 += gz
                acc2 += gz * xhat
                if NEED_PARTIALS:
                    tl.store(part + offs, tl.load(part + offs, mask=m, other=0.0) + dy, mask=m)
                    tl.store(part + D + offs, tl.load(part + D + offs, mask=m, other=0.0) + dy * xhat,
                             mask=m)
            if NEED_DX:
                c1 = tl.sum(acc1, axis=0) / D
                c2 = tl.sum(acc2, axis=0) / D
                for start in range(0, D, BLOCK_D):
                    offs = start + cols
                    m = offs < D
                    dy, xhat, gain = _bwd_tile(dy_row, xy_row, w_ptr, b_ptr, scale_ptr, g, D, offs,
                                               m, mean, rstd, HAS_W, HAS_B, HAS_MOD, XY_IS_Y)
                    dx = rstd * (dy * gain - c1 - xhat * c2)
                    tl.store(dx_ptr + r * D + offs, dx.to(dx_ptr.dtype.element_ty), mask=m)


def forward_config(D):
    """(ONE_BLOCK, BLOCK_D, ROWS, num_warps) of the forward for rows of D >= 0 elements.

    Rows up to MAX_ONE_BLOCK: [ROWS, BLOCK_D] tiles of about 4096 elements, one
    warp per 1024 of them (at most 16 warps).  Longer rows: one row per program,
    LOOP_BLOCK tiles, 8 warps."""
    if D <= MAX_ONE_BLOCK:
        block = max(16, triton.next_power_of_2(D))
        rows = max(1, min(64, 4096 // block))
        return True, block, rows, max(1, min(16, block * rows // 1024))
    return False, LOOP_BLOCK, 1, 8


def backward_config(D):
    """(ONE_BLOCK, BLOCK_D, ROWS, num_warps) of the backward for rows of D >= 0 elements.

    The backward holds dy, x (or y), xhat and dx of its tile at once, so its
    tiles have BWD_TILE_ELEMS elements (the forward's 4096 made ptxas spill at
    D = 64: 64 x 64 tiles on 4 warps, 255 registers + 470 B), with one warp per
    512 of them (at most 16), and rows longer than BWD_MAX_ONE_BLOCK loop (one
    16384 block on 16 warps spilled 0.5-2 KB).  Resources per configuration:
    docs/gpu_resources.md."""
    if D <= BWD_MAX_ONE_BLOCK:
        block = max(16, triton.next_power_of_2(D))
        rows = max(1, min(64, BWD_TILE_ELEMS // block))
        return True, block, rows, max(1, min(16, block * rows // 512))
    return False, LOOP_BLOCK, 1, 8


def backward_grid(group_rows, D):
    """(chunks, rows_per_chunk) of the backward grid (G, chunks) for groups of group_rows.

    About TASK_ELEMS elements per program, but at most MAX_GRID_Y chunks (read at
    call time): beyond that the chunks grow instead.  Chunk c covers the rows
    [c * rows_per_chunk, min((c + 1) * rows_per_chunk, group_rows)) of its group;
    every chunk is non-empty and together they cover the group exactly once."""
    if group_rows < 1:
        raise ValueError(f"layer_norm backward: group_rows must be >= 1, got {group_rows}")
    rows_per_task = max(1, TASK_ELEMS // max(D, 1))
    chunks = min(max(1, -(-group_rows // rows_per_task)), MAX_GRID_Y)
    rows_per_chunk = -(-group_rows // chunks)
    return -(-group_rows // rows_per_chunk), rows_per_chunk


def layer_norm_forward(x, weight, bias, shift, scale, eps, group_rows):
    """Triton implementation of lct::layer_norm_fwd (see csrc/ops.cpp for the schema)."""
    import torch

    M, D = x.shape
    y = torch.empty((M, D), dtype=x.dtype, device=x.device)
    mean = torch.empty(M, dtype=torch.float32, device=x.device)
    rstd = torch.empty(M, dtype=torch.float32, device=x.device)
    if M == 0:
        return y, mean, rstd
    one_block, block, rows, warps = forward_config(D)
    grid = (triton.cdiv(M, rows) if one_block else M,)
    dummy = mean
    with device_guard(x):
        _ln_fwd_kernel[grid](
            x, y, weight if weight is not None else dummy, bias if bias is not None else dummy,
            shift if shift is not None else dummy, scale if scale is not None else dummy, mean,
            rstd, M, D, x.stride(0), group_rows, float(eps),
            HAS_W=weight is not None, HAS_B=bias is not None, HAS_MOD=shift is not None,
            ROWS=rows, BLOCK_D=block, ONE_BLOCK=one_block, num_warps=warps,
        )
    return y, mean, rstd


def layer_norm_backward(dy, xy, mean, rstd, weight, bias, scale, group_rows, xy_is_y, need_dx,
                        need_partials):
    """Triton implementation of lct::layer_norm_bwd (see csrc/ops.cpp for the schema)."""
    import torch

    M, D = dy.shape
    G = M // group_rows
    dx = torch.empty((M, D) if need_dx else (0,), dtype=dy.dtype, device=dy.device)
    f32 = dict(dtype=torch.float32, device=dy.device)
    if M == 0 or not (need_dx or need_partials):
        return dx, torch.zeros((G if need_partials else 0, D), **f32), torch.zeros(
            (G if need_partials else 0, D), **f32)
    one_block, block, rows, warps = backward_config(D)
    chunks, rows_per_chunk = backward_grid(group_rows, D)
    alloc = torch.zeros if not one_block else torch.empty
    part = alloc((G * chunks if need_partials else 1, 2, D), **f32)
    dummy = rstd
    with device_guard(dy):
        _ln_bwd_kernel[(G, chunks)](
            dy, xy, mean, rstd, weight if weight is not None else dummy,
            bias if bias is not None else dummy, scale if scale is not None else dummy,
            dx if need_dx else dummy, part, D, dy.stride(0), xy.stride(0), group_rows,
            rows_per_chunk, chunks,
            HAS_W=weight is not None, HAS_B=bias is not None, HAS_MOD=scale is not None,
            XY_IS_Y=bool(xy_is_y), NEED_DX=bool(need_dx), NEED_PARTIALS=bool(need_partials),
            ROWS=rows, BLOCK_D=block, ONE_BLOCK=one_block, num_warps=warps,
        )
    if not need_partials:
        empty = torch.zeros((0, D), **f32)
        return dx, empty, empty.clone()
    sums = part.view(G, chunks, 2, D).sum(dim=1)  # chunk order: deterministic
    return dx, sums[:, 0].clone(), sums[:, 1].clone()
