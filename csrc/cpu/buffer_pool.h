// A small recycling pool for the CPU kernels' large output buffers.
//
// The fused losses allocate a fresh (B, N) gradient every step, which becomes
// .grad and is freed at the next zero_grad.  With glibc malloc those multi-MB
// blocks are often trimmed and re-mapped, so every step pays a page fault per
// 4 KiB of gradient -- as much time as the kernel itself at (256, 4096) fp32.
// Buffers from pooled_empty() go back to this pool when their tensor dies and
// are handed out again for the next request of the same size.
// The pool holds at most LCT_CPU_POOL_MB megabytes (default: a quarter of physical
// memory, at least 256; 0 disables it); a block returned to a full pool first evicts
// cached blocks of other sizes.
#pragma once

#include <ATen/core/Tensor.h>

namespace lct::cpu {

// An uninitialised tensor like at::empty(sizes, options) (contiguous, CPU);
// buffers of at least 1 MiB come from, and return to, the pool.
at::Tensor pooled_empty(at::IntArrayRef sizes, const at::TensorOptions& options);

}  // namespace lct::cpu
