/*
 * Per-row thresholds for the SparseMLP kernels (plugins/kernels/sparse_mlp.h).
 *
 * The kernels read one (t_in, t_mid) pair per activation row; the ONNX node carries one
 * pair per sequence ([B, 2]) for rows laid out as [B, T, hidden]. This expands the
 * per-sequence pairs into per-row pairs so that row r gets the pair of sequence r / T.
 * Knows nothing of TensorRT; asynchronous on `stream`, capturable in a CUDA graph.
 */
#ifndef CLADA_TRT_ROW_THRESHOLDS_H_
#define CLADA_TRT_ROW_THRESHOLDS_H_

#include <cstdint>
#include <cuda_runtime_api.h>

namespace clada::trt
{

//! row_thresholds[r] = seq_thresholds[r / tokens_per_seq] for r in [0, num_seqs * tokens_per_seq),
//! each entry a (t_in, t_mid) float pair. Returns the launch status.
cudaError_t expandRowThresholds(float const* seq_thresholds, float* row_thresholds, int64_t num_seqs,
    int64_t tokens_per_seq, cudaStream_t stream);

} // namespace clada::trt

#endif // CLADA_TRT_ROW_THRESHOLDS_H_
