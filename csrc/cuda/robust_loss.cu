// CUDA kernels of the fused robust losses (lct::robust_loss) and of their
// backward scaling (lct::scale_rows).
//
// Design: one block per sample row.  The block reads pred and target with
// 16-byte packs, keeps d = pred - target in registers (up to kItems packs per
// thread, i.e. rows of 16K fp32 / 32K bf16 elements at 1024 threads), reduces
// sum(d^2) across the block, then writes rho'(m) * 2 d / N straight from
// registers.  Longer rows loop and read pred/target a second time.  The
// elementwise variants need no reduction before the write: one pass.
// Arithmetic is float32; the per-row rho(m) and rho'(m) are evaluated in float64.
// Bytes moved for B x N elements of size s: read 2 s B N, write s B N + 4 B
// (forward with gradient); scale_rows reads and writes s B N.
// Limitation: one block per row, so a handful of very long rows leaves most SMs
// idle (e.g. B = 8); batches of >= ~2 x #SMs rows fill the GPU.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "lct/dispatch.h"
#include "lct/robust_loss.h"
#include "row_kernels.cuh"

namespace lct::cuda {
namespace {

template <typename T, int VEC, bool ELEMENTWISE>
__global__ void __launch_bounds__(kMaxThreads)
    robust_loss_kernel(const T* __restrict__ pred, const T* __restrict__ target,
                       const double* __restrict__ c_ptr, float* __restrict__ loss,
                       T* __restrict__ grad, int64_t n, int64_t stride_pred,
                       int64_t stride_target, int64_t kind) {
  __shared__ float scratch[32];
  const int64_t row = blockIdx.x;
  const T* p = pred + row * stride_pred;
  const T* t = target + row * stride_target;
  T* g = grad == nullptr ? nullptr : grad + row * n;
  const double cd = *c_ptr, c2d = cd * cd;
  const float c = static_cast<float>(cd), c2 = static_cast<float>(c2d);
  const float two_over_n = static_cast<float>(2.0 / static_cast<double>(n));
  const int64_t n_packs = n / VEC;
  float acc = 0.f;

  if (n_packs <= int64_t(kItems) * blockDim.x) {
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
      if (threadIdx.x == 0) loss[row] = total / static_cast<float>(n);
    } else {
      const double m = static_cast<double>(total) / static_cast<double>(n);
      if (threadIdx.x == 0) loss[row] = static_cast<float>(robust_rho<double>(kind, m, cd, c2d));
      coef = static_cast<float>(robust_drho<double>(kind, m, c2d) * 2.0 / static_cast<double>(n));
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
    if (threadIdx.x == 0) loss[row] = total / static_cast<float>(n);
    return;
  }
  const double m = static_cast<double>(total) / static_cast<double>(n);
  if (threadIdx.x == 0) loss[row] = static_cast<float>(robust_rho<double>(kind, m, cd, c2d));
  if (g == nullptr) return;
  const float coef =
      static_cast<float>(robust_drho<double>(kind, m, c2d) * 2.0 / static_cast<double>(n));
  for (int64_t pk = threadIdx.x; pk < n_packs; pk += blockDim.x) {
    float a[VEC], b[VEC], out[VEC];
    load_pack<T, VEC>(p, pk, a);
    load_pack<T, VEC>(t, pk, b);
#pragma unroll
    for (int i = 0; i < VEC; ++i) out[i] = coef * (a[i] - b[i]);
    store_pack<T, VEC>(g, pk, out);
  }
}

template <typename T, int VEC>
__global__ void scale_rows_kernel(const T* __restrict__ x, const float* __restrict__ scale,
                                  T* __restrict__ out, int64_t n, int64_t stride_x,
                                  int64_t tiles) {
  // 1-D grid of rows x tiles: block b covers tile (b % tiles) of row (b / tiles).
  const int64_t row = blockIdx.x / tiles;
  const int64_t pk = (blockIdx.x % tiles) * blockDim.x + threadIdx.x;
  if (pk >= n / VEC) return;
  const float k = scale[row];
  float v[VEC];
  load_pack<T, VEC>(x + row * stride_x, pk, v);
#pragma unroll
  for (int i = 0; i < VEC; ++i) v[i] *= k;
  store_pack<T, VEC>(out + row * n, pk, v);
}

void check_rows(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.is_cuda(), "lct: ", name, " must be a CUDA tensor");
  TORCH_CHECK(x.dim() == 2, "lct: ", name, " must be 2-D (B, N), got ", x.dim(), "-D");
  TORCH_CHECK(x.size(1) <= 1 || x.stride(1) == 1, "lct: ", name, " must have unit column stride");
}

template <typename T, int VEC, bool EW>
void launch_robust_loss(const at::Tensor& pred, const at::Tensor& target, const at::Tensor& c,
                        at::Tensor& loss, T* grad, int64_t kind, cudaStream_t stream) {
  const int64_t B = pred.size(0), N = pred.size(1);
  const int threads = threads_for(N / VEC);
  robust_loss_kernel<T, VEC, EW><<<static_cast<unsigned>(B), threads, 0, stream>>>(
      pred.const_data_ptr<T>(), target.const_data_ptr<T>(), c.const_data_ptr<double>(),
      loss.mutable_data_ptr<float>(), grad, N, pred.stride(0), target.stride(0), kind);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void robust_loss_typed(const at::Tensor& pred, const at::Tensor& target, const at::Tensor& c,
                       at::Tensor& loss, at::Tensor* grad_t, int64_t kind, bool elementwise) {
  constexpr int kVec = 16 / sizeof(T);
  const int64_t N = pred.size(1);
  T* grad = grad_t ? grad_t->mutable_data_ptr<T>() : nullptr;
  const bool vec = can_vectorize<T>(N, {pred.const_data_ptr(), target.const_data_ptr(), grad},
                                    {pred.stride(0), target.stride(0)});
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(pred.device().index());
  if (vec) {
    if (elementwise) launch_robust_loss<T, kVec, true>(pred, target, c, loss, grad, kind, stream);
    else launch_robust_loss<T, kVec, false>(pred, target, c, loss, grad, kind, stream);
  } else {
    if (elementwise) launch_robust_loss<T, 1, true>(pred, target, c, loss, grad, kind, stream);
    else launch_robust_loss<T, 1, false>(pred, target, c, loss, grad, kind, stream);
  }
}

std::tuple<at::Tensor, at::Tensor> robust_loss_cuda(const at::Tensor& pred,
                                                    const at::Tensor& target,
                                                    const at::Tensor& c, int64_t kind,
                                                    bool elementwise, bool compute_grad) {
  check_rows(pred, "pred");
  check_rows(target, "target");
  TORCH_CHECK(pred.sizes() == target.sizes(), "lct: pred and target shapes differ");
  TORCH_CHECK(pred.scalar_type() == target.scalar_type(), "lct: pred and target dtypes differ");
  TORCH_CHECK(target.device() == pred.device() && c.device() == pred.device(),
              "lct: pred, target and c must be on one device");
  TORCH_CHECK(c.numel() == 1 && c.scalar_type() == at::kDouble, "lct: c must be a float64 scalar");
  TORCH_CHECK(kind >= 0 && kind <= 2, "lct: unknown loss kind ", kind);
  c10::cuda::CUDAGuard guard(pred.device());
  const int64_t B = pred.size(0), N = pred.size(1);
  at::Tensor loss = at::empty({B}, pred.options().dtype(at::kFloat));
  at::Tensor grad = compute_grad ? at::empty({B, N}, pred.options()) : at::empty({0}, pred.options());
  if (B == 0) return {loss, grad};
  TORCH_CHECK(N > 0, "lct: each sample needs at least one element");
  TORCH_CHECK(B <= 0x7fffffff, "lct: at most 2^31 - 1 samples");
  LCT_DISPATCH_KERNEL_TYPES(pred.scalar_type(), "robust_loss_cuda", [&] {
    robust_loss_typed<scalar_t>(pred, target, c, loss, compute_grad ? &grad : nullptr, kind,
                                elementwise);
  });
  return {loss, grad};
}

template <typename T, int VEC>
void launch_scale_rows(const at::Tensor& x, const at::Tensor& scale, at::Tensor& out) {
  const int64_t B = x.size(0), N = x.size(1);
  const int threads = 256;
  const int64_t tiles = (N / VEC + threads - 1) / threads;
  TORCH_CHECK(B * tiles <= 0x7fffffff, "lct: scale_rows input too large for one launch");
  scale_rows_kernel<T, VEC><<<static_cast<unsigned>(B * tiles), threads, 0,
                              c10::cuda::getCurrentCUDAStream(x.device().index())>>>(
      x.const_data_ptr<T>(), scale.const_data_ptr<float>(), out.mutable_data_ptr<T>(), N,
      x.stride(0), tiles);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor scale_rows_cuda(const at::Tensor& x, const at::Tensor& scale) {
  check_rows(x, "x");
  TORCH_CHECK(scale.dim() == 1 && scale.size(0) == x.size(0) && scale.scalar_type() == at::kFloat &&
                  scale.is_contiguous() && scale.device() == x.device(),
              "lct: scale must be a contiguous float32 (B,) tensor on x's device");
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty({x.size(0), x.size(1)}, x.options());
  if (out.numel() == 0) return out;
  LCT_DISPATCH_KERNEL_TYPES(x.scalar_type(), "scale_rows_cuda", [&] {
    constexpr int kVec = 16 / sizeof(scalar_t);
    if (can_vectorize<scalar_t>(x.size(1), {x.const_data_ptr(), out.const_data_ptr()}, {x.stride(0)}))
      launch_scale_rows<scalar_t, kVec>(x, scale, out);
    else
      launch_scale_rows<scalar_t, 1>(x, scale, out);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lct, CUDA, m) {
  m.impl("robust_loss", &robust_loss_cuda);
  m.impl("scale_rows", &scale_rows_cuda);
}

}  // namespace lct::cuda
