// Helpers shared by the CPU row kernels (robust losses, consistency objective).
//
// All of them view their inputs as (B, N) rows with unit column stride and an
// arbitrary row stride.  The work pattern is "reduce a row, then rewrite it":
//   * many rows, or short rows: parallel over rows; the second pass re-reads the
//     row from L1/L2, so DRAM sees each input once;
//   * few long rows (B < threads and N > kChunk): parallel over fixed-size chunks
//     of each row, partial sums combined in chunk order (deterministic).
// Sums use float32 SIMD accumulators inside blocks of kBlock elements and a
// float64 accumulator across blocks, so long rows do not lose precision.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include "lct/dispatch.h"
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
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
  const bool split_rows = B < at::get_num_threads() && N > kChunk;
  if (!split_rows) {
    const int64_t grain = std::max<int64_t>(1, kChunk / std::max<int64_t>(N, 1));
    at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        finish(r, reduce(r, int64_t(0), N));
        if (with_apply) apply(r, int64_t(0), N);
      }
    });
    return;
  }
  const int64_t n_chunks = (N + kChunk - 1) / kChunk;
  std::vector<Stats> partial(n_chunks);
  for (int64_t r = 0; r < B; ++r) {
    at::parallel_for(0, n_chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k)
        partial[k] = reduce(r, k * kChunk, std::min(N, (k + 1) * kChunk));
    });
    Stats total = partial[0];
    for (int64_t k = 1; k < n_chunks; ++k) total += partial[k];
    finish(r, total);
    if (with_apply) {
      at::parallel_for(0, n_chunks, 1, [&](int64_t begin, int64_t end) {
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

}  // namespace lct::cpu

