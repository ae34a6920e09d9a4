// Plain-pointer arguments of the float32 layer norm row kernels (isa/*.cpp).
// No torch types here: the ISA-specific translation units must not include torch.
#pragma once

#include <cstdint>

namespace lct::cpu {

struct LayerNormFwdArgs {
  const float* x;      // (M, D), row stride x_stride, column stride 1
  int64_t x_stride;
  int64_t D;
  const float* weight;  // (D,): ones when absent
  const float* bias;    // (D,): zeros when absent
  const float* shift;   // (G, D) or nullptr
  const float* scale;   // (G, D) or nullptr
  const float* zeros;   // (D,) zeros
  double eps;
  int64_t group_rows;
  float* y;     // (M, D) contiguous
  float* mean;  // (M,)
  float* rstd;  // (M,)
  bool stream;  // non-temporal stores of y (a big output: row_ops.h stream_output)
};

struct LayerNormBwdArgs {
  const float* dy;  // (M, D), row stride dy_stride
  int64_t dy_stride;
  const float* xy;  // x, or y when xy_is_y; row stride xy_stride
  int64_t xy_stride;
  int64_t D;
  const float* mean;
  const float* rstd;
  const float* weight;  // ones when absent
  const float* bias;    // zeros when absent
  const float* scale;   // (G, D) or nullptr
  const float* zeros;
  int64_t group_rows, chunks, rows_per_chunk;
  bool xy_is_y;
  float* dx;  // (M, D) contiguous, or nullptr
  bool stream;  // non-temporal stores of dx (a big output)
};

// One entry point per ISA level: forward over rows [r0, r1); backward of one
// (group, chunk) task accumulating into p1, p2 (D each).  scratch, gain: D floats.
#define LCT_DECLARE_LN_ROWS(ISA)                                                            \
  namespace ISA {                                                                           \
  void layer_norm_fwd_rows_f32(const LayerNormFwdArgs& a, int64_t r0, int64_t r1,           \
                               float* scratch);                                             \
  void layer_norm_bwd_task_f32(const LayerNormBwdArgs& a, int64_t task, float* p1, float* p2, \
                               float* gain, float* scratch);                                \
  }
LCT_DECLARE_LN_ROWS(base)
LCT_DECLARE_LN_ROWS(avx2)
#undef LCT_DECLARE_LN_ROWS

}  // namespace lct::cpu
