// Thread-count policy of the CPU kernels.
//
// Forking costs more than a small kernel: a parallel region wakes the pool,
// splits the work and ends in a barrier.  Alone on a machine that is a few
// microseconds; when another process competes for the cores, a worker that is
// not running holds the barrier until the scheduler runs it again (a time
// slice, milliseconds), so one small op can take 10-100x its quiet time.  The
// rule here: fork only when every thread gets at least kMinElemsPerThread
// elements of work, and never more threads than torch allows
// (torch.set_num_threads / at::get_num_threads()) or than there are tasks.
// A single task (one problem, one row) never enters a parallel region.
//
// The split never changes results: every kernel computes each task the same
// way whichever thread runs it, and combines per-task partials in task order.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

namespace lct::cpu {

// Work per thread below which a kernel runs on the calling thread: 16K elements,
// a few microseconds of memory-bound work, about what a fork costs on a quiet
// machine (torch's own elementwise grain, at::internal::GRAIN_SIZE, is 32768
// elements; ATen's layer norm forks for any row count).  Measured 2026-12-02 on
// the 2-core development machine: at 64K the demo's 2048 x 32 qk-norm and
// 512 x 128 block norms ran on one thread and lost to ATen's two; at 16K the
// forward of 2048 x 32 takes 29-37 us instead of 48, the backward 20 instead of 31.
constexpr int64_t kMinElemsPerThread = 16384;

// Threads to use for `tasks` independent tasks of about `elems_per_task`
// elements each, given at most `max_threads`: a pure function of its
// arguments (tested through lct::_cpu_threads).  Returns 1..max(max_threads, 1).
inline int64_t plan_threads(int64_t tasks, int64_t elems_per_task, int64_t max_threads) {
  if (tasks <= 1 || max_threads <= 1) return 1;
  const double work = double(tasks) * double(std::max<int64_t>(elems_per_task, 1));
  const double by_work = work / double(kMinElemsPerThread);
  const int64_t cap = std::min<int64_t>(max_threads, tasks);
  if (by_work < 2.0) return 1;
  return by_work >= double(cap) ? cap : static_cast<int64_t>(by_work);
}

// Threads a kernel called here would use now (1 inside a parallel region).
inline int64_t threads_for(int64_t tasks, int64_t elems_per_task) {
  if (at::in_parallel_region()) return 1;
  return plan_threads(tasks, elems_per_task, at::get_num_threads());
}

// Runs f(begin, end) over [0, tasks) on threads_for(tasks, elems_per_task)
// threads: contiguous, equal ranges (through at::parallel_for, so torch's
// thread pool and settings apply), or a single call f(0, tasks) on the calling
// thread.
template <typename F>
void parallel_tasks(int64_t tasks, int64_t elems_per_task, const F& f) {
  if (tasks <= 0) return;
  const int64_t nt = threads_for(tasks, elems_per_task);
  if (nt <= 1) {
    f(int64_t(0), tasks);
    return;
  }
  at::parallel_for(0, tasks, (tasks + nt - 1) / nt, f);
}

// out[j] = sum over p in [0, parts) of partial[p * n + j], added in p order in float64
// and rounded once: how the kernels combine per-task float32 partials (bias and
// gate gradients) so that the result does not depend on which thread made which.
inline void sum_partials_in_order(const float* partial, int64_t parts, int64_t n, float* out) {
  for (int64_t j = 0; j < n; ++j) {
    double s = 0.0;
    for (int64_t p = 0; p < parts; ++p) s += double(partial[p * n + j]);
    out[j] = static_cast<float>(s);
  }
}

}  // namespace lct::cpu
