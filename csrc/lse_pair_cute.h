// Launchers of the CuTe kernels in lse_pair_cute.cu (fp16/bf16, sm_80+). Plain CUDA types only (no torch), so the
// kernels compile with nvcc and the CUTLASS headers alone; csrc/cuda_binding.cpp wraps them for PyTorch.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace fastcontrast {
namespace cute_kernels {

// Whether the CuTe kernels take these operands: D a multiple of 8 and 16-byte-aligned rows (16-byte vector copies).
bool supported(int64_t D, int64_t lda, int64_t ldb, const void* A, const void* B);

// One sweep of S = A·Bᵀ: lse[i] = log Σ_j exp(scale_a[i]·S_ij) (base e) and, for each 128-row block b,
// pmax[b, j] = max_i scale_b[j]·S_ij·log2 e and psum[b, j] = Σ_i 2^(scale_b[j]·S_ij·log2 e − pmax[b, j]) (base 2).
cudaError_t launch_lse_sweep(bool bf16, const void* A, const void* B, const float* scale_a, const float* scale_b,
                             float* lse, float* pmax, float* psum, int64_t Na, int64_t Nb, int64_t D, int64_t lda,
                             int64_t ldb, int64_t ldp, cudaStream_t stream);

// σ·G for rows [row_base, row_base + rc) into G (rc × Nb, row stride ldg), g_a·Σ_j P·S and g_b·Σ_i Q·S added to
// dscale_a, dscale_b; P = exp(a·S − lse_a), Q = exp(b·S − lse_b).
cudaError_t launch_grad_tile(bool bf16, const void* A, const void* B, const float* scale_a, const float* scale_b,
                             const float* lse_a, const float* lse_b, const float* g_a, const float* g_b,
                             const float* sigma, void* G, float* dscale_a, float* dscale_b, int64_t row_base,
                             int64_t rc, int64_t Nb, int64_t D, int64_t lda, int64_t ldb, int64_t ldg,
                             cudaStream_t stream);

}  // namespace cute_kernels
}  // namespace fastcontrast
