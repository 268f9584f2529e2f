// Launchers of the CUDA kernels in lse_pair_cuda.cu. Plain CUDA types only (no torch), so the kernels compile
// with nvcc alone; csrc/cuda_binding.cpp wraps them for PyTorch.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace fastcontrast {

enum class DType : int { kFloat = 0, kHalf = 1, kBFloat16 = 2 };

// lse[i] = log Σ_j exp(scale_a[i]·⟨A_i, B_j⟩ + bias) for the Na rows of A (lda, ldb: row strides in elements).
cudaError_t launch_lse_rows(DType dtype, const void* A, const void* B, const float* scale_a, float bias, float* lse,
                            int64_t Na, int64_t Nb, int64_t D, int64_t lda, int64_t ldb, cudaStream_t stream);

// σ·G for rows [row_base, row_base + rc) into G (rc × Nb, row stride ldg), and Σ_j P·S, Σ_i Q·S added to
// dscale_a, dscale_b (multiplied by g_a, g_b).
cudaError_t launch_grad_tile(DType dtype, const void* A, const void* B, const float* scale_a, const float* scale_b,
                             float bias, const float* lse_a, const float* lse_b, const float* g_a, const float* g_b,
                             const float* sigma, void* G, float* dscale_a, float* dscale_b, int64_t row_base,
                             int64_t rc, int64_t Nb, int64_t D, int64_t lda, int64_t ldb, int64_t ldg,
                             cudaStream_t stream);

}  // namespace fastcontrast
