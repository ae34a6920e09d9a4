// CPU kernel of the fused robust losses (lct::robust_loss).
//
// Design: one fused pass per row computes the per-sample loss and, when asked,
// the gradient of the weighted, reduced loss with respect to pred into a fresh
// buffer (never in place): weight_i (and 1/B for "mean") are folded in, so the
// backward only has to multiply by the incoming gradient -- and skips even that
// when it is exactly 1 (see lct_kernels/ops/_fused_grad.py).
// Per-sample form: pass 1 sums (pred - target)^2, pass 2 writes
// f_i rho'(m_i) 2 d / N while the row is still in cache.  Elementwise form: a
// single pass.  Bytes moved (fp32, B x N): read 8BN, write 4BN (+8B).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>

#include "lct/checks.h"
#include "lct/robust_loss.h"
#include "buffer_pool.h"
#include "row_ops.h"

namespace lct::cpu {
namespace {

struct Sum1 {
  double v = 0.0;
  Sum1& operator+=(const Sum1& o) {
    v += o.v;
    return *this;
  }
};

// Per-row factor folded into the gradient: weight_i, divided by B for "mean".
inline float row_factor(const float* weight, int64_t r, double inv_b) {
  return static_cast<float>((weight ? double(weight[r]) : 1.0) * inv_b);
}

template <typename scalar_t>
void robust_loss_impl(const at::Tensor& pred, const at::Tensor& target, double c, int64_t kind,
                      bool elementwise, const float* weight, double inv_b, float* rho_out,
                      at::Tensor* grad) {
  const int64_t B = pred.size(0), N = pred.size(1);
  const Rows<scalar_t> p = rows_of<scalar_t>(pred), t = rows_of<scalar_t>(target);
  scalar_t* g = grad ? grad->mutable_data_ptr<scalar_t>() : nullptr;
  const double c2d = c * c;
  const float cf = static_cast<float>(c), c2 = static_cast<float>(c2d);
  const float two_over_n = static_cast<float>(2.0 / double(N));
  std::vector<float> coef(B);  // row_factor * rho'(m_i) * 2 / N, per-sample form
  const bool stream = stream_output(B * N * int64_t(sizeof(scalar_t)));

  if (elementwise) {
    // One pass: rho_i = mean_j rho(d_ij^2), grad_ij = f_i rho'(d_ij^2) 2 d_ij / N.
    two_pass_rows<Sum1>(
        B, N, false,
        [&](int64_t r, int64_t b, int64_t e) {
          const scalar_t* pr = p.row(r);
          const scalar_t* tr = t.row(r);
          scalar_t* gr = g ? g + r * N : nullptr;
          const float k = row_factor(weight, r, inv_b) * two_over_n;
          return Sum1{blocked_sum(b, e, [&](int64_t j) {
            const float d = float(pr[j]) - float(tr[j]);
            const float m = d * d;
            if (gr) gr[j] = static_cast<scalar_t>(robust_drho<float>(kind, m, c2) * k * d);
            return robust_rho<float>(kind, m, cf, c2);
          })};
        },
        [&](int64_t r, const Sum1& s) { rho_out[r] = static_cast<float>(s.v / double(N)); },
        [](int64_t, int64_t, int64_t) {});
    return;
  }

  two_pass_rows<Sum1>(
      B, N, g != nullptr,
      [&](int64_t r, int64_t b, int64_t e) {
        const scalar_t* pr = p.row(r);
        const scalar_t* tr = t.row(r);
        return Sum1{blocked_sum(b, e, [&](int64_t j) {
          const float d = float(pr[j]) - float(tr[j]);
          return d * d;
        })};
      },
      [&](int64_t r, const Sum1& s) {
        const double m = s.v / double(N);
        rho_out[r] = static_cast<float>(robust_rho<double>(kind, m, c, c2d));
        coef[r] = static_cast<float>(double(row_factor(weight, r, inv_b)) *
                                     robust_drho<double>(kind, m, c2d) * 2.0 / double(N));
      },
      [&](int64_t r, int64_t b, int64_t e) {
        const scalar_t* pr = p.row(r);
        const scalar_t* tr = t.row(r);
        write_scaled_diff(g + r * N, pr, tr, coef[r], b, e, stream);
      });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> robust_loss_cpu(
    const at::Tensor& pred, const at::Tensor& target, const at::Tensor& c,
    const std::optional<at::Tensor>& weight, int64_t kind, bool elementwise, int64_t reduction,
    bool compute_grad) {
  check_robust_loss_args(pred, target, c, weight, kind, reduction);
  const int64_t B = pred.size(0), N = pred.size(1);
  const float* w = weight.has_value() ? weight->const_data_ptr<float>() : nullptr;
  const auto f32 = pred.options().dtype(at::kFloat);
  at::Tensor out = reduction == 0 ? at::empty({B}, f32) : at::empty({}, f32);
  at::Tensor rho = at::empty({B}, f32);
  at::Tensor grad = compute_grad ? pooled_empty({B, N}, pred.options()) : at::empty({0}, pred.options());
  const double inv_b = reduction == 1 ? 1.0 / double(B) : 1.0;
  float* rho_p = rho.mutable_data_ptr<float>();
  LCT_DISPATCH_KERNEL_TYPES(pred.scalar_type(), "robust_loss_cpu", [&] {
    robust_loss_impl<scalar_t>(pred, target, c.const_data_ptr<double>()[0], kind, elementwise, w,
                               inv_b, rho_p, compute_grad ? &grad : nullptr);
  });
  float* o = out.mutable_data_ptr<float>();
  if (reduction == 0) {
    for (int64_t r = 0; r < B; ++r) o[r] = w ? w[r] * rho_p[r] : rho_p[r];
  } else {
    double total = 0.0;  // fixed order: deterministic
    for (int64_t r = 0; r < B; ++r) total += double(w ? w[r] : 1.f) * double(rho_p[r]);
    *o = static_cast<float>(total * inv_b);
  }
  return {out, rho, grad};
}

}  // namespace

TORCH_LIBRARY_IMPL(lct, CPU, m) { m.impl("robust_loss", &robust_loss_cpu); }

}  // namespace lct::cpu
