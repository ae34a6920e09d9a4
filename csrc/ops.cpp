// Every schema of the `lct` operator library, in one place.
//
// Kernels register under their dispatch keys in cpu/*.cpp and cuda/*.cu; the
// Python side (lct_kernels/ops/*.py) adds the fake (meta) kernels and the
// autograd formulas.  Shapes are the flattened 2-D views the Python wrappers
// pass in: rows are samples, columns are the flattened per-sample elements.
#include <torch/library.h>

TORCH_LIBRARY(lct, m) {
  // pred, target: (B, N) float32/float16/bfloat16, same dtype, unit column stride.
  // c: 0-d float64 on pred's device (read on the device: no recompile, no sync).
  // weight: optional (B,) float32.  kind: lct::LossKind.  reduction: 0 none, 1 mean, 2 sum.
  // Returns (out = reduction of weight_i * rho_i: (B,) or () float32,
  //          rho (B,) float32 (unweighted, per sample),
  //          grad (B, N) = d out / d pred in pred's dtype -- for reduction "none" the
  //          gradient of sum_i out_i -- or (0,) when !compute_grad).
  m.def(
      "robust_loss(Tensor pred, Tensor target, Tensor c, Tensor? weight, int kind, "
      "bool elementwise, int reduction, bool compute_grad) -> (Tensor, Tensor, Tensor)");
  // student, teacher, x0: (B, N) same dtype.  weight, diff_weight, diff_mask: (B,) float32.
  // Returns (total () float32, cm_loss (B,) float32, diff_loss () float32,
  //          grad (B, N) = d total / d student in student's dtype, or (0,)).
  m.def(
      "consistency_objective(Tensor student, Tensor teacher, Tensor x0, Tensor weight, "
      "Tensor diff_weight, Tensor diff_mask, Tensor c, int kind, float diff_coef, "
      "bool compute_grad) -> (Tensor, Tensor, Tensor, Tensor)");
}
