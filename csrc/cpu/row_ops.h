// Helpers shared by the CPU row kernels (robust losses, consistency objective).
//
// All of them view their inputs as (B, N) rows with unit column stride and an
// arbitrary row stride.  The work pattern is "reduce a row, then rewrite it":
//   * many rows, or short rows: parallel over rows; the second pass re-reads the
//     row from L1/L2, so DRAM sees each input once;
//   * few long rows (B < threads and N > kChunk): parallel over fixed-size chunks
//     of each row, partial sums combined in chunk order (deterministic).
// Small problems run on the calling thread (parallel.h: no fork below
// kMinElemsPerThread elements per thread).
// Sums use float32 SIMD accumulators inside blocks of kBlock elements and a
// float64 accumulator across blocks, so long rows do not lose precision.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include "lct/dispatch.h"
#include "parallel.h"
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#if defined(__SSE2__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <type_traits>
#include <cstdint>
#include <vector>

namespace lct::cpu {

constexpr int64_t kBlock = 2048;   // float32 accumulation block
constexpr int64_t kChunk = 65536;  // chunk per task when a row is split across threads

// A row view: base pointer plus row stride in elements (column stride is 1).
template <typename T>
struct Rows {
  const T* data;
  int64_t row_stride;
  const T* row(int64_t r) const { return data + r * row_stride; }
};

template <typename T>
Rows<T> rows_of(const at::Tensor& x) {
  return Rows<T>{x.const_data_ptr<T>(), x.stride(0)};
}

// Runs, for every row r of a (B, N) problem:
//     stats = reduce(r, 0, N)        (Stats: a small aggregate with +=)
//     finish(r, stats)               (per-row results and coefficients)
//     apply(r, begin, end)           (the second pass, e.g. writing the gradient)
// `apply` is skipped when `with_apply` is false.
template <typename Stats, typename Reduce, typename Finish, typename Apply>
void two_pass_rows(int64_t B, int64_t N, bool with_apply, const Reduce& reduce,
                   const Finish& finish, const Apply& apply) {
  // Split rows only when there are fewer rows than threads that may run: the
  // chunk count depends only on N, so the partials add up in the same order
  // whatever the thread count.
  const int64_t n_chunks = (N + kChunk - 1) / kChunk;
  const bool split_rows = n_chunks > 1 && B < threads_for(n_chunks * B, kChunk);
  if (!split_rows) {
    parallel_tasks(B, N, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        // The same chunked sum as the split path, so the result does not
        // depend on which path the thread count chose.
        Stats total = reduce(r, int64_t(0), std::min(N, kChunk));
        for (int64_t k = 1; k < n_chunks; ++k)
          total += reduce(r, k * kChunk, std::min(N, (k + 1) * kChunk));
        finish(r, total);
        if (with_apply) apply(r, int64_t(0), N);
      }
    });
    return;
  }
  std::vector<Stats> partial(n_chunks);
  for (int64_t r = 0; r < B; ++r) {
    parallel_tasks(n_chunks, kChunk, [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k)
        partial[k] = reduce(r, k * kChunk, std::min(N, (k + 1) * kChunk));
    });
    Stats total = partial[0];
    for (int64_t k = 1; k < n_chunks; ++k) total += partial[k];
    finish(r, total);
    if (with_apply) {
      parallel_tasks(n_chunks, kChunk, [&](int64_t begin, int64_t end) {
        for (int64_t k = begin; k < end; ++k) apply(r, k * kChunk, std::min(N, (k + 1) * kChunk));
      });
    }
  }
}

// Sum over [begin, end) of f(j), with f returning float: float32 SIMD blocks,
// float64 across blocks.
template <typename F>
inline double blocked_sum(int64_t begin, int64_t end, const F& f) {
  double total = 0.0;
  for (int64_t s = begin; s < end; s += kBlock) {
    const int64_t e = std::min(end, s + kBlock);
    float acc = 0.f;
#pragma omp simd reduction(+ : acc)
    for (int64_t j = s; j < e; ++j) acc += f(j);
    total += static_cast<double>(acc);
  }
  return total;
}

// Outputs of at least this many bytes are written with non-temporal stores.
// Streaming skips the read-for-ownership of each output line, which pays when
// the output is too big for the caches anyway; a smaller output is better left
// in cache for its consumer (the next layer, or the optimizer reading .grad),
// and its per-row store fences would cost more than they save.
constexpr int64_t kStreamMinBytes = int64_t(4) << 20;

inline bool stream_output(int64_t bytes) { return bytes >= kStreamMinBytes; }

// dst[0:n] = src[0:n] with non-temporal stores where possible (x86, float32):
// for outputs written once and not read back soon, streaming skips the
// read-for-ownership of every destination cache line.
inline void stream_copy(float* dst, const float* src, int64_t n) {
  int64_t j = 0;
#if defined(__SSE2__)
  while (j < n && (reinterpret_cast<uintptr_t>(dst + j) & 15) != 0) {
    dst[j] = src[j];
    ++j;
  }
  for (; j + 4 <= n; j += 4) _mm_stream_ps(dst + j, _mm_loadu_ps(src + j));
  _mm_sfence();
#endif
  for (; j < n; ++j) dst[j] = src[j];
}

// Row writer: computes a row with `fill(out_row_or_scratch)` and stores it into
// dst (n elements of T).  float32 rows go through an L1 scratch buffer and are
// streamed out; other types are written directly.
template <typename T, typename Fill>
inline void write_row(T* dst, int64_t n, std::vector<float>& scratch, const Fill& fill) {
  if constexpr (std::is_same_v<T, float>) {
    if (scratch.size() < size_t(n)) scratch.resize(n);
    fill(scratch.data());
    stream_copy(dst, scratch.data(), n);
  } else {
    fill(dst);
  }
}

// out[j] = k * (a[j] - b[j]) for j in [begin, end), converted to T.
// With `stream` (a big output, see stream_output) float32 stores on x86 are
// non-temporal: the gradient is written once and not read back soon, so
// streaming it skips the read-for-ownership of every output cache line (a
// quarter of the traffic).
template <typename T>
inline void write_scaled_diff(T* out, const T* a, const T* b, float k, int64_t begin, int64_t end,
                              bool stream) {
  int64_t j = begin;
#if defined(__SSE2__)
  if constexpr (std::is_same_v<T, float>) {
    if (stream) {
      while (j < end && (reinterpret_cast<uintptr_t>(out + j) & 15) != 0) {
        out[j] = k * (a[j] - b[j]);
        ++j;
      }
      const __m128 kk = _mm_set1_ps(k);
      for (; j + 4 <= end; j += 4)
        _mm_stream_ps(out + j, _mm_mul_ps(kk, _mm_sub_ps(_mm_loadu_ps(a + j), _mm_loadu_ps(b + j))));
      _mm_sfence();
    }
  }
#else
  (void)stream;
#endif
#pragma omp simd
  for (int64_t i = j; i < end; ++i) out[i] = static_cast<T>(k * (float(a[i]) - float(b[i])));
}

// out[j] = ka * (s[j] - t[j]) + kb * (s[j] - x[j]): the objective's gradient,
// with the same non-temporal float32 stores as write_scaled_diff when `stream`.
template <typename T>
inline void write_objective_grad(T* out, const T* s, const T* t, const T* x, float ka, float kb,
                                 int64_t begin, int64_t end, bool stream) {
  int64_t j = begin;
#if defined(__SSE2__)
  if constexpr (std::is_same_v<T, float>) {
    if (stream) {
      while (j < end && (reinterpret_cast<uintptr_t>(out + j) & 15) != 0) {
        out[j] = ka * (s[j] - t[j]) + kb * (s[j] - x[j]);
        ++j;
      }
      const __m128 va = _mm_set1_ps(ka), vb = _mm_set1_ps(kb);
      for (; j + 4 <= end; j += 4) {
        const __m128 sv = _mm_loadu_ps(s + j);
        const __m128 g = _mm_add_ps(_mm_mul_ps(va, _mm_sub_ps(sv, _mm_loadu_ps(t + j))),
                                    _mm_mul_ps(vb, _mm_sub_ps(sv, _mm_loadu_ps(x + j))));
        _mm_stream_ps(out + j, g);
      }
      _mm_sfence();
    }
  }
#else
  (void)stream;
#endif
#pragma omp simd
  for (int64_t i = j; i < end; ++i) {
    const float sv = float(s[i]);
    out[i] = static_cast<T>(ka * (sv - float(t[i])) + kb * (sv - float(x[i])));
  }
}

}  // namespace lct::cpu

