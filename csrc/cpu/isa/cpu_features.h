// Run-time choice of the ISA-specific kernels in csrc/cpu/isa/.
#pragma once

#include <cstdlib>
#include <cstring>

namespace lct::cpu {

// True when the AVX2 + FMA builds may run: the CPU has both and LCT_CPU_ISA is
// not "base" (which forces the baseline kernels, e.g. to test them).
inline bool use_avx2() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  const char* forced = std::getenv("LCT_CPU_ISA");
  if (forced != nullptr && std::strcmp(forced, "base") == 0) return false;
  static const bool supported = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return supported;
#else
  return false;
#endif
}

}  // namespace lct::cpu
