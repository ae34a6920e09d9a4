// float32 rows of the fused gated residual (lct::gated_residual_fwd / _bwd), compiled
// once per x86 ISA level (isa/gated_base.cpp, isa/gated_avx2.cpp).
//
// One sample b of x, y (B, T, D) row-major, gate (B, D) and an optional bias (D,) of y
// (the Linear's bias, folded in: its GEMM then runs without one):
//   forward   out[t, j] = x[t, j] + gate[j] (y[t, j] + bias[j])
//   backward  dy[t, j] = dout[t, j] gate[j]
//             dgate[j] = sum_t dout[t, j] (y[t, j] + bias[j])   (float32, t in order)
//             dbias_b[j] = sum_t dy[t, j]   (this sample's partial, float32, t in order)
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

#include "avx2_lanes.h"
#include "pointwise_isa.h"

#ifndef LCT_ISA
#error "define LCT_ISA (the namespace of this ISA level) before including"
#endif

namespace lct::cpu::LCT_ISA {

void gated_residual_fwd_f32(const float* x, const float* gate, const float* y, const float* bias,
                            float* out, int64_t T, int64_t D) {
  for (int64_t t = 0; t < T; ++t) {
    const float* xr = x + t * D;
    const float* yr = y + t * D;
    float* orow = out + t * D;
#if defined(LCT_ISA_AVX2)
    for (int64_t j = 0; j < D; j += 8) {
      const Lanes l = lanes_at(j, D);
      __m256 yv = l.load(yr + j);
      if (bias) yv = _mm256_add_ps(yv, l.load(bias + j));
      l.store(orow + j, _mm256_fmadd_ps(l.load(gate + j), yv, l.load(xr + j)));
    }
#else
    if (bias) {
      for (int64_t j = 0; j < D; ++j) orow[j] = xr[j] + gate[j] * (yr[j] + bias[j]);
    } else {
      for (int64_t j = 0; j < D; ++j) orow[j] = xr[j] + gate[j] * yr[j];
    }
#endif
  }
}

void gated_residual_bwd_f32(const float* dout, const float* gate, const float* y, const float* bias,
                            float* dy, float* dgate, float* dbias, int64_t T, int64_t D) {
  for (int64_t j = 0; j < D; ++j) {
    if (dgate) dgate[j] = 0.f;
    if (dbias) dbias[j] = 0.f;
  }
  for (int64_t t = 0; t < T; ++t) {
    const float* gr = dout + t * D;
    const float* yr = y + t * D;
    float* dr = dy ? dy + t * D : nullptr;
#if defined(LCT_ISA_AVX2)
    for (int64_t j = 0; j < D; j += 8) {
      const Lanes l = lanes_at(j, D);
      const __m256 g = l.load(gr + j);
      const __m256 d = _mm256_mul_ps(g, l.load(gate + j));
      if (dr) l.store(dr + j, d);
      if (dbias) l.store(dbias + j, _mm256_add_ps(l.load(dbias + j), d));
      if (dgate) {
        __m256 yv = l.load(yr + j);
        if (bias) yv = _mm256_add_ps(yv, l.load(bias + j));
        l.store(dgate + j, _mm256_fmadd_ps(g, yv, l.load(dgate + j)));
      }
    }
#else
    for (int64_t j = 0; j < D; ++j) {
      const float d = gr[j] * gate[j];
      if (dr) dr[j] = d;
      if (dbias) dbias[j] += d;
      if (dgate) dgate[j] += gr[j] * (bias ? yr[j] + bias[j] : yr[j]);
    }
#endif
  }
}

}  // namespace lct::cpu::LCT_ISA
