// See buffer_pool.h.
#include "buffer_pool.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>

#include <cstdlib>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace lct::cpu {
namespace {

constexpr size_t kMinPooledBytes = size_t(1) << 20;
constexpr size_t kAlignment = 4096;

size_t capacity_from_env() {
  const char* env = std::getenv("LCT_CPU_POOL_MB");
  if (env == nullptr || *env == '\0') return size_t(256) << 20;
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
  void give(void* p, size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (cached_ + bytes <= capacity_) {
        free_[bytes].push_back(p);
        cached_ += bytes;
        return;
      }
    }
    std::free(p);
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
