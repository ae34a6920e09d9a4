// AVX2 + FMA build of the assignment solver, used only when the CPU has both
// (checked at run time in ot_assign.cpp); on other architectures it is the
// baseline code under another name and never selected.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#pragma GCC target("avx2,fma")
#define LCT_LAP_AVX2 1
#endif
#define LCT_LAP_NS lap_avx2
#include "lct/lap.h"

namespace lct::lap_avx2 {
template int32_t solve<float>(const float*, int64_t, int64_t, int64_t, int64_t*, double*, double*,
                              const LapBuffers&);
template int32_t solve<double>(const double*, int64_t, int64_t, int64_t, int64_t*, double*,
                               double*, const LapBuffers&);
}  // namespace lct::lap_avx2
