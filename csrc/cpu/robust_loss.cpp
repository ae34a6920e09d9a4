// CPU kernels of the fused robust losses (lct::robust_loss) and of their
// backward scaling (lct::scale_rows).
//
// Design: one fused pass per row computes the per-sample loss and, when asked,
// the unscaled gradient dloss_i/dpred into a fresh buffer (never in place).
// Per-sample form: pass 1 sums (pred - target)^2, pass 2 writes
// rho'(m) * 2 d / N while the row is still in cache.  Elementwise form: a single
// pass.  Bytes moved (fp32, B x N): read 8BN, write 4BN (+4B); the backward
// (scale_rows) reads and writes the gradient once more.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>

#include "lct/robust_loss.h"
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

void check_rows(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.dim() == 2, "lct: ", name, " must be 2-D (B, N), got ", x.dim(), "-D");
  TORCH_CHECK(x.size(1) <= 1 || x.stride(1) == 1, "lct: ", name, " must have unit column stride");
}

template <typename scalar_t>
void robust_loss_impl(const at::Tensor& pred, const at::Tensor& target, double c, int64_t kind,
                      bool elementwise, at::Tensor& loss, at::Tensor* grad) {
  const int64_t B = pred.size(0), N = pred.size(1);
  const Rows<scalar_t> p = rows_of<scalar_t>(pred), t = rows_of<scalar_t>(target);
  scalar_t* g = grad ? grad->mutable_data_ptr<scalar_t>() : nullptr;
  const int64_t g_stride = grad ? grad->stride(0) : 0;
  float* out = loss.mutable_data_ptr<float>();
  const double cd = c, c2d = cd * cd;
  const float c2 = static_cast<float>(c2d), two_over_n = static_cast<float>(2.0 / double(N));
  std::vector<float> coef(B);  // rho'(m_i) * 2 / N, per-sample form only

  if (elementwise) {
    // One pass: loss_i = mean_j rho(d_ij^2), grad_ij = rho'(d_ij^2) * 2 d_ij / N.
    two_pass_rows<Sum1>(
        B, N, false,
        [&](int64_t r, int64_t b, int64_t e) {
          const scalar_t* pr = p.row(r);
          const scalar_t* tr = t.row(r);
          scalar_t* gr = g ? g + r * g_stride : nullptr;
          const float cf = c;
          const double s = blocked_sum(b, e, [&](int64_t j) {
            const float d = float(pr[j]) - float(tr[j]);
            const float m = d * d;
            if (gr) gr[j] = static_cast<scalar_t>(robust_drho<float>(kind, m, c2) * two_over_n * d);
            return robust_rho<float>(kind, m, cf, c2);
          });
          return Sum1{s};
        },
        [&](int64_t r, const Sum1& s) { out[r] = static_cast<float>(s.v / double(N)); },
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
        out[r] = static_cast<float>(robust_rho<double>(kind, m, cd, c2d));
        coef[r] = static_cast<float>(robust_drho<double>(kind, m, c2d) * 2.0 / double(N));
      },
      [&](int64_t r, int64_t b, int64_t e) {
        const scalar_t* pr = p.row(r);
        const scalar_t* tr = t.row(r);
        scalar_t* gr = g + r * g_stride;
        const float k = coef[r];
#pragma omp simd
        for (int64_t j = b; j < e; ++j)
          gr[j] = static_cast<scalar_t>(k * (float(pr[j]) - float(tr[j])));
      });
}

std::tuple<at::Tensor, at::Tensor> robust_loss_cpu(const at::Tensor& pred,
                                                   const at::Tensor& target,
                                                   const at::Tensor& c, int64_t kind,
                                                   bool elementwise, bool compute_grad) {
  check_rows(pred, "pred");
  check_rows(target, "target");
  TORCH_CHECK(pred.sizes() == target.sizes(), "lct: pred and target shapes differ");
  TORCH_CHECK(pred.scalar_type() == target.scalar_type(), "lct: pred and target dtypes differ");
  TORCH_CHECK(c.numel() == 1 && c.scalar_type() == at::kDouble && c.device().is_cpu(),
              "lct: c must be a float64 CPU scalar tensor");
  TORCH_CHECK(kind >= 0 && kind <= 2, "lct: unknown loss kind ", kind);
  const int64_t B = pred.size(0), N = pred.size(1);
  at::Tensor loss = at::empty({B}, pred.options().dtype(at::kFloat));
  at::Tensor grad = compute_grad ? at::empty({B, N}, pred.options()) : at::empty({0}, pred.options());
  if (B == 0) return {loss, grad};
  TORCH_CHECK(N > 0, "lct: each sample needs at least one element");
  const double cval = c.const_data_ptr<double>()[0];
  LCT_DISPATCH_KERNEL_TYPES(pred.scalar_type(), "robust_loss_cpu", [&] {
    robust_loss_impl<scalar_t>(pred, target, cval, kind, elementwise, loss,
                               compute_grad ? &grad : nullptr);
  });
  return {loss, grad};
}

template <typename scalar_t>
void scale_rows_impl(const at::Tensor& x, const float* scale, at::Tensor& out) {
  const int64_t B = x.size(0), N = x.size(1);
  const Rows<scalar_t> xr = rows_of<scalar_t>(x);
  scalar_t* o = out.mutable_data_ptr<scalar_t>();
  // Parallel over the flattened elements, so few long rows still use every thread.
  at::parallel_for(0, B * N, kChunk / 2, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin / N; r * N < end; ++r) {
      const int64_t jb = std::max(begin, r * N) - r * N, je = std::min(end, (r + 1) * N) - r * N;
      const scalar_t* in = xr.row(r);
      scalar_t* dst = o + r * N;
      const float k = scale[r];
#pragma omp simd
      for (int64_t j = jb; j < je; ++j) dst[j] = static_cast<scalar_t>(k * float(in[j]));
    }
  });
}

at::Tensor scale_rows_cpu(const at::Tensor& x, const at::Tensor& scale) {
  check_rows(x, "x");
  TORCH_CHECK(scale.dim() == 1 && scale.size(0) == x.size(0) && scale.scalar_type() == at::kFloat &&
                  scale.is_contiguous() && scale.device().is_cpu(),
              "lct: scale must be a contiguous float32 (B,) CPU tensor");
  at::Tensor out = at::empty({x.size(0), x.size(1)}, x.options());
  if (out.numel() == 0) return out;
  LCT_DISPATCH_KERNEL_TYPES(x.scalar_type(), "scale_rows_cpu", [&] {
    scale_rows_impl<scalar_t>(x, scale.const_data_ptr<float>(), out);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lct, CPU, m) {
  m.impl("robust_loss", &robust_loss_cpu);
  m.impl("scale_rows", &scale_rows_cpu);
}

}  // namespace lct::cpu
