// Launcher of the CUDA Sinkhorn kernels (sinkhorn_cuda.cu). Plain CUDA types only, like lse_pair_cuda.h.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace fastcontrast {

// Q = exp(S/ε + u_i + v_k) after n_iters (column, row) rounds in potential form; S (n × k, row stride lds, fp32).
// u (n) must come in zeroed; v (k) is overwritten; work holds 2·parts·k floats (per-chunk column statistics).
cudaError_t launch_sinkhorn(const float* S, float* Q, float* u, float* v, float* work, int64_t n, int64_t k,
                            int64_t lds, float inv_eps, float log_col, int n_iters, int parts, cudaStream_t stream);

}  // namespace fastcontrast
