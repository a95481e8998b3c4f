#include "row_thresholds.h"

namespace clada::trt
{
namespace
{

// One thread per row: copies its sequence's (t_in, t_mid). Scalar loads, so no alignment
// beyond a float's is assumed of either buffer.
__global__ void expandRowThresholdsKernel(
    float const* __restrict__ seq, float* __restrict__ rows, int64_t num_rows, int64_t tokens_per_seq)
{
    for (int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; r < num_rows;
         r += static_cast<int64_t>(gridDim.x) * blockDim.x)
    {
        int64_t const s = r / tokens_per_seq;
        rows[2 * r] = seq[2 * s];
        rows[2 * r + 1] = seq[2 * s + 1];
    }
}

} // namespace

cudaError_t expandRowThresholds(float const* seq_thresholds, float* row_thresholds, int64_t num_seqs,
    int64_t tokens_per_seq, cudaStream_t stream)
{
    int64_t const num_rows = num_seqs * tokens_per_seq;
    if (num_rows <= 0)
    {
        return cudaSuccess;
    }
    constexpr int kThreads = 256;
    int64_t const blocks = (num_rows + kThreads - 1) / kThreads;
    int const grid = static_cast<int>(blocks < 1024 ? blocks : 1024);
    expandRowThresholdsKernel<<<grid, kThreads, 0, stream>>>(seq_thresholds, row_thresholds, num_rows, tokens_per_seq);
    return cudaGetLastError();
}

} // namespace clada::trt
