// Status codes of the assignment solvers (CPU lct/lap.h, CUDA, Triton); the
// Python side maps them to error messages (lct_kernels/ops/ot.py).
#pragma once

#include <cstdint>

namespace lct::lap_status {
enum Status : int32_t {
  kOk = 0,
  kInfeasible = 1,
  kNaN = 2,
  kNegInf = 3,
  kCertificateFailed = 4,
  kIterationLimit = 5,
  kBadShape = 6,
};
}  // namespace lct::lap_status
