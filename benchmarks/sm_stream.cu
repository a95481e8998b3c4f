// How fast one SM streams from device memory: 16-byte loads (the SparseMLP kernels' way) against
// bulk copies (cp.async.bulk, sm_90) into a ring of shared-memory stages, for 1 to all SMs' worth
// of blocks, each block reading its own 4 MB. benchmarks/NOTES.md section 10 has what it showed
// and what the fused kernel's phase D made of it.
//
//   nvcc -std=c++17 -arch=sm_90 -O3 benchmarks/sm_stream.cu -o /tmp/sm_stream && /tmp/sm_stream
//
// Bulk rows are 8 KB (a Llama-3-8B W_down_t row) taken from scattered places in the block's
// region, one copy per row, issued by one lane each; a stage's rows complete on one mbarrier, and
// the block frees a stage (a barrier) once every thread has read it.
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>

#define CHECK(x)                                                                           \
  do {                                                                                     \
    cudaError_t e = (x);                                                                   \
    if (e != cudaSuccess) {                                                                \
      std::printf("%s:%d: %s\n", __FILE__, __LINE__, cudaGetErrorString(e));              \
      std::exit(1);                                                                        \
    }                                                                                      \
  } while (0)

constexpr int kThreads = 256;
constexpr size_t kPerBlock = 4u << 20;

__device__ __forceinline__ uint4 ld_stream(const void* p) {  // as ld_weights in plugins/kernels/common.cuh
  uint4 r;
  asm("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
      : "l"(p));
  return r;
}
__device__ __forceinline__ float fold(uint4 v) { return __uint_as_float(v.x ^ v.y ^ v.z ^ v.w); }

// kLoads 16-byte loads in flight per thread, then their use.
template <int kLoads>
__global__ void __launch_bounds__(kThreads) loads_kernel(const uint4* __restrict__ src, float* sink) {
  const uint4* p = src + blockIdx.x * (kPerBlock / 16);
  constexpr size_t n = kPerBlock / 16;
  float s = 0.f;
  for (size_t i = threadIdx.x; i < n; i += kThreads * kLoads) {
    uint4 v[kLoads];
#pragma unroll
    for (int q = 0; q < kLoads; ++q) v[q] = ld_stream(p + i + q * kThreads);
#pragma unroll
    for (int q = 0; q < kLoads; ++q) s += fold(v[q]);
  }
  if (s == 12345.f) *sink = s;  // never true: keeps the loads
}

__device__ __forceinline__ unsigned smem_u32(const void* p) { return (unsigned)__cvta_generic_to_shared(p); }

// kStages stages of kRows rows of kRowBytes each.
template <int kStages, int kRows, int kRowBytes>
__global__ void __launch_bounds__(kThreads) bulk_kernel(const char* __restrict__ src, float* sink) {
  extern __shared__ __align__(128) unsigned char ring[];
  __shared__ __align__(8) uint64_t full[kStages];
  constexpr int kStageBytes = kRows * kRowBytes;
  constexpr int kRowsTotal = (int)(kPerBlock / kRowBytes);
  constexpr int kSteps = kRowsTotal / kRows;
  const char* p = src + blockIdx.x * kPerBlock;
  const int lane = threadIdx.x % 32;
  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(smem_u32(&full[s])));
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();
  auto issue = [&](int k) {
    const int st = k % kStages;
    if (threadIdx.x < 32) {
      if (lane == 0)
        asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_u32(&full[st])),
                     "r"(kStageBytes)
                     : "memory");
      __syncwarp();
      if (lane < kRows) {
        const int row = (int)(((long long)(k * kRows + lane) * 7919) % kRowsTotal);  // scattered rows
        asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
                         smem_u32(ring + st * kStageBytes + lane * kRowBytes)),
                     "l"(p + (size_t)row * kRowBytes), "r"(kRowBytes), "r"(smem_u32(&full[st]))
                     : "memory");
      }
    }
  };
  for (int k = 0; k < kStages; ++k) issue(k);
  float s = 0.f;
  for (int k = 0; k < kSteps; ++k) {
    const int st = k % kStages;
    asm volatile(
        "{\n .reg .pred done;\n WAIT_%=:\n mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
        " @!done bra WAIT_%=;\n}\n" ::"r"(smem_u32(&full[st])),
        "r"((unsigned)(k / kStages) & 1u)
        : "memory");
    const uint4* d = reinterpret_cast<const uint4*>(ring + st * kStageBytes);
    for (int i = threadIdx.x; i < kStageBytes / 16; i += kThreads) s += fold(d[i]);
    __syncthreads();
    if (k + kStages < kSteps) issue(k + kStages);
  }
  if (s == 12345.f) *sink = s;
}

int main() {
  constexpr size_t kBuffer = (size_t)3 << 30;  // rounds read fresh bytes: nothing is served from L2
  char* buf = nullptr;
  float* sink = nullptr;
  CHECK(cudaMalloc(&buf, kBuffer));
  CHECK(cudaMemset(buf, 1, kBuffer));
  CHECK(cudaMalloc(&sink, sizeof(float)));
  cudaDeviceProp prop;
  CHECK(cudaGetDeviceProperties(&prop, 0));
  cudaEvent_t t0, t1;
  CHECK(cudaEventCreate(&t0));
  CHECK(cudaEventCreate(&t1));
  size_t offset = 0;
  // Best of 5 timed rounds (after one untimed), GB/s per block.
  auto per_block = [&](auto launch, int grid) {
    float best = 1e30f;
    for (int r = 0; r < 6; ++r) {
      if (offset + grid * kPerBlock > kBuffer) offset = 0;
      CHECK(cudaEventRecord(t0));
      launch(buf + offset, grid);
      CHECK(cudaEventRecord(t1));
      CHECK(cudaEventSynchronize(t1));
      CHECK(cudaGetLastError());
      offset += grid * kPerBlock;
      float ms = 0.f;
      CHECK(cudaEventElapsedTime(&ms, t0, t1));
      if (r > 0 && ms < best) best = ms;
    }
    return kPerBlock / (best * 1e-3) / 1e9;
  };
  const int grids[] = {1, 16, 112, prop.multiProcessorCount};
  std::printf("%s, %d SMs: GB/s per block (blocks x that = the total), %zu MB per block\n\n", prop.name,
              prop.multiProcessorCount, kPerBlock >> 20);
  std::printf("| way | in flight per SM |");
  for (int g : grids) std::printf(" %d blocks |", g);
  std::printf("\n|---|---|");
  for (size_t i = 0; i < sizeof(grids) / sizeof(grids[0]); ++i) std::printf("---|");
  std::printf("\n");
  auto row = [&](const char* name, const char* flight, auto launch) {
    std::printf("| %s | %s |", name, flight);
    for (int g : grids) std::printf(" %.1f |", per_block(launch, g));
    std::printf("\n");
  };
  row("16-byte loads, 8 a thread", "32 KB",
      [&](const char* s, int g) { loads_kernel<8><<<g, kThreads>>>(reinterpret_cast<const uint4*>(s), sink); });
  row("16-byte loads, 16 a thread", "64 KB",
      [&](const char* s, int g) { loads_kernel<16><<<g, kThreads>>>(reinterpret_cast<const uint4*>(s), sink); });
  row("16-byte loads, 32 a thread", "128 KB",
      [&](const char* s, int g) { loads_kernel<32><<<g, kThreads>>>(reinterpret_cast<const uint4*>(s), sink); });
#define BULK(S, R, BYTES, FLIGHT)                                                                              \
  do {                                                                                                         \
    auto k = bulk_kernel<S, R, BYTES>;                                                                         \
    const int smem = S * R * BYTES;                                                                            \
    CHECK(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));                         \
    row("bulk copies, " #S " stages of " #R " x " #BYTES " B", FLIGHT,                                         \
        [&](const char* s, int g) { k<<<g, kThreads, smem>>>(s, sink); });                                    \
  } while (0)
  BULK(4, 2, 8192, "64 KB");
  BULK(4, 4, 8192, "128 KB");
  BULK(2, 8, 8192, "128 KB");
  BULK(3, 8, 8192, "192 KB");
  BULK(4, 1, 32768, "128 KB");
  return 0;
}
