// The row kernels of the CPU SparseMLP: generic C++, AVX2+FMA and AVX-512F. The vector
// ones carry __attribute__((target)) rather than living in TUs built with -mavx2: inline
// functions of a TU built with -mavx2 (std:: templates) could be merged by the linker into
// code that runs on every CPU, and crash where AVX2 is missing.
#include "row_kernels.h"

#include <immintrin.h>

namespace clada_cpu {
namespace {

// Batch size as a template parameter: the loops over b unroll and the coefficients of
// small batches stay in registers.
template <int B>
void rows_generic_b(float* acc, long stride, const float* const* rows, const float* coef, int num_rows, long col0,
                    long n) {
  int r = 0;
  for (; r + 4 <= num_rows; r += 4) {
    const float* w0 = rows[r] + col0;
    const float* w1 = rows[r + 1] + col0;
    const float* w2 = rows[r + 2] + col0;
    const float* w3 = rows[r + 3] + col0;
    const float* k = coef + r * B;
    for (int b = 0; b < B; ++b) {
      float* a = acc + b * stride;
      const float k0 = k[b], k1 = k[B + b], k2 = k[2 * B + b], k3 = k[3 * B + b];
      for (long c = 0; c < n; ++c) a[c] += k0 * w0[c] + k1 * w1[c] + k2 * w2[c] + k3 * w3[c];
    }
  }
  for (; r < num_rows; ++r) {
    const float* w = rows[r] + col0;
    for (int b = 0; b < B; ++b) {
      float* a = acc + b * stride;
      const float k = coef[r * B + b];
      for (long c = 0; c < n; ++c) a[c] += k * w[c];
    }
  }
}

template <int B>
__attribute__((target("avx2,fma"))) void rows_avx2_b(float* acc, long stride, const float* const* rows,
                                                      const float* coef, int num_rows, long col0, long n) {
  const long nv = n & ~7L;
  int r = 0;
  for (; r + 4 <= num_rows; r += 4) {
    const float* w0 = rows[r] + col0;
    const float* w1 = rows[r + 1] + col0;
    const float* w2 = rows[r + 2] + col0;
    const float* w3 = rows[r + 3] + col0;
    const float* k = coef + r * B;
    __m256 k0[B], k1[B], k2[B], k3[B];
    for (int b = 0; b < B; ++b) {
      k0[b] = _mm256_set1_ps(k[b]);
      k1[b] = _mm256_set1_ps(k[B + b]);
      k2[b] = _mm256_set1_ps(k[2 * B + b]);
      k3[b] = _mm256_set1_ps(k[3 * B + b]);
    }
    for (long c = 0; c < nv; c += 8) {
      const __m256 v0 = _mm256_loadu_ps(w0 + c), v1 = _mm256_loadu_ps(w1 + c);
      const __m256 v2 = _mm256_loadu_ps(w2 + c), v3 = _mm256_loadu_ps(w3 + c);
      for (int b = 0; b < B; ++b) {
        float* a = acc + b * stride + c;
        __m256 s = _mm256_loadu_ps(a);
        s = _mm256_fmadd_ps(k0[b], v0, s);
        s = _mm256_fmadd_ps(k1[b], v1, s);
        s = _mm256_fmadd_ps(k2[b], v2, s);
        s = _mm256_fmadd_ps(k3[b], v3, s);
        _mm256_storeu_ps(a, s);
      }
    }
    for (long c = nv; c < n; ++c)
      for (int b = 0; b < B; ++b)
        acc[b * stride + c] += k[b] * w0[c] + k[B + b] * w1[c] + k[2 * B + b] * w2[c] + k[3 * B + b] * w3[c];
  }
  for (; r < num_rows; ++r) {
    const float* w = rows[r] + col0;
    for (long c = 0; c < nv; c += 8) {
      const __m256 v = _mm256_loadu_ps(w + c);
      for (int b = 0; b < B; ++b) {
        float* a = acc + b * stride + c;
        _mm256_storeu_ps(a, _mm256_fmadd_ps(_mm256_set1_ps(coef[r * B + b]), v, _mm256_loadu_ps(a)));
      }
    }
    for (long c = nv; c < n; ++c)
      for (int b = 0; b < B; ++b) acc[b * stride + c] += coef[r * B + b] * w[c];
  }
}

template <int B>
__attribute__((target("avx512f"))) void rows_avx512_b(float* acc, long stride, const float* const* rows,
                                                       const float* coef, int num_rows, long col0, long n) {
  const long nv = n & ~15L;
  int r = 0;
  for (; r + 4 <= num_rows; r += 4) {
    const float* w0 = rows[r] + col0;
    const float* w1 = rows[r + 1] + col0;
    const float* w2 = rows[r + 2] + col0;
    const float* w3 = rows[r + 3] + col0;
    const float* k = coef + r * B;
    __m512 k0[B], k1[B], k2[B], k3[B];
    for (int b = 0; b < B; ++b) {
      k0[b] = _mm512_set1_ps(k[b]);
      k1[b] = _mm512_set1_ps(k[B + b]);
      k2[b] = _mm512_set1_ps(k[2 * B + b]);
      k3[b] = _mm512_set1_ps(k[3 * B + b]);
    }
    for (long c = 0; c < nv; c += 16) {
      const __m512 v0 = _mm512_loadu_ps(w0 + c), v1 = _mm512_loadu_ps(w1 + c);
      const __m512 v2 = _mm512_loadu_ps(w2 + c), v3 = _mm512_loadu_ps(w3 + c);
      for (int b = 0; b < B; ++b) {
        float* a = acc + b * stride + c;
        __m512 s = _mm512_loadu_ps(a);
        s = _mm512_fmadd_ps(k0[b], v0, s);
        s = _mm512_fmadd_ps(k1[b], v1, s);
        s = _mm512_fmadd_ps(k2[b], v2, s);
        s = _mm512_fmadd_ps(k3[b], v3, s);
        _mm512_storeu_ps(a, s);
      }
    }
    for (long c = nv; c < n; ++c)
      for (int b = 0; b < B; ++b)
        acc[b * stride + c] += k[b] * w0[c] + k[B + b] * w1[c] + k[2 * B + b] * w2[c] + k[3 * B + b] * w3[c];
  }
  for (; r < num_rows; ++r) {
    const float* w = rows[r] + col0;
    for (long c = 0; c < nv; c += 16) {
      const __m512 v = _mm512_loadu_ps(w + c);
      for (int b = 0; b < B; ++b) {
        float* a = acc + b * stride + c;
        _mm512_storeu_ps(a, _mm512_fmadd_ps(_mm512_set1_ps(coef[r * B + b]), v, _mm512_loadu_ps(a)));
      }
    }
    for (long c = nv; c < n; ++c)
      for (int b = 0; b < B; ++b) acc[b * stride + c] += coef[r * B + b] * w[c];
  }
}


#define CLADA_BATCH_SWITCH(fn)                                   \
  switch (batch) {                                               \
    case 1: return fn<1>(acc, stride, rows, coef, num_rows, col0, n); \
    case 2: return fn<2>(acc, stride, rows, coef, num_rows, col0, n); \
    case 3: return fn<3>(acc, stride, rows, coef, num_rows, col0, n); \
    case 4: return fn<4>(acc, stride, rows, coef, num_rows, col0, n); \
    case 5: return fn<5>(acc, stride, rows, coef, num_rows, col0, n); \
    case 6: return fn<6>(acc, stride, rows, coef, num_rows, col0, n); \
    case 7: return fn<7>(acc, stride, rows, coef, num_rows, col0, n); \
    default: return fn<8>(acc, stride, rows, coef, num_rows, col0, n); \
  }

}  // namespace

void rows_generic(float* acc, long stride, const float* const* rows, const float* coef, int num_rows, int batch,
                  long col0, long n) {
  CLADA_BATCH_SWITCH(rows_generic_b)
}

void rows_avx2(float* acc, long stride, const float* const* rows, const float* coef, int num_rows, int batch,
               long col0, long n) {
  CLADA_BATCH_SWITCH(rows_avx2_b)
}

void rows_avx512(float* acc, long stride, const float* const* rows, const float* coef, int num_rows, int batch,
                 long col0, long n) {
  CLADA_BATCH_SWITCH(rows_avx512_b)
}

// __builtin_cpu_supports also checks that the OS saves the wide registers (XCR0).
bool cpu_has_avx2() { return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"); }
bool cpu_has_avx512() { return __builtin_cpu_supports("avx512f"); }

}  // namespace clada_cpu
