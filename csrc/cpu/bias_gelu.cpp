// CPU kernels of the fused bias + GELU(tanh) (lct::bias_gelu_fwd, lct::bias_gelu_bwd).
//
// Design: the MLP's first Linear runs as a plain GEMM (no bias: ATen's addmm first
// copies the broadcast bias into its output, a full M x N write), and one pass adds
// the bias and applies GELU; the backward's one pass writes dh and sums the bias
// gradient.  float32 rows go through the ISA kernels (isa/gelu_rows.h); float16
// and bfloat16 rows are converted to float32, through the same kernels, and back.
// Threads: rows split by parallel.h's policy in the forward; the backward's bias
// sum uses fixed blocks of kBlockRows rows, each with its own float32 partial,
// combined in block order in float64, so the result is the same for any thread
// count.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <vector>

#include "buffer_pool.h"
#include "isa/cpu_features.h"
#include "isa/pointwise_isa.h"
#include "lct/dispatch.h"
#include "parallel.h"

namespace lct::cpu {
namespace {

constexpr int64_t kBlockRows = 64;  // rows per bias-gradient partial

void check_bias_gelu(const at::Tensor& h, const at::Tensor& bias) {
  TORCH_CHECK(h.dim() == 2 && h.is_contiguous(), "lct: bias_gelu: h must be a contiguous 2-D "
              "(M, N) tensor, got ", h.dim(), "-D", h.is_contiguous() ? "" : " non-contiguous");
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == h.size(1) && bias.is_contiguous() &&
                  bias.scalar_type() == h.scalar_type() && bias.device() == h.device(),
              "lct: bias_gelu: bias must be a contiguous (N,) = (", h.size(1),
              ",) tensor of h's dtype on h's device");
}

using FwdRows = void (*)(const float*, const float*, float*, int64_t, int64_t, int64_t);
using BwdRows = void (*)(const float*, const float*, const float*, float*, float*, int64_t,
                         int64_t, int64_t);

FwdRows fwd_rows() { return use_avx2() ? &avx2::bias_gelu_fwd_rows_f32 : &base::bias_gelu_fwd_rows_f32; }
BwdRows bwd_rows() { return use_avx2() ? &avx2::bias_gelu_bwd_rows_f32 : &base::bias_gelu_bwd_rows_f32; }

// The float32 branch's pointers (the dispatch lambda is no template, so both branches
// compile for every dtype; this cast runs only where scalar_t is float).
template <typename T> const float* as_f(const T* p) { return reinterpret_cast<const float*>(p); }
template <typename T> float* as_f(T* p) { return reinterpret_cast<float*>(p); }

// float16 / bfloat16: each row converted to float32, through the float32 kernel, and
// back (one rounding of the output, as ATen's reduced-precision gelu)
template <typename scalar_t>
void to_float(const scalar_t* src, float* dst, int64_t n) {
  for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<float>(src[j]);
}
template <typename scalar_t>
void from_float(const float* src, scalar_t* dst, int64_t n) {
  for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<scalar_t>(src[j]);
}

at::Tensor bias_gelu_fwd_cpu(const at::Tensor& h, const at::Tensor& bias) {
  check_bias_gelu(h, bias);
  const int64_t M = h.size(0), N = h.size(1);
  at::Tensor y = pooled_empty({M, N}, h.options());
  if (M == 0 || N == 0) return y;
  LCT_DISPATCH_KERNEL_TYPES(h.scalar_type(), "bias_gelu_fwd_cpu", [&] {
    const scalar_t* hp = h.const_data_ptr<scalar_t>();
    const scalar_t* bp = bias.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    const FwdRows rows = fwd_rows();
    if constexpr (std::is_same_v<scalar_t, float>) {
      parallel_tasks(M, N, [&](int64_t r0, int64_t r1) { rows(as_f(hp), as_f(bp), as_f(yp), N, r0, r1); });
    } else {
      std::vector<float> bf(N);
      to_float(bp, bf.data(), N);
      parallel_tasks(M, N, [&](int64_t r0, int64_t r1) {
        std::vector<float> hf(N), yf(N);
        for (int64_t r = r0; r < r1; ++r) {
          to_float(hp + r * N, hf.data(), N);
          rows(hf.data(), bf.data(), yf.data(), N, 0, 1);
          from_float(yf.data(), yp + r * N, N);
        }
      });
    }
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> bias_gelu_bwd_cpu(const at::Tensor& dy, const at::Tensor& h,
                                                     const at::Tensor& bias, bool need_dh,
                                                     bool need_dbias) {
  check_bias_gelu(h, bias);
  TORCH_CHECK(dy.sizes() == h.sizes() && dy.scalar_type() == h.scalar_type() &&
                  dy.device() == h.device() && dy.is_contiguous(),
              "lct: bias_gelu_bwd: dy must be a contiguous tensor of h's shape, dtype and device");
  const int64_t M = h.size(0), N = h.size(1);
  at::Tensor dh = need_dh ? pooled_empty({M, N}, h.options()) : at::empty({0}, h.options());
  const auto f32 = h.options().dtype(at::kFloat);
  if (!need_dbias) {
    if (!need_dh || M == 0 || N == 0) return {dh, at::empty({0}, f32)};
  }
  const int64_t blocks = (M + kBlockRows - 1) / kBlockRows;
  // one float32 partial row per block; zero rows when M == 0 give a zero gradient
  std::vector<float> partial(need_dbias ? size_t(blocks * N) : size_t(0), 0.f);
  LCT_DISPATCH_KERNEL_TYPES(h.scalar_type(), "bias_gelu_bwd_cpu", [&] {
    const scalar_t* gp = dy.const_data_ptr<scalar_t>();
    const scalar_t* hp = h.const_data_ptr<scalar_t>();
    const scalar_t* bp = bias.const_data_ptr<scalar_t>();
    scalar_t* dp = need_dh ? dh.mutable_data_ptr<scalar_t>() : nullptr;
    const BwdRows rows = bwd_rows();
    std::vector<float> bf;
    if constexpr (!std::is_same_v<scalar_t, float>) {
      bf.resize(N);
      to_float(bp, bf.data(), N);
    }
    parallel_tasks(blocks, kBlockRows * N, [&](int64_t b0, int64_t b1) {
      std::vector<float> gf, hf, df;
      if constexpr (!std::is_same_v<scalar_t, float>) gf.resize(N), hf.resize(N), df.resize(N);
      for (int64_t blk = b0; blk < b1; ++blk) {
        const int64_t r0 = blk * kBlockRows, r1 = std::min(M, r0 + kBlockRows);
        float* db = need_dbias ? partial.data() + blk * N : nullptr;
        if constexpr (std::is_same_v<scalar_t, float>) {
          rows(as_f(gp), as_f(hp), as_f(bp), as_f(dp), db, N, r0, r1);
        } else {
          for (int64_t r = r0; r < r1; ++r) {
            to_float(gp + r * N, gf.data(), N);
            to_float(hp + r * N, hf.data(), N);
            rows(gf.data(), hf.data(), bf.data(), dp ? df.data() : nullptr, db, N, 0, 1);
            if (dp) from_float(df.data(), dp + r * N, N);
          }
        }
      }
    });
  });
  if (!need_dbias) return {dh, at::empty({0}, f32)};
  at::Tensor dbias = at::empty({N}, f32);
  sum_partials_in_order(partial.data(), blocks, N, dbias.mutable_data_ptr<float>());
  return {dh, dbias};
}

}  // namespace

TORCH_LIBRARY_IMPL(lct, CPU, m) {
  m.impl("bias_gelu_fwd", &bias_gelu_fwd_cpu);
  m.impl("bias_gelu_bwd", &bias_gelu_bwd_cpu);
}

}  // namespace lct::cpu
