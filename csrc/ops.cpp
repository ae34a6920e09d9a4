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
  // Layer norm with optional weight and bias, optionally followed by the adaLN
  // modulation of DiT: rows of x are grouped by sample, group g = row / group_rows.
  //   xhat = (x - mean) * rstd,  rstd = 1 / sqrt(var + eps)  (biased variance)
  //   z = xhat * weight + bias;  y = z * (1 + scale[g]) + shift[g]
  // x: (M, D) float32/float16/bfloat16 with unit column stride; weight, bias: (D,)
  // float32; shift, scale: (M / group_rows, D) float32.  Returns (y (M, D) in x's
  // dtype, mean (M,) float32, rstd (M,) float32).  save_y only tells the autograd
  // formula to keep y instead of x (the memory-saving mode); kernels ignore it.
  m.def(
      "layer_norm_fwd(Tensor x, Tensor? weight, Tensor? bias, Tensor? shift, Tensor? scale, "
      "float eps, int group_rows, bool save_y) -> (Tensor, Tensor, Tensor)");
  // Backward of layer_norm_fwd.  xy is x, or y when xy_is_y (then weight, shift and
  // scale must be absent and xhat = y - bias).  Returns (dx (M, D) in dy's dtype, or
  // (0,) when !need_dx; p1 = sum over each group's rows of dy; p2 = the same of
  // dy * xhat), p1 and p2 (G, D) float32 or (0,) when !need_partials.  Parameter
  // gradients follow from them: d bias = sum_g (1 + scale_g) p1_g,
  // d weight = sum_g (1 + scale_g) p2_g, d shift = p1, d scale = weight p2 + bias p1.
  // layer_norm_fwd's y with its autograd node in C++ (cpu/layer_norm_autograd.cpp): the
  // eager path for CPU tensors; the backward runs layer_norm_bwd and the parameter sums.
  m.def(
      "layer_norm_autograd(Tensor x, Tensor? weight, Tensor? bias, Tensor? shift, "
      "Tensor? scale, float eps, int group_rows, bool save_y) -> Tensor");
  m.def(
      "layer_norm_bwd(Tensor dy, Tensor xy, Tensor mean, Tensor rstd, Tensor? weight, "
      "Tensor? bias, Tensor? scale, int group_rows, bool xy_is_y, bool need_dx, "
      "bool need_partials) -> (Tensor, Tensor, Tensor)");
  // Batched exact linear assignment.  cost: (B, N, M) float32/float64, contiguous,
  // N <= M; +inf marks a forbidden pair.  sizes: optional (B, 2) int64 (rows, columns)
  // of each problem inside a padded batch.  Returns (assignment (B, N) int64, the
  // column of each row, -1 for padding rows; u (B, N) and v (B, M) float64 dual
  // potentials, the optimality certificate; status (B,) int32, lct::lap::Status).
  m.def("ot_assign(Tensor cost, Tensor? sizes) -> (Tensor, Tensor, Tensor, Tensor)");
  // Fused bias + GELU(tanh) of an MLP's first Linear (cpu/bias_gelu.cpp; CPU only):
  //   y = gelu_tanh(h + bias),  h (M, N) contiguous float32/float16/bfloat16 (the
  //   bias-free GEMM's output), bias (N,) of h's dtype; y (M, N) in h's dtype.
  // Backward: dh = dy * gelu_tanh'(h + bias) in h's dtype, or (0,) when !need_dh;
  //   dbias = sum over rows of dh, (N,) float32, or (0,) when !need_dbias.
  m.def("bias_gelu_fwd(Tensor h, Tensor bias) -> Tensor");
  m.def("bias_gelu_bwd(Tensor dy, Tensor h, Tensor bias, bool need_dh, bool need_dbias) "
        "-> (Tensor, Tensor)");
  // Fused gated residual of adaLN-zero (cpu/gated_residual.cpp; CPU only):
  //   out = x + gate[:, None, :] * (y + bias),  x, y (B, T, D) contiguous
  //   float32/float16/bfloat16, gate (B, D) of x's dtype with unit column stride (a
  //   column slice of adaLN's output), bias (D,) of x's dtype or None (zero): the bias
  //   of the Linear that produced y, folded in.
  // Backward: dgate = sum over T of dout * (y + bias), (B, D) float32, or (0,) when
  //   !need_dgate; dy = dout * gate[:, None, :] in dout's dtype, or (0,) when !need_dy;
  //   dbias = sum over B and T of dy, (D,) float32, or (0,) when !need_dbias (dx is dout).
  m.def("gated_residual_fwd(Tensor x, Tensor gate, Tensor y, Tensor? bias) -> Tensor");
  m.def("gated_residual_bwd(Tensor dout, Tensor gate, Tensor y, Tensor? bias, bool need_dgate, "
        "bool need_dy, bool need_dbias) -> (Tensor, Tensor, Tensor)");
  // gated_residual_fwd and bias_gelu_fwd with their autograd nodes in C++
  // (cpu/pointwise_autograd.cpp): eager training calls on CPU tensors, no Python backward.
  m.def("gated_residual_autograd(Tensor x, Tensor gate, Tensor y, Tensor? bias) -> Tensor");
  m.def("bias_gelu_autograd(Tensor h, Tensor bias) -> Tensor");
  // One fused step of torch.optim.RAdam (coupled weight decay) over a group's
  // contiguous float32 CPU tensors, in place, optionally followed by
  // emas[i].lerp_(params[i], ema_weight) (cpu/radam.cpp).  The host passes the step's
  // scalars: bias_correction1 = 1 - beta1^t, sqrt_bias_correction2 = sqrt(1 - beta2^t),
  // rect = r_t and rectified = rho_t > 5 (lct_kernels/ops/radam.py).
  m.def(
      "radam_step(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] emas, float lr, float beta1, float beta2, "
      "float eps, float weight_decay, float bias_correction1, float sqrt_bias_correction2, "
      "float rect, bool rectified, float ema_weight) -> ()");
  // CPU introspection (csrc/cpu/introspect.cpp), no tensors:
  //   _cpu_isa: the ISA path of the CPU kernels ("avx2+fma: ..." or "base: ...", with why);
  //   _cpu_threads: threads a CPU kernel uses for `tasks` tasks of `elems_per_task`
  //   elements under at most max_threads threads (< 1: torch.get_num_threads()).
  m.def("_cpu_isa() -> str");
  m.def("_cpu_threads(int tasks, int elems_per_task, int max_threads=0) -> int");
}
