// CUDA Sinkhorn–Knopp in log space, potential form (the math of csrc/sinkhorn_cpu.cpp and the Triton kernel):
//   v_k = log(N/K) − lse_i(s_ik/ε + u_i),   u_i = −lse_k(s_ik/ε + v_k),   Q_ik = exp(s_ik/ε + u_i + v_k).
// Every pass is bandwidth-bound (one read of S per half-iteration), so the kernels are laid out for coalescing:
//   * rows: one block per row, threads stride along the contiguous row, online (max, Σexp), block reduction;
//   * columns: 32 consecutive columns per block × 8 row lanes, rows split into `parts` chunks across grid.y so a
//     small K still fills the GPU; the chunks' (max, Σexp) are merged by a second small kernel;
//   * Q: one elementwise pass.
// No torch header: csrc/compile_check.sh compiles it with nvcc alone; csrc/cuda_binding.cpp wraps it.
#include <cuda_runtime.h>

#include <cstdint>

#include "sinkhorn_cuda.h"

namespace fastcontrast {
namespace {

constexpr float NEG_INF = -__builtin_huge_valf();
constexpr int ROW_THREADS = 256, COL_W = 32, COL_H = 8;

// (m, s) ← (m, s) ⊕ (m2, s2) for log-sum-exp = m + log s; safe when either side is empty (m = −inf)
__device__ __forceinline__ void lse_merge(float& m, float& s, float m2, float s2) {
  const float M = fmaxf(m, m2);
  if (M == NEG_INF) return;
  s = s * expf(m - M) + s2 * expf(m2 - M);
  m = M;
}

__device__ __forceinline__ void lse_push(float& m, float& s, float x) {
  if (x > m) {
    s = s * expf(m - x) + 1.0f;
    m = x;
  } else {
    s += expf(x - m);
  }
}

template <typename T>
__global__ void sinkhorn_rows_kernel(const T* __restrict__ S, const float* __restrict__ v, float* __restrict__ u,
                                     int64_t k, int64_t lds, float inv_eps) {
  __shared__ float sm_m[ROW_THREADS / 32], sm_s[ROW_THREADS / 32];
  const T* row = S + static_cast<int64_t>(blockIdx.x) * lds;
  float m = NEG_INF, s = 0.0f;
  for (int64_t j = threadIdx.x; j < k; j += ROW_THREADS) lse_push(m, s, static_cast<float>(row[j]) * inv_eps + v[j]);
  for (int off = 16; off > 0; off >>= 1) {
    const float m2 = __shfl_xor_sync(0xffffffffu, m, off), s2 = __shfl_xor_sync(0xffffffffu, s, off);
    lse_merge(m, s, m2, s2);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) sm_m[warp] = m, sm_s[warp] = s;
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < ROW_THREADS / 32; ++w) lse_merge(m, s, sm_m[w], sm_s[w]);
    u[blockIdx.x] = -(m + logf(s));
  }
}

// partial column statistics of rows [chunk·rows_per, (chunk+1)·rows_per) → work[chunk][k] (max) and
// work[parts + chunk][k] (Σexp)
template <typename T>
__global__ void sinkhorn_cols_kernel(const T* __restrict__ S, const float* __restrict__ u, float* __restrict__ work,
                                     int64_t n, int64_t k, int64_t lds, float inv_eps, int64_t rows_per, int parts) {
  __shared__ float sm_m[COL_H][COL_W], sm_s[COL_H][COL_W];
  const int64_t j = static_cast<int64_t>(blockIdx.x) * COL_W + threadIdx.x;
  const int64_t i0 = static_cast<int64_t>(blockIdx.y) * rows_per;
  const int64_t i1 = i0 + rows_per < n ? i0 + rows_per : n;
  float m = NEG_INF, s = 0.0f;
  if (j < k)
    for (int64_t i = i0 + threadIdx.y; i < i1; i += COL_H) lse_push(m, s, static_cast<float>(S[i * lds + j]) * inv_eps + u[i]);
  sm_m[threadIdx.y][threadIdx.x] = m;
  sm_s[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && j < k) {
    for (int h = 1; h < COL_H; ++h) lse_merge(m, s, sm_m[h][threadIdx.x], sm_s[h][threadIdx.x]);
    work[static_cast<int64_t>(blockIdx.y) * k + j] = m;
    work[static_cast<int64_t>(parts + blockIdx.y) * k + j] = s;
  }
}

__global__ void sinkhorn_col_merge_kernel(const float* __restrict__ work, float* __restrict__ v, int64_t k, int parts,
                                          float log_col) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= k) return;
  float m = NEG_INF, s = 0.0f;
  for (int p = 0; p < parts; ++p) lse_merge(m, s, work[static_cast<int64_t>(p) * k + j], work[static_cast<int64_t>(parts + p) * k + j]);
  v[j] = log_col - (m + logf(s));
}

template <typename T>
__global__ void sinkhorn_out_kernel(const T* __restrict__ S, const float* __restrict__ u, const float* __restrict__ v,
                                    float* __restrict__ Q, int64_t n, int64_t k, int64_t lds, float inv_eps) {
  const int64_t total = n * k;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = e / k, j = e - i * k;
    Q[e] = expf(static_cast<float>(S[i * lds + j]) * inv_eps + u[i] + v[j]);
  }
}

}  // namespace

cudaError_t launch_sinkhorn(const float* S, float* Q, float* u, float* v, float* work, int64_t n, int64_t k,
                            int64_t lds, float inv_eps, float log_col, int n_iters, int parts, cudaStream_t stream) {
  if (n <= 0 || k <= 0 || parts <= 0) return cudaErrorInvalidValue;
  if (n > 0x7fffffffLL || parts > 65535) return cudaErrorInvalidConfiguration;  // grid.x (rows), grid.y limits
  const int64_t rows_per = (n + parts - 1) / parts;
  const dim3 col_grid(static_cast<unsigned>((k + COL_W - 1) / COL_W), static_cast<unsigned>(parts));
  const unsigned merge_blocks = static_cast<unsigned>((k + 255) / 256);
  for (int it = 0; it < n_iters; ++it) {
    sinkhorn_cols_kernel<float><<<col_grid, dim3(COL_W, COL_H), 0, stream>>>(S, u, work, n, k, lds, inv_eps, rows_per, parts);
    sinkhorn_col_merge_kernel<<<merge_blocks, 256, 0, stream>>>(work, v, k, parts, log_col);
    sinkhorn_rows_kernel<float><<<static_cast<unsigned>(n), ROW_THREADS, 0, stream>>>(S, v, u, k, lds, inv_eps);
  }
  const int64_t blocks = (n * k + 255) / 256;
  sinkhorn_out_kernel<float><<<static_cast<unsigned>(blocks < 65535 * 8 ? blocks : 65535 * 8), 256, 0, stream>>>(
      S, u, v, Q, n, k, lds, inv_eps);
  return cudaGetLastError();
}

}  // namespace fastcontrast
