// CUDA kernels of the fused robust losses (lct::robust_loss).
//
// Design: one block per sample row.  The block reads pred and target with
// 16-byte packs, keeps d = pred - target in registers (up to kItems packs per
// thread, i.e. rows of 16K fp32 / 32K bf16 elements at 1024 threads), reduces
// sum(d^2) across the block, then writes rho'(m) * 2 d / N straight from
// registers.  Longer rows loop and read pred/target a second time.  The
// elementwise variants need no reduction before the write: one streamed pass,
// nothing held in registers.  The
// per-row factor weight_i (/ B for "mean") is folded into the gradient, so the
// backward only multiplies by the scalar incoming gradient.
// Arithmetic is float32; the per-row rho(m) and rho'(m) are evaluated in float64.
// Bytes moved for B x N elements of size s: read 2 s B N, write s B N + 8 B
// (forward with gradient); a second tiny kernel reduces the B losses.
// Limitation: one block per row, so a handful of very long rows leaves most SMs
// idle (e.g. B = 8); batches of >= ~2 x #SMs rows fill the GPU.
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

template <typename T, int VEC, bool ELEMENTWISE>
__global__ void __launch_bounds__(kMaxThreads)
    robust_loss_kernel(const T* __restrict__ pred, const T* __restrict__ target,
                       const double* __restrict__ c_ptr, const float* __restrict__ weight,
                       float inv_b, float* __restrict__ rho_out, float* __restrict__ out_rows,
                       T* __restrict__ grad, int64_t n, int64_t stride_pred,
                       int64_t stride_target, int64_t kind) {
  __shared__ float scratch[32];
  const int64_t row = blockIdx.x;
  const T* p = pred + row * stride_pred;
  const T* t = target + row * stride_target;
  T* g = grad == nullptr ? nullptr : grad + row * n;
  const double cd = *c_ptr, c2d = cd * cd;
  const float c = static_cast<float>(cd), c2 = static_cast<float>(c2d);
  const float w = weight == nullptr ? 1.f : weight[row];
  const float factor = w * inv_b;  // folded into the gradient
  const float two_over_n = factor * static_cast<float>(2.0 / static_cast<double>(n));
  const int64_t n_packs = n / VEC;
  float acc = 0.f;
  auto write_loss = [&](float rho) {
    if (threadIdx.x != 0) return;
    rho_out[row] = rho;
    if (out_rows != nullptr) out_rows[row] = w * rho;
  };

  // Rows held in registers: only the per-sample form needs the row's total before the
  // gradient write.  The elementwise form writes as it reads (the streamed loop below, one
  // pass, same per-thread order); holding its row too made the 16-byte-pack variants
  // spill at the 64-register cap of 1024-thread blocks.
  if (!ELEMENTWISE && n_packs <= int64_t(kItems) * blockDim.x) {
    float d[kItems][VEC];
#pragma unroll
    for (int k = 0; k < kItems; ++k) {
      const int64_t pk = threadIdx.x + int64_t(k) * blockDim.x;
      if (pk < n_packs) {
        float a[VEC], b[VEC];
        load_pack<T, VEC>(p, pk, a);
        load_pack<T, VEC>(t, pk, b);
#pragma unroll
        for (int i = 0; i < VEC; ++i) d[k][i] = a[i] - b[i];
      } else {
#pragma unroll
        for (int i = 0; i < VEC; ++i) d[k][i] = 0.f;
      }
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        const float m = d[k][i] * d[k][i];
        acc += ELEMENTWISE ? robust_rho<float>(kind, m, c, c2) : m;
      }
    }
    const float total = block_sum(acc, scratch);
    float coef = 0.f;
    if (ELEMENTWISE) {
      write_loss(total / static_cast<float>(n));
    } else {
      const double m = static_cast<double>(total) / static_cast<double>(n);
      write_loss(static_cast<float>(robust_rho<double>(kind, m, cd, c2d)));
      coef = static_cast<float>(double(factor) * robust_drho<double>(kind, m, c2d) * 2.0 /
                                static_cast<double>(n));
    }
    if (g == nullptr) return;
#pragma unroll
    for (int k = 0; k < kItems; ++k) {
      const int64_t pk = threadIdx.x + int64_t(k) * blockDim.x;
      if (pk >= n_packs) break;
      float out[VEC];
#pragma unroll
      for (int i = 0; i < VEC; ++i)
        out[i] = ELEMENTWISE ? robust_drho<float>(kind, d[k][i] * d[k][i], c2) * two_over_n * d[k][i]
                             : coef * d[k][i];
      store_pack<T, VEC>(g, pk, out);
    }
    return;
  }

  // Long rows: stream the row; the per-sample form reads it twice.
  for (int64_t pk = threadIdx.x; pk < n_packs; pk += blockDim.x) {
    float a[VEC], b[VEC], out[VEC];
    load_pack<T, VEC>(p, pk, a);
    load_pack<T, VEC>(t, pk, b);
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      const float di = a[i] - b[i], m = di * di;
      if (ELEMENTWISE) {
        acc += robust_rho<float>(kind, m, c, c2);
        out[i] = robust_drho<float>(kind, m, c2) * two_over_n * di;
      } else {
        acc += m;
      }
    }
    if (ELEMENTWISE && g != nullptr) store_pack<T, VEC>(g, pk, out);
  }
  const float total = block_sum(acc, scratch);
  if (ELEMENTWISE) {
    write_loss(total / static_cast<float>(n));
    return;
  }
  const double m = static_cast<double>(total) / static_cast<double>(n);
  write_loss(static_cast<float>(robust_rho<double>(kind, m, cd, c2d)));
  if (g == nullptr) return;
  const float coef = static_cast<float>(double(factor) * robust_drho<double>(kind, m, c2d) * 2.0 /
                                        static_cast<double>(n));
  for (int64_t pk = threadIdx.x; pk < n_packs; pk += blockDim.x) {
    float a[VEC], b[VEC], out[VEC];
    load_pack<T, VEC>(p, pk, a);
    load_pack<T, VEC>(t, pk, b);
#pragma unroll
    for (int i = 0; i < VEC; ++i) out[i] = coef * (a[i] - b[i]);
    store_pack<T, VEC>(g, pk, out);
  }
}

// out = inv_b * sum_i w_i rho_i over the B rows (one block, fixed order: deterministic).
__global__ void reduce_loss_kernel(const float* __restrict__ rho, const float* __restrict__ weight,
                                   int64_t B, float inv_b, float* __restrict__ out) {
  __shared__ float scratch[32];
  float acc = 0.f;
  for (int64_t i = threadIdx.x; i < B; i += blockDim.x) acc += (weight ? weight[i] : 1.f) * rho[i];
  const float total = block_sum(acc, scratch);
  if (threadIdx.x == 0) *out = total * inv_b;
}

struct LossArgs {
  const double* c;
  const float* weight;  // nullable
  float inv_b;
  float* rho;
  float* out_rows;  // nullable: only for reduction "none"
  int64_t kind;
};

template <typename T, int VEC, bool EW>
void launch_robust_loss(const at::Tensor& pred, const at::Tensor& target, const LossArgs& a,
                        T* grad, cudaStream_t stream) {
  const int64_t B = pred.size(0), N = pred.size(1);
  const int threads = threads_for(N / VEC);
  robust_loss_kernel<T, VEC, EW><<<static_cast<unsigned>(B), threads, 0, stream>>>(
      pred.const_data_ptr<T>(), target.const_data_ptr<T>(), a.c, a.weight, a.inv_b, a.rho,
      a.out_rows, grad, N, pred.stride(0), target.stride(0), a.kind);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void robust_loss_typed(const at::Tensor& pred, const at::Tensor& target, const LossArgs& a,
                       at::Tensor* grad_t, bool elementwise) {
  constexpr int kVec = 16 / sizeof(T);
  const int64_t N = pred.size(1);
  T* grad = grad_t ? grad_t->mutable_data_ptr<T>() : nullptr;
  const bool vec = can_vectorize<T>(N, {pred.const_data_ptr(), target.const_data_ptr(), grad},
                                    {pred.stride(0), target.stride(0)});
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(pred.device().index());
  if (vec) {
    if (elementwise) launch_robust_loss<T, kVec, true>(pred, target, a, grad, stream);
    else launch_robust_loss<T, kVec, false>(pred, target, a, grad, stream);
  } else {
    if (elementwise) launch_robust_loss<T, 1, true>(pred, target, a, grad, stream);
    else launch_robust_loss<T, 1, false>(pred, target, a, grad, stream);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> robust_loss_cuda(
    const at::Tensor& pred, const at::Tensor& target, const at::Tensor& c,
    const std::optional<at::Tensor>& weight, int64_t kind, bool elementwise, int64_t reduction,
    bool compute_grad) {
  check_robust_loss_args(pred, target, c, weight, kind, reduction);
  c10::cuda::CUDAGuard guard(pred.device());
  const int64_t B = pred.size(0), N = pred.size(1);
  const float* w = weight.has_value() ? weight->const_data_ptr<float>() : nullptr;
  const auto f32 = pred.options().dtype(at::kFloat);
  at::Tensor out = reduction == 0 ? at::empty({B}, f32) : at::empty({}, f32);
  at::Tensor rho = at::empty({B}, f32);
  at::Tensor grad = compute_grad ? at::empty({B, N}, pred.options()) : at::empty({0}, pred.options());
  const float inv_b = reduction == 1 ? static_cast<float>(1.0 / double(B)) : 1.f;
  const LossArgs args{c.const_data_ptr<double>(), w, inv_b, rho.mutable_data_ptr<float>(),
                      reduction == 0 ? out.mutable_data_ptr<float>() : nullptr, kind};
  LCT_DISPATCH_KERNEL_TYPES(pred.scalar_type(), "robust_loss_cuda", [&] {
    robust_loss_typed<scalar_t>(pred, target, args, compute_grad ? &grad : nullptr, elementwise);
  });
  if (reduction != 0) {
    reduce_loss_kernel<<<1, 1024, 0, c10::cuda::getCurrentCUDAStream(pred.device().index())>>>(
        rho.const_data_ptr<float>(), w, B, inv_b, out.mutable_data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {out, rho, grad};
}

}  // namespace

TORCH_LIBRARY_IMPL(lct, CUDA, m) { m.impl("robust_loss", &robust_loss_cuda); }

}  // namespace lct::cuda
