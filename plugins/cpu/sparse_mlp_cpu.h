/*
 * CLADA sparse MLP on the CPU: C ABI (libclada_cpu.so).
 *
 * The op, as in plugins/kernels/sparse_mlp.h and clada_export/ops/sparse_mlp.py:
 *   x_s = x * (|x| > t_in[b]);  h = act(x_s @ Wg) * (x_s @ Wu);
 *   h_s = h * (|h| > t_mid[b]); y = h_s @ Wd
 * for a decode batch of 1..8 rows, float32 weights and activations, float32 accumulation.
 *
 * Layout (row-major, contiguous; no alignment required), the CUDA library's:
 *   x          [batch, hidden]
 *   w_gate_t   [hidden, inter]    input-major: a skipped x_i skips row i
 *   w_up_t     [hidden, inter]
 *   w_down_t   [inter, hidden]    a skipped h_j skips row j
 *   thresholds [batch, 2]         (t_in, t_mid) per row
 *   y          [batch, hidden]
 *
 * A weight row is read when any batch row keeps its channel (the union); the rows that do
 * not keep it multiply it by zero, so each row's result is exact. The library knows nothing
 * of torch or ONNX Runtime. Every entry point catches all exceptions and returns a status.
 */
#ifndef CLADA_SPARSE_MLP_CPU_H_
#define CLADA_SPARSE_MLP_CPU_H_

#include <stddef.h>

#if defined(_WIN32)
#define CLADA_CPU_API __declspec(dllexport)
#else
#define CLADA_CPU_API __attribute__((visibility("default")))
#endif

#ifdef __cplusplus
extern "C" {
#endif

#define CLADA_CPU_ABI_VERSION 1
#define CLADA_CPU_MAX_BATCH 8

/* The same values as clada_act_t of the CUDA library. */
typedef enum { CLADA_CPU_ACT_SILU = 0, CLADA_CPU_ACT_GELU_TANH = 1, CLADA_CPU_ACT_GELU = 2 } clada_cpu_act_t;

/* Instruction sets of the row kernels. AUTO picks the widest this CPU and OS support;
 * the others force one (tests and benchmarks), and fail with CLADA_CPU_UNSUPPORTED where
 * the CPU lacks it. GENERIC is plain C++ (the compiler's baseline vectorization). */
typedef enum {
  CLADA_CPU_ISA_AUTO = 0,
  CLADA_CPU_ISA_GENERIC = 1,
  CLADA_CPU_ISA_AVX2 = 2,   /* AVX2 + FMA */
  CLADA_CPU_ISA_AVX512 = 3  /* AVX-512F */
} clada_cpu_isa_t;

typedef enum {
  CLADA_CPU_OK = 0,
  CLADA_CPU_INVALID_ARGUMENT = 1, /* a null pointer, a size out of range, an unknown act or isa */
  CLADA_CPU_UNSUPPORTED = 2,      /* the requested isa is not available on this CPU */
  CLADA_CPU_INTERNAL = 3          /* an exception (e.g. out of memory) inside the library */
} clada_cpu_status_t;

CLADA_CPU_API int clada_cpu_abi_version(void);

/* The isa AUTO resolves to on this machine. */
CLADA_CPU_API int clada_cpu_best_isa(void);

/* Computes y on up to num_threads OpenMP threads; <= 0: omp_get_max_threads(). The torch
 * binding passes torch.get_num_threads(). Calls from several threads run one at a time.
 * row_counts: NULL, or 2 counters the call adds to: [0] rows of W_gate_t/W_up_t read
 * (input channels any batch row kept), [1] rows of W_down_t read. Returns a
 * clada_cpu_status_t. */
CLADA_CPU_API int clada_sparse_mlp_cpu(const float* x, const float* w_gate_t, const float* w_up_t,
                                       const float* w_down_t, const float* thresholds, float* y,
                                       int batch, int hidden, int inter, int act, int num_threads, int isa,
                                       unsigned long long* row_counts);

/* Human-readable text for a status, and a name for an isa ("generic", "avx2", "avx512"). */
CLADA_CPU_API const char* clada_cpu_error_string(int status);
CLADA_CPU_API const char* clada_cpu_isa_name(int isa);

#ifdef __cplusplus
}
#endif

#endif /* CLADA_SPARSE_MLP_CPU_H_ */
