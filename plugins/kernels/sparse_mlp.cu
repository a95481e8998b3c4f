// CLADA sparse MLP for decode (batch 1..8): two split-K GEMV kernels, for the gated MLP
// (y = (act(x_s Wg) * (x_s Wu))_s Wd) and, with kGated = false, the plain one
// (y = act(x_s W_in + b_in)_s W_out + b_out): one definition of each stage, where the plain
// form streams one matrix in stage 1 instead of two and adds the biases.
//
// Stage 1 (gateup_kernel): grid = (column tiles of `inter`, splits of `hidden`). Each
//   block loads its slice of x for every batch row, applies the per-row input
//   thresholds, and compacts the indices of the rows of W_gate_t/W_up_t that any batch
//   row needs into shared memory (no separate compaction pass). Its warps then stream
//   only those rows (one warp = one 512-byte row segment of each matrix, 16-byte loads,
//   several rows in flight), reduce across warps in shared memory, and add their fp32
//   partial sums into the workspace accumulators acc1[b][gate|up][inter] with atomics.
// Stage 2 (down_kernel): grid = blocks of `down_rows_per_block` intermediate rows; a
//   block owns its rows and all hidden columns. It reads the finished gate/up sums of
//   its rows, computes h = act(g) * u and the mid threshold per batch row (fused here,
//   so h never goes to memory), zeroes those accumulators for the next call, compacts
//   the rows any batch row needs, streams those rows of W_down_t (whole contiguous
//   rows) and adds its partial y into acc2[b][hidden] (vector atomics on sm_90). The
//   last block to finish (a counter in the workspace) converts acc2 to y in the
//   activation dtype and zeroes acc2 and the counter, so the workspace is zero again.
// Plain form: stage 1 accumulates x_s W_in only (acc1[b][0][inter]; the up half stays zero);
//   stage 2 computes h = act(sum + b_in[j]) and the last block adds b_out to y.
//
// Fused (one launch; the default for one sequence of the gated form on a large MLP): see
//   fused_kernel below.
//
// Thresholds are read from device memory: one CUDA graph serves every threshold.
//
// Both stages in one persistent launch (a work queue) was built, measured slower on the
// H100 at every sparsity, and removed (benchmarks/NOTES.md, v4).

#include "sparse_mlp.h"

#include <stdint.h>

#include <cooperative_groups.h>

#include <atomic>

#include "common.cuh"

namespace {

using clada::aligned16;
using clada::kWarp;
using clada::ld_weights;
using clada::pack2;
using clada::to_float;
using clada::unpack8;

constexpr int kS1Threads = 256;  // 8 warps
constexpr int kS1Warps = kS1Threads / kWarp;
constexpr int kS1Cols = kWarp * 8;  // columns of one block tile: 32 lanes x 8 (16 bytes)
#ifndef CLADA_S1_UNROLL
#define CLADA_S1_UNROLL 4
#endif
// Rows in flight per warp: the gated form loads two matrices per row, the plain one one, so
// the plain form keeps twice the rows in flight (the same bytes, the same registers).
template <bool kGated>
constexpr int s1_unroll() {
  return kGated ? CLADA_S1_UNROLL : 2 * CLADA_S1_UNROLL;
}
constexpr int kS2MaxThreads = 512;
// Rows of W_down_t in flight per thread: as many as registers allow without spilling.
template <int BT, int VPT>
constexpr int s2_unroll() {
  return VPT == 1 ? 8 : (BT >= 8 ? 2 : 4);
}
constexpr int kSmemCap = 46 * 1024;         // stay under the 48 KB default dynamic limit

__device__ __forceinline__ unsigned lanemask_lt() {
  unsigned m;
  asm("mov.u32 %0, %%lanemask_lt;" : "=r"(m));
  return m;
}

__device__ __forceinline__ float activation(float g, int act) {
  if (act == CLADA_ACT_SILU) return g / (1.0f + __expf(-g));
  if (act == CLADA_ACT_RELU) return g > 0.0f ? g : 0.0f;
  if (act == CLADA_ACT_GELU_TANH) {
    const float k = 0.7978845608028654f * (g + 0.044715f * g * g * g);
    return 0.5f * g * (1.0f + tanhf(k));
  }
  return 0.5f * g * (1.0f + erff(g * 0.7071067811865476f));
}

__device__ __forceinline__ void red_add4(float* p, float a, float b, float c, float d) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  atomicAdd(reinterpret_cast<float4*>(p), make_float4(a, b, c, d));
#else
  atomicAdd(p, a);
  atomicAdd(p + 1, b);
  atomicAdd(p + 2, c);
  atomicAdd(p + 3, d);
#endif
}

// Block-wide stream compaction step: each thread has `keep`; returns this thread's slot
// (valid when keep) and adds the block's count to `base`. Uses s_cnt[nwarps].
__device__ __forceinline__ int compact_slot(bool keep, int* s_cnt, int nwarps, int& base) {
  const int lane = threadIdx.x & (kWarp - 1), warp = threadIdx.x / kWarp;
  const unsigned m = __ballot_sync(0xffffffffu, keep);
  if (lane == 0) s_cnt[warp] = __popc(m);
  __syncthreads();
  int off = base, tot = 0;
  for (int w = 0; w < nwarps; ++w) {
    const int c = s_cnt[w];
    off += (w < warp) ? c : 0;
    tot += c;
  }
  off += __popc(m & lanemask_lt());
  base += tot;
  __syncthreads();  // s_cnt is reused by the next round
  return off;
}

// ---------------------------------------------------------------- stage 1
// Stage 1's and the fused kernel's row loop: adds the compacted input rows e = slot, slot +
// stride, ... of s_idx[n] (values s_xs[e * BT + b]), kU rows in flight, over the 8 columns that
// pg/pu point at in row 0 of W_gate_t/W_up_t (the plain form: W_in_t alone, pu unused), into
// ag/au. col_ok false: the columns lie past inter (nothing is read, the sums stay 0).
template <typename T, int BT, int kU, bool kGated>
__device__ __forceinline__ void accumulate_input_rows(const T* __restrict__ pg, const T* __restrict__ pu,
                                                      const int* s_idx, const float* s_xs, int n, int slot,
                                                      int stride, bool col_ok, int I, float (&ag)[BT][8],
                                                      float (&au)[BT][8]) {
  for (int e = slot; e < n; e += stride * kU) {
    uint4 g[kU], u[kU];
#pragma unroll
    for (int q = 0; q < kU; ++q) {
      const int eq = e + q * stride;
      g[q] = u[q] = make_uint4(0u, 0u, 0u, 0u);
      if (eq < n && col_ok) {
        const size_t row = (size_t)s_idx[eq] * I;
        g[q] = ld_weights(pg + row);
        if constexpr (kGated) u[q] = ld_weights(pu + row);
      }
    }
#pragma unroll
    for (int q = 0; q < kU; ++q) {
      const int eq = e + q * stride;
      if (eq < n) {
        float fg[8], fu[8];
        unpack8<T>(g[q], fg);
        if constexpr (kGated) unpack8<T>(u[q], fu);
#pragma unroll
        for (int b = 0; b < BT; ++b) {
          const float xs = s_xs[eq * BT + b];
#pragma unroll
          for (int c = 0; c < 8; ++c) {
            ag[b][c] = fmaf(xs, fg[c], ag[b][c]);
            if constexpr (kGated) au[b][c] = fmaf(xs, fu[c], au[b][c]);
          }
        }
      }
    }
  }
}

// acc1 layout: [batch][2][inter] fp32 (gate sums, then up sums), zero on entry. The plain
// form (kGated false: wg is W_in_t, wu unused) fills only acc1[b][0][:].
template <typename T, int BT, bool kGated>
__global__ void __launch_bounds__(kS1Threads)
    gateup_kernel(const T* __restrict__ x, const T* __restrict__ wg, const T* __restrict__ wu,
                  const float* __restrict__ thr, float* __restrict__ acc1,
                  unsigned* __restrict__ row_counts, int B, int H, int I, int kc) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  float* s_red = reinterpret_cast<float*>(smem_raw);         // [warps][2][kS1Cols]
  float* s_xs = s_red + kS1Warps * 2 * kS1Cols;              // [kc][BT]
  int* s_idx = reinterpret_cast<int*>(s_xs + (size_t)kc * BT);  // [kc]
  __shared__ int s_cnt[kS1Warps];

  const int tid = threadIdx.x, lane = tid & (kWarp - 1), warp = tid / kWarp;
  const int col0 = blockIdx.x * kS1Cols;
  const int k0 = blockIdx.y * kc;
  const int k1 = min(H, k0 + kc);
  // Every thread loads the thresholds itself (broadcast loads, in flight together with
  // the x loads below: no barrier in the prologue's latency chain). Rows b >= B never
  // pass (+inf threshold) and are never read.
  float s_tin[BT];
#pragma unroll
  for (int b = 0; b < BT; ++b) s_tin[b] = (b < B) ? __ldg(thr + 2 * b) : __int_as_float(0x7f800000);

  // 1. Threshold x and compact the rows any batch row needs (ascending row order).
  int n = 0;
  for (int r0 = k0; r0 < k1; r0 += kS1Threads) {
    const int i = r0 + tid;
    float v[BT];
    bool any = false;
#pragma unroll
    for (int b = 0; b < BT; ++b) {
      v[b] = 0.0f;
      if (b < B && i < k1) {
        const float xv = to_float(x[(size_t)b * H + i]);
        // NaN fails the comparison and is dropped, exactly as in the reference op.
        if (fabsf(xv) > s_tin[b]) {
          v[b] = xv;
          any = true;
        }
      }
    }
    const int slot = compact_slot(any, s_cnt, kS1Warps, n);
    if (any) {
      s_idx[slot] = i;
#pragma unroll
      for (int b = 0; b < BT; ++b) s_xs[slot * BT + b] = v[b];
    }
  }
  __syncthreads();
  // The first column tile counts its hidden slice's kept rows (all tiles compact the same).
  if (row_counts != nullptr && blockIdx.x == 0 && tid == 0 && n > 0) atomicAdd(row_counts, (unsigned)n);
  if (n == 0) return;  // nothing to add: the accumulators keep their value

  // 2. Stream the needed rows: warp w takes entries w, w+8, ...; lane covers 8 columns.
  constexpr int kS1Unroll = s1_unroll<kGated>();
  float ag[BT][8], au[BT][8];
#pragma unroll
  for (int b = 0; b < BT; ++b)
#pragma unroll
    for (int c = 0; c < 8; ++c) ag[b][c] = au[b][c] = 0.0f;

  const int col = col0 + lane * 8;
  accumulate_input_rows<T, BT, kS1Unroll, kGated>(wg + col, wu + col, s_idx, s_xs, n, warp, kS1Warps, col < I, I, ag,
                                                  au);

  // 3. Reduce the warps' partial sums in shared memory, one batch row at a time, then
  //    one coalesced atomic add per column into the workspace.
#pragma unroll
  for (int b = 0; b < BT; ++b) {
    if (b >= B) break;
    float4* dst_g = reinterpret_cast<float4*>(s_red + (warp * 2 + 0) * kS1Cols + lane * 8);
    float4* dst_u = reinterpret_cast<float4*>(s_red + (warp * 2 + 1) * kS1Cols + lane * 8);
    dst_g[0] = make_float4(ag[b][0], ag[b][1], ag[b][2], ag[b][3]);
    dst_g[1] = make_float4(ag[b][4], ag[b][5], ag[b][6], ag[b][7]);
    if constexpr (kGated) {
      dst_u[0] = make_float4(au[b][0], au[b][1], au[b][2], au[b][3]);
      dst_u[1] = make_float4(au[b][4], au[b][5], au[b][6], au[b][7]);
    }
    __syncthreads();
    float sg = 0.0f, su = 0.0f;
#pragma unroll
    for (int w = 0; w < kS1Warps; ++w) {
      sg += s_red[(w * 2 + 0) * kS1Cols + tid];
      if constexpr (kGated) su += s_red[(w * 2 + 1) * kS1Cols + tid];
    }
    const int c = col0 + tid;
    if (c < I) {
      atomicAdd(acc1 + ((size_t)b * 2 + 0) * I + c, sg);
      if constexpr (kGated) atomicAdd(acc1 + ((size_t)b * 2 + 1) * I + c, su);
    }
    __syncthreads();
  }
}

// The end of a call, for the kernel whose blocks add partial y into acc2 [B, H]: the last
// block to finish (a counter in the workspace) converts acc2 to y in the activation dtype
// (plain form: adding b_out) and zeroes acc2 and the counter, so the workspace is zero again.
// Returns whether this block was the last.
template <typename T, bool kGated>
__device__ __forceinline__ bool finish_last_block(float* __restrict__ acc2, unsigned* __restrict__ counter,
                                                  T* __restrict__ y, const T* __restrict__ b_out, int B, int H) {
  __shared__ bool s_last;
  const int tid = threadIdx.x, nthreads = blockDim.x;
  __threadfence();
  __syncthreads();
  if (tid == 0) s_last = (atomicAdd(counter, 1u) == gridDim.x - 1);
  __syncthreads();
  if (!s_last) return false;
  __threadfence();
  const int total4 = (B * H) / 4;
  for (int k = tid; k < total4; k += nthreads) {
    float4* p = reinterpret_cast<float4*>(acc2) + k;
    float4 s = __ldcg(p);
    __stcg(p, make_float4(0.0f, 0.0f, 0.0f, 0.0f));
    if constexpr (!kGated) {
      // H is a multiple of 8: the 4 values lie in one row, at columns c..c+3 (8-byte aligned).
      const int c = (k * 4) % H;
      const uint2 bv = __ldg(reinterpret_cast<const uint2*>(b_out + c));
      const T* bt = reinterpret_cast<const T*>(&bv);
      s.x += to_float(bt[0]);
      s.y += to_float(bt[1]);
      s.z += to_float(bt[2]);
      s.w += to_float(bt[3]);
    }
    uint2 o;
    o.x = pack2<T>(s.x, s.y);
    o.y = pack2<T>(s.z, s.w);
    reinterpret_cast<uint2*>(y)[k] = o;
  }
  if (tid == 0) *counter = 0u;
  return true;
}

// Stage 2's and the fused kernel's last step: stream the rows s_idx[0..n) of W_down_t (whole
// contiguous rows of `hidden`), each scaled by its kept h values s_hs[e * BT + b], kU rows in
// flight per thread, into the accumulators a; thread `tid` of `nthreads` owns the 8-column groups
// (v * nthreads + tid) * 8.
template <typename T, int BT, int VPT, int kU>
__device__ __forceinline__ void accumulate_down_rows(const T* __restrict__ wd, const int* s_idx, const float* s_hs,
                                                     int n, float (&a)[VPT][BT][8], int H, int tid, int nthreads) {
  int col[VPT];
  bool ok[VPT];
#pragma unroll
  for (int v = 0; v < VPT; ++v) {
    col[v] = (v * nthreads + tid) * 8;
    ok[v] = col[v] < H;
  }
  for (int e = 0; e < n; e += kU) {
    uint4 w[kU][VPT];
#pragma unroll
    for (int q = 0; q < kU; ++q) {
      const int eq = e + q;
      const size_t row = (size_t)s_idx[min(eq, n - 1)] * H;
#pragma unroll
      for (int v = 0; v < VPT; ++v) {
        w[q][v] = make_uint4(0u, 0u, 0u, 0u);
        if (eq < n && ok[v]) w[q][v] = ld_weights(wd + row + col[v]);
      }
    }
#pragma unroll
    for (int q = 0; q < kU; ++q) {
      const int eq = e + q;
      if (eq < n) {
#pragma unroll
        for (int v = 0; v < VPT; ++v) {
          float f[8];
          unpack8<T>(w[q][v], f);
#pragma unroll
          for (int b = 0; b < BT; ++b) {
            const float hs = s_hs[eq * BT + b];
#pragma unroll
            for (int c = 0; c < 8; ++c) a[v][b][c] = fmaf(hs, f[c], a[v][b][c]);
          }
        }
      }
    }
  }
}

// Calls f(offset, sums) for each 8-column group of a block's partial y (the accumulators of
// accumulate_down_rows) that thread `tid` of `nthreads` holds: offset b * H + col into a [B, H]
// row-major buffer, sums the group's 8 floats.
template <int BT, int VPT, typename F>
__device__ __forceinline__ void for_each_partial_y(const float (&a)[VPT][BT][8], int B, int H, int tid, int nthreads,
                                                   F&& f) {
#pragma unroll
  for (int v = 0; v < VPT; ++v) {
    const int col = (v * nthreads + tid) * 8;
    if (col >= H) continue;
#pragma unroll
    for (int b = 0; b < BT; ++b) {
      if (b >= B) break;
      f((size_t)b * H + col, a[v][b]);
    }
  }
}

// Adds a block's partial y into acc2 [B, H] (vector atomics on sm_90).
template <int BT, int VPT>
__device__ __forceinline__ void add_partial_y(const float (&a)[VPT][BT][8], float* __restrict__ acc2, int B, int H,
                                              int tid, int nthreads) {
  for_each_partial_y(a, B, H, tid, nthreads, [&](size_t off, const float (&s)[8]) {
    red_add4(acc2 + off, s[0], s[1], s[2], s[3]);
    red_add4(acc2 + off + 4, s[4], s[5], s[6], s[7]);
  });
}

template <int VPT, int BT>
__device__ __forceinline__ void zero_acc(float (&a)[VPT][BT][8]) {
#pragma unroll
  for (int v = 0; v < VPT; ++v)
#pragma unroll
    for (int b = 0; b < BT; ++b)
#pragma unroll
      for (int c = 0; c < 8; ++c) a[v][b][c] = 0.0f;
}

// ---------------------------------------------------------------- stage 2
// acc2 layout: [batch][hidden] fp32, zero on entry. counter: zero on entry.
// The plain form (kGated false): h = act(acc1[b][0][j] + b_in[j]), y = acc2 + b_out; the
// gated form ignores b_in and b_out (null).
template <typename T, int BT, int VPT, bool kGated>
__global__ void __launch_bounds__(kS2MaxThreads)
    down_kernel(float* __restrict__ acc1, const T* __restrict__ wd, const float* __restrict__ thr,
                float* __restrict__ acc2, unsigned* __restrict__ counter, T* __restrict__ y,
                unsigned* __restrict__ row_counts, int B, int H, int I, int jc, int act,
                const T* __restrict__ b_in, const T* __restrict__ b_out) {
  constexpr int kS2Unroll = s2_unroll<BT, VPT>();
  extern __shared__ __align__(16) unsigned char smem_raw[];
  float* s_hs = reinterpret_cast<float*>(smem_raw);              // [jc][BT]
  int* s_idx = reinterpret_cast<int*>(s_hs + (size_t)jc * BT);   // [jc]
  __shared__ int s_cnt[kS2MaxThreads / kWarp];

  const int tid = threadIdx.x, nthreads = blockDim.x, nwarps = nthreads / kWarp;
  const int j0 = blockIdx.x * jc;
  const int j1 = min(I, j0 + jc);
  float s_tmid[BT];  // per thread, loaded together with the acc1 loads below
#pragma unroll
  for (int b = 0; b < BT; ++b) s_tmid[b] = (b < B) ? __ldg(thr + 2 * b + 1) : __int_as_float(0x7f800000);

  // 1. h = act(g) * u (plain: act(g + b_in)) from the finished stage-1 sums, mid threshold,
  //    compaction. This block is the only reader of acc1[:, :, j0:j1], so it zeroes them
  //    for the next call.
  int n = 0;
  for (int r0 = j0; r0 < j1; r0 += nthreads) {
    const int j = r0 + tid;
    float hv[BT];
    bool any = false;
    float bias = 0.0f;
    if constexpr (!kGated) {
      if (j < j1) bias = to_float(b_in[j]);
    }
#pragma unroll
    for (int b = 0; b < BT; ++b) {
      hv[b] = 0.0f;
      if (b < B && j < j1) {
        float* pg = acc1 + ((size_t)b * 2 + 0) * I + j;
        const float g = __ldcg(pg);
        __stcg(pg, 0.0f);
        float h;
        if constexpr (kGated) {
          float* pu = acc1 + ((size_t)b * 2 + 1) * I + j;
          const float u = __ldcg(pu);
          __stcg(pu, 0.0f);
          h = activation(g, act) * u;
        } else {
          h = activation(g + bias, act);
        }
        if (fabsf(h) > s_tmid[b]) {
          hv[b] = h;
          any = true;
        }
      }
    }
    const int slot = compact_slot(any, s_cnt, nwarps, n);
    if (any) {
      s_idx[slot] = j;
#pragma unroll
      for (int b = 0; b < BT; ++b) s_hs[slot * BT + b] = hv[b];
    }
  }
  __syncthreads();
  if (row_counts != nullptr && tid == 0 && n > 0) atomicAdd(row_counts + 1, (unsigned)n);

  // 2. Stream the needed rows of W_down_t: the block reads whole contiguous rows.
  if (n > 0) {
    float a[VPT][BT][8];
    zero_acc(a);
    accumulate_down_rows<T, BT, VPT, kS2Unroll>(wd, s_idx, s_hs, n, a, H, tid, nthreads);
    add_partial_y(a, acc2, B, H, tid, nthreads);
  }

  // 3. The last block converts the finished sums to y and leaves the workspace zeroed.
  finish_last_block<T, kGated>(acc2, counter, y, b_out, B, H);
}

// ---------------------------------------------------------------- fused (one launch)
// Gated form, batch <= 2 (by default at batch 1 where fused_by_default; forced by
// CLADA_SPARSE_MLP_FLAG_FUSED). Why (benchmarks/NOTES.md): the two-kernel path spends about
// 15 us a call beyond the bytes it reads. Block t owns the intermediate
// columns [t * kFCols, (t + 1) * kFCols): it thresholds and compacts all of x itself (every
// block builds the same list), streams every kept row of W_gate_t/W_up_t over its own
// columns only, so its gate/up sums are complete without split-K atomics or a second launch,
// computes h and the mid threshold for its columns, streams the kept rows of W_down_t among
// them, and adds its partial y into acc2; the last block writes y (finish_last_block).
constexpr int kFThreads = 256;
constexpr int kFWarps = kFThreads / kWarp;
constexpr int kFCols = 128;                      // intermediate columns per block
constexpr int kFLanesPerRow = kFCols / 8;        // 16 lanes x 8 columns (16 bytes) of a row
constexpr int kFRowsPerWarp = kWarp / kFLanesPerRow;
constexpr int kFSlots = kFWarps * kFRowsPerWarp; // input rows one sweep of the block covers

// Rows in flight: per row slot in phase B (two 16-byte loads a row), per thread in phase D
// (VPT 16-byte loads a row). Overridable (CLADA_KERNEL_DEFINES) for tuning experiments.
#ifndef CLADA_F_UNROLL
#define CLADA_F_UNROLL 8
#endif
#ifndef CLADA_F_DOWN_LOADS
#define CLADA_F_DOWN_LOADS 16
#endif
template <int BT>
constexpr int fused_unroll() { return BT == 1 ? CLADA_F_UNROLL : CLADA_F_UNROLL / 2; }
template <int VPT>
constexpr int fused_down_unroll() { return CLADA_F_DOWN_LOADS / VPT; }
// Channels of x one thread thresholds in phase A, in 8-channel (16-byte) groups loaded together.
#ifndef CLADA_F_X_GROUPS
#define CLADA_F_X_GROUPS 2
#endif
constexpr int kFXGroups = CLADA_F_X_GROUPS;

#ifdef CLADA_FUSED_TRACE
// Timeline of the fused kernel for benchmarks/fused_timeline.py (a build with
// -DCLADA_FUSED_TRACE only): per launch (4 kept, round robin) and block, %globaltimer at each
// phase boundary and the kept W_down_t rows. Fields: 0 start, 1 x compacted (A), 2 gate/up
// summed (B), 3 h compacted (C), 4 W_down_t rows streamed and partial y added (D), 5 end (the
// last block: y written), 6 the tile's kept h columns.
constexpr int kTraceLaunches = 4, kTraceBlocks = 1024, kTraceFields = 8;
__device__ unsigned long long g_fused_trace[kTraceLaunches][kTraceBlocks][kTraceFields];
__device__ unsigned g_fused_trace_launch;
__device__ __forceinline__ unsigned long long global_ns() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}
#define FUSED_TRACE(k, v)                                                                        \
  do {                                                                                           \
    if (threadIdx.x == 0 && blockIdx.x < kTraceBlocks)                                           \
      g_fused_trace[trace_launch % kTraceLaunches][blockIdx.x][k] = (v);                         \
  } while (0)
#else
#define FUSED_TRACE(k, v) \
  do {                    \
  } while (0)
#endif

// Shared memory: the compacted input rows (index, thresholded values) for all of `hidden`.
template <int BT>
constexpr size_t fused_smem_bytes(int H) {
  return (size_t)H * sizeof(int) + (size_t)H * BT * sizeof(float);
}

// The fused kernel's first step, in every block: threshold x [B, H] and compact the input
// rows any batch row keeps into s_idx[n] (ascending) and their thresholded values
// s_xs[n * BT + b]; returns n. Each thread takes kFXGroups x 8 consecutive channels a round, its
// 16-byte loads issued together (Llama-3-8B's hidden 4096 costs one round trip); one
// block-wide scan of the per-thread counts places them. s_cnt: kFWarps ints.
template <typename T, int BT>
__device__ __forceinline__ int compact_input(const T* __restrict__ x, const float (&t_in)[BT], int* s_idx,
                                             float* s_xs, int* s_cnt, int B, int H) {
  const int tid = threadIdx.x, lane = tid & (kWarp - 1), warp = tid / kWarp;
  int n = 0;
  for (int r0 = 0; r0 < H; r0 += kFThreads * 8 * kFXGroups) {
    float v[kFXGroups][BT][8];
    unsigned keep[kFXGroups];
#pragma unroll
    for (int g = 0; g < kFXGroups; ++g) {
      const int i0 = r0 + (tid * kFXGroups + g) * 8;
      keep[g] = 0u;
#pragma unroll
      for (int b = 0; b < BT; ++b) {
        if (b < B && i0 < H) {
          unpack8<T>(*reinterpret_cast<const uint4*>(x + (size_t)b * H + i0), v[g][b]);
        } else {
#pragma unroll
          for (int c = 0; c < 8; ++c) v[g][b][c] = 0.0f;
        }
      }
    }
    int cnt = 0;
#pragma unroll
    for (int g = 0; g < kFXGroups; ++g) {
#pragma unroll
      for (int b = 0; b < BT; ++b)
#pragma unroll
        for (int c = 0; c < 8; ++c) {
          // NaN fails the comparison and is dropped, exactly as in the reference op.
          const bool k = fabsf(v[g][b][c]) > t_in[b];
          keep[g] |= (k ? 1u : 0u) << c;
          if (!k) v[g][b][c] = 0.0f;
        }
      cnt += __popc(keep[g]);
    }
    int incl = cnt;  // inclusive scan within the warp
#pragma unroll
    for (int d = 1; d < kWarp; d <<= 1) {
      const int o = __shfl_up_sync(0xffffffffu, incl, d);
      if (lane >= d) incl += o;
    }
    if (lane == kWarp - 1) s_cnt[warp] = incl;
    __syncthreads();
    int off = n, tot = 0;
#pragma unroll
    for (int w = 0; w < kFWarps; ++w) {
      const int c = s_cnt[w];
      off += (w < warp) ? c : 0;
      tot += c;
    }
    off += incl - cnt;
#pragma unroll
    for (int g = 0; g < kFXGroups; ++g) {
      const int i0 = r0 + (tid * kFXGroups + g) * 8;
#pragma unroll
      for (int c = 0; c < 8; ++c) {
        if (keep[g] & (1u << c)) {
          s_idx[off] = i0 + c;
#pragma unroll
          for (int b = 0; b < BT; ++b) s_xs[off * BT + b] = v[g][b][c];
          ++off;
        }
      }
    }
    n += tot;
    __syncthreads();  // s_cnt is reused by the next round; s_idx/s_xs complete after the last
  }
  return n;
}

// The fused kernel's steps A-C for the column tile [col0, col0 + kFCols) of block
// `blockIdx.x`: compacts x (A), sums every kept input row's W_gate_t/W_up_t segment over the
// tile (B), and leaves the tile's kept h columns in s_hidx[n2], s_hs[n2][BT] (C); returns n2.
template <typename T, int BT>
__device__ __forceinline__ int fused_tile_front(const T* __restrict__ x, const T* __restrict__ wg,
                                                const T* __restrict__ wu, const float (&t_in)[BT],
                                                const float (&t_mid)[BT], unsigned* __restrict__ row_counts, int B,
                                                int H, int I, int act, int col0, int* s_idx, float* s_xs,
                                                float (&s_red)[kFWarps][2][BT][kFCols], int (&s_hidx)[kFCols],
                                                float (&s_hs)[kFCols][BT], int* s_cnt,
                                                [[maybe_unused]] unsigned trace_launch) {
  const int tid = threadIdx.x, lane = tid & (kWarp - 1), warp = tid / kWarp;
  // A. Threshold x and compact the input rows any batch row keeps.
  const int n = compact_input<T, BT>(x, t_in, s_idx, s_xs, s_cnt, B, H);
  FUSED_TRACE(1, global_ns());
  if (row_counts != nullptr && blockIdx.x == 0 && tid == 0 && n > 0) atomicAdd(row_counts, (unsigned)n);

  // B. Gate/up sums over every kept input row, for this block's columns: row slot
  //    (warp, lane / 16) takes rows slot, slot + 16, ...; lane % 16 covers 8 columns.
  constexpr int kU = fused_unroll<BT>();
  const int slot = warp * kFRowsPerWarp + lane / kFLanesPerRow;
  const int cg = lane % kFLanesPerRow;
  const int col = col0 + cg * 8;
  const bool col_ok = col < I;
  float ag[BT][8], au[BT][8];
#pragma unroll
  for (int b = 0; b < BT; ++b)
#pragma unroll
    for (int c = 0; c < 8; ++c) ag[b][c] = au[b][c] = 0.0f;
  accumulate_input_rows<T, BT, kU, true>(wg + col, wu + col, s_idx, s_xs, n, slot, kFSlots, col_ok, I, ag, au);
  // the two row slots of a warp hold the same columns: add them, then across the warps
#pragma unroll
  for (int b = 0; b < BT; ++b)
#pragma unroll
    for (int c = 0; c < 8; ++c) {
      ag[b][c] += __shfl_xor_sync(0xffffffffu, ag[b][c], kFLanesPerRow);
      au[b][c] += __shfl_xor_sync(0xffffffffu, au[b][c], kFLanesPerRow);
    }
  if (lane < kFLanesPerRow) {
#pragma unroll
    for (int b = 0; b < BT; ++b)
#pragma unroll
      for (int c = 0; c < 8; ++c) {
        s_red[warp][0][b][cg * 8 + c] = ag[b][c];
        s_red[warp][1][b][cg * 8 + c] = au[b][c];
      }
  }
  __syncthreads();
  FUSED_TRACE(2, global_ns());

  // C. h = act(g) * u for this block's columns, the mid threshold, compaction.
  float hv[BT];
  bool any = false;
  const int j = col0 + tid;
#pragma unroll
  for (int b = 0; b < BT; ++b) {
    hv[b] = 0.0f;
    if (tid < kFCols && j < I && b < B) {
      float g = 0.0f, u = 0.0f;
#pragma unroll
      for (int w = 0; w < kFWarps; ++w) {
        g += s_red[w][0][b][tid];
        u += s_red[w][1][b][tid];
      }
      const float h = activation(g, act) * u;
      if (fabsf(h) > t_mid[b]) {
        hv[b] = h;
        any = true;
      }
    }
  }
  int n2 = 0;
  const int hslot = compact_slot(any, s_cnt, kFWarps, n2);
  if (any) {
    s_hidx[hslot] = j;
#pragma unroll
    for (int b = 0; b < BT; ++b) s_hs[hslot][b] = hv[b];
  }
  __syncthreads();
  if (row_counts != nullptr && tid == 0 && n2 > 0) atomicAdd(row_counts + 1, (unsigned)n2);
  FUSED_TRACE(3, global_ns());
  FUSED_TRACE(6, n2);

  return n2;
}

// Thread-block clusters (sm_90): the blocks of a cluster of kFCluster sum their partial y in
// distributed shared memory, and each adds 1/kFCluster of the columns into acc2. Why
// (benchmarks/NOTES.md section 9): with 112 blocks each adding all H columns, the fence on
// those atomics and the last block's wait cost 2-4 us a call; in pairs the same call is 0.4-1.2
// us faster at 50-90% (clusters of 4 and 8 measured no better, and pooling the cluster's down rows
// to even out phase D measured slower: the pool waits for the cluster's slowest gate/up phase).
// 0 or 1: no clusters.
#ifndef CLADA_F_CLUSTER
#define CLADA_F_CLUSTER 2
#endif
constexpr int kFCluster = CLADA_F_CLUSTER > 1 ? CLADA_F_CLUSTER : 1;

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define CLADA_HAS_CLUSTERS 1
#else
#define CLADA_HAS_CLUSTERS 0
#endif

// A cluster's block adds its partial y a [VPT][BT][8] (the accumulate_down_rows layout) into
// acc2 [B, H] through the cluster: it writes a to s_y ([BT][H] floats of its shared memory),
// and after the cluster barrier sums the 4-column groups [rank H4 / C, (rank+1) H4 / C) of every
// block's s_y and adds them with atomics. Ends with this block's arrival on the cluster barrier:
// the caller waits on it before exiting, since the other blocks read this block's s_y.
template <int BT, int VPT, int kC>
__device__ __forceinline__ void cluster_add_partial_y(const float (&a)[VPT][BT][8], float* s_y,
                                                      float* __restrict__ acc2, int B, int H) {
#if CLADA_HAS_CLUSTERS
  namespace cg = cooperative_groups;
  const cg::cluster_group cluster = cg::this_cluster();
  const int tid = threadIdx.x, nthreads = blockDim.x;
  const int rank = (int)cluster.block_rank();
  for_each_partial_y(a, B, H, tid, nthreads, [&](size_t off, const float (&s)[8]) {
    float4* p = reinterpret_cast<float4*>(s_y + off);
    p[0] = make_float4(s[0], s[1], s[2], s[3]);
    p[1] = make_float4(s[4], s[5], s[6], s[7]);
  });
  cluster.sync();  // every block's partial y is in its s_y
  const int h4 = H / 4, g0 = rank * h4 / kC, g1 = (rank + 1) * h4 / kC;
  for (int b = 0; b < B; ++b)
    for (int g = g0 + tid; g < g1; g += nthreads) {
      float4 s = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
#pragma unroll
      for (int r = 0; r < kC; ++r) {
        const float4 o = *cluster.map_shared_rank(reinterpret_cast<const float4*>(s_y + (size_t)b * H) + g, r);
        s.x += o.x;
        s.y += o.y;
        s.z += o.z;
        s.w += o.w;
      }
      red_add4(acc2 + (size_t)b * H + 4 * g, s.x, s.y, s.z, s.w);
    }
  cluster.barrier_arrive();  // done reading the others' s_y
#else
  __trap();  // clusters need sm_90; the host launches a cluster build's kernel only there
#endif
}

// kC > 1: launched in clusters of kC blocks, the grid rounded up to whole clusters (a block
// past the last tile only adds its zero partial y to the cluster's sum).
template <typename T, int BT, int VPT, int kC>
__global__ void __launch_bounds__(kFThreads)
    fused_kernel(const T* __restrict__ x, const T* __restrict__ wg, const T* __restrict__ wu,
                 const T* __restrict__ wd, const float* __restrict__ thr, float* __restrict__ acc2,
                 unsigned* __restrict__ counter, T* __restrict__ y, unsigned* __restrict__ row_counts, int B,
                 int H, int I, int act) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  int* s_idx = reinterpret_cast<int*>(smem_raw);                     // [H]
  float* s_xs = reinterpret_cast<float*>(s_idx + H);                 // [H][BT]
  __shared__ float s_red[kFWarps][2][BT][kFCols];                    // per-warp gate/up sums
  __shared__ int s_hidx[kFCols];
  __shared__ float s_hs[kFCols][BT];
  __shared__ int s_cnt[kFWarps];
  const int tid = threadIdx.x;
  unsigned trace_launch = 0;
#ifdef CLADA_FUSED_TRACE
  trace_launch = *reinterpret_cast<volatile unsigned*>(&g_fused_trace_launch);
  FUSED_TRACE(0, global_ns());
#endif
  float t_in[BT], t_mid[BT];
#pragma unroll
  for (int b = 0; b < BT; ++b) {
    t_in[b] = (b < B) ? __ldg(thr + 2 * b) : __int_as_float(0x7f800000);
    t_mid[b] = (b < B) ? __ldg(thr + 2 * b + 1) : __int_as_float(0x7f800000);
  }
  const int col0 = blockIdx.x * kFCols;
  const int n2 = col0 < I ? fused_tile_front<T, BT>(x, wg, wu, t_in, t_mid, row_counts, B, H, I, act, col0, s_idx,
                                                    s_xs, s_red, s_hidx, s_hs, s_cnt, trace_launch)
                          : 0;

  // D. The kept rows of W_down_t among this block's columns, whole contiguous rows.
  float acc[VPT][BT][8];
  zero_acc(acc);
  if (n2 > 0)
    accumulate_down_rows<T, BT, VPT, fused_down_unroll<VPT>()>(wd, s_hidx, &s_hs[0][0], n2, acc, H, tid, kFThreads);
  if constexpr (kC > 1) {
    // s_y reuses the input-row lists: phase B was their last reader.
    cluster_add_partial_y<BT, VPT, kC>(acc, reinterpret_cast<float*>(smem_raw), acc2, B, H);
  } else if (n2 > 0) {
    add_partial_y(acc, acc2, B, H, tid, kFThreads);
  }
  FUSED_TRACE(4, global_ns());
  const bool last = finish_last_block<T, true>(acc2, counter, y, nullptr, B, H);
  FUSED_TRACE(5, global_ns());
#ifdef CLADA_FUSED_TRACE
  if (last && threadIdx.x == 0) g_fused_trace_launch = trace_launch + 1;
#endif
  (void)last;
#if CLADA_HAS_CLUSTERS
  if constexpr (kC > 1) cooperative_groups::this_cluster().barrier_wait();  // the others are done with our s_y
#endif
}

// ---------------------------------------------------------------- dense-GEMM path
// The same op around dense GEMMs (the runtime's fallback where the kernel above would read
// nearly every row): x_s = x * (|x| > t_in[b]) before the gate/up GEMM, and
// h_s = act(g) * u * (|act(g) * u| > t_mid[b]) between the GEMMs, each one elementwise
// launch (what the plain dense MLP spends on act(g) * u alone).
template <typename T>
__global__ void mask_input_kernel(const T* __restrict__ x, const float* __restrict__ thr, T* __restrict__ y,
                                  int n) {
  const int b = blockIdx.y;
  const float t = __ldg(thr + 2 * b);
  const size_t base = (size_t)b * n;
  for (int i = (blockIdx.x * blockDim.x + threadIdx.x) * 8; i < n; i += gridDim.x * blockDim.x * 8) {
    float f[8];
    unpack8<T>(*reinterpret_cast<const uint4*>(x + base + i), f);
#pragma unroll
    for (int c = 0; c < 8; ++c) f[c] = fabsf(f[c]) > t ? f[c] : 0.0f;  // NaN dropped, as in the op
    *reinterpret_cast<uint4*>(y + base + i) = clada::pack8<T>(f);
  }
}

// kGated: gu [B, 2 * inter] (gate, then up), h = act(g) * u. Plain: gu [B, inter] (x_s W_in),
// h = act(g + b_in) (b_in [inter] or null when the GEMM added it).
template <typename T, bool kGated>
__global__ void gate_mask_kernel(const T* __restrict__ gu, const T* __restrict__ b_in, const float* __restrict__ thr,
                                 T* __restrict__ h, int inter, int act) {
  const int b = blockIdx.y;
  const float t = __ldg(thr + 2 * b + 1);
  const T* g = gu + (size_t)b * (kGated ? 2 : 1) * inter;
  const T* u = g + inter;
  for (int i = (blockIdx.x * blockDim.x + threadIdx.x) * 8; i < inter; i += gridDim.x * blockDim.x * 8) {
    float fg[8], fu[8];
    unpack8<T>(*reinterpret_cast<const uint4*>(g + i), fg);
    if constexpr (kGated) {
      unpack8<T>(*reinterpret_cast<const uint4*>(u + i), fu);
    } else {
#pragma unroll
      for (int c = 0; c < 8; ++c) fu[c] = 0.0f;
      if (b_in != nullptr) unpack8<T>(*reinterpret_cast<const uint4*>(b_in + i), fu);
    }
#pragma unroll
    for (int c = 0; c < 8; ++c) {
      const float v = kGated ? activation(fg[c], act) * fu[c] : activation(fg[c] + fu[c], act);
      fg[c] = fabsf(v) > t ? v : 0.0f;
    }
    *reinterpret_cast<uint4*>(h + (size_t)b * inter + i) = clada::pack8<T>(fg);
  }
}

// ---------------------------------------------------------------- host side
constexpr size_t kCtrlBytes = 256;
constexpr int kMaxDevices = 64;  // per-device launch state (the fused kernel's shared-memory opt-in)
size_t align_up(size_t v, size_t a) { return (v + a - 1) / a * a; }
int cdiv(int a, int b) { return (a + b - 1) / b; }

struct WorkspaceLayout {
  size_t acc1, acc2, counter, total;
};
WorkspaceLayout layout(int batch, int hidden, int inter) {
  WorkspaceLayout l;
  l.acc1 = 0;
  l.acc2 = align_up((size_t)batch * 2 * inter * sizeof(float), 256);
  l.counter = l.acc2 + align_up((size_t)batch * hidden * sizeof(float), 256);
  l.total = l.counter + kCtrlBytes;  // the end-of-call counter
  return l;
}

int sm_count() {
  int dev = 0, sms = 0;
  cudaGetDevice(&dev);
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || sms < 1)
    sms = 1;
  return sms;
}

// One call's arguments, gated or plain: w1/w2 are W_gate_t/W_up_t (gated) or W_in_t/null
// (plain), wd is W_down_t or W_out_t; b_in/b_out are the plain form's biases (null when gated).
struct Call {
  const void *x, *w1, *w2, *wd, *b_in, *b_out;
  const float* thr;
  void* y;
  int B, H, I, act;
  char* ws;
  unsigned* row_counts;
  const clada_sparse_mlp_config* cfg;
  cudaStream_t stream;
};

template <typename T, int BT, int VPT, bool kGated>
int launch_typed(const Call& a) {
  const int B = a.B, H = a.H, I = a.I;
  const clada_sparse_mlp_config* cfg = a.cfg;
  const WorkspaceLayout l = layout(B, H, I);
  float* acc1 = reinterpret_cast<float*>(a.ws + l.acc1);
  float* acc2 = reinterpret_cast<float*>(a.ws + l.acc2);
  unsigned* counter = reinterpret_cast<unsigned*>(a.ws + l.counter);
  const int sms = sm_count();

  // Stage 1 launch shape: 128 x BT rows of hidden per block. Every block adds its
  // [B, 2, 256] partial with atomics, so the atomic count is splits x B x 2 x inter:
  // this keeps it at ~32 x 2 x inter whatever B, and gives B=1 many small blocks (measured
  // best on H100: 32 splits for B=1, 8 for B=4 on Llama-3-8B). The plain form uses the same
  // shape (half the atomics, one matrix).
  const int ntiles = cdiv(I, kS1Cols);
  const size_t red_bytes = (size_t)kS1Warps * 2 * kS1Cols * sizeof(float);
  const int kc_cap = (int)((kSmemCap - red_bytes) / ((BT + 1) * sizeof(float))) / 32 * 32;
  int splits = cfg && cfg->gateup_splits > 0 ? cfg->gateup_splits : 0;
  // Small models (few tiles): at least enough blocks to give every SM one.
  if (splits == 0) splits = max(cdiv(H, 128 * BT), cdiv(sms, ntiles));
  splits = max(1, min(splits, cdiv(H, 32)));
  int kc = (int)align_up((size_t)cdiv(H, splits), 32);
  if (kc > kc_cap) kc = kc_cap;
  splits = cdiv(H, kc);
  const size_t smem1 = red_bytes + (size_t)kc * (BT + 1) * sizeof(float);

  // Stage 2 launch shape: each block owns `jc` rows of W_down_t and all hidden columns.
  const int vec = H / 8;
  const int threads2 = (int)align_up((size_t)cdiv(vec, VPT), kWarp);
  const int jc_cap = (int)(kSmemCap / ((BT + 1) * sizeof(float))) / 8 * 8;
  int jc = cfg && cfg->down_rows_per_block > 0 ? cfg->down_rows_per_block : 0;
  if (jc == 0) {
    // One block per SM: every block adds a whole [B, hidden] partial into acc2 with
    // atomics, so more blocks cost more same-address atomics (measured: 448 blocks were
    // 15 us slower than 128 on Llama-3-8B); loads in flight come from the unroll.
    jc = (int)align_up((size_t)cdiv(I, sms), 8);
  }
  jc = max(1, min(jc, jc_cap));
  const int nblocks2 = cdiv(I, jc);
  const size_t smem2 = (size_t)jc * (BT + 1) * sizeof(float);

  gateup_kernel<T, BT, kGated><<<dim3(ntiles, splits), kS1Threads, smem1, a.stream>>>(
      static_cast<const T*>(a.x), static_cast<const T*>(a.w1), static_cast<const T*>(a.w2), a.thr, acc1,
      a.row_counts, B, H, I, kc);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return (int)err;
  down_kernel<T, BT, VPT, kGated><<<nblocks2, threads2, smem2, a.stream>>>(
      acc1, static_cast<const T*>(a.wd), a.thr, acc2, counter, static_cast<T*>(a.y), a.row_counts, B, H, I, jc,
      a.act, static_cast<const T*>(a.b_in), static_cast<const T*>(a.b_out));
  return (int)cudaGetLastError();
}

// Above 48 KB of shared memory (static + dynamic) a kernel has to opt in: once per kernel and
// device (the attribute is per device: a process may drive several GPUs). `opted` is the
// kernel's own per-device record.
template <typename Kernel>
cudaError_t opt_in_shared_memory(Kernel kernel, size_t smem, std::atomic<size_t> (&opted)[kMaxDevices]) {
  int dev = 0;
  cudaError_t e = cudaGetDevice(&dev);
  if (e != cudaSuccess) return e;
  if (dev < 0 || dev >= kMaxDevices) return cudaErrorInvalidDevice;
  if (smem > opted[dev].load(std::memory_order_relaxed)) {
    e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
    if (e != cudaSuccess) return e;
    opted[dev].store(smem, std::memory_order_relaxed);
  }
  return cudaSuccess;
}

// A launch of `blocks` fused-kernel blocks (a multiple of kFCluster) in clusters of kFCluster.
struct ClusterLaunch {
  cudaLaunchConfig_t cfg = {};
  cudaLaunchAttribute attr[1];
  ClusterLaunch(int blocks, size_t smem, cudaStream_t stream) {
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = kFCluster;
    attr[0].val.clusterDim.y = 1;
    attr[0].val.clusterDim.z = 1;
    cfg.gridDim = dim3(blocks);
    cfg.blockDim = dim3(kFThreads);
    cfg.dynamicSmemBytes = smem;
    cfg.stream = stream;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
  }
  ClusterLaunch(const ClusterLaunch&) = delete;  // cfg.attrs points into this object
  ClusterLaunch& operator=(const ClusterLaunch&) = delete;
};

// Whether `kernel` can run in clusters of kFCluster blocks on this device (one record per
// device: 0 not yet asked, 1 yes, -1 no): sm_90 or later, and at least one cluster fits.
template <typename Kernel>
bool clusters_fit(Kernel kernel, size_t smem, std::atomic<int> (&known)[kMaxDevices]) {
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= kMaxDevices) return false;
  const int k = known[dev].load(std::memory_order_relaxed);
  if (k != 0) return k > 0;
  int major = 0, n = 0;
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
  // The kernel's code must itself be sm_90 or later: a library built for older GPUs only (its
  // PTX JIT-compiled here) has the cluster code compiled out.
  cudaFuncAttributes fa = {};
  const bool sm90_code = major >= 9 && cudaFuncGetAttributes(&fa, kernel) == cudaSuccess && fa.ptxVersion >= 90;
  ClusterLaunch launch(kFCluster, smem, nullptr);
  if (!sm90_code || cudaOccupancyMaxActiveClusters(&n, kernel, &launch.cfg) != cudaSuccess) {
    cudaGetLastError();  // "no clusters here" is an answer, not an error of the call
    n = 0;
  }
  known[dev].store(n > 0 ? 1 : -1, std::memory_order_relaxed);
  return n > 0;
}

template <typename T, int BT, int VPT>
int launch_fused_vpt(const Call& a) {
  const WorkspaceLayout l = layout(a.B, a.H, a.I);
  float* acc2 = reinterpret_cast<float*>(a.ws + l.acc2);
  unsigned* counter = reinterpret_cast<unsigned*>(a.ws + l.counter);
  const int ntiles = cdiv(a.I, kFCols);
  const size_t smem = fused_smem_bytes<BT>(a.H);
  const T* x = static_cast<const T*>(a.x);
  const T* w1 = static_cast<const T*>(a.w1);
  const T* w2 = static_cast<const T*>(a.w2);
  const T* wd = static_cast<const T*>(a.wd);
  T* y = static_cast<T*>(a.y);
  const bool no_cluster = a.cfg && (a.cfg->flags & CLADA_SPARSE_MLP_FLAG_NO_CLUSTER);
  if constexpr (kFCluster > 1) {
    auto kernel = fused_kernel<T, BT, VPT, kFCluster>;
    static std::atomic<size_t> opted[kMaxDevices];
    static std::atomic<int> fits[kMaxDevices];
    const cudaError_t e = opt_in_shared_memory(kernel, smem, opted);
    if (e != cudaSuccess) return (int)e;
    if (!no_cluster && clusters_fit(kernel, smem, fits)) {
      ClusterLaunch launch(cdiv(ntiles, kFCluster) * kFCluster, smem, a.stream);
      return (int)cudaLaunchKernelEx(&launch.cfg, kernel, x, w1, w2, wd, a.thr, acc2, counter, y, a.row_counts, a.B, a.H,
                                     a.I, a.act);
    }
    // Before sm_90, or asked for: the launch without clusters.
  }
  static std::atomic<size_t> opted[kMaxDevices];
  const cudaError_t e = opt_in_shared_memory(fused_kernel<T, BT, VPT, 1>, smem, opted);
  if (e != cudaSuccess) return (int)e;
  fused_kernel<T, BT, VPT, 1><<<ntiles, kFThreads, smem, a.stream>>>(x, w1, w2, wd, a.thr, acc2, counter, y,
                                                                      a.row_counts, a.B, a.H, a.I, a.act);
  return (int)cudaGetLastError();
}

template <typename T, int BT>
int launch_fused(const Call& a) {
  const int vec = a.H / 8;  // 16-byte vectors of a W_down_t row, over 256 threads
  if (vec <= kFThreads) return launch_fused_vpt<T, BT, 1>(a);
  if (vec <= 2 * kFThreads) return launch_fused_vpt<T, BT, 2>(a);
  return launch_fused_vpt<T, BT, 4>(a);
}

// The fused launch by default for one sequence of the gated form when its column tiles
// give most SMs a block: on the Llama-3-8B MLP (112 tiles, 132 SMs) it measured 4-17% faster
// than the two kernels at 0-90% sparsity; at batch 2 it measured no better, and a small MLP
// (SmolLM2's 12 tiles) would leave most of the GPU idle.
bool fused_by_default(const Call& a) {
  return a.B == 1 && 4 * cdiv(a.I, kFCols) >= 3 * sm_count();
}

template <typename T, bool kGated>
int launch_dtype(const Call& a) {
  if constexpr (kGated) {
    const int flags = a.cfg ? a.cfg->flags : 0;
    const bool fused = (flags & CLADA_SPARSE_MLP_FLAG_FUSED) ||
                       (!(flags & CLADA_SPARSE_MLP_FLAG_TWO_KERNEL) && fused_by_default(a));
    if (fused) return a.B <= 1 ? launch_fused<T, 1>(a) : launch_fused<T, 2>(a);
  }
  const bool two = (a.H / 8) > kS2MaxThreads;  // 16 columns per thread in stage 2
#define CLADA_LAUNCH(BT) \
  return two ? launch_typed<T, BT, 2, kGated>(a) : launch_typed<T, BT, 1, kGated>(a)
  if (a.B <= 1) CLADA_LAUNCH(1);
  if (a.B <= 2) CLADA_LAUNCH(2);
  if (a.B <= 4) CLADA_LAUNCH(4);
  CLADA_LAUNCH(8);
#undef CLADA_LAUNCH
}

bool valid_act(int act) { return act >= CLADA_ACT_SILU && act <= CLADA_ACT_RELU; }

// The checks and the launch shared by both forms (sparse_mlp.h: the argument rules).
template <bool kGated>
int run(const Call& a, int dtype, size_t workspace_bytes, int workspace_is_zeroed) {
  if (a.B < 1 || a.B > CLADA_SPARSE_MLP_MAX_BATCH) return (int)cudaErrorInvalidValue;
  if (a.H < 8 || a.I < 8 || a.H % 8 != 0 || a.I % 8 != 0) return (int)cudaErrorInvalidValue;
  if (a.H > CLADA_SPARSE_MLP_MAX_HIDDEN) return (int)cudaErrorNotSupported;
  if (!valid_act(a.act)) return (int)cudaErrorInvalidValue;
  const int flags = a.cfg ? a.cfg->flags : 0;
  constexpr int kKnown =
      CLADA_SPARSE_MLP_FLAG_FUSED | CLADA_SPARSE_MLP_FLAG_TWO_KERNEL | CLADA_SPARSE_MLP_FLAG_NO_CLUSTER;
  constexpr int kFusedOrTwo = CLADA_SPARSE_MLP_FLAG_FUSED | CLADA_SPARSE_MLP_FLAG_TWO_KERNEL;
  constexpr int kTwoNoCluster = CLADA_SPARSE_MLP_FLAG_TWO_KERNEL | CLADA_SPARSE_MLP_FLAG_NO_CLUSTER;
  if ((flags & ~kKnown) != 0 || (flags & kFusedOrTwo) == kFusedOrTwo || (flags & kTwoNoCluster) == kTwoNoCluster)
    return (int)cudaErrorInvalidValue;
  if ((flags & CLADA_SPARSE_MLP_FLAG_FUSED) && (!kGated || a.B > 2))
    return (int)cudaErrorNotSupported;  // the fused launch: gated form, batch 1 or 2
  if (!a.x || !a.w1 || !a.wd || !a.thr || !a.y || !a.ws) return (int)cudaErrorInvalidValue;
  if (!aligned16(a.x) || !aligned16(a.w1) || !aligned16(a.wd) || !aligned16(a.y) || !aligned16(a.ws))
    return (int)cudaErrorInvalidValue;
  if (kGated ? (!a.w2 || !aligned16(a.w2))
             : (!a.b_in || !a.b_out || !aligned16(a.b_in) || !aligned16(a.b_out)))
    return (int)cudaErrorInvalidValue;
  const size_t need = layout(a.B, a.H, a.I).total;
  const cudaError_t ws_err = clada::prepare_workspace(a.ws, workspace_bytes, need, workspace_is_zeroed, a.stream);
  if (ws_err != cudaSuccess) return (int)ws_err;
  if (dtype == CLADA_DTYPE_BF16) return launch_dtype<__nv_bfloat16, kGated>(a);
  if (dtype == CLADA_DTYPE_F16) return launch_dtype<__half, kGated>(a);
  return (int)cudaErrorInvalidValue;
}

template <bool kGated>
int launch_mid_mask(const void* pre, const void* b_in, const float* thresholds, void* h, int batch, int inter,
                    int dtype, int act, cudaStream_t stream) {
  if (batch < 1 || inter < 8 || inter % 8 != 0 || !pre || !thresholds || !h || !aligned16(pre) || !aligned16(h) ||
      (b_in && !aligned16(b_in)) || !valid_act(act))
    return (int)cudaErrorInvalidValue;
  const dim3 grid(min(cdiv(inter, 8 * 256), 64), batch);
  if (dtype == CLADA_DTYPE_BF16) {
    using T = __nv_bfloat16;
    gate_mask_kernel<T, kGated><<<grid, 256, 0, stream>>>(static_cast<const T*>(pre), static_cast<const T*>(b_in),
                                                          thresholds, static_cast<T*>(h), inter, act);
  } else if (dtype == CLADA_DTYPE_F16) {
    using T = __half;
    gate_mask_kernel<T, kGated><<<grid, 256, 0, stream>>>(static_cast<const T*>(pre), static_cast<const T*>(b_in),
                                                          thresholds, static_cast<T*>(h), inter, act);
  } else {
    return (int)cudaErrorInvalidValue;
  }
  return (int)cudaGetLastError();
}

}  // namespace

extern "C" {

int clada_kernels_abi_version(void) { return CLADA_KERNELS_ABI_VERSION; }

size_t clada_sparse_mlp_workspace_size(int batch, int hidden, int inter) {
  if (batch < 1 || hidden < 1 || inter < 1) return 0;
  return layout(batch, hidden, inter).total;
}

int clada_sparse_mlp(const void* x, const void* w_gate_t, const void* w_up_t, const void* w_down_t,
                     const float* thresholds, void* y, int batch, int hidden, int inter, int dtype,
                     int act, void* workspace, size_t workspace_bytes, int workspace_is_zeroed,
                     const clada_sparse_mlp_config* config, cudaStream_t stream) {
  return clada_sparse_mlp_counted(x, w_gate_t, w_up_t, w_down_t, thresholds, y, batch, hidden, inter, dtype, act,
                                  workspace, workspace_bytes, workspace_is_zeroed, nullptr, config, stream);
}

int clada_sparse_mlp_counted(const void* x, const void* w_gate_t, const void* w_up_t, const void* w_down_t,
                             const float* thresholds, void* y, int batch, int hidden, int inter, int dtype,
                             int act, void* workspace, size_t workspace_bytes, int workspace_is_zeroed,
                             unsigned* row_counts, const clada_sparse_mlp_config* config, cudaStream_t stream) {
  const Call a{x, w_gate_t, w_up_t, w_down_t, nullptr, nullptr, thresholds, y, batch, hidden, inter, act,
               static_cast<char*>(workspace), row_counts, config, stream};
  return run<true>(a, dtype, workspace_bytes, workspace_is_zeroed);
}

int clada_sparse_mlp_plain(const void* x, const void* w_in_t, const void* b_in, const void* w_out_t,
                           const void* b_out, const float* thresholds, void* y, int batch, int hidden, int inter,
                           int dtype, int act, void* workspace, size_t workspace_bytes, int workspace_is_zeroed,
                           unsigned* row_counts, const clada_sparse_mlp_config* config, cudaStream_t stream) {
  const Call a{x, w_in_t, nullptr, w_out_t, b_in, b_out, thresholds, y, batch, hidden, inter, act,
               static_cast<char*>(workspace), row_counts, config, stream};
  return run<false>(a, dtype, workspace_bytes, workspace_is_zeroed);
}

int clada_mask_input(const void* x, const float* thresholds, void* y, int batch, int n, int dtype,
                     cudaStream_t stream) {
  if (batch < 1 || n < 8 || n % 8 != 0 || !x || !thresholds || !y || !aligned16(x) || !aligned16(y))
    return (int)cudaErrorInvalidValue;
  const dim3 grid(min(cdiv(n, 8 * 256), 64), batch);
  if (dtype == CLADA_DTYPE_BF16)
    mask_input_kernel<__nv_bfloat16><<<grid, 256, 0, stream>>>(static_cast<const __nv_bfloat16*>(x), thresholds,
                                                               static_cast<__nv_bfloat16*>(y), n);
  else if (dtype == CLADA_DTYPE_F16)
    mask_input_kernel<__half><<<grid, 256, 0, stream>>>(static_cast<const __half*>(x), thresholds,
                                                        static_cast<__half*>(y), n);
  else
    return (int)cudaErrorInvalidValue;
  return (int)cudaGetLastError();
}

int clada_gate_mask(const void* gate_up, const float* thresholds, void* h, int batch, int inter, int dtype, int act,
                    cudaStream_t stream) {
  return launch_mid_mask<true>(gate_up, nullptr, thresholds, h, batch, inter, dtype, act, stream);
}

int clada_bias_act_mask(const void* pre, const void* b_in, const float* thresholds, void* h, int batch, int inter,
                        int dtype, int act, cudaStream_t stream) {
  return launch_mid_mask<false>(pre, b_in, thresholds, h, batch, inter, dtype, act, stream);
}

const char* clada_error_string(int status) { return cudaGetErrorString((cudaError_t)status); }

#ifdef CLADA_FUSED_TRACE
// The fused kernel's timeline (benchmarks/fused_timeline.py): copies the trace of the last
// `launches` (<= 4) launches, [launches][1024 blocks][8] u64, oldest first, and restarts it
// (zeroed: a block that did not run reads 0).
CLADA_API int clada_fused_trace_read(unsigned long long* out, int launches) {
  unsigned n = 0;
  cudaError_t e = cudaMemcpyFromSymbol(&n, g_fused_trace_launch, sizeof(n));
  if (e != cudaSuccess) return (int)e;
  const size_t per = sizeof(unsigned long long) * kTraceBlocks * kTraceFields;
  for (int i = 0; i < launches && i < kTraceLaunches; ++i) {
    const unsigned slot = (n + kTraceLaunches - launches + i) % kTraceLaunches;
    e = cudaMemcpyFromSymbol(out + (size_t)i * kTraceBlocks * kTraceFields, g_fused_trace, per, slot * per);
    if (e != cudaSuccess) return (int)e;
  }
  void* trace = nullptr;
  e = cudaGetSymbolAddress(&trace, g_fused_trace);
  if (e == cudaSuccess) e = cudaMemset(trace, 0, per * kTraceLaunches);
  if (e != cudaSuccess) return (int)e;
  const unsigned zero = 0;
  return (int)cudaMemcpyToSymbol(g_fused_trace_launch, &zero, sizeof(zero));
}
#endif

}  // extern "C"
