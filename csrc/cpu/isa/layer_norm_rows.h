// float32 row kernels of the layer norm family, compiled once per x86 ISA level
// (isa/*.cpp) and chosen at run time (layer_norm.cpp).  This header is included
// only by those translation units and deliberately uses no torch or standard
// library code that could be emitted out of line: every helper has internal
// linkage, so the AVX2 copy can never be picked by the linker for the baseline
// path (the one-definition-rule hazard of compiling a file for two ISAs).
#pragma once

#include <cstdint>

#include "layer_norm_args.h"

#if defined(__SSE2__)
#include <immintrin.h>
#endif

#ifndef LCT_ISA
#error "define LCT_ISA (the namespace of this ISA level) before including"
#endif

namespace lct::cpu::LCT_ISA {
namespace {

constexpr int64_t kBlock = 2048;

inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// Non-temporal copy of a row computed in L1 to its destination (see row_ops.h).
// The caller issues one store fence after its last row (a fence per short row
// would dominate the qk-norm case of millions of 64-element rows).
inline void stream_copy(float* dst, const float* src, int64_t n) {
  int64_t j = 0;
#if defined(__AVX__)
  while (j < n && (reinterpret_cast<uintptr_t>(dst + j) & 31) != 0) dst[j] = src[j], ++j;
  for (; j + 8 <= n; j += 8) _mm256_stream_ps(dst + j, _mm256_loadu_ps(src + j));
#elif defined(__SSE2__)
  while (j < n && (reinterpret_cast<uintptr_t>(dst + j) & 15) != 0) dst[j] = src[j], ++j;
  for (; j + 4 <= n; j += 4) _mm_stream_ps(dst + j, _mm_loadu_ps(src + j));
#endif
  for (; j < n; ++j) dst[j] = src[j];
}

// 1 / sqrt(v) in float64, rounded once to float32.  The SSE2 square root keeps
// the libm call and its errno check (math-errno is on by default) off the
// per-row path, which at D = 32 is most of a row's latency.
inline float inv_sqrt(double v) {
#if defined(__SSE2__)
  return static_cast<float>(1.0 / _mm_cvtsd_f64(_mm_sqrt_sd(_mm_setzero_pd(), _mm_set_sd(v))));
#else
  return static_cast<float>(1.0 / __builtin_sqrt(v));
#endif
}

inline void store_fence() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

}  // namespace

void layer_norm_fwd_rows_f32(const LayerNormFwdArgs& a, int64_t r0, int64_t r1, float* scratch) {
  const int64_t D = a.D;
  // Per-row scalar work is what costs at small D: the group of a row is tracked
  // incrementally (no 64-bit division per row), and there is one division per row.
  int64_t g = r0 / a.group_rows, g_end = (g + 1) * a.group_rows;
  for (int64_t r = r0; r < r1; ++r) {
    if (r == g_end) ++g, g_end += a.group_rows;
    const float* xi = a.x + r * a.x_stride;
    double sum = 0.0;
    for (int64_t jb = 0; jb < D; jb += kBlock) {
      const int64_t je = min64(D, jb + kBlock);
      float acc = 0.f;
#pragma omp simd reduction(+ : acc)
      for (int64_t j = jb; j < je; ++j) acc += xi[j];
      sum += acc;
    }
    const float mf = static_cast<float>(sum / double(D));
    double ss = 0.0;
    for (int64_t jb = 0; jb < D; jb += kBlock) {
      const int64_t je = min64(D, jb + kBlock);
      float acc = 0.f;
#pragma omp simd reduction(+ : acc)
      for (int64_t j = jb; j < je; ++j) acc += (xi[j] - mf) * (xi[j] - mf);
      ss += acc;
    }
    const float rs = inv_sqrt(ss / double(D) + a.eps);
    a.mean[r] = mf;
    a.rstd[r] = rs;
    const float* sc = a.scale ? a.scale + g * D : a.zeros;
    const float* sh = a.shift ? a.shift + g * D : a.zeros;
    const float* w = a.weight;
    const float* b = a.bias;
    // A big output is computed in L1 and streamed out; a small one is stored in place.
    float* out = a.stream ? scratch : a.y + r * D;
#pragma omp simd
    for (int64_t j = 0; j < D; ++j) out[j] = ((xi[j] - mf) * rs * w[j] + b[j]) * (1.f + sc[j]) + sh[j];
    if (a.stream) stream_copy(a.y + r * D, scratch, D);
  }
  if (a.stream) store_fence();
}

void layer_norm_bwd_task_f32(const LayerNormBwdArgs& a, int64_t task, float* p1, float* p2,
                             float* gain, float* scratch) {
  const int64_t D = a.D;
  const int64_t g = task / a.chunks, c = task % a.chunks;
  const int64_t r0 = g * a.group_rows + c * a.rows_per_chunk;
  const int64_t r1 = min64(g * a.group_rows + a.group_rows, r0 + a.rows_per_chunk);
  const float* sc = a.scale ? a.scale + g * D : a.zeros;
  for (int64_t j = 0; j < D; ++j) gain[j] = (1.f + sc[j]) * a.weight[j];  // dxhat = dy * gain
  // xhat = (x - mu) * xs - bsub: (x - mean) * rstd, or y - bias in the memory-saving mode.
  const float* bsub = a.xy_is_y ? a.bias : a.zeros;
  for (int64_t r = r0; r < r1; ++r) {
    const float* dyi = a.dy + r * a.dy_stride;
    const float* xi = a.xy + r * a.xy_stride;
    const float mu = a.xy_is_y ? 0.f : a.mean[r], rs = a.rstd[r];
    const float xs = a.xy_is_y ? 1.f : rs;
    double s1 = 0.0, s2 = 0.0;
    for (int64_t jb = 0; jb < D; jb += kBlock) {
      const int64_t je = min64(D, jb + kBlock);
      float a1 = 0.f, a2 = 0.f;
#pragma omp simd reduction(+ : a1, a2)
      for (int64_t j = jb; j < je; ++j) {
        const float d = dyi[j];
        const float xh = (xi[j] - mu) * xs - bsub[j];
        const float gz = d * gain[j];
        a1 += gz;
        a2 += gz * xh;
        p1[j] += d;
        p2[j] += d * xh;
      }
      s1 += a1;
      s2 += a2;
    }
    if (a.dx == nullptr) continue;
    const float c1 = static_cast<float>(s1 / double(D)), c2 = static_cast<float>(s2 / double(D));
    float* out = a.stream ? scratch : a.dx + r * D;
#pragma omp simd
    for (int64_t j = 0; j < D; ++j) {
      const float xh = (xi[j] - mu) * xs - bsub[j];
      out[j] = rs * (dyi[j] * gain[j] - c1 - xh * c2);
    }
    if (a.stream) stream_copy(a.dx + r * D, scratch, D);
  }
  if (a.stream) store_fence();
}

}  // namespace lct::cpu::LCT_ISA
