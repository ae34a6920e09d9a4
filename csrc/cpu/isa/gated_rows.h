// float32 rows of the fused gated residual (lct::gated_residual_fwd / _bwd), compiled
// once per x86 ISA level (isa/gated_base.cpp, isa/gated_avx2.cpp).
//
// One sample b of x, y (B, T, D) row-major and gate (B, D):
//   forward   out[t, j] = x[t, j] + gate[j] y[t, j]
//   backward  dy[t, j] = dout[t, j] gate[j]
//             dgate[j] = sum_t dout[t, j] y[t, j]   (float32, t in order)
// (dx = dout needs no pass.)  The AVX2 build uses FMA (one rounding of g y + x where
// eager's mul then add rounds twice); the baseline build multiplies, then adds.
// Every element goes through the same lane math (tails masked), so a value never
// depends on where a row ends; dgate's sum over t runs in t order for each j, so it is
// the same whichever thread runs the sample.
#pragma once

#include <cstdint>

#if defined(LCT_ISA_AVX2)
#include <immintrin.h>
#endif

#include "pointwise_isa.h"

#ifndef LCT_ISA
#error "define LCT_ISA (the namespace of this ISA level) before including"
#endif

namespace lct::cpu::LCT_ISA {
namespace {

#if defined(LCT_ISA_AVX2)
inline __m256i tail_mask(int64_t n) {  // lanes [0, n) set, n in [0, 8)
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), lanes);
}

// 8 lanes (or the n < 8 of a tail, the rest zero) at p
struct Lanes {
  bool full;
  __m256i mask;
  __m256 load(const float* p) const { return full ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, mask); }
  void store(float* p, __m256 v) const {
    if (full) _mm256_storeu_ps(p, v);
    else _mm256_maskstore_ps(p, mask, v);
  }
};

inline Lanes lanes_at(int64_t j, int64_t D) {
  const int64_t n = D - j;
  return {n >= 8, tail_mask(n < 8 ? n : 0)};
}
#endif

}  // namespace

void gated_residual_fwd_f32(const float* x, const float* gate, const float* y, float* out,
                            int64_t T, int64_t D) {
  for (int64_t t = 0; t < T; ++t) {
    const float* xr = x + t * D;
    const float* yr = y + t * D;
    float* orow = out + t * D;
#if defined(LCT_ISA_AVX2)
    for (int64_t j = 0; j < D; j += 8) {
      const Lanes l = lanes_at(j, D);
      l.store(orow + j, _mm256_fmadd_ps(l.load(gate + j), l.load(yr + j), l.load(xr + j)));
    }
#else
    for (int64_t j = 0; j < D; ++j) orow[j] = xr[j] + gate[j] * yr[j];
#endif
  }
}

void gated_residual_bwd_f32(const float* dout, const float* gate, const float* y, float* dy,
                            float* dgate, int64_t T, int64_t D) {
  if (dgate) {
    for (int64_t j = 0; j < D; ++j) dgate[j] = 0.f;
  }
  for (int64_t t = 0; t < T; ++t) {
    const float* gr = dout + t * D;
    const float* yr = y + t * D;
    float* dr = dy ? dy + t * D : nullptr;
#if defined(LCT_ISA_AVX2)
    for (int64_t j = 0; j < D; j += 8) {
      const Lanes l = lanes_at(j, D);
      const __m256 g = l.load(gr + j);
      if (dr) l.store(dr + j, _mm256_mul_ps(g, l.load(gate + j)));
      if (dgate) l.store(dgate + j, _mm256_fmadd_ps(g, l.load(yr + j), l.load(dgate + j)));
    }
#else
    for (int64_t j = 0; j < D; ++j) {
      if (dr) dr[j] = gr[j] * gate[j];
      if (dgate) dgate[j] += gr[j] * yr[j];
    }
#endif
  }
}

}  // namespace lct::cpu::LCT_ISA
