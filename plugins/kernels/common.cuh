// Helpers shared by the kernels of libclada_kernels.so: 16-bit float <-> fp32, eight
// packed values per 16-byte load or store, the streaming weight load; on the host, the
// argument checks of the C entry points.
#ifndef CLADA_KERNELS_COMMON_CUH_
#define CLADA_KERNELS_COMMON_CUH_

#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <stdint.h>

namespace clada {

constexpr int kWarp = 32;

template <typename T>
__device__ __forceinline__ float to_float(T v);
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}
template <>
__device__ __forceinline__ float to_float<__half>(__half v) {
  return __half2float(v);
}

// 8 packed 16-bit values -> 8 floats.
template <typename T>
__device__ __forceinline__ void unpack8(const uint4 v, float (&f)[8]);
template <>
__device__ __forceinline__ void unpack8<__nv_bfloat16>(const uint4 v, float (&f)[8]) {
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    f[2 * k] = __uint_as_float(w[k] << 16);
    f[2 * k + 1] = __uint_as_float(w[k] & 0xffff0000u);
  }
}
template <>
__device__ __forceinline__ void unpack8<__half>(const uint4 v, float (&f)[8]) {
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    __half2 h;
    *reinterpret_cast<uint32_t*>(&h) = w[k];
    const float2 t = __half22float2(h);
    f[2 * k] = t.x;
    f[2 * k + 1] = t.y;
  }
}

template <typename T>
__device__ __forceinline__ uint32_t pack2(float a, float b);
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float a, float b) {
  __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
  return *reinterpret_cast<uint32_t*>(&h);
}
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float a, float b) {
  __half2 h = __floats2half2_rn(a, b);
  return *reinterpret_cast<uint32_t*>(&h);
}

// Round an fp32 value to T and back (what storing it as T would keep).
template <typename T>
__device__ __forceinline__ float round_to(float v);
template <>
__device__ __forceinline__ float round_to<__nv_bfloat16>(float v) {
  return __bfloat162float(__float2bfloat16_rn(v));
}
template <>
__device__ __forceinline__ float round_to<__half>(float v) {
  return __half2float(__float2half_rn(v));
}

// 8 floats -> 8 packed 16-bit values (round to nearest even).
template <typename T>
__device__ __forceinline__ uint4 pack8(const float (&f)[8]) {
  return make_uint4(pack2<T>(f[0], f[1]), pack2<T>(f[2], f[3]), pack2<T>(f[4], f[5]), pack2<T>(f[6], f[7]));
}

// Weights are read exactly once per call: keep them out of L1, hint a 256-byte L2 fetch.
__device__ __forceinline__ uint4 ld_weights(const void* p) {
  uint4 r;
  asm("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
      : "l"(p));
  return r;
}

// -- host side of the C entry points

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// The caller's workspace must hold `need` bytes. It is zeroed here unless the caller says it
// already is: every kernel of the library leaves its workspace zeroed when it finishes, so a
// caller that keeps one workspace per launch site zeroes it once.
inline cudaError_t prepare_workspace(void* workspace, size_t workspace_bytes, size_t need, int is_zeroed,
                                     cudaStream_t stream) {
  if (workspace_bytes < need) return cudaErrorInvalidValue;
  return is_zeroed ? cudaSuccess : cudaMemsetAsync(workspace, 0, need, stream);
}

}  // namespace clada

#endif  // CLADA_KERNELS_COMMON_CUH_
