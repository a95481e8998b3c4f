#include "work_pool.h"

#include <immintrin.h>

#include <chrono>

namespace clada_cpu {
namespace {

// A decode step calls the MLP once per layer with the attention in between (a few hundred
// microseconds): helpers spin this long after their last chunk, then sleep.
constexpr auto kSpin = std::chrono::microseconds(200);

}  // namespace

WorkPool& WorkPool::instance() {
  // never destroyed: helpers may still be spinning when the process exits
  static WorkPool* pool = new WorkPool();
  return *pool;
}

WorkPool::~WorkPool() {
  stop_.store(true);
  {
    std::lock_guard<std::mutex> lock(mutex_);
  }
  wake_.notify_all();
  for (auto& t : helpers_) t.join();
}

void WorkPool::ensure_helpers(int count) {
  while (static_cast<int>(helpers_.size()) < count) {
    const int worker = static_cast<int>(helpers_.size()) + 1;
    helpers_.emplace_back([this, worker] { helper_loop(worker); });
  }
}

int WorkPool::claim(uint32_t gen, int worker) {
  uint64_t t = ticket_.load(std::memory_order_acquire);
  for (;;) {
    if (static_cast<uint32_t>(t >> 32) != gen) return -1;
    if (worker >= static_cast<int>((t >> 24) & 0xffu)) return -1;  // this call wants fewer workers
    const int chunk = static_cast<int>(t & 0xffffffu);
    if (chunk >= chunks_) return -1;
    if (ticket_.compare_exchange_weak(t, t + 1, std::memory_order_acq_rel, std::memory_order_acquire)) return chunk;
  }
}

void WorkPool::run(int workers, int chunks, ChunkFn fn, void* ctx) {
  if (workers <= 1 || chunks <= 1) {
    for (int c = 0; c < chunks; ++c) fn(ctx, 0, c);
    return;
  }
  ensure_helpers(workers - 1);
  fn_ = fn;
  ctx_ = ctx;
  chunks_ = chunks;
  done_.store(0, std::memory_order_relaxed);
  const uint32_t gen = static_cast<uint32_t>(ticket_.load(std::memory_order_relaxed) >> 32) + 1;
  ticket_.store(static_cast<uint64_t>(gen) << 32 | static_cast<uint64_t>(workers) << 24, std::memory_order_seq_cst);
  if (sleepers_.load(std::memory_order_seq_cst) > 0) {
    { std::lock_guard<std::mutex> lock(mutex_); }
    wake_.notify_all();
  }
  for (int c; (c = claim(gen, 0)) >= 0;) {
    fn(ctx, 0, c);
    done_.fetch_add(1, std::memory_order_acq_rel);
  }
  while (done_.load(std::memory_order_acquire) < chunks) _mm_pause();
}

void WorkPool::helper_loop(int worker) {
  uint32_t seen = static_cast<uint32_t>(ticket_.load() >> 32);
  while (!stop_.load(std::memory_order_relaxed)) {
    const auto until = std::chrono::steady_clock::now() + kSpin;
    uint32_t gen = seen;
    for (int i = 0; (gen = static_cast<uint32_t>(ticket_.load(std::memory_order_acquire) >> 32)) == seen; ++i) {
      _mm_pause();
      if ((i & 63) == 63 && std::chrono::steady_clock::now() > until) break;
    }
    if (gen == seen) {
      std::unique_lock<std::mutex> lock(mutex_);
      sleepers_.fetch_add(1, std::memory_order_seq_cst);
      wake_.wait(lock, [&] {
        gen = static_cast<uint32_t>(ticket_.load(std::memory_order_seq_cst) >> 32);
        return gen != seen || stop_.load();
      });
      sleepers_.fetch_sub(1, std::memory_order_seq_cst);
      if (stop_.load()) return;
    }
    seen = gen;
    for (int c; (c = claim(gen, worker)) >= 0;) {
      // fn_ and ctx_ are stable from a successful claim until this chunk is counted done
      fn_(ctx_, worker, c);
      done_.fetch_add(1, std::memory_order_acq_rel);
    }
  }
}

}  // namespace clada_cpu
