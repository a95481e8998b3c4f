// The one inner loop of the CPU SparseMLP, per instruction set (row_kernels.cpp).
#ifndef CLADA_CPU_ROW_KERNELS_H_
#define CLADA_CPU_ROW_KERNELS_H_

namespace clada_cpu {

// acc[b * acc_stride + c] += sum_r coef[r * batch + b] * rows[r][col0 + c]
// for b < batch (1..8), c < n, r < num_rows: the kept weight rows, each scaled by its
// activation in every batch row. Rows are streamed four at a time, so four sequential
// memory streams are in flight and acc is loaded and stored once per four rows.
using RowsFn = void (*)(float* acc, long acc_stride, const float* const* rows, const float* coef, int num_rows,
                        int batch, long col0, long n);

void rows_generic(float* acc, long acc_stride, const float* const* rows, const float* coef, int num_rows, int batch,
                  long col0, long n);
void rows_avx2(float* acc, long acc_stride, const float* const* rows, const float* coef, int num_rows, int batch,
               long col0, long n);
void rows_avx512(float* acc, long acc_stride, const float* const* rows, const float* coef, int num_rows, int batch,
                 long col0, long n);

bool cpu_has_avx2();
bool cpu_has_avx512();

}  // namespace clada_cpu

#endif  // CLADA_CPU_ROW_KERNELS_H_
