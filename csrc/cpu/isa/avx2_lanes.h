// Masked 8-lane float32 access for the AVX2 builds of the pointwise row kernels
// (isa/gated_rows.h, isa/gelu_rows.h): every element of a row goes through the same
// vector code, the tail through masked loads and stores, so a value never depends on
// where a row ends.  Included only with LCT_ISA defined; like the kernels' own helpers
// everything has internal linkage (no ODR hazard between the ISA copies).
#pragma once

#include <cstdint>

#if defined(LCT_ISA_AVX2)
#include <immintrin.h>

#ifndef LCT_ISA
#error "define LCT_ISA (the namespace of this ISA level) before including"
#endif

namespace lct::cpu::LCT_ISA {
namespace {

inline __m256i tail_mask(int64_t n) {  // lanes [0, n) set, n in [0, 8)
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), lanes);
}

// 8 lanes (or the n < 8 of a tail: masked, the rest read as zero and never written) at p
struct Lanes {
  bool full;
  __m256i mask;
  __m256 load(const float* p) const { return full ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, mask); }
  void store(float* p, __m256 v) const {
    if (full) _mm256_storeu_ps(p, v);
    else _mm256_maskstore_ps(p, mask, v);
  }
};

// the lanes of columns [j, min(j + 8, D))
inline Lanes lanes_at(int64_t j, int64_t D) {
  const int64_t n = D - j;
  return {n >= 8, tail_mask(n < 8 ? n : 0)};
}

}  // namespace
}  // namespace lct::cpu::LCT_ISA
#endif
