// CPU kernel of the batched exact assignment (lct::ot_assign): the solver in
// csrc/include/lct/lap.h, one problem per task, OpenMP (at::parallel_for) over
// the batch; a single or small problem stays on the calling thread (parallel.h).
// Padded batches (groups of different sizes) carry their own sizes.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <vector>

#include "isa/cpu_features.h"
#include "isa/lap_isa.h"
#include "parallel.h"

namespace lct::cpu {
namespace {

// Scratch for one problem (allocated here, in the baseline translation unit).
struct Scratch {
  std::vector<double> key, level, row_base;
  std::vector<int64_t> reached_rows, y, order, rows;
  LapBuffers buffers(int64_t n, int64_t m) {
    key.resize(m), level.resize(m), reached_rows.resize(m), y.resize(m), order.resize(m);
    rows.resize(n), row_base.resize(n);
    return LapBuffers{key.data(),   level.data(), reached_rows.data(), y.data(),
                      order.data(), rows.data(),  row_base.data()};
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ot_assign_cpu(
    const at::Tensor& cost, const std::optional<at::Tensor>& sizes) {
  TORCH_CHECK(cost.dim() == 3 && cost.is_contiguous(), "lct: cost must be a contiguous (B, N, M) tensor");
  TORCH_CHECK(cost.scalar_type() == at::kFloat || cost.scalar_type() == at::kDouble,
              "lct: cost must be float32 or float64");
  const int64_t B = cost.size(0), N = cost.size(1), M = cost.size(2);
  TORCH_CHECK(N <= M, "lct: ot_assign needs N <= M (rows <= columns)");
  const int64_t* sz = nullptr;
  at::Tensor sizes_c;
  if (sizes.has_value()) {
    sizes_c = sizes->contiguous();
    TORCH_CHECK(sizes_c.dim() == 2 && sizes_c.size(0) == B && sizes_c.size(1) == 2 &&
                    sizes_c.scalar_type() == at::kLong && sizes_c.device().is_cpu(),
                "lct: sizes must be an int64 (B, 2) CPU tensor of (rows, columns)");
    sz = sizes_c.const_data_ptr<int64_t>();
  }
  const auto opts = cost.options();
  at::Tensor assignment = at::empty({B, N}, opts.dtype(at::kLong));
  at::Tensor u = at::empty({B, N}, opts.dtype(at::kDouble));
  at::Tensor v = at::empty({B, M}, opts.dtype(at::kDouble));
  at::Tensor status = at::empty({B}, opts.dtype(at::kInt));
  int64_t* xa = assignment.mutable_data_ptr<int64_t>();
  double* ua = u.mutable_data_ptr<double>();
  double* va = v.mutable_data_ptr<double>();
  int32_t* st = status.mutable_data_ptr<int32_t>();
  AT_DISPATCH_FLOATING_TYPES(cost.scalar_type(), "ot_assign_cpu", [&] {
    const scalar_t* c = cost.const_data_ptr<scalar_t>();
    const auto solve = use_avx2() ? &lap_avx2::solve<scalar_t> : &lap_base::solve<scalar_t>;
    // One problem never forks; a batch forks when its problems are big enough
    // (the solver touches each cost entry a few times: N M per problem is the
    // work unit of parallel.h).
    parallel_tasks(B, N * M, [&](int64_t begin, int64_t end) {
      Scratch scratch;
      for (int64_t b = begin; b < end; ++b) {
        const int64_t n = sz ? sz[2 * b] : N, m = sz ? sz[2 * b + 1] : M;
        int64_t* x = xa + b * N;
        for (int64_t i = 0; i < N; ++i) x[i] = -1;
        for (int64_t i = 0; i < N; ++i) ua[b * N + i] = 0.0;
        for (int64_t j = 0; j < M; ++j) va[b * M + j] = 0.0;
        if (n < 0 || m < 0 || n > N || m > M || n > m) {
          st[b] = lap_status::kBadShape;
          continue;
        }
        st[b] = solve(c + b * N * M, M, n, m, x, ua + b * N, va + b * M, scratch.buffers(n, m));
      }
    });
  });
  return {assignment, u, v, status};
}

}  // namespace

TORCH_LIBRARY_IMPL(lct, CPU, m) { m.impl("ot_assign", &ot_assign_cpu); }

}  // namespace lct::cpu
