// CUDA kernel of the batched exact assignment (lct::ot_assign): one CTA per
// problem, the threads striding over the M columns.  Same mathematics as the
// CPU solver (csrc/include/lct/lap.h) without the augmenting row reduction, laid
// out for a block of threads (one barrier-separated round per search level):
//
//   staging: when the problem's n x M block fits in shared memory (about 240^2
//         float32 on an H100/H200) and the batch still runs in one wave, it is
//         copied there once and every later read of the cost hits shared
//         memory; otherwise rows stream from L2.
//   init: row minima one warp per row (no block barrier per row).  Square:
//         column minima of c - r by columns in parallel, each column's argmin
//         row claims it with atomicMax, so each row keeps the highest-index
//         column that chose it.  Rectangular: v = 0, each row's first cheapest
//         column, claimed by the lowest row index (atomicMin) -- the result of
//         taking rows in order.
//   per free row: d = c_f - v; rounds of { one block reduction of the key
//         (d_j, assigned_j, j) over unsettled columns gives mu and prefers an
//         unassigned column, which ends the search; otherwise every unsettled
//         column at mu is settled at once (the level), and all threads relax
//         all the level's rows for their own columns: d_k = min(d_k, h), with
//         the predecessor the lowest row index reaching that minimum, so the
//         result does not depend on the order the level list was filled in }.
//         Then v += d - mu on settled columns, and one thread flips the path
//         through the row-to-column map (x, kept in the output buffer).
//   certificate on the device (reduced costs >= -tol; v <= tol and v = 0 on
//         unassigned columns for N < M); status per problem (lct::lap_status);
//         a failed problem returns x = -1 and zero duals.
// The sequential depth is the number of levels (tight edges found in a round
// make one more round at the same mu), not the number of columns scanned: the
// design point for one large problem on one SM.  Many small problems fill the
// GPU one CTA each.  Per-column state lives in global scratch slices (d, y,
// pred, settled, the level list); duals are float64; a round budget bounds
// every search.
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
constexpr int kWarps = kThreads / 32;
constexpr double kInfD = ::cuda::std::numeric_limits<double>::infinity();
constexpr long long kNone = ::cuda::std::numeric_limits<long long>::max();

struct MinIdx {
  double v;
  int64_t i;
};

__device__ __forceinline__ MinIdx better_of(MinIdx a, MinIdx b) {
  return (b.v < a.v || (b.v == a.v && b.i < a.i)) ? b : a;
}

__device__ __forceinline__ MinIdx warp_min_idx(MinIdx m) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    MinIdx other{__shfl_xor_sync(0xffffffffu, m.v, o), __shfl_xor_sync(0xffffffffu, m.i, o)};
    m = better_of(m, other);
  }
  return m;
}

// Block-wide (min value, lowest index at that value); every thread gets it.
__device__ MinIdx block_min_idx(MinIdx m, MinIdx* scratch) {
  m = warp_min_idx(m);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) scratch[warp] = m;
  __syncthreads();
  if (warp == 0) {
    m = lane < kWarps ? scratch[lane] : MinIdx{kInfD, INT64_MAX};
    m = warp_min_idx(m);
    if (lane == 0) scratch[kWarps] = m;
  }
  __syncthreads();
  const MinIdx out = scratch[kWarps];
  __syncthreads();
  return out;
}

__device__ double block_max(double x, MinIdx* scratch) {
  return -block_min_idx(MinIdx{-x, 0}, scratch).v;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    lap_kernel(const T* __restrict__ cost, const int64_t* __restrict__ sizes, int64_t N, int64_t M,
               bool stage, int64_t* __restrict__ x_out, double* __restrict__ u_out,
               double* __restrict__ v_out, int32_t* __restrict__ status_out,
               double* __restrict__ d_ws, int64_t* __restrict__ y_ws, int64_t* __restrict__ pred_ws,
               uint8_t* __restrict__ settled_ws, int64_t* __restrict__ level_row_ws,
               double* __restrict__ level_base_ws) {
  extern __shared__ __align__(16) unsigned char staged_cost[];
  __shared__ MinIdx scratch[kWarps + 1];
  __shared__ int32_t status;
  __shared__ int level_size;
  const int64_t b = blockIdx.x;
  const int64_t n = sizes ? sizes[2 * b] : N, m = sizes ? sizes[2 * b + 1] : M;  // null: unpadded
  double* v = v_out + b * M;
  int64_t* x = x_out + b * N;  // row -> column during the solve (rebuilt from y at the end)
  double* rmin = u_out + b * N;  // row minima during the initialisation
  double* d = d_ws + b * M;
  int64_t* y = y_ws + b * M;
  int64_t* pred = pred_ws + b * M;
  uint8_t* settled = settled_ws + b * M;
  int64_t* level_row = level_row_ws + b * M;
  double* level_base = level_base_ws + b * M;
  const int tid = threadIdx.x, nt = blockDim.x, lane = tid & 31, warp = tid >> 5;
  if (n < 0 || m < 0 || n > N || m > M || n > m) {  // block-uniform: safe before any barrier
    for (int64_t i = tid; i < N; i += nt) x[i] = -1, u_out[b * N + i] = 0.0;
    for (int64_t j = tid; j < M; j += nt) v[j] = 0.0;
    if (tid == 0) status_out[b] = kBadShape;
    return;
  }
  const T* C = cost + b * N * M;
  if (stage) {  // the host enabled this only when n * M elements fit (uniform)
    T* sc = reinterpret_cast<T*>(staged_cost);
    for (int64_t e = tid; e < n * M; e += nt) sc[e] = C[e];
    __syncthreads();
    C = sc;
  }
  auto c = [&](int64_t i, int64_t j) { return static_cast<double>(C[i * M + j]); };

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
  for (int64_t i = tid; i < N; i += nt) x[i] = -1;
  __syncthreads();

  // ---- initialisation ----
  if (status == kOk) {
    double infeasible = 0.0;
    for (int64_t i = warp; i < n; i += kWarps) {  // row minima (first column at the minimum)
      MinIdx r{kInfD, INT64_MAX};
      for (int64_t j = lane; j < m; j += 32) r = better_of(r, MinIdx{c(i, j), j});
      r = warp_min_idx(r);
      if (lane == 0) {
        rmin[i] = r.v;
        pred[i] = r.i;  // pred doubles as each row's first cheapest column (n <= m)
      }
      if (r.v == kInfD) infeasible = 1.0;
    }
    __syncthreads();
    if (n == m) {
      for (int64_t j = tid; j < m; j += nt) {  // column minima of c - r, first row
        double best = kInfD;
        int64_t arg = -1;
        if (infeasible == 0.0)
          for (int64_t i = 0; i < n; ++i) {
            const double rc = c(i, j) - rmin[i];
            if (rc < best) best = rc, arg = i;
          }
        if (arg < 0) infeasible = 1.0;
        v[j] = arg < 0 ? 0.0 : best;
        d[j] = static_cast<double>(arg);  // d doubles as the argmin row until the search
      }
    } else {
      for (int64_t j = tid; j < m; j += nt) y[j] = kNone;
    }
    infeasible = block_max(infeasible, scratch);  // also the barrier before the claims
    if (infeasible != 0.0) {
      if (tid == 0) status = kInfeasible;
    } else if (n == m) {
      for (int64_t j = tid; j < m; j += nt)
        atomicMax(reinterpret_cast<long long*>(&x[static_cast<int64_t>(d[j])]),
                  static_cast<long long>(j));
      __syncthreads();
      for (int64_t j = tid; j < m; j += nt) {
        const int64_t i = static_cast<int64_t>(d[j]);
        if (x[i] == j) y[j] = i;
      }
    } else {
      for (int64_t i = tid; i < n; i += nt)
        atomicMin(reinterpret_cast<long long*>(&y[pred[i]]), static_cast<long long>(i));
      __syncthreads();
      for (int64_t j = tid; j < m; j += nt) {
        if (y[j] == kNone) y[j] = -1;
        else x[y[j]] = j;
      }
    }
    __syncthreads();
  }

  // ---- shortest augmenting paths, one round per level ----
  int64_t budget = 4 * n * (m + 2) + 64;  // every round settles >= 1 column
  for (int64_t f = 0; f < n; ++f) {
    if (status != kOk) break;
    if (x[f] >= 0) continue;  // written before a barrier: uniform
    for (int64_t j = tid; j < m; j += nt) d[j] = c(f, j) - v[j], pred[j] = f, settled[j] = 0;
    __syncthreads();
    int64_t end = -1;
    double mu = 0.0;
    for (;;) {
      // (d_j, then unassigned before assigned, then lowest j) over unsettled columns
      MinIdx key{kInfD, INT64_MAX};
      for (int64_t j = tid; j < m; j += nt)
        if (!settled[j]) key = better_of(key, MinIdx{d[j], (y[j] >= 0 ? m : 0) + j});
      key = block_min_idx(key, scratch);
      mu = key.v;
      if (--budget < 0) {  // identical on every thread
        if (tid == 0) status = kIterationLimit;
        break;
      }
      if (mu == kInfD) {
        if (tid == 0) status = kInfeasible;
        break;
      }
      if (key.i < m) {  // an unassigned column at mu: the path ends there
        end = key.i;
        break;
      }
      if (tid == 0) level_size = 0;
      __syncthreads();
      for (int64_t j = tid; j < m; j += nt)
        if (!settled[j] && d[j] == mu) {  // the level: all assigned (see the key)
          settled[j] = 1;
          const int t = atomicAdd(&level_size, 1);
          const int64_t i = y[j];
          level_row[t] = i;
          level_base[t] = c(i, j) - v[j] - mu;
        }
      __syncthreads();
      const int size = level_size;
      for (int64_t k = tid; k < m; k += nt) {
        if (settled[k]) continue;
        double best = kInfD;
        int64_t best_row = INT64_MAX;
        const double vk = v[k];
        for (int t = 0; t < size; ++t) {
          const int64_t i = level_row[t];
          const double h = c(i, k) - vk - level_base[t];
          if (h < best || (h == best && i < best_row)) best = h, best_row = i;
        }
        if (best < d[k]) d[k] = best, pred[k] = best_row;
      }
      __syncthreads();
    }
    __syncthreads();
    if (status != kOk) break;
    for (int64_t j = tid; j < m; j += nt)
      if (settled[j]) v[j] += d[j] - mu;
    if (tid == 0) {  // flip the path through the row -> column map
      for (int64_t j = end;;) {
        const int64_t i = pred[j];
        const int64_t prev = x[i];
        y[j] = i;
        x[i] = j;
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
  for (int64_t i = tid; i < N; i += nt) x[i] = -1, u_out[b * N + i] = 0.0;
  __syncthreads();
  if (status == kOk)
    for (int64_t j = tid; j < m; j += nt)
      if (y[j] >= 0) x[y[j]] = j;
  __syncthreads();
  if (status == kOk)
    for (int64_t i = tid; i < n; i += nt) u_out[b * N + i] = c(i, x[i]) - v[x[i]];
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
    for (int64_t i = tid; i < n; i += nt) x[i] = -1, u_out[b * N + i] = 0.0;
  }
  if (tid == 0) status_out[b] = final_status;
}

// Dynamic shared memory for staging one problem's cost, or 0 to read the cost
// from global memory through L2: when it does not fit, or when staging the whole
// batch would need more shared memory than all SMs hold at once (staging lowers
// the CTAs per SM, so it must not turn one wave of problems into several; this
// rule is a design choice, not yet measured).
template <typename T>
size_t staging_bytes(int64_t B, int64_t N, int64_t M) {
  int device = 0, optin = 0, sms = 0;
  cudaFuncAttributes fa{};
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess ||
      cudaFuncGetAttributes(&fa, lap_kernel<T>) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  const size_t room = static_cast<size_t>(optin) - fa.sharedSizeBytes;  // static shared memory, measured
  const size_t bytes = static_cast<size_t>(N) * static_cast<size_t>(M) * sizeof(T);
  if (N == 0 || bytes > room) return 0;
  if (static_cast<double>(B) * bytes > static_cast<double>(sms) * room) return 0;
  // The default dynamic limit is 48 KB minus the static part; raise it once, to the
  // maximum (never lowered, so concurrent callers cannot shrink it under a launch).
  if (bytes > static_cast<size_t>(fa.maxDynamicSharedSizeBytes) &&
      cudaFuncSetAttribute(lap_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                           static_cast<int>(room)) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return bytes;
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
  TORCH_CHECK(M < (int64_t(1) << 31), "lct: ot_assign supports fewer than 2^31 columns");
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
  at::Tensor level_row = at::empty({B, M}, opts.dtype(at::kLong));
  at::Tensor level_base = at::empty({B, M}, opts.dtype(at::kDouble));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(cost.device().index());
  TORCH_CHECK(B <= 0x7fffffff, "lct: too many problems for one launch");
  AT_DISPATCH_FLOATING_TYPES(cost.scalar_type(), "ot_assign_cuda", [&] {
    const size_t smem = staging_bytes<scalar_t>(B, N, M);
    lap_kernel<scalar_t><<<static_cast<unsigned>(B), kThreads, smem, stream>>>(
        cost.const_data_ptr<scalar_t>(), sz.defined() ? sz.const_data_ptr<int64_t>() : nullptr, N, M,
        smem > 0, x.mutable_data_ptr<int64_t>(), u.mutable_data_ptr<double>(),
        v.mutable_data_ptr<double>(), status.mutable_data_ptr<int32_t>(),
        d.mutable_data_ptr<double>(), y.mutable_data_ptr<int64_t>(),
        pred.mutable_data_ptr<int64_t>(), settled.mutable_data_ptr<uint8_t>(),
        level_row.mutable_data_ptr<int64_t>(), level_base.mutable_data_ptr<double>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {x, u, v, status};
}

}  // namespace

TORCH_LIBRARY_IMPL(lct, CUDA, m) { m.impl("ot_assign", &ot_assign_cuda); }

}  // namespace lct::cuda
