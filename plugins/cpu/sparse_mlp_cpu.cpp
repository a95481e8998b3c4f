// The CPU SparseMLP: compaction of the kept rows, the two stages, the C ABI.
//
// Batch-1 decode is bound by memory bandwidth, as on the GPU: the win is the weight rows
// never read. Each stage splits the kept rows into chunks that the OpenMP threads claim;
// each thread streams whole rows into its own partial sums, which the caller adds up.
// Between the stages the caller computes h, its t_mid test and the list of kept down rows.
#include "sparse_mlp_cpu.h"

#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <mutex>
#include <vector>

#include "row_kernels.h"

namespace clada_cpu {
namespace {

float activate(float g, int act) {
  switch (act) {
    case CLADA_CPU_ACT_SILU:
      return g / (1.0f + std::exp(-g));
    case CLADA_CPU_ACT_GELU_TANH:
      return 0.5f * g * (1.0f + std::tanh(0.7978845608028654f * (g + 0.044715f * g * g * g)));
    default:
      return 0.5f * g * (1.0f + std::erf(g * 0.7071067811865476f));
  }
}

RowsFn rows_for(int isa) {
  switch (isa) {
    case CLADA_CPU_ISA_GENERIC:
      return rows_generic;
    case CLADA_CPU_ISA_AVX2:
      return cpu_has_avx2() ? rows_avx2 : nullptr;
    case CLADA_CPU_ISA_AVX512:
      return cpu_has_avx512() ? rows_avx512 : nullptr;
    default:
      return nullptr;
  }
}

// Buffers of the calling thread, kept between calls (a decode step calls once per layer
// with the same sizes).
struct Workspace {
  std::vector<const float*> gate_rows, up_rows, down_rows;
  std::vector<float> x_coef, h_coef;   // [kept rows, batch]
  std::vector<float> part_a, part_b;   // [workers, batch, inter]: per-worker partial sums
  std::vector<float> gate, up;         // [batch, inter]: their totals
  std::vector<unsigned char> touched;  // [workers]: did the worker add into its partials
};

// One call's arguments, shared with the OpenMP team.
struct Call {
  int batch;
  long hidden, inter;
  RowsFn rows_fn;
  const float* const* rows_a;  // stage 1: gate rows; stage 2: down rows
  const float* const* rows_b;  // stage 1: up rows; stage 2: unused
  const float* coef;
  int num_rows, rows_per_chunk;
  long width;                  // columns of a row: inter (stage 1) or hidden (stage 2)
  float* part_a;
  float* part_b;
  unsigned char* touched;
};

// A chunk is a run of whole kept rows: rows are contiguous, so each worker streams long
// sequential runs, and adds into its own partial sums (no sharing, no atomics).
void rows_chunk(const Call& c, int worker, int chunk) {
  const long size = c.batch * c.width;
  float* a = c.part_a + worker * size;
  float* b = c.part_b + worker * size;
  if (!c.touched[worker]) {
    std::fill(a, a + size, 0.0f);
    if (c.rows_b) std::fill(b, b + size, 0.0f);
    c.touched[worker] = 1;
  }
  const int r0 = chunk * c.rows_per_chunk;
  const int n = std::min(c.num_rows - r0, c.rows_per_chunk);
  c.rows_fn(a, c.width, c.rows_a + r0, c.coef + r0 * c.batch, n, c.batch, 0, c.width);
  if (c.rows_b) c.rows_fn(b, c.width, c.rows_b + r0, c.coef + r0 * c.batch, n, c.batch, 0, c.width);
}

// About 128 KiB of weights per chunk: long enough to stream, short enough that a worker the
// scheduler pauses holds up little, and enough chunks to balance two to eight workers.
int rows_per_chunk(long row_bytes) {
  return static_cast<int>(std::max(4L, (131072L / std::max(1L, row_bytes)) & ~3L));
}

void run_stage(Call& c, int workers, Workspace& ws) {
  c.rows_per_chunk = rows_per_chunk(c.width * 4 * (c.rows_b ? 2 : 1));
  c.touched = ws.touched.data();
  std::fill(ws.touched.begin(), ws.touched.end(), 0);
  const int chunks = (c.num_rows + c.rows_per_chunk - 1) / c.rows_per_chunk;
  // Threads claim chunks as they come, so one the scheduler runs late (a busy shared core)
  // takes fewer; the team is the process's OpenMP pool, which torch's ops use between two
  // MLP calls: the threads are already awake and none competes with another pool's.
  std::atomic<int> next{0};
#pragma omp parallel num_threads(std::min(workers, chunks)) if (workers > 1 && chunks > 1)
  {
    const int worker = omp_get_thread_num();
    for (int k; (k = next.fetch_add(1, std::memory_order_relaxed)) < chunks;) rows_chunk(c, worker, k);
  }
}

// out[i] = sum over the workers that added anything of part[w][i]
void reduce(const Workspace& ws, const float* part, long size, float* out) {
  std::fill(out, out + size, 0.0f);
  for (size_t w = 0; w < ws.touched.size(); ++w)
    if (ws.touched[w])
      for (long i = 0; i < size; ++i) out[i] += part[w * size + i];
}

int run(const float* x, const float* wg, const float* wu, const float* wd, const float* thr, float* y, int batch,
        long hidden, long inter, int act, int workers, RowsFn rows_fn, unsigned long long* row_counts) {
  thread_local Workspace ws;
  const int B = batch;
  ws.gate_rows.resize(hidden);
  ws.up_rows.resize(hidden);
  ws.x_coef.resize(hidden * B);
  int kept_in = 0;
  for (long i = 0; i < hidden; ++i) {
    bool any = false;
    for (int b = 0; b < B; ++b) {
      const float v = x[b * hidden + i];
      const bool keep = std::fabs(v) > thr[2 * b];  // NaN fails the test: dropped, as in the reference
      ws.x_coef[kept_in * B + b] = keep ? v : 0.0f;
      any |= keep;
    }
    if (any) {
      ws.gate_rows[kept_in] = wg + i * inter;
      ws.up_rows[kept_in] = wu + i * inter;
      ++kept_in;
    }
  }
  ws.part_a.resize(workers * B * inter);
  ws.part_b.resize(workers * B * inter);
  ws.touched.resize(workers);

  Call c{B, hidden, inter, rows_fn, ws.gate_rows.data(), ws.up_rows.data(), ws.x_coef.data(), kept_in, 0,
         inter, ws.part_a.data(), ws.part_b.data(), nullptr};
  run_stage(c, workers, ws);

  // h = act(gate) * up, kept where |h| > t_mid; the kept down rows compacted with their h
  ws.gate.resize(B * inter);
  ws.up.resize(B * inter);
  float* g = ws.gate.data();
  float* u = ws.up.data();
  reduce(ws, ws.part_a.data(), B * inter, g);
  reduce(ws, ws.part_b.data(), B * inter, u);
  ws.down_rows.resize(inter);
  ws.h_coef.resize(inter * B);
  int kept_mid = 0;
  for (long j = 0; j < inter; ++j) {
    bool any = false;
    for (int b = 0; b < B; ++b) {
      const float v = activate(g[b * inter + j], act) * u[b * inter + j];
      const bool keep = std::fabs(v) > thr[2 * b + 1];
      ws.h_coef[kept_mid * B + b] = keep ? v : 0.0f;
      any |= keep;
    }
    if (any) ws.down_rows[kept_mid++] = wd + j * hidden;
  }

  Call d{B, hidden, inter, rows_fn, ws.down_rows.data(), nullptr, ws.h_coef.data(), kept_mid, 0,
         hidden, ws.part_a.data(), nullptr, nullptr};
  run_stage(d, workers, ws);
  reduce(ws, ws.part_a.data(), B * hidden, y);

  if (row_counts != nullptr) {
    row_counts[0] += static_cast<unsigned long long>(kept_in);
    row_counts[1] += static_cast<unsigned long long>(kept_mid);
  }
  return CLADA_CPU_OK;
}

}  // namespace
}  // namespace clada_cpu

extern "C" {

int clada_cpu_abi_version(void) { return CLADA_CPU_ABI_VERSION; }

int clada_cpu_best_isa(void) {
  if (clada_cpu::cpu_has_avx512()) return CLADA_CPU_ISA_AVX512;
  if (clada_cpu::cpu_has_avx2()) return CLADA_CPU_ISA_AVX2;
  return CLADA_CPU_ISA_GENERIC;
}

int clada_sparse_mlp_cpu(const float* x, const float* w_gate_t, const float* w_up_t, const float* w_down_t,
                         const float* thresholds, float* y, int batch, int hidden, int inter, int act,
                         int num_threads, int isa, unsigned long long* row_counts) {
  try {
    if (!x || !w_gate_t || !w_up_t || !w_down_t || !thresholds || !y) return CLADA_CPU_INVALID_ARGUMENT;
    if (batch < 1 || batch > CLADA_CPU_MAX_BATCH || hidden < 1 || inter < 1) return CLADA_CPU_INVALID_ARGUMENT;
    if (act < CLADA_CPU_ACT_SILU || act > CLADA_CPU_ACT_GELU) return CLADA_CPU_INVALID_ARGUMENT;
    if (isa < CLADA_CPU_ISA_AUTO || isa > CLADA_CPU_ISA_AVX512) return CLADA_CPU_INVALID_ARGUMENT;
    const clada_cpu::RowsFn rows_fn = clada_cpu::rows_for(isa == CLADA_CPU_ISA_AUTO ? clada_cpu_best_isa() : isa);
    if (rows_fn == nullptr) return CLADA_CPU_UNSUPPORTED;
    const int threads = std::clamp(num_threads > 0 ? num_threads : omp_get_max_threads(), 1, 256);
    // one call at a time: the partial sums are shared by the team of one caller
    static std::mutex call_mutex;
    std::lock_guard<std::mutex> lock(call_mutex);
    return clada_cpu::run(x, w_gate_t, w_up_t, w_down_t, thresholds, y, batch, hidden, inter, act, threads, rows_fn,
                          row_counts);
  } catch (...) {
    return CLADA_CPU_INTERNAL;
  }
}

const char* clada_cpu_error_string(int status) {
  switch (status) {
    case CLADA_CPU_OK:
      return "ok";
    case CLADA_CPU_INVALID_ARGUMENT:
      return "invalid argument (a null pointer, batch outside 1..8, a non-positive size, an unknown act or isa)";
    case CLADA_CPU_UNSUPPORTED:
      return "the requested instruction set is not available on this CPU";
    case CLADA_CPU_INTERNAL:
      return "internal error (an exception inside the library, e.g. out of memory)";
    default:
      return "unknown status";
  }
}

const char* clada_cpu_isa_name(int isa) {
  switch (isa) {
    case CLADA_CPU_ISA_AUTO:
      return "auto";
    case CLADA_CPU_ISA_GENERIC:
      return "generic";
    case CLADA_CPU_ISA_AVX2:
      return "avx2";
    case CLADA_CPU_ISA_AVX512:
      return "avx512";
    default:
      return "unknown";
  }
}

}  // extern "C"
