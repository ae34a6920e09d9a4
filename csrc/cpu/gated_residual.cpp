// CPU kernels of the fused gated residual (lct::gated_residual_fwd, lct::gated_residual_bwd).
//
// Design: adaLN-zero's residual update x + gate[:, None] * y is two ATen passes in eager
// mode (a multiply into a temporary, then an add), and its backward three (dout * gate,
// dout * y, then a sum over tokens).  Here the forward is one pass and the backward one
// pass that writes dy and dgate together (dx is dout itself: no pass).  The optional
// bias is the bias of the Linear that produced y, folded in: that GEMM then runs as a
// plain mm (ATen's addmm first copies the broadcast bias into its output and the GEMM
// then reads it back: two extra passes over a (B T, D) activation), and d bias (the sum
// of dy over rows) comes out of the same backward pass (one float32 partial per sample,
// combined in sample order in float64: the same for any thread count).  float32 goes
// through the ISA kernels (isa/gated_rows.h); float16 and bfloat16 are computed in
// float32 per element and rounded once.  gate may be a column slice of adaLN's output
// (row stride >= D, unit column stride): it is read in place, never copied.
// Threads: samples split by parallel.h's policy; each sample's dgate row is summed over
// its tokens in order by one thread, so results do not depend on the thread count.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <vector>

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

void check_bias(const char* name, const std::optional<at::Tensor>& bias, const at::Tensor& x) {
  if (!bias.has_value()) return;
  TORCH_CHECK(bias->dim() == 1 && bias->size(0) == x.size(2) && bias->is_contiguous() &&
                  bias->scalar_type() == x.scalar_type() && bias->device() == x.device(),
              "lct: ", name, ": bias must be a contiguous (D,) = (", x.size(2),
              ",) tensor of x's dtype and device");
}

using FwdF32 = void (*)(const float*, const float*, const float*, const float*, float*, int64_t,
                        int64_t);
using BwdF32 = void (*)(const float*, const float*, const float*, const float*, float*, float*,
                        float*, int64_t, int64_t);

FwdF32 fwd_f32() { return use_avx2() ? &avx2::gated_residual_fwd_f32 : &base::gated_residual_fwd_f32; }
BwdF32 bwd_f32() { return use_avx2() ? &avx2::gated_residual_bwd_f32 : &base::gated_residual_bwd_f32; }

template <typename T> const float* as_f(const T* p) { return reinterpret_cast<const float*>(p); }
template <typename T> float* as_f(T* p) { return reinterpret_cast<float*>(p); }

at::Tensor gated_residual_fwd_cpu(const at::Tensor& x, const at::Tensor& gate, const at::Tensor& y,
                                  const std::optional<at::Tensor>& bias) {
  check_gated("gated_residual_fwd", x, gate);
  check_same("gated_residual_fwd", "y", y, x);
  check_bias("gated_residual_fwd", bias, x);
  const int64_t B = x.size(0), T = x.size(1), D = x.size(2);
  at::Tensor out = pooled_empty({B, T, D}, x.options());
  if (out.numel() == 0) return out;
  const int64_t gs = gate.stride(0);
  LCT_DISPATCH_KERNEL_TYPES(x.scalar_type(), "gated_residual_fwd_cpu", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* gp = gate.const_data_ptr<scalar_t>();
    const scalar_t* yp = y.const_data_ptr<scalar_t>();
    const scalar_t* bp = bias.has_value() ? bias->const_data_ptr<scalar_t>() : nullptr;
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    const FwdF32 rows = fwd_f32();
    parallel_tasks(B, T * D, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t o = b * T * D;
        if constexpr (std::is_same_v<scalar_t, float>) {
          rows(as_f(xp + o), as_f(gp + b * gs), as_f(yp + o), bp ? as_f(bp) : nullptr,
               as_f(op + o), T, D);
        } else {
          for (int64_t i = 0; i < T * D; ++i) {
            const int64_t j = i % D;
            const float yv = static_cast<float>(yp[o + i]) + (bp ? static_cast<float>(bp[j]) : 0.f);
            op[o + i] = static_cast<scalar_t>(static_cast<float>(xp[o + i]) +
                                              static_cast<float>(gp[b * gs + j]) * yv);
          }
        }
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gated_residual_bwd_cpu(
    const at::Tensor& dout, const at::Tensor& gate, const at::Tensor& y,
    const std::optional<at::Tensor>& bias, bool need_dgate, bool need_dy, bool need_dbias) {
  check_gated("gated_residual_bwd", dout, gate);
  check_same("gated_residual_bwd", "y", y, dout);
  check_bias("gated_residual_bwd", bias, dout);
  const int64_t B = dout.size(0), T = dout.size(1), D = dout.size(2);
  const auto f32 = dout.options().dtype(at::kFloat);
  // dgate and dbias are float32 (sums over tokens, and over samples); zero tokens or
  // samples give zero gradients
  at::Tensor dgate = need_dgate ? at::empty({B, D}, f32) : at::empty({0}, f32);
  at::Tensor dy = need_dy ? pooled_empty({B, T, D}, dout.options()) : at::empty({0}, dout.options());
  at::Tensor dbias = need_dbias ? at::zeros({D}, f32) : at::empty({0}, f32);
  if (!(need_dgate || need_dy || need_dbias) || B == 0 || D == 0) return {dgate, dy, dbias};
  // one float32 partial row of dbias per sample, written by that sample's task and
  // combined in sample order in float64 (dgate's rows likewise: each task zeroes its own)
  std::vector<float> partial(need_dbias ? size_t(B * D) : size_t(0));
  const int64_t gs = gate.stride(0);
  LCT_DISPATCH_KERNEL_TYPES(dout.scalar_type(), "gated_residual_bwd_cpu", [&] {
    const scalar_t* gp_out = dout.const_data_ptr<scalar_t>();
    const scalar_t* gp = gate.const_data_ptr<scalar_t>();
    const scalar_t* yp = y.const_data_ptr<scalar_t>();
    const scalar_t* bp = bias.has_value() ? bias->const_data_ptr<scalar_t>() : nullptr;
    scalar_t* dyp = need_dy ? dy.mutable_data_ptr<scalar_t>() : nullptr;
    float* dgp = need_dgate ? dgate.mutable_data_ptr<float>() : nullptr;
    const BwdF32 rows = bwd_f32();
    parallel_tasks(B, T * D, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t o = b * T * D;
        float* dg = dgp ? dgp + b * D : nullptr;
        float* db = need_dbias ? partial.data() + b * D : nullptr;
        if constexpr (std::is_same_v<scalar_t, float>) {
          rows(as_f(gp_out + o), as_f(gp + b * gs), as_f(yp + o), bp ? as_f(bp) : nullptr,
               dyp ? as_f(dyp + o) : nullptr, dg, db, T, D);
        } else {
          if (dg) std::fill(dg, dg + D, 0.f);
          if (db) std::fill(db, db + D, 0.f);
          for (int64_t t = 0; t < T; ++t) {
            for (int64_t j = 0; j < D; ++j) {
              const int64_t i = o + t * D + j;
              const float g = static_cast<float>(gp_out[i]);
              const float d = g * static_cast<float>(gp[b * gs + j]);
              if (dyp) dyp[i] = static_cast<scalar_t>(d);
              if (db) db[j] += d;
              if (dg) {
                const float yv = static_cast<float>(yp[i]) + (bp ? static_cast<float>(bp[j]) : 0.f);
                dg[j] += g * yv;
              }
            }
          }
        }
      }
    });
  });
  if (need_dbias) sum_partials_in_order(partial.data(), B, D, dbias.mutable_data_ptr<float>());
  return {dgate, dy, dbias};
}

}  // namespace

TORCH_LIBRARY_IMPL(lct, CPU, m) {
  m.impl("gated_residual_fwd", &gated_residual_fwd_cpu);
  m.impl("gated_residual_bwd", &gated_residual_bwd_cpu);
}

}  // namespace lct::cpu
