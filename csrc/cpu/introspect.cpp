// Read-only facts about the CPU kernels, for `python -m lct_kernels` and the
// tests: the ISA path the kernels take on this CPU and the thread-count policy
// of parallel.h.  Registered as lct::_cpu_isa and lct::_cpu_threads (schemas in
// csrc/ops.cpp); they take no tensors.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdlib>
#include <string>

#include "isa/cpu_features.h"
#include "parallel.h"

namespace lct::cpu {
namespace {

// "avx2+fma" or "base", and why.
std::string cpu_isa() {
  const char* forced = std::getenv("LCT_CPU_ISA");
  if (use_avx2()) return "avx2+fma: the CPU reports AVX2 and FMA";
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  if (forced != nullptr && std::string(forced) == "base")
    return "base: forced by LCT_CPU_ISA=base";
  return "base: the CPU lacks AVX2 or FMA";
#else
  (void)forced;
  return "base: not an x86-64 build";
#endif
}

// Threads a kernel would use now for `tasks` tasks of `elems_per_task`
// elements; max_threads < 1 means at::get_num_threads().
int64_t cpu_threads(int64_t tasks, int64_t elems_per_task, int64_t max_threads) {
  return plan_threads(tasks, elems_per_task, max_threads < 1 ? at::get_num_threads() : max_threads);
}

}  // namespace

TORCH_LIBRARY_IMPL(lct, CompositeExplicitAutograd, m) {
  m.impl("_cpu_isa", &cpu_isa);
  m.impl("_cpu_threads", &cpu_threads);
}

}  // namespace lct::cpu
