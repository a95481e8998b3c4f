// CLADA decode attention (decode_attention.h): RoPE, KV-cache write and grouped-query
// attention of one new token per sequence, in one launch.
//
// grid = (batch x heads, splits of max_len), 256 threads. A block owns one query head of
// one sequence and one chunk of cache slots (flash-decoding); the heads that share a KV
// head read the same cache rows (L2 hits after the first). Decode attention is a few
// hundred KB per layer: its time is latency (dependent loads, instructions per warp),
// not bandwidth, so the work is spread over many blocks and each block is laid out for
// one memory round trip after the position: the first K and V rows of the chunk are
// requested together with q and the new k and v; the rotary factors (cos/sin of
// position x inv_freq, as the model computes them) are computed once per block into
// shared memory meanwhile. Cache rows are read with 16-byte loads, head_dim / 8 lanes
// per row, K and V rows of several slots in flight per thread. The row at the token's
// own slot is taken from registers (the cache holds the previous value there until the
// write of the block that owns that slot lands). Each row group of lanes keeps an online
// softmax (running max, sum, weighted V sum) over its slots; row groups and warps are
// merged at the end. With one split the block writes the output; with several, each
// block writes its partial (max, sum, unnormalised output) to the workspace and the last
// block of the head to finish (a counter, threadfence reduction) combines them and
// resets the counter.

#include "decode_attention.h"

#include <math.h>
#include <stdint.h>

#include "common.cuh"

namespace {

using clada::aligned16;
using clada::kWarp;
using clada::pack8;
using clada::round_to;
using clada::unpack8;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / kWarp;
constexpr int kUnroll = 4;  // row steps in flight: K and V rows per thread
// Slots per block: at least 256 (a short cache is one split: no combine step), about 32
// splits for long caches, at most 4096 (bounds the workspace).
constexpr int kMinChunk = 256, kMaxChunk = 4096, kTargetSplits = 32;

int cdiv(int a, int b) { return (a + b - 1) / b; }
size_t align_up(size_t v, size_t a) { return (v + a - 1) / a * a; }

int chunk_for(int max_len) {
  int c = (int)align_up((size_t)cdiv(max_len, kTargetSplits), 64);
  c = c < kMinChunk ? kMinChunk : (c > kMaxChunk ? kMaxChunk : c);
  return c < max_len ? c : max_len;
}

struct Layout {
  size_t o, ml, counters, total;
};
// o: [batch * heads][splits][head_dim] fp32 partial outputs; ml: [batch * heads][splits][2]
// (max, sum); counters: [batch * heads].
Layout layout(int batch, int heads, int head_dim, int max_len) {
  const size_t bh = (size_t)batch * heads, splits = cdiv(max_len, chunk_for(max_len));
  Layout l;
  l.o = 0;
  l.ml = align_up(bh * splits * head_dim * sizeof(float), 256);
  l.counters = l.ml + align_up(bh * splits * 2 * sizeof(float), 256);
  l.total = l.counters + align_up(bh * sizeof(unsigned), 256);
  return l;
}

__device__ __forceinline__ uint4 ldg16(const void* p) { return __ldg(reinterpret_cast<const uint4*>(p)); }
// Cache rows: plain loads (this grid writes the cache; the rows it reads are older).
__device__ __forceinline__ uint4 ld16(const void* p) { return *reinterpret_cast<const uint4*>(p); }

// Weights that merge two online-softmax states with maxima m and mo (-inf: empty).
__device__ __forceinline__ void merge_weights(float m, float mo, float& wa, float& wb, float& mnew) {
  mnew = fmaxf(m, mo);
  wa = m == -INFINITY ? 0.0f : expf(m - mnew);
  wb = mo == -INFINITY ? 0.0f : expf(mo - mnew);
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads)
    decode_attention_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                            long long qs, long long ks, long long vs, const float* __restrict__ inv_freq,
                            float rope_scale, const long long* __restrict__ position, T* kc, T* vc,
                            T* __restrict__ out, int H, int KV, int max_len, int window, int chunk, float scale,
                            float* __restrict__ ws_o, float* __restrict__ ws_ml, unsigned* __restrict__ counters) {
  constexpr int LPR = D / 8;         // lanes per cache row (8 columns each)
  constexpr int R = kWarp / LPR;     // rows per warp per step
  constexpr int kStep = kWarps * R;  // rows per block per step
  __shared__ float s_cos[D / 2], s_sin[D / 2];
  __shared__ __align__(16) float s_acc[kWarps][D];  // the warps' weighted V sums
  __shared__ float s_ml[kWarps][2];                 // the warps' (max, sum)
  __shared__ float s_wt[kWarps];                    // merge weight of each warp's partial
  __shared__ float s_max, s_sum;
  __shared__ bool s_last;

  const int bh = blockIdx.x, b = bh / H, h = bh - b * H, group = H / KV, kvh = h / group;
  const int split = blockIdx.y, nsplit = gridDim.y;
  const int tid = threadIdx.x, lane = tid & (kWarp - 1), warp = tid / kWarp;
  const int sub = lane % LPR, rw = lane / LPR;
  const int c0 = sub * 8;

  // 1. Everything this block reads, requested at once.
  const long long pos = __ldg(position + b);
  const int s0 = split * chunk, s1 = min(max_len, s0 + chunk);
  const int lo = window > 0 ? (int)max((long long)s0, pos - window + 1) : s0;
  const int hi = (int)min((long long)s1 - 1, pos);  // visible slots of this chunk: [lo, hi]
  const size_t head = ((size_t)b * KV + kvh) * (size_t)max_len * D;
  const T* kb = kc + head;
  const T* vb = vc + head;
  uint4 rk[kUnroll], rv[kUnroll];
  auto load_rows = [&](int base) {
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int s = base + u * kStep + rw;
      rk[u] = s <= hi ? ld16(kb + (size_t)s * D + c0) : make_uint4(0u, 0u, 0u, 0u);
      rv[u] = s <= hi ? ld16(vb + (size_t)s * D + c0) : make_uint4(0u, 0u, 0u, 0u);
    }
  };
  int base = lo + warp * R;
  load_rows(base);
  const int cp = c0 < D / 2 ? c0 + D / 2 : c0 - D / 2;  // rotate-half partner columns
  const T* qrow = q + (size_t)b * qs + (size_t)h * D;
  const T* krow = k + (size_t)b * ks + (size_t)kvh * D;
  const uint4 q_own = ldg16(qrow + c0), q_partner = ldg16(qrow + cp);
  const uint4 k_own = ldg16(krow + c0), k_partner = ldg16(krow + cp);
  const uint4 v_new = ldg16(v + (size_t)b * vs + (size_t)kvh * D + c0);
  if (tid < D / 2) {  // cos/sin of pos x inv_freq, scaled and rounded to T as the model does
    float sv, cv;
    sincosf((float)pos * __ldg(inv_freq + tid), &sv, &cv);
    s_cos[tid] = round_to<T>(cv * rope_scale);
    s_sin[tid] = round_to<T>(sv * rope_scale);
  }
  __syncthreads();

  // 2. RoPE (rotate-half: x * cos + sign * partner * sin), rounded to T once, as the
  //    model's fused elementwise kernel leaves q and k.
  const float sgn = c0 < D / 2 ? -1.0f : 1.0f;
  auto rope = [&](const uint4 own, const uint4 partner, float(&o)[8]) -> uint4 {
    float x[8], xp[8];
    unpack8<T>(own, x);
    unpack8<T>(partner, xp);
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int j = (c0 + i) % (D / 2);
      o[i] = fmaf(x[i], s_cos[j], sgn * xp[i] * s_sin[j]);
    }
    const uint4 packed = pack8<T>(o);
    unpack8<T>(packed, o);
    return packed;
  };
  float qr[8], kr[8];
  rope(q_own, q_partner, qr);
  const uint4 k_new = rope(k_own, k_partner, kr);
  if (h % group == 0 && pos >= s0 && pos < s1 && warp == 0 && rw == 0) {  // the cache write, once per KV head
    *reinterpret_cast<uint4*>(kc + head + (size_t)pos * D + c0) = k_new;
    *reinterpret_cast<uint4*>(vc + head + (size_t)pos * D + c0) = v_new;
  }

  // 3. Online softmax over the visible slots of the chunk.
  float m = -INFINITY, l = 0.0f, acc[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) acc[i] = 0.0f;
  while (base <= hi) {  // warp-uniform
    float x[kUnroll];
    float mx = -INFINITY;
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int s = base + u * kStep + rw;
      float kf[8];
      unpack8<T>(s == pos ? k_new : rk[u], kf);
      float d = 0.0f;
#pragma unroll
      for (int i = 0; i < 8; ++i) d = fmaf(qr[i], kf[i], d);
#pragma unroll
      for (int off = LPR / 2; off > 0; off /= 2) d += __shfl_xor_sync(0xffffffffu, d, off);
      x[u] = s <= hi ? d * scale : -INFINITY;
      mx = fmaxf(mx, x[u]);
    }
    if (mx > m) {  // rescale the running sums to the new max
      const float r = m == -INFINITY ? 0.0f : expf(m - mx);
      l *= r;
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[i] *= r;
      m = mx;
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int s = base + u * kStep + rw;
      if (s > hi) continue;
      float vf[8];
      unpack8<T>(s == pos ? v_new : rv[u], vf);
      const float p = expf(x[u] - m);
      l += p;
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[i] = fmaf(p, vf[i], acc[i]);
    }
    base += kStep * kUnroll;
    if (base <= hi) load_rows(base);
  }

  // 4. Merge the row groups of each warp (shuffles), then the warps (shared memory).
#pragma unroll
  for (int off = LPR; off < kWarp; off *= 2) {
    const float mo = __shfl_xor_sync(0xffffffffu, m, off);
    const float lo_ = __shfl_xor_sync(0xffffffffu, l, off);
    float wa, wb, mn;
    merge_weights(m, mo, wa, wb, mn);
    l = l * wa + lo_ * wb;
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[i] = acc[i] * wa + __shfl_xor_sync(0xffffffffu, acc[i], off) * wb;
    m = mn;
  }
  if (rw == 0) {
    float4* dst = reinterpret_cast<float4*>(&s_acc[warp][c0]);
    dst[0] = make_float4(acc[0], acc[1], acc[2], acc[3]);
    dst[1] = make_float4(acc[4], acc[5], acc[6], acc[7]);
    if (sub == 0) {
      s_ml[warp][0] = m;
      s_ml[warp][1] = l;
    }
  }
  __syncthreads();
  if (tid == 0) {
    float mx = -INFINITY;
    for (int w = 0; w < kWarps; ++w) mx = fmaxf(mx, s_ml[w][0]);
    float sum = 0.0f;
    for (int w = 0; w < kWarps; ++w) {
      const float wt = s_ml[w][0] == -INFINITY ? 0.0f : expf(s_ml[w][0] - mx);
      s_wt[w] = wt;
      sum += s_ml[w][1] * wt;
    }
    s_max = mx;
    s_sum = sum;
  }
  __syncthreads();

  const size_t part = (size_t)bh * nsplit + split;
  for (int c = tid; c < D; c += kThreads) {
    float sum = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) sum = fmaf(s_acc[w][c], s_wt[w], sum);
    if (nsplit == 1)
      out[(size_t)bh * D + c] = static_cast<T>(sum / s_sum);
    else
      ws_o[part * D + c] = sum;
  }
  if (nsplit == 1) return;

  // 5. Several splits: publish this chunk's partial; the last block of the head combines.
  if (tid == 0) {
    ws_ml[part * 2] = s_max;
    ws_ml[part * 2 + 1] = s_sum;
  }
  __threadfence();
  __syncthreads();
  if (tid == 0) s_last = atomicAdd(counters + bh, 1u) == (unsigned)nsplit - 1;
  __syncthreads();
  if (!s_last) return;
  __threadfence();
  const size_t first = (size_t)bh * nsplit;
  if (tid == 0) {
    float mx = -INFINITY;
    for (int sp = 0; sp < nsplit; ++sp) mx = fmaxf(mx, __ldcg(ws_ml + (first + sp) * 2));
    float sum = 0.0f;
    for (int sp = 0; sp < nsplit; ++sp) {
      const float ms = __ldcg(ws_ml + (first + sp) * 2);
      if (ms != -INFINITY) sum += __ldcg(ws_ml + (first + sp) * 2 + 1) * expf(ms - mx);
    }
    s_max = mx;
    s_sum = sum;
  }
  __syncthreads();
  for (int c = tid; c < D; c += kThreads) {
    float sum = 0.0f;
    for (int sp = 0; sp < nsplit; ++sp) {
      const float ms = __ldcg(ws_ml + (first + sp) * 2);
      if (ms != -INFINITY)  // a split with no visible slot holds no partial
        sum += expf(ms - s_max) * __ldcg(ws_o + (first + sp) * D + c);
    }
    out[(size_t)bh * D + c] = static_cast<T>(sum / s_sum);
  }
  if (tid == 0) counters[bh] = 0u;
}

template <typename T>
int launch(const void* q, const void* k, const void* v, long long qs, long long ks, long long vs,
           const float* inv_freq, float rope_scale, const long long* position, void* kc, void* vc, void* out, int B,
           int H, int KV, int D, int max_len, int window, float scale, char* ws, cudaStream_t stream) {
  const int chunk = chunk_for(max_len);
  const dim3 grid(B * H, cdiv(max_len, chunk));
  const Layout l = layout(B, H, D, max_len);
  float* ws_o = reinterpret_cast<float*>(ws + l.o);
  float* ws_ml = reinterpret_cast<float*>(ws + l.ml);
  unsigned* counters = reinterpret_cast<unsigned*>(ws + l.counters);
#define CLADA_ATTN_LAUNCH(DIM)                                                                                  \
  decode_attention_kernel<T, DIM><<<grid, kThreads, 0, stream>>>(                                             \
      static_cast<const T*>(q), static_cast<const T*>(k), static_cast<const T*>(v), qs, ks, vs, inv_freq,      \
      rope_scale, position, static_cast<T*>(kc), static_cast<T*>(vc), static_cast<T*>(out), H, KV, max_len,    \
      window, chunk, scale, ws_o, ws_ml, counters)
  switch (D) {
    case 16: CLADA_ATTN_LAUNCH(16); break;
    case 32: CLADA_ATTN_LAUNCH(32); break;
    case 64: CLADA_ATTN_LAUNCH(64); break;
    case 128: CLADA_ATTN_LAUNCH(128); break;
    case 256: CLADA_ATTN_LAUNCH(256); break;
    default: return (int)cudaErrorNotSupported;
  }
#undef CLADA_ATTN_LAUNCH
  return (int)cudaGetLastError();
}

}  // namespace

extern "C" {

int clada_decode_attention_supported(int heads, int kv_heads, int head_dim) {
  if (heads < 1 || kv_heads < 1 || heads % kv_heads != 0) return 0;
  return head_dim == 16 || head_dim == 32 || head_dim == 64 || head_dim == 128 || head_dim == 256;
}

size_t clada_decode_attention_workspace_size(int batch, int heads, int kv_heads, int head_dim, int max_len) {
  if (batch < 1 || max_len < 1 || !clada_decode_attention_supported(heads, kv_heads, head_dim)) return 0;
  return layout(batch, heads, head_dim, max_len).total;
}

int clada_decode_attention(const void* q, const void* k, const void* v, long long q_stride, long long k_stride,
                           long long v_stride, const float* inv_freq, float rope_scale, const long long* position,
                           void* k_cache, void* v_cache, void* out, int batch, int heads, int kv_heads,
                           int head_dim, int max_len, int window, float scale, int dtype, void* workspace,
                           size_t workspace_bytes, int workspace_is_zeroed, cudaStream_t stream) {
  if (!clada_decode_attention_supported(heads, kv_heads, head_dim)) return (int)cudaErrorNotSupported;
  if (batch < 1 || max_len < 1 || window < 0) return (int)cudaErrorInvalidValue;
  if (q_stride % 8 || k_stride % 8 || v_stride % 8) return (int)cudaErrorInvalidValue;
  if (!q || !k || !v || !inv_freq || !position || !k_cache || !v_cache || !out || !workspace)
    return (int)cudaErrorInvalidValue;
  if (!aligned16(q) || !aligned16(k) || !aligned16(v) || !aligned16(k_cache) || !aligned16(v_cache) ||
      !aligned16(workspace))
    return (int)cudaErrorInvalidValue;
  const size_t need = layout(batch, heads, head_dim, max_len).total;
  const cudaError_t ws_err = clada::prepare_workspace(workspace, workspace_bytes, need, workspace_is_zeroed, stream);
  if (ws_err != cudaSuccess) return (int)ws_err;
  char* ws = static_cast<char*>(workspace);
  if (dtype == CLADA_DTYPE_BF16)
    return launch<__nv_bfloat16>(q, k, v, q_stride, k_stride, v_stride, inv_freq, rope_scale, position, k_cache,
                                 v_cache, out, batch, heads, kv_heads, head_dim, max_len, window, scale, ws, stream);
  if (dtype == CLADA_DTYPE_F16)
    return launch<__half>(q, k, v, q_stride, k_stride, v_stride, inv_freq, rope_scale, position, k_cache, v_cache,
                          out, batch, heads, kv_heads, head_dim, max_len, window, scale, ws, stream);
  return (int)cudaErrorInvalidValue;
}

}  // extern "C"
