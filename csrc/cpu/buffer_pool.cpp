// See buffer_pool.h.
#include "buffer_pool.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>

#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace lct::cpu {
namespace {

constexpr size_t kMinPooledBytes = size_t(1) << 20;
constexpr size_t kAlignment = 4096;

// Default cap: a quarter of physical memory, at least 256 MiB.  The pool only ever holds
// buffers that were live at once, so it stays below the process's own peak; 256 MiB
// (the cap before 2026-12-02) was below one DiT-S/2 training step's activations
// (batch 64, 4x16x16 latents), and every buffer past it went back to the OS and
// page-faulted in again the next step: 42 K faults and +10 % step time on the 2-core
// development machine.
size_t default_capacity() {
  const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
  const size_t quarter = (pages > 0 && page > 0) ? size_t(pages) * size_t(page) / 4 : 0;
  return std::max(quarter, size_t(256) << 20);
}

size_t capacity_from_env() {
  const char* env = std::getenv("LCT_CPU_POOL_MB");
  if (env == nullptr || *env == '\0') return default_capacity();
  return static_cast<size_t>(std::strtoull(env, nullptr, 10)) << 20;
}

class Pool {
 public:
  void* take(size_t bytes) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = free_.find(bytes);
    if (it == free_.end() || it->second.empty()) return nullptr;
    void* p = it->second.back();
    it->second.pop_back();
    cached_ -= bytes;
    return p;
  }
  // Keeps the block when it fits under the cap, first evicting cached blocks of other
  // sizes (the shapes a workload no longer uses) to make room; else frees it.
  void give(void* p, size_t bytes) {
    std::vector<void*> evicted;
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (auto it = free_.begin(); cached_ + bytes > capacity_ && it != free_.end(); ++it) {
        if (it->first == bytes) continue;
        while (!it->second.empty() && cached_ + bytes > capacity_) {
          evicted.push_back(it->second.back());
          it->second.pop_back();
          cached_ -= it->first;
        }
      }
      if (cached_ + bytes <= capacity_) {
        free_[bytes].push_back(p);
        cached_ += bytes;
        p = nullptr;
      }
    }
    for (void* q : evicted) std::free(q);
    if (p != nullptr) std::free(p);
  }
  bool enabled() const { return capacity_ > 0; }

 private:
  std::mutex mu_;
  std::unordered_map<size_t, std::vector<void*>> free_;
  size_t cached_ = 0;
  const size_t capacity_ = capacity_from_env();
};

// Leaked on purpose: tensors may be freed during interpreter shutdown, after
// static destructors would have run.
Pool& pool() {
  static Pool* instance = new Pool();
  return *instance;
}

struct Block {
  void* data;
  size_t bytes;
};

void release(void* ctx) {
  auto* block = static_cast<Block*>(ctx);
  pool().give(block->data, block->bytes);
  delete block;
}

}  // namespace

at::Tensor pooled_empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
  int64_t numel = 1;
  for (int64_t s : sizes) numel *= s;
  const size_t nbytes = static_cast<size_t>(numel) * options.dtype().itemsize();
  if (nbytes < kMinPooledBytes || !pool().enabled()) return at::empty(sizes, options);
  const size_t bytes = (nbytes + kAlignment - 1) / kAlignment * kAlignment;
  void* data = pool().take(bytes);
  if (data == nullptr) {
    data = std::aligned_alloc(kAlignment, bytes);
    TORCH_CHECK(data != nullptr, "lct: out of memory allocating ", bytes, " bytes");
  }
  auto* block = new Block{data, bytes};
  return at::for_blob(data, sizes).context(block, &release).options(options).make_tensor();
}

}  // namespace lct::cpu
