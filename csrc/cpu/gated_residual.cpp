// CPU kernels of the fused gated residual (lct::gated_residual_fwd, lct::gated_residual_bwd).
//
// Design: adaLN-zero's residual update x + gate[:, None] * y is two ATen passes in eager
// mode (a multiply into a temporary, then an add), and its backward three (dout * gate,
// dout * y, then a sum over tokens).  Here the forward is one pass and the backward one
// pass that writes dy and dgate together (dx is dout itself: no pass).  float32 goes
// through the ISA kernels (isa/gated_rows.h); float16 and bfloat16 are computed in
// float32 per element and rounded once.  gate may be a column slice of adaLN's output
// (row stride >= D, unit column stride): it is read in place, never copied.
// Threads: samples split by parallel.h's policy; each sample's dgate row is summed over
// its tokens in order by one thread, so results do not depend on the thread count.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>

#include "buffer_pool.h"
#include "isa/cpu_features.h"
#include "isa/pointwise_isa.h"
#include "lct/dispatch.h"
#include "parallel.h"

namespace lct::cpu {
namespace {

void check_gated(const char* name, const at::Tensor& x, const at::Tensor& gate) {
  TORCH_CHECK(x.dim() == 3 && x.is_contiguous(), "lct: ", name, ": x/y/dout must be contiguous "
              "(B, T, D) tensors, got ", x.dim(), "-D", x.is_contiguous() ? "" : " non-contiguous");
  TORCH_CHECK(gate.dim() == 2 && gate.size(0) == x.size(0) && gate.size(1) == x.size(2) &&
                  (gate.size(1) <= 1 || gate.stride(1) == 1) && gate.stride(0) >= 0 &&
                  gate.scalar_type() == x.scalar_type() && gate.device() == x.device(),
              "lct: ", name, ": gate must be (B, D) = (", x.size(0), ", ", x.size(2),
              ") with unit column stride, of x's dtype and device");
}

void check_same(const char* name, const char* what, const at::Tensor& a, const at::Tensor& x) {
  TORCH_CHECK(a.sizes() == x.sizes() && a.scalar_type() == x.scalar_type() &&
                  a.device() == x.device() && a.is_contiguous(),
              "lct: ", name, ": ", what, " must be a contiguous tensor of the first argument's "
              "shape, dtype and device");
}

using FwdF32 = void (*)(const float*, const float*, const float*, float*, int64_t, int64_t);
using BwdF32 = void (*)(const float*, const float*, const float*, float*, float*, int64_t, int64_t);

FwdF32 fwd_f32() { return use_avx2() ? &avx2::gated_residual_fwd_f32 : &base::gated_residual_fwd_f32; }
BwdF32 bwd_f32() { return use_avx2() ? &avx2::gated_residual_bwd_f32 : &base::gated_residual_bwd_f32; }

template <typename T> const float* as_f(const T* p) { return reinterpret_cast<const float*>(p); }
template <typename T> float* as_f(T* p) { return reinterpret_cast<float*>(p); }

at::Tensor gated_residual_fwd_cpu(const at::Tensor& x, const at::Tensor& gate, const at::Tensor& y) {
  check_gated("gated_residual_fwd", x, gate);
  check_same("gated_residual_fwd", "y", y, x);
  const int64_t B = x.size(0), T = x.size(1), D = x.size(2);
  at::Tensor out = pooled_empty({B, T, D}, x.options());
  if (out.numel() == 0) return out;
  const int64_t gs = gate.stride(0);
  LCT_DISPATCH_KERNEL_TYPES(x.scalar_type(), "gated_residual_fwd_cpu", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* gp = gate.const_data_ptr<scalar_t>();
    const scalar_t* yp = y.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    const FwdF32 rows = fwd_f32();
    parallel_tasks(B, T * D, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t o = b * T * D;
        if constexpr (std::is_same_v<scalar_t, float>) {
          rows(as_f(xp + o), as_f(gp + b * gs), as_f(yp + o), as_f(op + o), T, D);
        } else {
          for (int64_t i = 0; i < T * D; ++i)
            op[o + i] = static_cast<scalar_t>(static_cast<float>(xp[o + i]) +
                                              static_cast<float>(gp[b * gs + i % D]) *
                                                  static_cast<float>(yp[o + i]));
        }
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> gated_residual_bwd_cpu(const at::Tensor& dout,
                                                          const at::Tensor& gate,
                                                          const at::Tensor& y, bool need_dgate,
                                                          bool need_dy) {
  check_gated("gated_residual_bwd", dout, gate);
  check_same("gated_residual_bwd", "y", y, dout);
  const int64_t B = dout.size(0), T = dout.size(1), D = dout.size(2);
  const auto f32 = dout.options().dtype(at::kFloat);
  // dgate is float32 (the sum over tokens); zero tokens give a zero gradient
  at::Tensor dgate = need_dgate ? at::empty({B, D}, f32) : at::empty({0}, f32);
  at::Tensor dy = need_dy ? pooled_empty({B, T, D}, dout.options()) : at::empty({0}, dout.options());
  if (!need_dgate && !need_dy) return {dgate, dy};
  if (B == 0 || D == 0) return {dgate, dy};
  const int64_t gs = gate.stride(0);
  LCT_DISPATCH_KERNEL_TYPES(dout.scalar_type(), "gated_residual_bwd_cpu", [&] {
    const scalar_t* gp_out = dout.const_data_ptr<scalar_t>();
    const scalar_t* gp = gate.const_data_ptr<scalar_t>();
    const scalar_t* yp = y.const_data_ptr<scalar_t>();
    scalar_t* dyp = need_dy ? dy.mutable_data_ptr<scalar_t>() : nullptr;
    float* dgp = need_dgate ? dgate.mutable_data_ptr<float>() : nullptr;
    const BwdF32 rows = bwd_f32();
    parallel_tasks(B, T * D, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t o = b * T * D;
        float* dg = dgp ? dgp + b * D : nullptr;
        if constexpr (std::is_same_v<scalar_t, float>) {
          rows(as_f(gp_out + o), as_f(gp + b * gs), as_f(yp + o), dyp ? as_f(dyp + o) : nullptr,
               dg, T, D);
        } else {
          if (dg) std::fill(dg, dg + D, 0.f);
          for (int64_t t = 0; t < T; ++t) {
            for (int64_t j = 0; j < D; ++j) {
              const int64_t i = o + t * D + j;
              const float g = static_cast<float>(gp_out[i]);
              if (dyp) dyp[i] = static_cast<scalar_t>(g * static_cast<float>(gp[b * gs + j]));
              if (dg) dg[j] += g * static_cast<float>(yp[i]);
            }
          }
        }
      }
    });
  });
  return {dgate, dy};
}

}  // namespace

TORCH_LIBRARY_IMPL(lct, CPU, m) {
  m.impl("gated_residual_fwd", &gated_residual_fwd_cpu);
  m.impl("gated_residual_bwd", &gated_residual_bwd_cpu);
}

}  // namespace lct::cpu
