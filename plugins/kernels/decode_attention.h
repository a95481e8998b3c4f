/*
 * CLADA decode attention: C ABI.
 *
 * One new token per sequence (decode, T = 1) over a static, preallocated KV cache, in one
 * fused launch: rotary embedding of q and k, write of k and v into the cache at the
 * token's position, and grouped-query attention of the q heads that share each KV head
 * over the visible slots (slot <= position, and slot > position - window when window > 0),
 * softmax in fp32, output in the activation dtype. It replaces the chain of small kernels
 * (RoPE, cache scatter, scores, masked softmax, weighted sum) that dominates a decode
 * step's non-MLP time.
 *
 * Layout (row-major, 16-byte aligned base pointers, every row stride a multiple of 8):
 *   q          [batch, heads * head_dim]     row stride q_stride elements (a slice of a fused qkv row)
 *   k, v       [batch, kv_heads * head_dim]  row strides k_stride, v_stride; the new token, k before RoPE
 *   inv_freq   [head_dim / 2] float32        rotary frequencies: column c turns by position x
 *                                            inv_freq[c mod head_dim/2] (rotate-half convention),
 *                                            cos and sin scaled by rope_scale and rounded to the
 *                                            activation dtype, as the model computes them
 *   position   [batch] int64                 the token's cache slot and position, read on the device
 *   k_cache, v_cache [batch, kv_heads, max_len, head_dim]   updated in place at `position`
 *   out        [batch, heads * head_dim]     contiguous
 * Query head h uses KV head h / (heads / kv_heads). head_dim: 16, 32, 64, 128 or 256.
 * Positions must lie in [0, max_len).
 */
#ifndef CLADA_DECODE_ATTENTION_H_
#define CLADA_DECODE_ATTENTION_H_

#include "sparse_mlp.h"

#ifdef __cplusplus
extern "C" {
#endif

/* 1 when clada_decode_attention supports this attention shape, else 0. */
CLADA_API int clada_decode_attention_supported(int heads, int kv_heads, int head_dim);

/* Bytes of device workspace (split partial results and per-head counters). Like the
 * SparseMLP workspace: zero-filled once, left zeroed by every call; not shared by calls
 * that may run at the same time. */
CLADA_API size_t clada_decode_attention_workspace_size(int batch, int heads, int kv_heads, int head_dim,
                                                       int max_len);

/* Returns 0 (cudaSuccess) or a cudaError_t code (cudaErrorInvalidValue: bad arguments;
 * cudaErrorNotSupported: attention shape). workspace_is_zeroed as for
 * clada_sparse_mlp. */
CLADA_API int clada_decode_attention(const void* q, const void* k, const void* v, long long q_stride,
                                     long long k_stride, long long v_stride, const float* inv_freq,
                                     float rope_scale, const long long* position, void* k_cache,
                                     void* v_cache, void* out, int batch, int heads, int kv_heads,
                                     int head_dim, int max_len, int window, float scale, int dtype,
                                     void* workspace, size_t workspace_bytes, int workspace_is_zeroed,
                                     cudaStream_t stream);

#ifdef __cplusplus
}
#endif

#endif /* CLADA_DECODE_ATTENTION_H_ */
