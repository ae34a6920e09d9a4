// CPU kernels of the layer norm family (lct::layer_norm_fwd / lct::layer_norm_bwd):
// non-scaling LayerNorm (weight absent or ones), general LayerNorm, and the
// fused NsLN + adaLN modulate of DiT.  Formulas: csrc/ops.cpp.
//
// Threads: parallel.h (small calls run on the calling thread).
// Forward: parallel over rows; per row a float64-accumulated mean, a second pass
// for the biased variance (row in cache), a third writing y.  fp32 statistics.
// Bytes moved (element size s): read s M D, write s M D + 8 M.
//
// Backward: the rows of each group (sample) are cut into chunks of about
// kTaskElems elements; one task per (group, chunk) computes dx for its rows and
// accumulates fp32 partial sums p1 = sum dy and p2 = sum dy * xhat over them.
// The chunking depends only on the shape, and the partials are then added in
// chunk order, so results are identical for any thread count (no atomics).
// Bytes moved: read 2 s M D (+8 M), write s M D (+ partials, 8 D per task).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <utility>
#include <vector>

#include "buffer_pool.h"
#include "isa/cpu_features.h"
#include "isa/layer_norm_args.h"
#include "lct/layer_norm.h"
#include "parallel.h"
#include "row_ops.h"

namespace lct::cpu {
namespace {

// Per-column parameter vectors with absent ones replaced by their neutral value.
struct Params {
  std::vector<float> ones, zeros;
  const float* w;
  const float* b;
  Params(const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, int64_t D)
      : ones(D, 1.f), zeros(D, 0.f) {
    w = weight.has_value() ? weight->const_data_ptr<float>() : ones.data();
    b = bias.has_value() ? bias->const_data_ptr<float>() : zeros.data();
  }
};

template <typename T>
void fwd_impl(const at::Tensor& x, const Params& prm, const float* shift, const float* scale,
              double eps, int64_t group_rows, T* y, float* mean_out, float* rstd_out) {
  const int64_t M = x.size(0), D = x.size(1);
  const Rows<T> xr = rows_of<T>(x);
  const float* zeros = prm.zeros.data();
  parallel_tasks(M, D, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch;
    for (int64_t r = begin; r < end; ++r) {
      const T* xi = xr.row(r);
      const double mean = blocked_sum(0, D, [&](int64_t j) { return float(xi[j]); }) / double(D);
      const float mf = static_cast<float>(mean);
      const double var = blocked_sum(0, D, [&](int64_t j) {
        const float d = float(xi[j]) - mf;
        return d * d;
      }) / double(D);
      const float rs = static_cast<float>(1.0 / std::sqrt(var + eps));
      mean_out[r] = mf;
      rstd_out[r] = rs;
      const int64_t g = r / group_rows;
      const float* sc = scale ? scale + g * D : zeros;
      const float* sh = shift ? shift + g * D : zeros;
      const float* w = prm.w;
      const float* b = prm.b;
      write_row(y + r * D, D, scratch, [&](auto* yi) {
        using Out = std::remove_pointer_t<decltype(yi)>;
#pragma omp simd
        for (int64_t j = 0; j < D; ++j) {
          const float z = (float(xi[j]) - mf) * rs * w[j] + b[j];
          yi[j] = static_cast<Out>(z * (1.f + sc[j]) + sh[j]);
        }
      });
    }
  });
}

template <typename T>
void bwd_impl(const at::Tensor& dy, const at::Tensor& xy, const float* mean, const float* rstd,
              const Params& prm, const float* scale, int64_t group_rows, bool xy_is_y, T* dx,
              float* p1_out, float* p2_out) {
  const int64_t M = dy.size(0), D = dy.size(1), G = M / group_rows;
  const int64_t chunks = layer_norm_chunks(group_rows, D);
  const int64_t rows_per_chunk = (group_rows + chunks - 1) / chunks;
  const Rows<T> dyr = rows_of<T>(dy), xyr = rows_of<T>(xy);
  const bool partials = p1_out != nullptr;
  // One chunk per group: each task owns its group's row of p1_out / p2_out (zeroed by
  // the caller) and accumulates into it directly: no staging buffer, no serial pass.
  const bool direct = partials && chunks == 1;
  std::vector<float> part(partials && !direct ? size_t(G * chunks * 2 * D) : 0);
  auto task_partials = [&](int64_t task, float* local) -> std::pair<float*, float*> {
    if (!partials) return {local, local + D};
    if (direct) return {p1_out + task * D, p2_out + task * D};
    float* p = part.data() + task * 2 * D;
    return {p, p + D};
  };
  const float* zeros = prm.zeros.data();

  LayerNormBwdArgs fa{};  // float32: the ISA-specific task kernel (isa/)
  if constexpr (std::is_same_v<T, float>) {
    fa = LayerNormBwdArgs{dyr.data, dyr.row_stride, xyr.data, xyr.row_stride, D, mean, rstd,
                          prm.w, prm.b, scale, zeros, group_rows, chunks, rows_per_chunk,
                          xy_is_y, dx, stream_output(M * D * int64_t(sizeof(float)))};
  }
  const auto float_task = use_avx2() ? &avx2::layer_norm_bwd_task_f32 : &base::layer_norm_bwd_task_f32;

  parallel_tasks(G * chunks, rows_per_chunk * D, [&](int64_t begin, int64_t end) {
    std::vector<float> local(partials ? 0 : 2 * D);  // scratch partials when not wanted
    std::vector<float> gain_v(D), scratch(D);
    for (int64_t task = begin; task < end; ++task) {
      auto [p1, p2] = task_partials(task, local.data());
      if constexpr (std::is_same_v<T, float>) {
        float_task(fa, task, p1, p2, gain_v.data(), scratch.data());
        continue;
      }
      const int64_t g = task / chunks, c = task % chunks;
      const int64_t r0 = g * group_rows + c * rows_per_chunk;
      const int64_t r1 = std::min(g * group_rows + group_rows, r0 + rows_per_chunk);
      const float* sc = scale ? scale + g * D : zeros;
      float* gain = gain_v.data();  // dxhat = dy * gain, gain = (1 + scale_g) * w
      for (int64_t j = 0; j < D; ++j) gain[j] = (1.f + sc[j]) * prm.w[j];
      // xhat = (x - mu) * xs - bsub: (x - mean) * rstd, or y - bias in the memory-saving mode.
      const float* bsub = xy_is_y ? prm.b : zeros;
      for (int64_t r = r0; r < r1; ++r) {
        const T* dyi = dyr.row(r);
        const T* xi = xyr.row(r);
        const float mu = xy_is_y ? 0.f : mean[r], rs = rstd[r];
        const float xs = xy_is_y ? 1.f : rs;
        // Pass 1: the two row sums of dxhat = dy (1 + scale) w, and the partials.
        double s1 = 0.0, s2 = 0.0;
        for (int64_t jb = 0; jb < D; jb += kBlock) {
          const int64_t je = std::min(D, jb + kBlock);
          float a1 = 0.f, a2 = 0.f;
#pragma omp simd reduction(+ : a1, a2)
          for (int64_t j = jb; j < je; ++j) {
            const float d = float(dyi[j]);
            const float xh = (float(xi[j]) - mu) * xs - bsub[j];
            const float gz = d * gain[j];
            a1 += gz;
            a2 += gz * xh;
            p1[j] += d;
            p2[j] += d * xh;
          }
          s1 += a1;
          s2 += a2;
        }
        if (dx == nullptr) continue;
        const float c1 = static_cast<float>(s1 / double(D)), c2 = static_cast<float>(s2 / double(D));
        // Pass 2 (row still in L1): dx = rs (dxhat - c1 - xhat c2).
        write_row(dx + r * D, D, scratch, [&](auto* dxi) {
          using Out = std::remove_pointer_t<decltype(dxi)>;
#pragma omp simd
          for (int64_t j = 0; j < D; ++j) {
            const float xh = (float(xi[j]) - mu) * xs - bsub[j];
            const float gz = float(dyi[j]) * gain[j];
            dxi[j] = static_cast<Out>(rs * (gz - c1 - xh * c2));
          }
        });
      }
    }
  });
  if (!partials || direct) return;
  for (int64_t g = 0; g < G; ++g) {  // chunk order: deterministic
    float* p1 = p1_out + g * D;
    float* p2 = p2_out + g * D;
    std::fill(p1, p1 + D, 0.f);
    std::fill(p2, p2 + D, 0.f);
    for (int64_t c = 0; c < chunks; ++c) {
      const float* src = part.data() + (g * chunks + c) * 2 * D;
      for (int64_t j = 0; j < D; ++j) {
        p1[j] += src[j];
        p2[j] += src[D + j];
      }
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd_cpu(
    const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& shift,
    const std::optional<at::Tensor>& scale, double eps, int64_t group_rows, bool /*save_y*/) {
  check_layer_norm_fwd_args(x, weight, bias, shift, scale, eps, group_rows);
  const int64_t M = x.size(0), D = x.size(1);
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor y = pooled_empty({M, D}, x.options());
  at::Tensor mean = at::empty({M}, f32), rstd = at::empty({M}, f32);
  if (M == 0) return {y, mean, rstd};
  const Params prm(weight, bias, D);
  const float* sh = shift.has_value() ? shift->const_data_ptr<float>() : nullptr;
  const float* sc = scale.has_value() ? scale->const_data_ptr<float>() : nullptr;
  if (x.scalar_type() == at::kFloat) {
    const LayerNormFwdArgs a{x.const_data_ptr<float>(), x.stride(0), D, prm.w, prm.b, sh, sc,
                             prm.zeros.data(), eps, group_rows, y.mutable_data_ptr<float>(),
                             mean.mutable_data_ptr<float>(), rstd.mutable_data_ptr<float>(),
                             stream_output(M * D * int64_t(sizeof(float)))};
    const auto rows = use_avx2() ? &avx2::layer_norm_fwd_rows_f32 : &base::layer_norm_fwd_rows_f32;
    parallel_tasks(M, D, [&](int64_t begin, int64_t end) {
      std::vector<float> scratch(D);
      rows(a, begin, end, scratch.data());
    });
    return {y, mean, rstd};
  }
  LCT_DISPATCH_KERNEL_TYPES(x.scalar_type(), "layer_norm_fwd_cpu", [&] {
    fwd_impl<scalar_t>(x, prm, sh, sc, eps, group_rows, y.mutable_data_ptr<scalar_t>(),
                       mean.mutable_data_ptr<float>(), rstd.mutable_data_ptr<float>());
  });
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd_cpu(
    const at::Tensor& dy, const at::Tensor& xy, const at::Tensor& mean, const at::Tensor& rstd,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& scale, int64_t group_rows, bool xy_is_y, bool need_dx,
    bool need_partials) {
  check_layer_norm_bwd_args(dy, xy, mean, rstd, weight, bias, scale, group_rows, xy_is_y);
  const int64_t M = dy.size(0), D = dy.size(1), G = M / group_rows;
  const auto f32 = dy.options().dtype(at::kFloat);
  at::Tensor dx = need_dx ? pooled_empty({M, D}, dy.options()) : at::empty({0}, dy.options());
  // zeroed here, not by at::zeros (two more dispatcher calls; the kernel accumulates
  // into them)
  at::Tensor p1 = at::empty({need_partials ? G : 0, D}, f32);
  at::Tensor p2 = at::empty({need_partials ? G : 0, D}, f32);
  std::fill_n(p1.mutable_data_ptr<float>(), p1.numel(), 0.f);
  std::fill_n(p2.mutable_data_ptr<float>(), p2.numel(), 0.f);
  if (M == 0 || !(need_dx || need_partials)) return {dx, p1, p2};
  const Params prm(weight, bias, D);
  const float* sc = scale.has_value() ? scale->const_data_ptr<float>() : nullptr;
  LCT_DISPATCH_KERNEL_TYPES(dy.scalar_type(), "layer_norm_bwd_cpu", [&] {
    bwd_impl<scalar_t>(dy, xy, mean.const_data_ptr<float>(), rstd.const_data_ptr<float>(), prm,
                       sc, group_rows, xy_is_y, need_dx ? dx.mutable_data_ptr<scalar_t>() : nullptr,
                       need_partials ? p1.mutable_data_ptr<float>() : nullptr,
                       need_partials ? p2.mutable_data_ptr<float>() : nullptr);
  });
  return {dx, p1, p2};
}

}  // namespace

TORCH_LIBRARY_IMPL(lct, CPU, m) {
  m.impl("layer_norm_fwd", &layer_norm_fwd_cpu);
  m.impl("layer_norm_bwd", &layer_norm_bwd_cpu);
}

}  // namespace lct::cpu
