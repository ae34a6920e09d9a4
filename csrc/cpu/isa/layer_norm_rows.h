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

#if defined(LCT_ISA_AVX2)
inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

// The forward of rows [r0, r1) for short rows, D = 8 NV (the qk-norm's head_dim 16, 32
// or 64).  At D = 32 the generic loop below spends most of a row on two things that do
// not depend on D: its vectorised row sums leave through the stack, one scalar add per
// lane, and each row waits on its own float64 square root and division (about 40
// cycles of latency).  Here a row stays in registers, its sums reduce in registers, and
// the square roots and divisions of a block of 16 rows are four independent 4-lane
// float64 instructions (their latency overlaps instead of stalling every row).
// Same formula as the generic loop: float32 row sums, mean and variance divided in
// float64, rstd = 1 / sqrt(var + eps) in float64 rounded once to float32.
template <int NV>
void fwd_rows_short(const LayerNormFwdArgs& a, int64_t r0, int64_t r1) {
  constexpr int64_t D = 8 * NV;
  int64_t g = r0 / a.group_rows, g_end = (g + 1) * a.group_rows;
  constexpr int kRows = 16;  // rows per block: four independent 4-lane square roots
  for (int64_t rb = r0; rb < r1; rb += kRows) {
    const int n = static_cast<int>(min64(kRows, r1 - rb));
    alignas(32) double var[kRows];
    alignas(32) float mf[kRows], rs[kRows];
    for (int k = 0; k < n; ++k) {
      const float* xi = a.x + (rb + k) * a.x_stride;
      __m256 xv[NV];
      __m256 s = _mm256_setzero_ps();
      for (int v = 0; v < NV; ++v) s = _mm256_add_ps(s, xv[v] = _mm256_loadu_ps(xi + 8 * v));
      const float m = static_cast<float>(double(hsum8(s)) / double(D));
      const __m256 mv = _mm256_set1_ps(m);
      __m256 q = _mm256_setzero_ps();
      for (int v = 0; v < NV; ++v) {
        const __m256 t = _mm256_sub_ps(xv[v], mv);
        q = _mm256_fmadd_ps(t, t, q);
      }
      mf[k] = m;
      var[k] = double(hsum8(q)) / double(D) + a.eps;
    }
    for (int k = n; k < kRows; ++k) var[k] = 1.0;
    for (int k = 0; k < kRows; k += 4)
      _mm_store_ps(rs + k, _mm256_cvtpd_ps(_mm256_div_pd(_mm256_set1_pd(1.0),
                                                        _mm256_sqrt_pd(_mm256_load_pd(var + k)))));
    for (int k = 0; k < n; ++k) {
      const int64_t r = rb + k;
      if (r == g_end) ++g, g_end += a.group_rows;
      a.mean[r] = mf[k];
      a.rstd[r] = rs[k];
      const float* xi = a.x + r * a.x_stride;
      const float* sc = a.scale ? a.scale + g * D : a.zeros;
      const float* sh = a.shift ? a.shift + g * D : a.zeros;
      const __m256 mv = _mm256_set1_ps(mf[k]), rv = _mm256_set1_ps(rs[k]);
      const __m256 one = _mm256_set1_ps(1.f);
      float* out = a.y + r * D;
      for (int v = 0; v < NV; ++v) {
        const int j = 8 * v;
        const __m256 t = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(xi + j), mv), rv);
        const __m256 h = _mm256_fmadd_ps(t, _mm256_loadu_ps(a.weight + j), _mm256_loadu_ps(a.bias + j));
        const __m256 o = _mm256_fmadd_ps(h, _mm256_add_ps(one, _mm256_loadu_ps(sc + j)),
                                         _mm256_loadu_ps(sh + j));
        if (a.stream) _mm256_stream_ps(out + j, o);
        else _mm256_storeu_ps(out + j, o);
      }
    }
  }
  if (a.stream) store_fence();
}
#endif

void layer_norm_fwd_rows_f32(const LayerNormFwdArgs& a, int64_t r0, int64_t r1, float* scratch) {
  const int64_t D = a.D;
#if defined(LCT_ISA_AVX2)
  // streamed stores need a 32-byte aligned y (rows are 4 D bytes, a multiple of 32 here)
  if ((D == 16 || D == 32 || D == 64) &&
      (!a.stream || (reinterpret_cast<uintptr_t>(a.y) % 32) == 0)) {
    if (D == 16) fwd_rows_short<2>(a, r0, r1);
    else if (D == 32) fwd_rows_short<4>(a, r0, r1);
    else fwd_rows_short<8>(a, r0, r1);
    return;
  }
#endif
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

#if defined(LCT_ISA_AVX2)

// The backward of rows [r0, r1) for short rows, D = 8 NV (the qk-norm's head_dim 32 or
// 64): the partials p1, p2 and the row's operands stay in registers across the rows,
// where the generic loop stores and reloads p1[j], p2[j] for every row (a
// store-to-load chain per row).  Same formula and float32 row sums as the generic loop.
template <int NV>
void bwd_rows_short(const LayerNormBwdArgs& a, int64_t r0, int64_t r1, float* p1, float* p2,
                    const float* gain, const float* bsub) {
  constexpr int64_t D = 8 * NV;
  __m256 P1[NV], P2[NV], G[NV], S[NV];
  for (int v = 0; v < NV; ++v) {
    P1[v] = _mm256_loadu_ps(p1 + 8 * v);
    P2[v] = _mm256_loadu_ps(p2 + 8 * v);
    G[v] = _mm256_loadu_ps(gain + 8 * v);
    S[v] = _mm256_loadu_ps(bsub + 8 * v);
  }
  for (int64_t r = r0; r < r1; ++r) {
    const float* dyi = a.dy + r * a.dy_stride;
    const float* xi = a.xy + r * a.xy_stride;
    const float rs = a.rstd[r];
    const __m256 mu = _mm256_set1_ps(a.xy_is_y ? 0.f : a.mean[r]);
    const __m256 xs = _mm256_set1_ps(a.xy_is_y ? 1.f : rs);
    __m256 d[NV], xh[NV], gz[NV];
    __m256 a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps();
    for (int v = 0; v < NV; ++v) {
      d[v] = _mm256_loadu_ps(dyi + 8 * v);
      xh[v] = _mm256_sub_ps(_mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(xi + 8 * v), mu), xs), S[v]);
      gz[v] = _mm256_mul_ps(d[v], G[v]);
      a1 = _mm256_add_ps(a1, gz[v]);
      a2 = _mm256_fmadd_ps(gz[v], xh[v], a2);
      P1[v] = _mm256_add_ps(P1[v], d[v]);
      P2[v] = _mm256_fmadd_ps(d[v], xh[v], P2[v]);
    }
    if (a.dx == nullptr) continue;
    const __m256 c1 = _mm256_set1_ps(static_cast<float>(double(hsum8(a1)) / double(D)));
    const __m256 c2 = _mm256_set1_ps(static_cast<float>(double(hsum8(a2)) / double(D)));
    const __m256 rv = _mm256_set1_ps(rs);
    float* out = a.dx + r * D;
    for (int v = 0; v < NV; ++v) {
      const __m256 o = _mm256_mul_ps(rv, _mm256_sub_ps(_mm256_sub_ps(gz[v], c1), _mm256_mul_ps(xh[v], c2)));
      if (a.stream) _mm256_stream_ps(out + 8 * v, o);
      else _mm256_storeu_ps(out + 8 * v, o);
    }
  }
  for (int v = 0; v < NV; ++v) {
    _mm256_storeu_ps(p1 + 8 * v, P1[v]);
    _mm256_storeu_ps(p2 + 8 * v, P2[v]);
  }
  if (a.stream) store_fence();
}
#endif

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
#if defined(LCT_ISA_AVX2)
  // streamed stores need 32-byte aligned rows: the dx buffer's base (rows are 4 D bytes,
  // a multiple of 32 here)
  const bool stream_ok = !a.stream || a.dx == nullptr || (reinterpret_cast<uintptr_t>(a.dx) % 32) == 0;
  if (stream_ok && (D == 16 || D == 32 || D == 64)) {
    if (D == 16) bwd_rows_short<2>(a, r0, r1, p1, p2, gain, bsub);
    else if (D == 32) bwd_rows_short<4>(a, r0, r1, p1, p2, gain, bsub);
    else bwd_rows_short<8>(a, r0, r1, p1, p2, gain, bsub);
    return;
  }
#endif
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
