/*
 * CLADA sparse MLP kernels: C ABI.
 *
 * The op (see docs in plugins/kernels/README.md and clada_export/ops/sparse_mlp.py):
 *   x_s = x * (|x| > t_in[b]);  h = act(x_s @ Wg) * (x_s @ Wu);
 *   h_s = h * (|h| > t_mid[b]); y = h_s @ Wd
 * for a decode batch of 1..8 rows, bf16 or fp16 weights/activations, fp32 accumulation.
 * Its plain (non-gated) form, for GPT-2, OPT, GPT-NeoX style MLPs (clada_sparse_mlp_plain):
 *   x_s = x * (|x| > t_in[b]);  h = act(x_s @ W_in + b_in);
 *   h_s = h * (|h| > t_mid[b]); y = h_s @ W_out + b_out
 *
 * Layout (row-major, contiguous, 16-byte aligned base pointers):
 *   x          [batch, hidden]            activation dtype
 *   w_gate_t   [hidden, inter]            input-major: a skipped x_i skips row i
 *   w_up_t     [hidden, inter]
 *   w_down_t   [inter, hidden]            a skipped h_j skips row j
 *   thresholds [batch, 2] float32         (t_in, t_mid) per row, read on the device
 *   y          [batch, hidden]            activation dtype
 * plain form:
 *   w_in_t     [hidden, inter]            input-major, as w_gate_t
 *   b_in       [inter]                    activation dtype
 *   w_out_t    [inter, hidden]            as w_down_t
 *   b_out      [hidden]                   activation dtype
 *
 * The kernels know nothing of TensorRT or torch. All functions are asynchronous on
 * `stream` and can be captured in a CUDA graph.
 */
#ifndef CLADA_SPARSE_MLP_H_
#define CLADA_SPARSE_MLP_H_

#include <stddef.h>
#include <cuda_runtime_api.h>

#if defined(_WIN32)
#define CLADA_API __declspec(dllexport)
#else
#define CLADA_API __attribute__((visibility("default")))
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* Version of the library's whole C ABI (this header and decode_attention.h); 2 added
 * clada_decode_attention, 3 removed CLADA_FLAG_FUSED (2), now an unknown flag, 4 added
 * clada_sparse_mlp_counted, clada_mask_input and clada_gate_mask and removed CLADA_FLAG_PDL,
 * 5 added the controller (controller_capi.h), 6 added the plain (non-gated) MLP
 * (clada_sparse_mlp_plain, clada_bias_act_mask) and CLADA_ACT_RELU (both forms), 7 added the
 * profile's MLP form (gated_mlp) to clada_controller_create, 8 the fused launch and its flags,
 * 9 CLADA_SPARSE_MLP_FLAG_NO_CLUSTER. */
#define CLADA_KERNELS_ABI_VERSION 9
#define CLADA_SPARSE_MLP_MAX_BATCH 8
#define CLADA_SPARSE_MLP_MAX_HIDDEN 8192

typedef enum { CLADA_DTYPE_F16 = 0, CLADA_DTYPE_BF16 = 1 } clada_dtype_t;
typedef enum { CLADA_ACT_SILU = 0, CLADA_ACT_GELU_TANH = 1, CLADA_ACT_GELU = 2, CLADA_ACT_RELU = 3 } clada_act_t;

/* Launch-shape overrides (0 = automatic). For benchmarks and tuning only. */
typedef struct {
  int gateup_splits;        /* stage 1: number of splits of the hidden (K) dimension */
  int down_rows_per_block;  /* stage 2: intermediate rows owned by one block */
  int flags;                /* 0 or CLADA_SPARSE_MLP_FLAG_*, below */
  int reserved[5];
} clada_sparse_mlp_config;

/* Which launch serves the gated form (ABI 8). By default, one sequence of an MLP whose
 * intermediate size gives at least 3/4 of the SMs a tile of 128 columns runs the fused launch
 * (one kernel, each block owning a column tile end to end: sparse_mlp.cu, "fused"); everything
 * else runs the two split-K kernels. CLADA_SPARSE_MLP_FLAG_FUSED forces the fused launch
 * (batch 1 or 2 of the gated form, else cudaErrorNotSupported); CLADA_SPARSE_MLP_FLAG_TWO_KERNEL
 * forces the two kernels. Both, or any other bit, fail with cudaErrorInvalidValue. (Bit 1,
 * CLADA_FLAG_PDL, launched stage 2 by programmatic dependent launch; removed in ABI 4, measured
 * no faster on the H100 and H200: benchmarks/NOTES.md.)
 * On sm_90 and later the fused launch runs in thread-block clusters of 2 (ABI 9: the pair sums
 * its partial outputs in distributed shared memory before adding them up across the GPU);
 * CLADA_SPARSE_MLP_FLAG_NO_CLUSTER runs it without clusters, as before sm_90 (for tests and
 * benchmarks; with CLADA_SPARSE_MLP_FLAG_TWO_KERNEL it is cudaErrorInvalidValue). */
#define CLADA_SPARSE_MLP_FLAG_FUSED 2
#define CLADA_SPARSE_MLP_FLAG_TWO_KERNEL 4
#define CLADA_SPARSE_MLP_FLAG_NO_CLUSTER 8

CLADA_API int clada_kernels_abi_version(void);

/* Bytes of device workspace for one call (fp32 accumulators and a counter). The
 * workspace serves batches up to `batch`; one workspace must not be used by two calls
 * that may run at the same time (e.g. on two streams). */
CLADA_API size_t clada_sparse_mlp_workspace_size(int batch, int hidden, int inter);

/* Computes y. Returns 0 (cudaSuccess) or a cudaError_t code: cudaErrorInvalidValue for
 * bad arguments (shapes, alignment, workspace too small), cudaErrorNotSupported for
 * unsupported sizes, or the launch error.
 *
 * workspace_is_zeroed: pass 1 when the workspace is persistent and was zero-filled once
 * before its first use: every successful call leaves it zero-filled again, so no memset
 * is needed (the torch binding does this). Pass 0 for scratch memory (e.g. a TensorRT
 * enqueue workspace): the call then zero-fills it first with cudaMemsetAsync. */
CLADA_API int clada_sparse_mlp(const void* x, const void* w_gate_t, const void* w_up_t,
                               const void* w_down_t, const float* thresholds, void* y,
                               int batch, int hidden, int inter, int dtype, int act,
                               void* workspace, size_t workspace_bytes, int workspace_is_zeroed,
                               const clada_sparse_mlp_config* config, cudaStream_t stream);

/* clada_sparse_mlp that also counts the weight rows it read: row_counts[0] += rows of
 * W_gate_t/W_up_t (input channels any batch row kept), row_counts[1] += rows of W_down_t
 * (intermediate channels any batch row kept). row_counts: 2 unsigned ints in device memory
 * that the caller zeroes; NULL counts nothing. The runtime reads them to measure the
 * sparsity reached and to choose between this kernel and dense GEMMs (docs/gpu.md). */
CLADA_API int clada_sparse_mlp_counted(const void* x, const void* w_gate_t, const void* w_up_t,
                                       const void* w_down_t, const float* thresholds, void* y,
                                       int batch, int hidden, int inter, int dtype, int act,
                                       void* workspace, size_t workspace_bytes, int workspace_is_zeroed,
                                       unsigned* row_counts, const clada_sparse_mlp_config* config,
                                       cudaStream_t stream);

/* The plain (non-gated) form: y = act(x_s @ w_in_t + b_in)_s @ w_out_t + b_out (top of this
 * file), with the conventions of clada_sparse_mlp_counted: the same batch (1..8), shape
 * (hidden and inter multiples of 8, hidden <= CLADA_SPARSE_MLP_MAX_HIDDEN), 16-byte alignment
 * (every pointer but thresholds and row_counts, b_in and b_out included), return codes and
 * workspace contract (clada_sparse_mlp_workspace_size(batch, hidden, inter) bytes; the
 * workspace may be shared with the gated form's calls if they are ordered); b_in [inter] and
 * b_out [hidden] in the activation dtype, never NULL (pass zeros for a bias-free MLP).
 * Stage 1 reads the rows i of w_in_t whose x_s is nonzero in any batch row; stage 2 reads
 * the rows j of w_out_t whose h_s is nonzero in any batch row; b_out is added once.
 * row_counts (may be NULL): row_counts[0] += rows of w_in_t read, row_counts[1] += rows of
 * w_out_t read. */
CLADA_API int clada_sparse_mlp_plain(const void* x, const void* w_in_t, const void* b_in, const void* w_out_t,
                                     const void* b_out, const float* thresholds, void* y, int batch, int hidden,
                                     int inter, int dtype, int act, void* workspace, size_t workspace_bytes,
                                     int workspace_is_zeroed, unsigned* row_counts,
                                     const clada_sparse_mlp_config* config, cudaStream_t stream);

/* The op's two elementwise steps around dense GEMMs (the runtime's dense fallback):
 * y = x * (|x| > t_in[b]) for x, y [batch, n]; and, for gate_up [batch, 2 * inter] (the gate
 * GEMM's outputs, then the up GEMM's), h = act(g) * u kept where |h| > t_mid[b], h
 * [batch, inter]. Thresholds as for clada_sparse_mlp; n and inter multiples of 8. */
CLADA_API int clada_mask_input(const void* x, const float* thresholds, void* y, int batch, int n, int dtype,
                               cudaStream_t stream);
CLADA_API int clada_gate_mask(const void* gate_up, const float* thresholds, void* h, int batch, int inter,
                              int dtype, int act, cudaStream_t stream);
/* The plain form's middle step: h = act(pre + b_in) kept where |h| > t_mid[b], for pre
 * [batch, inter] (the x_s @ w_in_t GEMM's output) and b_in [inter] (NULL: no bias, e.g. when
 * the GEMM added it); h [batch, inter]. inter a multiple of 8, 16-byte aligned pointers. */
CLADA_API int clada_bias_act_mask(const void* pre, const void* b_in, const float* thresholds, void* h, int batch,
                                  int inter, int dtype, int act, cudaStream_t stream);

/* Human-readable text for a status returned above. */
CLADA_API const char* clada_error_string(int status);

#ifdef __cplusplus
}
#endif

#endif /* CLADA_SPARSE_MLP_H_ */
