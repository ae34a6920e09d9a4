// CUDA kernels of the layer norm family (lct::layer_norm_fwd / lct::layer_norm_bwd):
// NsLN, general LayerNorm and the fused NsLN + adaLN modulate.  Formulas: csrc/ops.cpp.
//
// Forward
//   * rows of up to 32 x kWarpItems packs (1024 fp32 / 2048 bf16 elements): one warp
//     per row, several rows per block (the qk-norm case is millions of rows of
//     D = 64); the row stays in registers: one read of x, warp-shuffle fp32
//     mean and centred variance, one write of y.
//   * longer rows: one block per row, three passes over the row (mean, centred
//     variance, write); the re-reads of a row hit L1/L2.  No cap on D.
//   Bytes: read s M D, write s M D + 8 M.
// Backward
//   grid = (groups, chunks); each block owns a fixed chunk of one group's rows
//   (about kTaskElems elements; at most 65535 chunks per group, longer chunks
//   past that), writes their dx and accumulates fp32 partials p1 = sum dy,
//   p2 = sum dy xhat (per lane in registers for warp rows, reduced across warps
//   in a fixed order; in the block's own slot of the global partial buffer for
//   long rows).  Warp rows of 1025-2048 bf16/fp16 elements are served by two
//   warps each (register pressure: two blocks per SM).  A final kernel adds the
//   chunks in order: deterministic, no atomics.  D = 0 launches nothing.
//   Bytes: read 2 s M D (+ 8 M), write s M D + 8 G chunks D.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <utility>

#include "lct/dispatch.h"
#include "lct/layer_norm.h"
#include "row_kernels.cuh"

namespace lct::cuda {
namespace {

constexpr int kWarpItems = 8;       // packs per lane for warp-per-row rows
constexpr int kWarpsPerBlock = 8;   // rows per block (forward) / warps per block (backward)
constexpr int64_t kTaskElems = 32768;  // backward elements per block

struct LnParams {
  const float* weight;  // nullable
  const float* bias;    // nullable
  const float* shift;   // (G, D) nullable
  const float* scale;   // (G, D) nullable
};

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float param(const float* p, int64_t j, float neutral) {
  return p == nullptr ? neutral : p[j];
}

// ---------------------------------------------------------------- forward --
template <typename T, int VEC, int ITEMS>
__global__ void ln_fwd_warp_kernel(const T* __restrict__ x, T* __restrict__ y, LnParams prm,
                                   float* __restrict__ mean_out, float* __restrict__ rstd_out,
                                   int64_t M, int64_t D, int64_t stride_x, int64_t group_rows,
                                   float eps) {
  const int64_t row = int64_t(blockIdx.x) * blockDim.y + threadIdx.y;
  if (row >= M) return;
  const int lane = threadIdx.x;
  const int64_t n_packs = D / VEC;
  const T* xi = x + row * stride_x;
  float v[ITEMS][VEC];
  float sum = 0.f;
#pragma unroll
  for (int k = 0; k < ITEMS; ++k) {
    const int64_t pk = lane + int64_t(k) * 32;
    if (pk < n_packs) {
      load_pack<T, VEC>(xi, pk, v[k]);
    } else {
#pragma unroll
      for (int i = 0; i < VEC; ++i) v[k][i] = 0.f;
    }
#pragma unroll
    for (int i = 0; i < VEC; ++i) sum += v[k][i];
  }
  const float mean = warp_sum(sum) / static_cast<float>(D);
  float sq = 0.f;
#pragma unroll
  for (int k = 0; k < ITEMS; ++k) {
    const int64_t pk = lane + int64_t(k) * 32;
    if (pk < n_packs) {
#pragma unroll
      for (int i = 0; i < VEC; ++i) sq += (v[k][i] - mean) * (v[k][i] - mean);
    }
  }
  const float rstd = rsqrtf(warp_sum(sq) / static_cast<float>(D) + eps);
  if (lane == 0) {
    mean_out[row] = mean;
    rstd_out[row] = rstd;
  }
  const int64_t g = row / group_rows;
#pragma unroll
  for (int k = 0; k < ITEMS; ++k) {
    const int64_t pk = lane + int64_t(k) * 32;
    if (pk >= n_packs) break;
    float out[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      const int64_t j = pk * VEC + i;
      float z = (v[k][i] - mean) * rstd * param(prm.weight, j, 1.f) + param(prm.bias, j, 0.f);
      if (prm.scale != nullptr) z = z * (1.f + prm.scale[g * D + j]) + prm.shift[g * D + j];
      out[i] = z;
    }
    store_pack<T, VEC>(y + row * D, pk, out);
  }
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kMaxThreads)
    ln_fwd_block_kernel(const T* __restrict__ x, T* __restrict__ y, LnParams prm,
                        float* __restrict__ mean_out, float* __restrict__ rstd_out, int64_t D,
                        int64_t stride_x, int64_t group_rows, float eps) {
  __shared__ float scratch[32];
  const int64_t row = blockIdx.x;
  const int64_t n_packs = D / VEC;
  const T* xi = x + row * stride_x;
  float sum = 0.f;
  for (int64_t pk = threadIdx.x; pk < n_packs; pk += blockDim.x) {
    float v[VEC];
    load_pack<T, VEC>(xi, pk, v);
#pragma unroll
    for (int i = 0; i < VEC; ++i) sum += v[i];
  }
  const float mean = block_sum(sum, scratch) / static_cast<float>(D);
  float sq = 0.f;
  for (int64_t pk = threadIdx.x; pk < n_packs; pk += blockDim.x) {
    float v[VEC];
    load_pack<T, VEC>(xi, pk, v);
#pragma unroll
    for (int i = 0; i < VEC; ++i) sq += (v[i] - mean) * (v[i] - mean);
  }
  const float rstd = rsqrtf(block_sum(sq, scratch) / static_cast<float>(D) + eps);
  if (threadIdx.x == 0) {
    mean_out[row] = mean;
    rstd_out[row] = rstd;
  }
  const int64_t g = row / group_rows;
  for (int64_t pk = threadIdx.x; pk < n_packs; pk += blockDim.x) {
    float v[VEC];
    load_pack<T, VEC>(xi, pk, v);
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      const int64_t j = pk * VEC + i;
      float z = (v[i] - mean) * rstd * param(prm.weight, j, 1.f) + param(prm.bias, j, 0.f);
      if (prm.scale != nullptr) z = z * (1.f + prm.scale[g * D + j]) + prm.shift[g * D + j];
      v[i] = z;
    }
    store_pack<T, VEC>(y + row * D, pk, v);
  }
}

// --------------------------------------------------------------- backward --
struct LnBwdArgs {
  const float* mean;
  const float* rstd;
  const float* weight;  // nullable
  const float* bias;    // nullable
  const float* scale;   // (G, D) nullable
  int64_t D, stride_dy, stride_xy, group_rows, rows_per_chunk, chunks;
  bool xy_is_y;
  float* part;  // (G * chunks, 2, D) or nullptr
};

// dxhat = dy * gain(j); xhat = (x - mean) * rstd - bsub(j) (bsub: the bias, when rebuilding from y).
__device__ __forceinline__ float ln_gain(const LnBwdArgs& a, int64_t g, int64_t j) {
  return (a.scale != nullptr ? 1.f + a.scale[g * a.D + j] : 1.f) * param(a.weight, j, 1.f);
}
__device__ __forceinline__ float ln_bsub(const LnBwdArgs& a, int64_t j) {
  return a.xy_is_y ? param(a.bias, j, 0.f) : 0.f;
}

// Warp rows.  SPLIT warps share a row: warp w serves row slot w / SPLIT and packs
// lane + (k SPLIT + w % SPLIT) 32, k < ITEMS (interleaved, so a ragged last slice is
// spread over all SPLIT warps), so each lane holds 2 ITEMS VEC fp32 partials.  SPLIT = 2
// for rows of more than 32 x 4 packs of 16 bytes: 64 partials per lane instead of 128,
// so that (with __launch_bounds__(256, 2)) two 8-warp blocks fit per SM without spills
// (one row per warp needed 206 registers: one block per SM).  The SPLIT warps of a
// row add their row sums through shared memory, in warp order.
// The block walks its chunk in steps of kWarpsPerBlock / SPLIT rows; every warp makes
// the same number of steps (a slot past the chunk's end computes nothing), so the
// block-wide barrier of that exchange is reached by all threads.
// Blocks per SM asked of the register allocator: by the partials each lane holds
// (2 ITEMS VEC floats), so that they stay in registers.
constexpr int bwd_min_blocks(int lane_elems) { return lane_elems > 16 ? 2 : lane_elems > 8 ? 3 : 4; }

template <typename T, int VEC, int ITEMS, int SPLIT>
__global__ void __launch_bounds__(32 * kWarpsPerBlock, bwd_min_blocks(ITEMS * VEC))
    ln_bwd_warp_kernel(const T* __restrict__ dy, const T* __restrict__ xy, T* __restrict__ dx,
                       LnBwdArgs a) {
  static_assert(kWarpsPerBlock % SPLIT == 0, "SPLIT must divide the warps of a block");
  constexpr int kSlots = kWarpsPerBlock / SPLIT;  // rows per step
  __shared__ float red[kWarpsPerBlock][2][32 * VEC];  // per-warp partials, one pack per lane
  __shared__ float rowsum[2][kWarpsPerBlock][2];      // [step parity][warp][s1, s2]
  const int64_t g = blockIdx.x, c = blockIdx.y;
  const int lane = threadIdx.x, warp = threadIdx.y;
  const int slot = warp / SPLIT, slice = warp % SPLIT;
  const int64_t D = a.D, n_packs = D / VEC;
  const int64_t r_begin = g * a.group_rows + c * a.rows_per_chunk;
  const int64_t r_end = min(g * a.group_rows + a.group_rows, r_begin + a.rows_per_chunk);
  const int64_t steps = r_end > r_begin ? (r_end - r_begin + kSlots - 1) / kSlots : 0;
  // Column factors are re-read from L1 when used (registers are kept for the partials).
  auto gain = [&](int64_t j) { return ln_gain(a, g, j); };
  auto bsub = [&](int64_t j) { return ln_bsub(a, j); };
  auto pack_of = [&](int k) { return lane + (int64_t(k) * SPLIT + slice) * 32; };
  float p1[ITEMS][VEC], p2[ITEMS][VEC];
#pragma unroll
  for (int k = 0; k < ITEMS; ++k)
#pragma unroll
    for (int i = 0; i < VEC; ++i) p1[k][i] = p2[k][i] = 0.f;

  for (int64_t step = 0; step < steps; ++step) {
    const int64_t r = r_begin + step * kSlots + slot;
    const bool active = r < r_end;
    const float mu = (a.xy_is_y || !active) ? 0.f : a.mean[r];
    const float rs = active ? a.rstd[r] : 0.f;
    const float xs = a.xy_is_y ? 1.f : rs;
    const T* dyr = dy + r * a.stride_dy;
    const T* xyr = xy + r * a.stride_xy;
    float s1 = 0.f, s2 = 0.f;
    if (active) {
#pragma unroll
      for (int k = 0; k < ITEMS; ++k) {
        const int64_t pk = pack_of(k);
        if (pk >= n_packs) break;
        float d[VEC], xv[VEC];
        load_pack<T, VEC>(dyr, pk, d);
        load_pack<T, VEC>(xyr, pk, xv);
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          const int64_t j = pk * VEC + i;
          const float xh = (xv[i] - mu) * xs - bsub(j);
          const float gz = d[i] * gain(j);
          s1 += gz;
          s2 += gz * xh;
          p1[k][i] += d[i];
          p2[k][i] += d[i] * xh;
        }
      }
    }
    if (dx == nullptr) continue;  // uniform across the block
    s1 = warp_sum(s1);
    s2 = warp_sum(s2);
    if constexpr (SPLIT > 1) {
      // Double-buffered by step parity: one barrier per step suffices, since a buffer
      // is rewritten only after every thread has passed the next step's barrier.
      float(&rsum)[kWarpsPerBlock][2] = rowsum[step & 1];
      if (lane == 0) {
        rsum[warp][0] = s1;
        rsum[warp][1] = s2;
      }
      __syncthreads();
      s1 = s2 = 0.f;
#pragma unroll
      for (int h = 0; h < SPLIT; ++h) {
        s1 += rsum[slot * SPLIT + h][0];
        s2 += rsum[slot * SPLIT + h][1];
      }
    }
    if (!active) continue;
    const float c1 = s1 / static_cast<float>(D), c2 = s2 / static_cast<float>(D);
#pragma unroll
    for (int k = 0; k < ITEMS; ++k) {  // second pass: the row was just read (L1)
      const int64_t pk = pack_of(k);
      if (pk >= n_packs) break;
      float d[VEC], xv[VEC];
      load_pack<T, VEC>(dyr, pk, d);
      load_pack<T, VEC>(xyr, pk, xv);
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        const int64_t j = pk * VEC + i;
        const float xh = (xv[i] - mu) * xs - bsub(j);
        xv[i] = rs * (d[i] * gain(j) - c1 - xh * c2);
      }
      store_pack<T, VEC>(dx + r * D, pk, xv);
    }
  }
  if (a.part == nullptr) return;
  // Add the partials of the warps serving the same slice, in slot order (deterministic),
  // 32 x SPLIT packs at a time.
  float* part = a.part + (g * a.chunks + c) * 2 * D;
#pragma unroll
  for (int k = 0; k < ITEMS; ++k) {
    if (int64_t(k) * SPLIT * 32 >= n_packs) break;  // uniform across the block
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      red[warp][0][lane * VEC + i] = p1[k][i];
      red[warp][1][lane * VEC + i] = p2[k][i];
    }
    __syncthreads();
    for (int t = warp * 32 + lane; t < SPLIT * 2 * 32 * VEC; t += kWarpsPerBlock * 32) {
      const int h = t / (2 * 32 * VEC), which = (t / (32 * VEC)) % 2, e = t % (32 * VEC);
      // lane e / VEC of slice h holds pack (k SPLIT + h) 32 + e / VEC; item e % VEC.
      const int64_t col = ((int64_t(k) * SPLIT + h) * 32 + e / VEC) * VEC + e % VEC;
      if (col < D) {
        float acc = 0.f;
        for (int s = 0; s < kSlots; ++s) acc += red[s * SPLIT + h][which][e];
        part[which * D + col] = acc;
      }
    }
    __syncthreads();
  }
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kMaxThreads)
    ln_bwd_block_kernel(const T* __restrict__ dy, const T* __restrict__ xy, T* __restrict__ dx,
                        LnBwdArgs a) {
  __shared__ float scratch[32];
  const int64_t g = blockIdx.x, c = blockIdx.y;
  const int64_t D = a.D, n_packs = D / VEC;
  const int64_t r_begin = g * a.group_rows + c * a.rows_per_chunk;
  const int64_t r_end = min(g * a.group_rows + a.group_rows, r_begin + a.rows_per_chunk);
  float* part = a.part == nullptr ? nullptr : a.part + (g * a.chunks + c) * 2 * D;
  for (int64_t r = r_begin; r < r_end; ++r) {
    const float mu = a.xy_is_y ? 0.f : a.mean[r], rs = a.rstd[r];
    const float xs = a.xy_is_y ? 1.f : rs;
    float s1 = 0.f, s2 = 0.f;
    for (int64_t pk = threadIdx.x; pk < n_packs; pk += blockDim.x) {
      float d[VEC], xv[VEC];
      load_pack<T, VEC>(dy + r * a.stride_dy, pk, d);
      load_pack<T, VEC>(xy + r * a.stride_xy, pk, xv);
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        const int64_t j = pk * VEC + i;
        const float xh = (xv[i] - mu) * xs - ln_bsub(a, j);
        const float gz = d[i] * ln_gain(a, g, j);
        s1 += gz;
        s2 += gz * xh;
        if (part != nullptr) {  // this block owns its slot; each column has one owner thread
          part[j] += d[i];
          part[D + j] += d[i] * xh;
        }
      }
    }
    const float c1 = block_sum(s1, scratch) / static_cast<float>(D);
    const float c2 = block_sum(s2, scratch) / static_cast<float>(D);
    if (dx == nullptr) continue;
    for (int64_t pk = threadIdx.x; pk < n_packs; pk += blockDim.x) {
      float d[VEC], xv[VEC];
      load_pack<T, VEC>(dy + r * a.stride_dy, pk, d);
      load_pack<T, VEC>(xy + r * a.stride_xy, pk, xv);
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        const int64_t j = pk * VEC + i;
        const float xh = (xv[i] - mu) * xs - ln_bsub(a, j);
        xv[i] = rs * (d[i] * ln_gain(a, g, j) - c1 - xh * c2);
      }
      store_pack<T, VEC>(dx + r * D, pk, xv);
    }
  }
}

// p[g, which, j] = sum over chunks of part[g, chunk, which, j], in chunk order.
__global__ void ln_reduce_partials_kernel(const float* __restrict__ part, float* __restrict__ p1,
                                          float* __restrict__ p2, int64_t G, int64_t chunks,
                                          int64_t D) {
  const int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= G * 2 * D) return;
  const int64_t g = t / (2 * D), which = (t / D) % 2, j = t % D;
  float acc = 0.f;
  for (int64_t c = 0; c < chunks; ++c) acc += part[((g * chunks + c) * 2 + which) * D + j];
  (which == 0 ? p1 : p2)[g * D + j] = acc;
}

// ------------------------------------------------------------------ host --
template <typename T>
bool vectorizable(int64_t D, std::initializer_list<const void*> ptrs,
                  std::initializer_list<int64_t> strides) {
  return can_vectorize<T>(D, ptrs, strides);
}

// Packs per lane for warp-per-row kernels: the smallest power of two covering the row.
inline int warp_items(int64_t n_packs) {
  int items = 1;
  while (items * 32 < n_packs) items *= 2;
  return items;
}

// Calls f(std::integral_constant<int, ITEMS>{}) for ITEMS in {1, 2, 4, 8}.
template <typename F>
void with_items(int items, const F& f) {
  switch (items) {
    case 1: return f(std::integral_constant<int, 1>{});
    case 2: return f(std::integral_constant<int, 2>{});
    case 4: return f(std::integral_constant<int, 4>{});
    default: return f(std::integral_constant<int, 8>{});
  }
}

template <typename T, int VEC>
void launch_fwd(const at::Tensor& x, at::Tensor& y, const LnParams& prm, at::Tensor& mean,
                at::Tensor& rstd, int64_t group_rows, float eps, cudaStream_t stream) {
  const int64_t M = x.size(0), D = x.size(1);
  if (D / VEC <= 32 * kWarpItems) {
    const dim3 block(32, kWarpsPerBlock);
    const int64_t blocks = (M + kWarpsPerBlock - 1) / kWarpsPerBlock;
    with_items(warp_items(D / VEC), [&](auto items) {
      ln_fwd_warp_kernel<T, VEC, decltype(items)::value>
          <<<static_cast<unsigned>(blocks), block, 0, stream>>>(
              x.const_data_ptr<T>(), y.mutable_data_ptr<T>(), prm, mean.mutable_data_ptr<float>(),
              rstd.mutable_data_ptr<float>(), M, D, x.stride(0), group_rows, eps);
    });
  } else {
    ln_fwd_block_kernel<T, VEC><<<static_cast<unsigned>(M), threads_for(D / VEC), 0, stream>>>(
        x.const_data_ptr<T>(), y.mutable_data_ptr<T>(), prm, mean.mutable_data_ptr<float>(),
        rstd.mutable_data_ptr<float>(), D, x.stride(0), group_rows, eps);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int VEC>
void launch_bwd(const at::Tensor& dy, const at::Tensor& xy, T* dx, const LnBwdArgs& a,
                int64_t G, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(G), static_cast<unsigned>(a.chunks));
  if (a.D / VEC <= 32 * kWarpItems) {
    with_items(warp_items(a.D / VEC), [&](auto items) {
      constexpr int kItemsRow = decltype(items)::value;
      // Two warps per row once a lane would hold more than 32 elements (bf16/fp16 rows
      // of 1025-2048): halves the partials kept in registers.
      constexpr int kSplit = kItemsRow * VEC > 32 ? 2 : 1;
      ln_bwd_warp_kernel<T, VEC, kItemsRow / kSplit, kSplit>
          <<<grid, dim3(32, kWarpsPerBlock), 0, stream>>>(dy.const_data_ptr<T>(),
                                                          xy.const_data_ptr<T>(), dx, a);
    });
  } else {
    ln_bwd_block_kernel<T, VEC><<<grid, threads_for(a.D / VEC), 0, stream>>>(
        dy.const_data_ptr<T>(), xy.const_data_ptr<T>(), dx, a);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The backward's split of a group's rows into chunks (grid y): about kTaskElems
// elements per chunk, at most kMaxGridY chunks (CUDA's limit on gridDim.y); past that,
// chunks grow instead.  Depends only on (group_rows, D), so the partial sums are
// added in the same order on every call.  Returns (rows per chunk, chunks), D > 0.
constexpr int64_t kMaxGridY = 65535;
inline std::pair<int64_t, int64_t> bwd_chunks(int64_t group_rows, int64_t D) {
  const int64_t rows_per_task = std::max<int64_t>(1, kTaskElems / D);
  int64_t chunks = (group_rows + rows_per_task - 1) / rows_per_task;
  chunks = std::min(std::max<int64_t>(chunks, 1), kMaxGridY);
  const int64_t rows_per_chunk = (group_rows + chunks - 1) / chunks;
  return {rows_per_chunk, (group_rows + rows_per_chunk - 1) / rows_per_chunk};  // none empty
}

const float* opt_ptr(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->const_data_ptr<float>() : nullptr;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd_cuda(
    const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& shift,
    const std::optional<at::Tensor>& scale, double eps, int64_t group_rows, bool /*save_y*/) {
  check_layer_norm_fwd_args(x, weight, bias, shift, scale, eps, group_rows);
  c10::cuda::CUDAGuard guard(x.device());
  const int64_t M = x.size(0), D = x.size(1);
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor y = at::empty({M, D}, x.options());
  at::Tensor mean = at::empty({M}, f32), rstd = at::empty({M}, f32);
  if (M == 0) return {y, mean, rstd};
  TORCH_CHECK(M <= 0x7fffffffLL * kWarpsPerBlock, "lct: too many rows for one launch");
  const LnParams prm{opt_ptr(weight), opt_ptr(bias), opt_ptr(shift), opt_ptr(scale)};
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index());
  LCT_DISPATCH_KERNEL_TYPES(x.scalar_type(), "layer_norm_fwd_cuda", [&] {
    constexpr int kVec = 16 / sizeof(scalar_t);
    if (vectorizable<scalar_t>(D, {x.const_data_ptr(), y.const_data_ptr()}, {x.stride(0)}))
      launch_fwd<scalar_t, kVec>(x, y, prm, mean, rstd, group_rows, static_cast<float>(eps), stream);
    else
      launch_fwd<scalar_t, 1>(x, y, prm, mean, rstd, group_rows, static_cast<float>(eps), stream);
  });
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd_cuda(
    const at::Tensor& dy, const at::Tensor& xy, const at::Tensor& mean, const at::Tensor& rstd,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& scale, int64_t group_rows, bool xy_is_y, bool need_dx,
    bool need_partials) {
  check_layer_norm_bwd_args(dy, xy, mean, rstd, weight, bias, scale, group_rows, xy_is_y);
  c10::cuda::CUDAGuard guard(dy.device());
  const int64_t M = dy.size(0), D = dy.size(1), G = M / group_rows;
  const auto f32 = dy.options().dtype(at::kFloat);
  at::Tensor dx = need_dx ? at::empty({M, D}, dy.options()) : at::empty({0}, dy.options());
  at::Tensor p1 = at::zeros({need_partials ? G : 0, D}, f32);
  at::Tensor p2 = at::zeros({need_partials ? G : 0, D}, f32);
  // D = 0: dx is (M, 0) and the partials (G, 0); nothing to launch.
  if (M == 0 || D == 0 || !(need_dx || need_partials)) return {dx, p1, p2};
  const auto [rows_per_chunk, chunks] = bwd_chunks(group_rows, D);
  TORCH_CHECK(G <= 0x7fffffff, "lct: layer norm backward: at most 2^31 - 1 groups, got ", G);
  // Long rows accumulate into the partial buffer in place, so it starts at zero.
  at::Tensor part = need_partials ? at::zeros({G * chunks, 2, D}, f32) : at::empty({0}, f32);
  const LnBwdArgs a{mean.const_data_ptr<float>(), rstd.const_data_ptr<float>(), opt_ptr(weight),
                    opt_ptr(bias), opt_ptr(scale), D, dy.stride(0), xy.stride(0), group_rows,
                    rows_per_chunk, chunks, xy_is_y,
                    need_partials ? part.mutable_data_ptr<float>() : nullptr};
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(dy.device().index());
  LCT_DISPATCH_KERNEL_TYPES(dy.scalar_type(), "layer_norm_bwd_cuda", [&] {
    constexpr int kVec = 16 / sizeof(scalar_t);
    scalar_t* dxp = need_dx ? dx.mutable_data_ptr<scalar_t>() : nullptr;
    if (vectorizable<scalar_t>(D, {dy.const_data_ptr(), xy.const_data_ptr(), dxp},
                               {dy.stride(0), xy.stride(0)}))
      launch_bwd<scalar_t, kVec>(dy, xy, dxp, a, G, stream);
    else
      launch_bwd<scalar_t, 1>(dy, xy, dxp, a, G, stream);
  });
  if (need_partials) {
    const int64_t n = G * 2 * D;
    ln_reduce_partials_kernel<<<static_cast<unsigned>((n + 255) / 256), 256, 0, stream>>>(
        part.const_data_ptr<float>(), p1.mutable_data_ptr<float>(), p2.mutable_data_ptr<float>(),
        G, chunks, D);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {dx, p1, p2};
}

}  // namespace

TORCH_LIBRARY_IMPL(lct, CUDA, m) {
  m.impl("layer_norm_fwd", &layer_norm_fwd_cuda);
  m.impl("layer_norm_bwd", &layer_norm_bwd_cuda);
}

}  // namespace lct::cuda
