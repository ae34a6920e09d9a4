// dtype dispatch shared by the CPU and CUDA kernels.
#pragma once

#include <ATen/Dispatch.h>

// The kernels' dtypes: float32, float16, bfloat16 (float64 runs the torch
// reference; see lct_kernels/ops/robust_loss.py).
#define LCT_DISPATCH_KERNEL_TYPES(TYPE, NAME, ...)                                         \
  [&] {                                                                                    \
    const at::ScalarType lct_st = (TYPE);                                                  \
    TORCH_CHECK(lct_st == at::kFloat || lct_st == at::kHalf || lct_st == at::kBFloat16,   \
                NAME ": dtype must be float32, float16 or bfloat16, got ", lct_st);       \
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, lct_st, NAME, __VA_ARGS__); \
  }()
