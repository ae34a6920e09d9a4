// Declarations of the per-ISA builds of the assignment solver (csrc/include/lct/lap.h),
// compiled in isa/lap_base.cpp (baseline x86-64) and isa/lap_avx2.cpp (AVX2 + FMA).
#pragma once

#include <cstdint>

#include "lct/lap.h"

namespace lct {
#define LCT_DECLARE_LAP(NS)                                                                  \
  namespace NS {                                                                             \
  template <typename T>                                                                      \
  int32_t solve(const T* C, int64_t ld, int64_t n, int64_t m, int64_t* x, double* u, double* v, \
                const LapBuffers& b);                                                        \
  extern template int32_t solve<float>(const float*, int64_t, int64_t, int64_t, int64_t*,    \
                                       double*, double*, const LapBuffers&);                 \
  extern template int32_t solve<double>(const double*, int64_t, int64_t, int64_t, int64_t*,  \
                                        double*, double*, const LapBuffers&);                \
  }
LCT_DECLARE_LAP(lap_base)
LCT_DECLARE_LAP(lap_avx2)
#undef LCT_DECLARE_LAP
}  // namespace lct
