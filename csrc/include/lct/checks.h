// Argument checks shared by the CPU and CUDA kernels (host code only).
//
// The Python wrappers validate user input with readable errors first; these
// checks guard the raw torch.ops.lct.* entry points (C++ users, torch.library
// tests), so they state the contract of each schema in csrc/ops.cpp.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>

namespace lct {

// x is (B, N) with unit column stride and matches ref's sizes, dtype and device.
inline void check_rows_like(const at::Tensor& x, const at::Tensor& ref, const char* name) {
  TORCH_CHECK(x.dim() == 2, "lct: ", name, " must be 2-D (B, N), got ", x.dim(), "-D");
  TORCH_CHECK(x.size(1) <= 1 || x.stride(1) == 1, "lct: ", name, " must have unit column stride");
  TORCH_CHECK(x.sizes() == ref.sizes() && x.scalar_type() == ref.scalar_type() &&
                  x.device() == ref.device(),
              "lct: ", name, " must match the first input's shape, dtype and device");
}

// v is a contiguous float32 (B,) tensor on ref's device.
inline void check_row_vector(const at::Tensor& v, const at::Tensor& ref, const char* name) {
  TORCH_CHECK(v.dim() == 1 && v.size(0) == ref.size(0) && v.scalar_type() == at::kFloat &&
                  v.is_contiguous() && v.device() == ref.device(),
              "lct: ", name, " must be a contiguous float32 (B,) tensor on the inputs' device");
}

inline void check_scalar_c(const at::Tensor& c, const at::Tensor& ref) {
  TORCH_CHECK(c.numel() == 1 && c.scalar_type() == at::kDouble && c.device() == ref.device(),
              "lct: c must be a float64 scalar tensor on the inputs' device");
}

inline void check_kind(int64_t kind) {
  TORCH_CHECK(kind >= 0 && kind <= 2, "lct: unknown loss kind ", kind);
}

inline void check_robust_loss_args(const at::Tensor& pred, const at::Tensor& target,
                                   const at::Tensor& c, const std::optional<at::Tensor>& weight,
                                   int64_t kind, int64_t reduction) {
  check_rows_like(pred, pred, "pred");
  check_rows_like(target, pred, "target");
  check_scalar_c(c, pred);
  if (weight.has_value()) check_row_vector(*weight, pred, "weight");
  check_kind(kind);
  TORCH_CHECK(reduction >= 0 && reduction <= 2, "lct: unknown reduction ", reduction);
  TORCH_CHECK(pred.size(0) > 0 && pred.size(1) > 0, "lct: robust_loss needs B >= 1 and N >= 1");
  TORCH_CHECK(pred.size(0) <= 0x7fffffff, "lct: at most 2^31 - 1 samples");
}

inline void check_objective_args(const at::Tensor& student, const at::Tensor& teacher,
                                 const at::Tensor& x0, const at::Tensor& weight,
                                 const at::Tensor& diff_weight, const at::Tensor& diff_mask,
                                 const at::Tensor& c, int64_t kind) {
  check_rows_like(student, student, "student");
  check_rows_like(teacher, student, "teacher");
  check_rows_like(x0, student, "x0");
  check_row_vector(weight, student, "weight");
  check_row_vector(diff_weight, student, "diff_weight");
  check_row_vector(diff_mask, student, "diff_mask");
  check_scalar_c(c, student);
  check_kind(kind);
  TORCH_CHECK(student.size(0) > 0 && student.size(1) > 0,
              "lct: consistency_objective needs B >= 1 and N >= 1");
  TORCH_CHECK(student.size(0) <= 0x7fffffff, "lct: at most 2^31 - 1 samples");
}

}  // namespace lct
