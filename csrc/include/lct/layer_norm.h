// Shared by the CPU and CUDA layer norm kernels: argument checks (host only)
// and the backward's work split.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <optional>

namespace lct {

// Elements of one backward task (a chunk of one group's rows).  The number of
// chunks depends only on the shape, so partial sums always add up in the same
// order, whatever the thread count.  16K elements (64 KB of fp32 dy): small enough
// that the demo's short-row calls (2048 x 32, 512 x 128) split into several tasks
// and can use two threads (parallel.h decides whether they do), large enough that
// the per-task partials (2 D floats) stay a small fraction of the work.
constexpr int64_t kLayerNormTaskElems = 16384;

inline int64_t layer_norm_chunks(int64_t group_rows, int64_t D) {
  const int64_t rows_per_task = std::max<int64_t>(1, kLayerNormTaskElems / std::max<int64_t>(D, 1));
  return std::max<int64_t>(1, (group_rows + rows_per_task - 1) / rows_per_task);
}

// v absent, or a contiguous float32 tensor on x's device of shape (D,) when
// groups < 0, else (groups, D).
inline void check_param_vector(const std::optional<at::Tensor>& v, const at::Tensor& x,
                               int64_t groups, const char* name) {
  if (!v.has_value()) return;
  const bool ok = groups < 0 ? (v->dim() == 1 && v->size(0) == x.size(1))
                             : (v->dim() == 2 && v->size(0) == groups && v->size(1) == x.size(1));
  TORCH_CHECK(ok && v->scalar_type() == at::kFloat && v->is_contiguous() && v->device() == x.device(),
              "lct: ", name, " must be a contiguous float32 ", groups < 0 ? "(D,)" : "(G, D)",
              " tensor on x's device");
}

inline void check_layer_norm_fwd_args(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                                      const std::optional<at::Tensor>& bias,
                                      const std::optional<at::Tensor>& shift,
                                      const std::optional<at::Tensor>& scale, double eps,
                                      int64_t group_rows) {
  TORCH_CHECK(x.dim() == 2 && (x.size(1) <= 1 || x.stride(1) == 1),
              "lct: x must be 2-D (M, D) with unit column stride");
  TORCH_CHECK(x.size(1) > 0, "lct: layer norm needs D >= 1");
  TORCH_CHECK(eps > 0, "lct: eps must be > 0");
  TORCH_CHECK(group_rows > 0 && x.size(0) % group_rows == 0,
              "lct: group_rows must be > 0 and divide the number of rows");
  const int64_t G = x.size(0) / group_rows;
  check_param_vector(weight, x, -1, "weight");
  check_param_vector(bias, x, -1, "bias");
  check_param_vector(shift, x, G, "shift");
  check_param_vector(scale, x, G, "scale");
  TORCH_CHECK(shift.has_value() == scale.has_value(), "lct: shift and scale go together");
}

inline void check_layer_norm_bwd_args(const at::Tensor& dy, const at::Tensor& xy,
                                      const at::Tensor& mean, const at::Tensor& rstd,
                                      const std::optional<at::Tensor>& weight,
                                      const std::optional<at::Tensor>& bias,
                                      const std::optional<at::Tensor>& scale, int64_t group_rows,
                                      bool xy_is_y) {
  TORCH_CHECK(dy.dim() == 2 && (dy.size(1) <= 1 || dy.stride(1) == 1),
              "lct: dy must be 2-D (M, D) with unit column stride");
  TORCH_CHECK(xy.sizes() == dy.sizes() && xy.scalar_type() == dy.scalar_type() &&
                  xy.device() == dy.device() && (xy.size(1) <= 1 || xy.stride(1) == 1),
              "lct: the saved input must match dy's shape, dtype and device");
  TORCH_CHECK(group_rows > 0 && dy.size(0) % group_rows == 0,
              "lct: group_rows must be > 0 and divide the number of rows");
  for (const at::Tensor* t : {&mean, &rstd})
    TORCH_CHECK(t->dim() == 1 && t->size(0) == dy.size(0) && t->scalar_type() == at::kFloat &&
                    t->is_contiguous() && t->device() == dy.device(),
                "lct: mean and rstd must be contiguous float32 (M,) tensors");
  check_param_vector(weight, dy, -1, "weight");
  check_param_vector(bias, dy, -1, "bias");
  check_param_vector(scale, dy, dy.size(0) / group_rows, "scale");
  TORCH_CHECK(!xy_is_y || (!weight.has_value() && !scale.has_value()),
              "lct: the memory-saving backward (from y) needs no weight and no modulation");
}

}  // namespace lct
