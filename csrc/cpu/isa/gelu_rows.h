// float32 rows of the fused bias + GELU(tanh) (lct::bias_gelu_fwd / _bwd),
// compiled once per x86 ISA level (isa/gelu_base.cpp, isa/gelu_avx2.cpp).
//
//   u = h + bias,  z = k0 (u + k1 u^3),  k0 = sqrt(2 / pi),  k1 = 0.044715
//   gelu(u) = 0.5 u (1 + tanh z) = u s,  s = sigmoid(2 z) = 1 / (1 + exp(-2 z))
//   gelu'(u) = s + u s (1 - s) 2 k0 (1 + 3 k1 u^2)
//
// Why sigmoid and not tanh: 0.5 (1 + tanh z) cancels for negative u (at u = -10
// the float32 sum 1 + tanh z keeps one or two digits), u s does not; and one exp
// plus one division is what an AVX2 lane computes fast, where ATen's vectorised
// tanh measured 2 ns per element on the 2-core development machine (2026-12-02:
// 0.49 ms for 512 x 512 against 0.06 ms for a multiply).
// Range: s is computed from u clamped to [-20, 20] (beyond it s is exactly 0 or 1
// in float32 and the derivative's second term exactly 0), with exp's argument
// clamped to [-87, 88] and s set to 0 where -2 z > 88; the output u s uses the
// unclamped u, so +inf -> +inf, -inf -> NaN (as ATen) and NaN propagates.
// Like layer_norm_rows.h, every helper has internal linkage (no ODR hazard between
// the two ISA copies).
#pragma once

#include <cmath>
#include <cstdint>

#if defined(LCT_ISA_AVX2)
#include <immintrin.h>
#endif

#include "avx2_lanes.h"
#include "pointwise_isa.h"

#ifndef LCT_ISA
#error "define LCT_ISA (the namespace of this ISA level) before including"
#endif

namespace lct::cpu::LCT_ISA {
namespace {

constexpr float kK0 = 0.7978845608028654f;  // sqrt(2 / pi)
constexpr float kK1 = 0.044715f;
constexpr float kUClamp = 20.f;

struct GeluTerms {
  float s;      // sigmoid(2 z(u_c))
  float uc;     // u clamped to [-20, 20] (NaN stays NaN)
  float u2;     // uc^2
};

inline GeluTerms gelu_terms(float u) {
  const float uc = u > kUClamp ? kUClamp : (u < -kUClamp ? -kUClamp : u);
  const float u2 = uc * uc;
  const float a = -2.f * kK0 * (uc + kK1 * uc * u2);
  const float e = __builtin_expf(a > 88.f ? 88.f : (a < -87.f ? -87.f : a));
  const float s = a > 88.f ? 0.f : 1.f / (1.f + e);
  return {s, uc, u2};
}

inline float gelu_scalar(float u) { return u * gelu_terms(u).s; }

inline float gelu_grad_scalar(float u) {
  const GeluTerms t = gelu_terms(u);
  return t.s + t.uc * (t.s * (1.f - t.s)) * (2.f * kK0) * (1.f + 3.f * kK1 * t.u2);
}

#if defined(LCT_ISA_AVX2)
// exp(x) for x in [-87, 88] (the caller clamps): Cephes' expf, about 1 ulp.
inline __m256 exp256(__m256 x) {
  const __m256 fx = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  const __m256 y = _mm256_add_ps(_mm256_fmadd_ps(_mm256_mul_ps(p, r), r, r), _mm256_set1_ps(1.f));
  const __m256i n = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(n));
}

struct GeluTerms8 {
  __m256 s, uc, u2;
};

inline GeluTerms8 gelu_terms8(__m256 u) {
  // min/max return their second operand when either is NaN: u second keeps NaN
  const __m256 uc = _mm256_max_ps(_mm256_set1_ps(-kUClamp), _mm256_min_ps(_mm256_set1_ps(kUClamp), u));
  const __m256 u2 = _mm256_mul_ps(uc, uc);
  const __m256 inner = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_set1_ps(kK1), uc), u2, uc);
  const __m256 a = _mm256_mul_ps(_mm256_set1_ps(-2.f * kK0), inner);
  const __m256 ac = _mm256_max_ps(_mm256_set1_ps(-87.f), _mm256_min_ps(_mm256_set1_ps(88.f), a));
  const __m256 e = exp256(ac);
  __m256 s = _mm256_div_ps(_mm256_set1_ps(1.f), _mm256_add_ps(_mm256_set1_ps(1.f), e));
  s = _mm256_andnot_ps(_mm256_cmp_ps(a, _mm256_set1_ps(88.f), _CMP_GT_OQ), s);
  return {s, uc, u2};
}
#endif

}  // namespace

void bias_gelu_fwd_rows_f32(const float* h, const float* bias, float* y, int64_t N, int64_t r0,
                            int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const float* hr = h + r * N;
    float* yr = y + r * N;
#if defined(LCT_ISA_AVX2)
    // every element through the vector path (the tail masked), so an element's value
    // never depends on where a row ends
    for (int64_t j = 0; j < N; j += 8) {
      const Lanes l = lanes_at(j, N);
      const __m256 u = _mm256_add_ps(l.load(hr + j), l.load(bias + j));
      l.store(yr + j, _mm256_mul_ps(u, gelu_terms8(u).s));
    }
#else
    for (int64_t j = 0; j < N; ++j) yr[j] = gelu_scalar(hr[j] + bias[j]);
#endif
  }
}

void bias_gelu_bwd_rows_f32(const float* dy, const float* h, const float* bias, float* dh,
                            float* dbias, int64_t N, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const float* hr = h + r * N;
    const float* gr = dy + r * N;
    float* dr = dh ? dh + r * N : nullptr;
#if defined(LCT_ISA_AVX2)
    const __m256 two_k0 = _mm256_set1_ps(2.f * kK0), three_k1 = _mm256_set1_ps(3.f * kK1);
    const __m256 one = _mm256_set1_ps(1.f);
    for (int64_t j = 0; j < N; j += 8) {
      const Lanes l = lanes_at(j, N);
      const __m256 gv = l.load(gr + j);
      const GeluTerms8 t = gelu_terms8(_mm256_add_ps(l.load(hr + j), l.load(bias + j)));
      const __m256 ds = _mm256_mul_ps(t.s, _mm256_sub_ps(one, t.s));
      const __m256 dz = _mm256_mul_ps(two_k0, _mm256_fmadd_ps(three_k1, t.u2, one));
      const __m256 d = _mm256_add_ps(t.s, _mm256_mul_ps(_mm256_mul_ps(t.uc, ds), dz));
      const __m256 out = _mm256_mul_ps(gv, d);
      if (dr) l.store(dr + j, out);
      if (dbias) l.store(dbias + j, _mm256_add_ps(l.load(dbias + j), out));
    }
#else
    for (int64_t j = 0; j < N; ++j) {
      const float out = gr[j] * gelu_grad_scalar(hr[j] + bias[j]);
      if (dr) dr[j] = out;
      if (dbias) dbias[j] += out;
    }
#endif
  }
}

}  // namespace lct::cpu::LCT_ISA
