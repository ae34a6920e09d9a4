// Every schema of the `lct` operator library, in one place.
//
// Kernels register under their dispatch keys in cpu/*.cpp and cuda/*.cu; the
// Python side (lct_kernels/ops/*.py) adds the fake (meta) kernels and the
// autograd formulas.  Shapes are the flattened 2-D views the Python wrappers
// pass in: rows are samples, columns are the flattened per-sample elements.
#include <torch/library.h>

TORCH_LIBRARY(lct, m) {
  // pred, target: (B, N) float32/float16/bfloat16, same dtype, unit column stride.
  // c: 0-d float64 on the device of pred (read on the device: no recompile, no sync).  kind: lct::LossKind.
  // Returns (loss (B,) float32 = rho per sample,
  //          grad (B, N) in pred's dtype = d loss_i / d pred, or (0,) when !compute_grad).
  m.def(
      "robust_loss(Tensor pred, Tensor target, Tensor c, int kind, bool elementwise, "
      "bool compute_grad) -> (Tensor, Tensor)");
  // x: (B, N), scale: (B,) float32.  Returns x * scale[:, None] in x's dtype,
  // computed in float32 (the backward of the fused losses).
  m.def("scale_rows(Tensor x, Tensor scale) -> Tensor");
  // student, teacher, x0: (B, N) same dtype.  weight, diff_weight, diff_mask: (B,) float32.
  // Returns (total () float32, cm_loss (B,) float32, diff_loss () float32,
  //          grad (B, N) = d total / d student in student's dtype, or (0,)).
  m.def(
      "consistency_objective(Tensor student, Tensor teacher, Tensor x0, Tensor weight, "
      "Tensor diff_weight, Tensor diff_mask, Tensor c, int kind, float diff_coef, "
      "bool compute_grad) -> (Tensor, Tensor, Tensor, Tensor)");
}
