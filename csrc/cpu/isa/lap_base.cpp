// Baseline x86-64 build of the assignment solver (csrc/include/lct/lap.h).
#define LCT_LAP_NS lap_base
#include "lct/lap.h"

namespace lct::lap_base {
template int32_t solve<float>(const float*, int64_t, int64_t, int64_t, int64_t*, double*, double*,
                              const LapBuffers&);
template int32_t solve<double>(const double*, int64_t, int64_t, int64_t, int64_t*, double*,
                               double*, const LapBuffers&);
}  // namespace lct::lap_base
