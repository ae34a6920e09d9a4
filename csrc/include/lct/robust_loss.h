// Robust-loss math shared by the CPU and CUDA kernels.
//
// Every loss is a function rho(m; c) of a non-negative "mean squared error" m
// (per sample, or per element in the elementwise variants), with its
// derivative drho/dm.  Kernels compute
//     loss   = rho(m)
//     dL/dd  = rho'(m) * 2 * d / N          (d = pred - target, N = row length)
// so only rho and rho' live here.  Formulas (c2 = c*c):
//     Cauchy         rho = log1p(m / (2 c2))          rho' = 1 / (m + 2 c2)
//     Pseudo-Huber   rho = sqrt(m + c2) - c            rho' = 1 / (2 sqrt(m + c2))
//                        = m / (sqrt(m + c2) + c)      (no cancellation for m << c2)
//     Geman-McClure  rho = 2 m / (m + 4 c2)            rho' = 8 c2 / (m + 4 c2)^2
// The Python side (lct_kernels/ops/robust_loss.py) holds the same formulas as
// the float64 reference; keep the two in step.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define LCT_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define LCT_HOST_DEVICE inline
#endif

namespace lct {

// Must match lct_kernels/ops/robust_loss.py:LOSS_KINDS.
enum LossKind : int64_t { kCauchy = 0, kPseudoHuber = 1, kGemanMcClure = 2 };

template <typename acc_t>
LCT_HOST_DEVICE acc_t robust_rho(int64_t kind, acc_t m, acc_t c, acc_t c2) {
  if (kind == kCauchy) return log1p(m / (acc_t(2) * c2));
  if (kind == kPseudoHuber) return m / (sqrt(m + c2) + c);
  return acc_t(2) * m / (m + acc_t(4) * c2);
}

template <typename acc_t>
LCT_HOST_DEVICE acc_t robust_drho(int64_t kind, acc_t m, acc_t c2) {
  if (kind == kCauchy) return acc_t(1) / (m + acc_t(2) * c2);
  if (kind == kPseudoHuber) return acc_t(0.5) / sqrt(m + c2);
  const acc_t den = m + acc_t(4) * c2;
  return acc_t(8) * c2 / (den * den);
}

}  // namespace lct
