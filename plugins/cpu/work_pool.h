// A pool of helper threads that share chunks of work with the calling thread, without a
// team barrier.
//
// Why not an OpenMP team: on a 2-core machine shared with other jobs, a team's barrier
// waits for a thread the scheduler has not run yet, and measured 5-15x slower than one
// thread (docs/cpu.md). Here the caller claims chunks too and waits only for chunks that
// were claimed, so a helper that never wakes costs nothing: the caller does its share.
#ifndef CLADA_CPU_WORK_POOL_H_
#define CLADA_CPU_WORK_POOL_H_

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <thread>
#include <vector>

namespace clada_cpu {

class WorkPool {
 public:
  using ChunkFn = void (*)(void* ctx, int worker, int chunk);

  static WorkPool& instance();

  // Runs fn(ctx, worker, chunk) for every chunk in [0, chunks), on the caller (worker 0)
  // and helpers 1..workers-1; returns when all are done. Not reentrant: one caller at a time.
  void run(int workers, int chunks, ChunkFn fn, void* ctx);  // workers <= 255, chunks < 2^24

  ~WorkPool();

 private:
  void ensure_helpers(int count);
  void helper_loop(int worker);
  // Claims the next chunk of generation gen for worker; -1 when none is left, gen has
  // passed, or this call has fewer workers.
  int claim(uint32_t gen, int worker);

  // (generation << 32) | (workers << 24) | next chunk: a helper that wakes late can only
  // claim chunks of the generation it saw, never one of a later call.
  std::atomic<uint64_t> ticket_{0};
  std::atomic<int> done_{0};
  std::atomic<int> sleepers_{0};
  std::atomic<bool> stop_{false};
  // written by the caller before ticket_ publishes a generation, read after a claim
  ChunkFn fn_ = nullptr;
  void* ctx_ = nullptr;
  int chunks_ = 0;
  std::mutex mutex_;
  std::condition_variable wake_;
  std::vector<std::thread> helpers_;
};

}  // namespace clada_cpu

#endif  // CLADA_CPU_WORK_POOL_H_
