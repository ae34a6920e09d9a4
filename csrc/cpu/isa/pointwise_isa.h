// Declarations of the per-ISA builds of the pointwise training kernels: the
// bias + GELU(tanh) rows (isa/gelu_rows.h), the gated residual (isa/gated_rows.h)
// and the fused RAdam + EMA update (isa/radam_span.h), each compiled in a *_base.cpp (baseline x86-64) and a
// *_avx2.cpp (AVX2 + FMA) translation unit and chosen at run time (use_avx2()).
#pragma once

#include <cstdint>

namespace lct::cpu {

// The scalar coefficients of one RAdam step (torch.optim.RAdam, coupled weight
// decay), computed once per step on the host in float64 and rounded to float32 as
// torch's tensor-scalar ops round them.
struct RAdamCoefs {
  float lr;           // learning rate
  float one_minus_b1; // 1 - beta1: exp_avg.lerp_(grad, 1 - beta1)
  float beta2;
  float one_minus_b2;
  float eps;
  float weight_decay; // 0: none
  float bc1;          // 1 - beta1^t
  float sqrt_bc2;     // sqrt(1 - beta2^t)
  float rect;         // the variance rectification term r_t
  bool rectified;     // rho_t > 5: the adaptive update; otherwise the SGD-with-momentum one
  float ema_weight;   // EMA: ema.lerp_(param, ema_weight) after the update, when ema != nullptr
};

#define LCT_DECLARE_POINTWISE(ISA)                                                          \
  namespace ISA {                                                                           \
  /* y[r, j] = gelu_tanh(h[r, j] + bias[j]) for rows [r0, r1) of (M, N) row-major */       \
  void bias_gelu_fwd_rows_f32(const float* h, const float* bias, float* y, int64_t N,       \
                              int64_t r0, int64_t r1);                                      \
  /* dh[r, j] = dy[r, j] gelu_tanh'(h[r, j] + bias[j]); dbias[j] += sum_r dh[r, j] when */ \
  /* dbias != nullptr (float32 accumulation over the rows given); dh may be nullptr.  */   \
  void bias_gelu_bwd_rows_f32(const float* dy, const float* h, const float* bias,          \
                              float* dh, float* dbias, int64_t N, int64_t r0, int64_t r1);  \
  /* out[t, j] = x[t, j] + gate[j] (y[t, j] + bias[j]) over one sample's (T, D) rows; */  \
  /* bias may be nullptr (zero) */                                                         \
  void gated_residual_fwd_f32(const float* x, const float* gate, const float* y,            \
                              const float* bias, float* out, int64_t T, int64_t D);         \
  /* dy[t, j] = dout[t, j] gate[j]; dgate[j] = sum_t dout (y + bias); dbias[j] = sum_t dy */\
  /* (t in order, overwritten); dy, dgate, dbias and bias may each be nullptr */            \
  void gated_residual_bwd_f32(const float* dout, const float* gate, const float* y,         \
                              const float* bias, float* dy, float* dgate, float* dbias,     \
                              int64_t T, int64_t D);                                        \
  /* One RAdam (+ EMA) update of n contiguous float32 elements, in place. */               \
  void radam_span_f32(const RAdamCoefs& c, float* param, const float* grad, float* exp_avg, \
                      float* exp_avg_sq, float* ema, int64_t n);                            \
  }
LCT_DECLARE_POINTWISE(base)
LCT_DECLARE_POINTWISE(avx2)
#undef LCT_DECLARE_POINTWISE

}  // namespace lct::cpu
