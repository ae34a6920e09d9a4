// Device helpers shared by the CUDA row kernels (robust losses, objective).
//
// Rows are read with 16-byte packs (VEC elements) when the row stride and the
// base pointers allow it, else element by element (VEC = 1).  A row that fits in
// ITEMS packs per thread is held in registers between the reduction and the
// gradient write, so DRAM sees each input once; longer rows are read twice.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace lct::cuda {

constexpr int kItems = 4;          // packs per thread kept in registers
constexpr int kMaxThreads = 1024;  // block size upper bound

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ void load_pack(const T* base, int64_t pack, float (&out)[VEC]) {
  const Pack<T, VEC> p = reinterpret_cast<const Pack<T, VEC>*>(base)[pack];
#pragma unroll
  for (int i = 0; i < VEC; ++i) out[i] = static_cast<float>(p.v[i]);
}

template <typename T, int VEC>
__device__ __forceinline__ void store_pack(T* base, int64_t pack, const float (&in)[VEC]) {
  Pack<T, VEC> p;
#pragma unroll
  for (int i = 0; i < VEC; ++i) p.v[i] = static_cast<T>(in[i]);
  reinterpret_cast<Pack<T, VEC>*>(base)[pack] = p;
}

// Sum of v over the block; every thread gets the result.  `scratch` holds 32 floats.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  const int n_warps = (blockDim.x + 31) >> 5;
  v = threadIdx.x < n_warps ? scratch[threadIdx.x] : 0.f;
  if (warp == 0) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if (lane == 0) scratch[0] = v;
  }
  __syncthreads();
  const float total = scratch[0];
  __syncthreads();  // scratch may be reused right after
  return total;
}

// Block size for rows of n_packs packs: enough threads to hold the row in
// kItems packs each when possible, a multiple of 32, at most kMaxThreads.
inline int threads_for(int64_t n_packs) {
  int64_t want = (n_packs + kItems - 1) / kItems;
  int threads = 32;
  while (threads < want && threads < kMaxThreads) threads *= 2;
  return threads;
}

// Whether 16-byte packs of T can be used for all the given row pointers/strides.
template <typename T>
inline bool can_vectorize(int64_t n, std::initializer_list<const void*> ptrs,
                          std::initializer_list<int64_t> row_strides) {
  constexpr int vec = 16 / sizeof(T);
  if (n % vec != 0) return false;
  for (const void* p : ptrs)
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0) return false;
  for (int64_t s : row_strides)
    if (s % vec != 0) return false;
  return true;
}

}  // namespace lct::cuda
