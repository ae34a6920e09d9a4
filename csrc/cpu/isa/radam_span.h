// float32 span kernel of the fused RAdam (+ EMA) update (lct::radam_step),
// compiled once per x86 ISA level (isa/radam_base.cpp, isa/radam_avx2.cpp).
//
// One pass reads param, grad, exp_avg, exp_avg_sq (and ema) once and writes each
// state once: the eager for-loop RAdam makes about ten passes per tensor (add,
// lerp, mul, addcmul, div, sqrt, add, div, three muls, add) and the EMA another.
// The operations and their order are torch.optim.RAdam's (coupled weight decay):
//   g  = grad + wd * param
//   m  = lerp(m, g, 1 - beta1)
//   v  = v * beta2 + (1 - beta2) * g * g
//   rectified:   param -= ((m / bc1) * lr) * (sqrt(bc2) / (sqrt(v) + eps)) * rect
//   otherwise:   param -= (m / bc1) * lr
//   ema = lerp(ema, param, ema_weight)              (when ema != nullptr)
// with torch's lerp: w < 0.5 ? a + w (b - a) : b - (b - a)(1 - w).  Elementwise,
// so any thread split gives the same bits.
#pragma once

#include <cstdint>

#if defined(__SSE2__)
#include <immintrin.h>
#endif

#include "pointwise_isa.h"

#ifndef LCT_ISA
#error "define LCT_ISA (the namespace of this ISA level) before including"
#endif

namespace lct::cpu::LCT_ISA {
namespace {

inline float lerp_scalar(float a, float b, float w) {
  return w < 0.5f ? a + w * (b - a) : b - (b - a) * (1.f - w);
}

inline float sqrt_scalar(float v) {
#if defined(__SSE2__)
  return _mm_cvtss_f32(_mm_sqrt_ss(_mm_set_ss(v)));  // no libm call, no errno
#else
  return __builtin_sqrtf(v);
#endif
}

inline void radam_one(const RAdamCoefs& c, float* p, const float* gp, float* m, float* v,
                      float* e) {
  const float g = c.weight_decay != 0.f ? *gp + c.weight_decay * *p : *gp;
  const float mn = lerp_scalar(*m, g, c.one_minus_b1);
  const float vn = *v * c.beta2 + c.one_minus_b2 * g * g;
  const float mh = mn / c.bc1;
  const float step = c.rectified ? ((mh * c.lr) * (c.sqrt_bc2 / (sqrt_scalar(vn) + c.eps))) * c.rect
                                 : mh * c.lr;
  const float pn = *p - step;
  *m = mn;
  *v = vn;
  *p = pn;
  if (e) *e = lerp_scalar(*e, pn, c.ema_weight);
}

#if defined(LCT_ISA_AVX2)
inline __m256 lerp8(__m256 a, __m256 b, float w) {
  return w < 0.5f ? _mm256_add_ps(a, _mm256_mul_ps(_mm256_set1_ps(w), _mm256_sub_ps(b, a)))
                  : _mm256_sub_ps(b, _mm256_mul_ps(_mm256_sub_ps(b, a), _mm256_set1_ps(1.f - w)));
}
#endif

}  // namespace

void radam_span_f32(const RAdamCoefs& c, float* param, const float* grad, float* exp_avg,
                    float* exp_avg_sq, float* ema, int64_t n) {
  int64_t i = 0;
#if defined(LCT_ISA_AVX2)
  const __m256 wd = _mm256_set1_ps(c.weight_decay), b2 = _mm256_set1_ps(c.beta2);
  const __m256 omb2 = _mm256_set1_ps(c.one_minus_b2), bc1 = _mm256_set1_ps(c.bc1);
  const __m256 lr = _mm256_set1_ps(c.lr), sbc2 = _mm256_set1_ps(c.sqrt_bc2);
  const __m256 eps = _mm256_set1_ps(c.eps), rect = _mm256_set1_ps(c.rect);
  const bool decay = c.weight_decay != 0.f;
  for (; i + 8 <= n; i += 8) {
    const __m256 p = _mm256_loadu_ps(param + i);
    __m256 g = _mm256_loadu_ps(grad + i);
    // no FMA where torch rounds twice (g + wd * p, v * b2 + ...): the same bits as the
    // scalar path and as torch's eager ops, which round each product
    if (decay) g = _mm256_add_ps(g, _mm256_mul_ps(wd, p));
    const __m256 m = lerp8(_mm256_loadu_ps(exp_avg + i), g, c.one_minus_b1);
    const __m256 v = _mm256_add_ps(_mm256_mul_ps(_mm256_loadu_ps(exp_avg_sq + i), b2),
                                   _mm256_mul_ps(_mm256_mul_ps(omb2, g), g));
    const __m256 mh = _mm256_div_ps(m, bc1);
    __m256 step = _mm256_mul_ps(mh, lr);
    if (c.rectified) {
      const __m256 adaptive = _mm256_div_ps(sbc2, _mm256_add_ps(_mm256_sqrt_ps(v), eps));
      step = _mm256_mul_ps(_mm256_mul_ps(step, adaptive), rect);
    }
    const __m256 pn = _mm256_sub_ps(p, step);
    _mm256_storeu_ps(exp_avg + i, m);
    _mm256_storeu_ps(exp_avg_sq + i, v);
    _mm256_storeu_ps(param + i, pn);
    if (ema) _mm256_storeu_ps(ema + i, lerp8(_mm256_loadu_ps(ema + i), pn, c.ema_weight));
  }
#endif
  for (; i < n; ++i)
    radam_one(c, param + i, grad + i, exp_avg + i, exp_avg_sq + i, ema ? ema + i : nullptr);
}

}  // namespace lct::cpu::LCT_ISA
