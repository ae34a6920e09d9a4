// CUDA kernels of the fused consistency + diffusion objective
// (lct::consistency_objective).  Formulas: csrc/cpu/consistency_objective.cpp.
//
// Three launches, no host synchronisation:
//   1. mask_count:   count = sum(mask)                       (one block)
//   2. objective:    one block per row; reads student, teacher, x0 once (16-byte
//                    packs), keeps u = s - t and v = s - x0 in registers for rows
//                    of up to 2 x 1024 packs (8K fp32 / 16K bf16 elements),
//                    reduces m_i, e_i, writes cm_i, mask_i dw_i e_i and the
//                    gradient a_i u + b_i v.  Longer rows are read twice.
//   3. finalize:     total and diff_loss from the per-row values (one block,
//                    fixed order: deterministic).
// Bytes moved (B x N elements of size s): read 3 s B N, write s B N.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "lct/dispatch.h"
#include "lct/checks.h"
#include "lct/robust_loss.h"
#include "row_kernels.cuh"

namespace lct::cuda {
namespace {

constexpr int kObjItems = 2;  // two cached vectors per pack: keep register use moderate

__global__ void mask_count_kernel(const float* __restrict__ mask, int64_t B, float* __restrict__ count) {
  __shared__ float scratch[32];
  float acc = 0.f;
  for (int64_t i = threadIdx.x; i < B; i += blockDim.x) acc += mask[i] != 0.f ? 1.f : 0.f;
  const float total = block_sum(acc, scratch);
  if (threadIdx.x == 0) *count = total;
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kMaxThreads) objective_kernel(
    const T* __restrict__ student, const T* __restrict__ teacher, const T* __restrict__ x0,
    const float* __restrict__ weight, const float* __restrict__ diff_weight,
    const float* __restrict__ mask, const float* __restrict__ count_ptr,
    const double* __restrict__ c_ptr, float* __restrict__ cm_out, float* __restrict__ diff_rows,
    T* __restrict__ grad, int64_t B, int64_t n, int64_t stride_s, int64_t stride_t,
    int64_t stride_x, int64_t kind, double diff_coef) {
  __shared__ float scratch[32];
  const int64_t row = blockIdx.x;
  const T* s = student + row * stride_s;
  const T* t = teacher + row * stride_t;
  const T* x = x0 + row * stride_x;
  T* g = grad == nullptr ? nullptr : grad + row * n;
  const int64_t n_packs = n / VEC;
  const bool cached = n_packs <= int64_t(kObjItems) * blockDim.x;
  float u[kObjItems][VEC], v[kObjItems][VEC];
  float acc_u = 0.f, acc_v = 0.f;

  if (cached) {
#pragma unroll
    for (int k = 0; k < kObjItems; ++k) {
      const int64_t pk = threadIdx.x + int64_t(k) * blockDim.x;
      float a[VEC], b[VEC], e[VEC];
      if (pk < n_packs) {
        load_pack<T, VEC>(s, pk, a);
        load_pack<T, VEC>(t, pk, b);
        load_pack<T, VEC>(x, pk, e);
      } else {
#pragma unroll
        for (int i = 0; i < VEC; ++i) a[i] = b[i] = e[i] = 0.f;
      }
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        u[k][i] = a[i] - b[i];
        v[k][i] = a[i] - e[i];
        acc_u += u[k][i] * u[k][i];
        acc_v += v[k][i] * v[k][i];
      }
    }
  } else {
    for (int64_t pk = threadIdx.x; pk < n_packs; pk += blockDim.x) {
      float a[VEC], b[VEC], e[VEC];
      load_pack<T, VEC>(s, pk, a);
      load_pack<T, VEC>(t, pk, b);
      load_pack<T, VEC>(x, pk, e);
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        acc_u += (a[i] - b[i]) * (a[i] - b[i]);
        acc_v += (a[i] - e[i]) * (a[i] - e[i]);
      }
    }
  }
  const double m = static_cast<double>(block_sum(acc_u, scratch)) / static_cast<double>(n);
  const double e_mean = static_cast<double>(block_sum(acc_v, scratch)) / static_cast<double>(n);
  const double cd = *c_ptr, c2d = cd * cd;
  const double w = weight[row], dw = diff_weight[row];
  const bool in_mask = mask[row] != 0.f;
  if (threadIdx.x == 0) {
    cm_out[row] = static_cast<float>(w * robust_rho<double>(kind, m, cd, c2d));
    diff_rows[row] = in_mask ? static_cast<float>(dw * e_mean) : 0.f;
  }
  if (g == nullptr) return;
  const double count = fmax(static_cast<double>(*count_ptr), 1.0);
  const float ca = static_cast<float>(w * robust_drho<double>(kind, m, c2d) * 2.0 /
                                      (static_cast<double>(B) * static_cast<double>(n)));
  const float cb = in_mask ? static_cast<float>(diff_coef * dw * 2.0 / (count * static_cast<double>(n))) : 0.f;
  if (cached) {
#pragma unroll
    for (int k = 0; k < kObjItems; ++k) {
      const int64_t pk = threadIdx.x + int64_t(k) * blockDim.x;
      if (pk >= n_packs) break;
      float out[VEC];
#pragma unroll
      for (int i = 0; i < VEC; ++i) out[i] = ca * u[k][i] + cb * v[k][i];
      store_pack<T, VEC>(g, pk, out);
    }
    return;
  }
  for (int64_t pk = threadIdx.x; pk < n_packs; pk += blockDim.x) {
    float a[VEC], b[VEC], e[VEC], out[VEC];
    load_pack<T, VEC>(s, pk, a);
    load_pack<T, VEC>(t, pk, b);
    load_pack<T, VEC>(x, pk, e);
#pragma unroll
    for (int i = 0; i < VEC; ++i) out[i] = ca * (a[i] - b[i]) + cb * (a[i] - e[i]);
    store_pack<T, VEC>(g, pk, out);
  }
}

__global__ void finalize_kernel(const float* __restrict__ cm, const float* __restrict__ diff_rows,
                                const float* __restrict__ count_ptr, int64_t B, double diff_coef,
                                float* __restrict__ total, float* __restrict__ diff) {
  __shared__ float scratch[32];
  float a = 0.f, b = 0.f;
  for (int64_t i = threadIdx.x; i < B; i += blockDim.x) {
    a += cm[i];
    b += diff_rows[i];
  }
  const float cm_sum = block_sum(a, scratch);
  const float diff_sum = block_sum(b, scratch);
  if (threadIdx.x == 0) {
    const float count = *count_ptr;
    const float d = count > 0.f ? diff_sum / count : 0.f;
    *diff = d;
    *total = cm_sum / static_cast<float>(B) + static_cast<float>(diff_coef) * d;
  }
}

template <typename T, int VEC>
void launch_objective(const at::Tensor& s, const at::Tensor& t, const at::Tensor& x,
                      const at::Tensor& w, const at::Tensor& dw, const at::Tensor& mask,
                      const at::Tensor& count, const at::Tensor& c, at::Tensor& cm,
                      at::Tensor& diff_rows, T* grad, int64_t kind, double diff_coef,
                      cudaStream_t stream) {
  const int64_t B = s.size(0), N = s.size(1);
  int threads = 32;
  const int64_t want = (N / VEC + kObjItems - 1) / kObjItems;
  while (threads < want && threads < kMaxThreads) threads *= 2;
  objective_kernel<T, VEC><<<static_cast<unsigned>(B), threads, 0, stream>>>(
      s.const_data_ptr<T>(), t.const_data_ptr<T>(), x.const_data_ptr<T>(),
      w.const_data_ptr<float>(), dw.const_data_ptr<float>(), mask.const_data_ptr<float>(),
      count.const_data_ptr<float>(), c.const_data_ptr<double>(), cm.mutable_data_ptr<float>(),
      diff_rows.mutable_data_ptr<float>(), grad, B, N, s.stride(0), t.stride(0), x.stride(0), kind,
      diff_coef);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> consistency_objective_cuda(
    const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& x0,
    const at::Tensor& weight, const at::Tensor& diff_weight, const at::Tensor& diff_mask,
    const at::Tensor& c, int64_t kind, double diff_coef, bool compute_grad) {
  check_objective_args(student, teacher, x0, weight, diff_weight, diff_mask, c, kind);
  const int64_t B = student.size(0), N = student.size(1);
  c10::cuda::CUDAGuard guard(student.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(student.device().index());
  const auto f32 = student.options().dtype(at::kFloat);
  at::Tensor total = at::empty({}, f32), diff = at::empty({}, f32), count = at::empty({}, f32);
  at::Tensor cm = at::empty({B}, f32), diff_rows = at::empty({B}, f32);
  at::Tensor grad = compute_grad ? at::empty({B, N}, student.options()) : at::empty({0}, student.options());

  mask_count_kernel<<<1, 1024, 0, stream>>>(diff_mask.const_data_ptr<float>(), B,
                                            count.mutable_data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  LCT_DISPATCH_KERNEL_TYPES(student.scalar_type(), "consistency_objective_cuda", [&] {
    constexpr int kVec = 16 / sizeof(scalar_t);
    scalar_t* g = compute_grad ? grad.mutable_data_ptr<scalar_t>() : nullptr;
    if (can_vectorize<scalar_t>(N, {student.const_data_ptr(), teacher.const_data_ptr(), x0.const_data_ptr(), g},
                                {student.stride(0), teacher.stride(0), x0.stride(0)}))
      launch_objective<scalar_t, kVec>(student, teacher, x0, weight, diff_weight, diff_mask, count, c,
                                       cm, diff_rows, g, kind, diff_coef, stream);
    else
      launch_objective<scalar_t, 1>(student, teacher, x0, weight, diff_weight, diff_mask, count, c,
                                    cm, diff_rows, g, kind, diff_coef, stream);
  });
  finalize_kernel<<<1, 1024, 0, stream>>>(cm.const_data_ptr<float>(), diff_rows.const_data_ptr<float>(),
                                          count.const_data_ptr<float>(), B, diff_coef,
                                          total.mutable_data_ptr<float>(), diff.mutable_data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {total, cm, diff, grad};
}

}  // namespace

TORCH_LIBRARY_IMPL(lct, CUDA, m) { m.impl("consistency_objective", &consistency_objective_cuda); }

}  // namespace lct::cuda
