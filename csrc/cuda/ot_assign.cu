// CUDA kernel of the batched exact assignment (lct::ot_assign): one CTA per
// problem, the threads striding over the M columns.  Same mathematics as the
// CPU solver (csrc/include/lct/lap.h) without the augmenting row reduction, and
// the same level structure as the Triton kernel (lct_kernels/triton/ot_assign.py):
//
//   init: square -> row minima and column reduction (each row takes the
//         highest-index column that chose it); rectangular -> v = 0 and rows take
//         their cheapest free column in order.
//   per free row: d = c_f - v; repeat { mu = block-min of d over unreached
//         columns; an unassigned column at mu ends the search; else settle the
//         lowest-index column at mu and relax the row matched to it (one row
//         read through L1/L2) }; then v += d - mu on settled columns; flip the path.
//   certificate on the device (reduced costs >= -tol; v <= tol and v = 0 on
//         unassigned columns for N < M); status per problem (lct::lap_status).
// Per-column state lives in global scratch slices (d, y, pred, settled); duals
// are float64.  Every step settles a column, and a step budget bounds the loop.
// Batches of many small problems fill the GPU (one CTA each); one large problem
// runs on one SM: the sequential chain of levels, not bandwidth, is the limit.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda/std/limits>

#include "lct/lap_status.h"

namespace lct::cuda {
namespace {

using namespace lct::lap_status;
constexpr int kThreads = 256;
constexpr double kInfD = ::cuda::std::numeric_limits<double>::infinity();

struct MinIdx {
  double v;
  int64_t i;
};

__device__ __forceinline__ MinIdx better_of(MinIdx a, MinIdx b) {
  return (b.v < a.v || (b.v == a.v && b.i < a.i)) ? b : a;
}

// Block-wide (min value, lowest index at that value); every thread gets it.
__device__ MinIdx block_min_idx(MinIdx m, MinIdx* scratch) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    MinIdx other{__shfl_xor_sync(0xffffffffu, m.v, o), __shfl_xor_sync(0xffffffffu, m.i, o)};
    m = better_of(m, other);
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) scratch[warp] = m;
  __syncthreads();
  if (warp == 0) {
    m = lane < (blockDim.x >> 5) ? scratch[lane] : MinIdx{kInfD, INT64_MAX};
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      MinIdx other{__shfl_xor_sync(0xffffffffu, m.v, o), __shfl_xor_sync(0xffffffffu, m.i, o)};
      m = better_of(m, other);
    }
    if (lane == 0) scratch[0] = m;
  }
  __syncthreads();
  const MinIdx out = scratch[0];
  __syncthreads();
  return out;
}

__device__ double block_max(double x, MinIdx* scratch) {
  return -block_min_idx(MinIdx{-x, 0}, scratch).v;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    lap_kernel(const T* __restrict__ cost, const int64_t* __restrict__ sizes, int64_t N, int64_t M,
               int64_t* __restrict__ x_out, double* __restrict__ u_out, double* __restrict__ v_out,
               int32_t* __restrict__ status_out, double* __restrict__ d_ws, int64_t* __restrict__ y_ws,
               int64_t* __restrict__ pred_ws, uint8_t* __restrict__ settled_ws) {
  __shared__ MinIdx scratch[32];
  __shared__ int32_t status;
  const int64_t b = blockIdx.x;
  const int64_t n = sizes ? sizes[2 * b] : N, m = sizes ? sizes[2 * b + 1] : M;  // null: unpadded
  const T* C = cost + b * N * M;
  double* v = v_out + b * M;
  double* d = d_ws + b * M;
  int64_t* y = y_ws + b * M;
  int64_t* pred = pred_ws + b * M;
  uint8_t* settled = settled_ws + b * M;
  const int tid = threadIdx.x, nt = blockDim.x;
  auto c = [&](int64_t i, int64_t j) { return static_cast<double>(C[i * M + j]); };
  if (n < 0 || m < 0 || n > N || m > M || n > m) {  // block-uniform: safe before any barrier
    for (int64_t i = tid; i < N; i += nt) x_out[b * N + i] = -1, u_out[b * N + i] = 0.0;
    for (int64_t j = tid; j < M; j += nt) v[j] = 0.0;
    if (tid == 0) status_out[b] = kBadShape;
    return;
  }

  // ---- validation ----
  double scale = 0.0;
  double flags = 0.0;  // 2: NaN, 1: -inf (max over threads: NaN wins, as on CPU/Triton)
  for (int64_t e = tid; e < n * m; e += nt) {
    const double ce = c(e / m, e % m);
    if (ce != ce) flags = 2.0;
    else if (ce == -kInfD) flags = fmax(flags, 1.0);
    else if (ce != kInfD) scale = fmax(scale, fabs(ce));
  }
  scale = block_max(scale, scratch);
  flags = block_max(flags, scratch);
  if (tid == 0) status = flags == 2.0 ? kNaN : flags == 1.0 ? kNegInf : kOk;
  for (int64_t j = tid; j < M; j += nt) v[j] = 0.0, y[j] = -1;
  __syncthreads();

  // ---- initialisation ----
  if (status == kOk && n == m) {
    for (int64_t j = tid; j < m; j += nt) d[j] = kInfD, pred[j] = -1;  // column min / argrow
    __syncthreads();
    for (int64_t i = 0; i < n; ++i) {
      MinIdx r{kInfD, 0};
      for (int64_t j = tid; j < m; j += nt) r = better_of(r, MinIdx{c(i, j), j});
      r = block_min_idx(r, scratch);
      if (r.v == kInfD) {
        if (tid == 0) status = kInfeasible;
      }
      for (int64_t j = tid; j < m; j += nt) {
        const double rc = c(i, j) - r.v;
        if (rc < d[j]) d[j] = rc, pred[j] = i;
      }
    }
    __syncthreads();
    for (int64_t j = tid; j < m; j += nt) {
      if (pred[j] < 0) status = kInfeasible;
      v[j] = d[j];
    }
    __syncthreads();
    // Row i takes the highest-index column that chose it.
    for (int64_t j = tid; j < m; j += nt) {
      bool highest = pred[j] >= 0;
      for (int64_t k = j + 1; k < m && highest; ++k) highest = pred[k] != pred[j];
      if (highest) y[j] = pred[j];
    }
    __syncthreads();
  } else if (status == kOk) {
    for (int64_t i = 0; i < n; ++i) {
      MinIdx r{kInfD, INT64_MAX};
      for (int64_t j = tid; j < m; j += nt) r = better_of(r, MinIdx{c(i, j), j});
      r = block_min_idx(r, scratch);
      if (tid == 0) {
        if (r.v == kInfD) status = kInfeasible;
        else if (y[r.i] < 0) y[r.i] = i;
      }
      __syncthreads();
    }
  }

  // ---- shortest augmenting paths ----
  int64_t budget = 4 * n * (m + 2) + 64;
  for (int64_t f = 0; f < n && status == kOk; ++f) {
    // is row f assigned?  (block-wide "any")
    MinIdx held{kInfD, INT64_MAX};
    for (int64_t j = tid; j < m; j += nt)
      if (y[j] == f) held = better_of(held, MinIdx{0.0, j});
    held = block_min_idx(held, scratch);
    if (held.v == 0.0) continue;
    for (int64_t j = tid; j < m; j += nt) d[j] = c(f, j) - v[j], pred[j] = f, settled[j] = 0;
    __syncthreads();
    int64_t end = -1;
    double mu = 0.0;
    while (end < 0) {
      if (--budget < 0) {
        if (tid == 0) status = kIterationLimit;
        break;
      }
      MinIdx lvl{kInfD, INT64_MAX}, free_hit{kInfD, INT64_MAX};
      for (int64_t j = tid; j < m; j += nt)
        if (!settled[j]) lvl = better_of(lvl, MinIdx{d[j], j});
      lvl = block_min_idx(lvl, scratch);
      mu = lvl.v;
      if (mu == kInfD) {
        if (tid == 0) status = kInfeasible;
        break;
      }
      for (int64_t j = tid; j < m; j += nt)
        if (!settled[j] && d[j] == mu && y[j] < 0) free_hit = better_of(free_hit, MinIdx{0.0, j});
      free_hit = block_min_idx(free_hit, scratch);
      if (free_hit.v == 0.0) {
        end = free_hit.i;
        break;
      }
      const int64_t j = lvl.i;  // settle the lowest-index column at mu
      const int64_t i = y[j];
      const double base = c(i, j) - v[j] - mu;
      __syncthreads();
      if (tid == 0) settled[j] = 1;
      __syncthreads();
      for (int64_t k = tid; k < m; k += nt) {
        if (settled[k]) continue;
        const double h = c(i, k) - v[k] - base;
        if (h < d[k]) d[k] = h, pred[k] = i;
      }
      __syncthreads();
    }
    __syncthreads();
    if (status != kOk) break;
    for (int64_t j = tid; j < m; j += nt)
      if (settled[j]) v[j] += d[j] - mu;
    __syncthreads();
    if (tid == 0) {  // flip the path (sequential, short)
      for (int64_t j = end;;) {
        const int64_t i = pred[j];
        int64_t prev = -1;
        for (int64_t k = 0; k < m; ++k)
          if (y[k] == i) prev = k;
        y[j] = i;
        if (prev >= 0 && prev != j && y[prev] == i) y[prev] = -1;
        if (i == f) break;
        j = prev;
      }
    }
    __syncthreads();
  }
  __syncthreads();

  // ---- certificate and outputs ----
  double vmax = 0.0;
  for (int64_t j = tid; j < m; j += nt) vmax = fmax(vmax, fabs(v[j]));
  vmax = block_max(vmax, scratch);
  const double tol = 1e-9 * (scale + vmax) + 1e-300;
  for (int64_t i = tid; i < N; i += nt) x_out[b * N + i] = -1, u_out[b * N + i] = 0.0;
  __syncthreads();
  if (status == kOk)
    for (int64_t j = tid; j < m; j += nt)
      if (y[j] >= 0) x_out[b * N + y[j]] = j;
  __syncthreads();
  if (status == kOk)
    for (int64_t i = tid; i < n; i += nt) u_out[b * N + i] = c(i, x_out[b * N + i]) - v[x_out[b * N + i]];
  __syncthreads();
  double worst = 0.0;  // largest violation
  if (status == kOk) {
    for (int64_t e = tid; e < n * m; e += nt) {
      const int64_t i = e / m, j = e % m;
      const double ce = c(i, j);
      if (ce != kInfD) worst = fmax(worst, -(ce - u_out[b * N + i] - v[j]));
    }
    if (n < m)
      for (int64_t j = tid; j < m; j += nt) {
        if (v[j] > tol) worst = fmax(worst, 2 * tol + 1.0);
        if (y[j] < 0 && v[j] != 0.0) worst = fmax(worst, 2 * tol + 1.0);
      }
  }
  worst = block_max(worst, scratch);
  const int32_t final_status = (status == kOk && worst > tol) ? kCertificateFailed : status;
  if (final_status != kOk) {  // uniform; outputs of a failed problem are x = -1, u = v = 0
    for (int64_t j = tid; j < m; j += nt) v[j] = 0.0;
    for (int64_t i = tid; i < n; i += nt) x_out[b * N + i] = -1, u_out[b * N + i] = 0.0;
  }
  if (tid == 0) status_out[b] = final_status;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ot_assign_cuda(
    const at::Tensor& cost, const std::optional<at::Tensor>& sizes) {
  TORCH_CHECK(cost.is_cuda() && cost.dim() == 3 && cost.is_contiguous(),
              "lct: cost must be a contiguous (B, N, M) CUDA tensor");
  TORCH_CHECK(cost.scalar_type() == at::kFloat || cost.scalar_type() == at::kDouble,
              "lct: cost must be float32 or float64");
  c10::cuda::CUDAGuard guard(cost.device());
  const int64_t B = cost.size(0), N = cost.size(1), M = cost.size(2);
  TORCH_CHECK(N <= M, "lct: ot_assign needs N <= M (rows <= columns)");
  const auto opts = cost.options();
  at::Tensor sz;  // undefined for an unpadded batch: the kernel then uses (N, M)
  if (sizes.has_value()) {
    TORCH_CHECK(sizes->dim() == 2 && sizes->size(0) == B && sizes->size(1) == 2 &&
                    sizes->scalar_type() == at::kLong,
                "lct: sizes must be an int64 (B, 2) tensor of (rows, columns)");
    sz = sizes->to(cost.device()).contiguous();
  }
  at::Tensor x = at::empty({B, N}, opts.dtype(at::kLong));
  at::Tensor u = at::empty({B, N}, opts.dtype(at::kDouble));
  at::Tensor v = at::zeros({B, M}, opts.dtype(at::kDouble));
  at::Tensor status = at::empty({B}, opts.dtype(at::kInt));
  if (B == 0) return {x, u, v, status};
  at::Tensor d = at::empty({B, M}, opts.dtype(at::kDouble));
  at::Tensor y = at::empty({B, M}, opts.dtype(at::kLong));
  at::Tensor pred = at::empty({B, M}, opts.dtype(at::kLong));
  at::Tensor settled = at::empty({B, M}, opts.dtype(at::kByte));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(cost.device().index());
  TORCH_CHECK(B <= 0x7fffffff, "lct: too many problems for one launch");
  AT_DISPATCH_FLOATING_TYPES(cost.scalar_type(), "ot_assign_cuda", [&] {
    lap_kernel<scalar_t><<<static_cast<unsigned>(B), kThreads, 0, stream>>>(
        cost.const_data_ptr<scalar_t>(), sz.defined() ? sz.const_data_ptr<int64_t>() : nullptr, N, M,
        x.mutable_data_ptr<int64_t>(), u.mutable_data_ptr<double>(), v.mutable_data_ptr<double>(),
        status.mutable_data_ptr<int32_t>(), d.mutable_data_ptr<double>(),
        y.mutable_data_ptr<int64_t>(), pred.mutable_data_ptr<int64_t>(),
        settled.mutable_data_ptr<uint8_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {x, u, v, status};
}

}  // namespace

TORCH_LIBRARY_IMPL(lct, CUDA, m) { m.impl("ot_assign", &ot_assign_cuda); }

}  // namespace lct::cuda
