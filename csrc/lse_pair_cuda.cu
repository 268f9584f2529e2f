// CUDA kernels for the pairwise log-sum-exp behind the InfoNCE family (math: fastcontrast/ops/infonce/
// triton_kernels.py). Same design as the Triton path, so the two are interchangeable:
//   * lse_rows_kernel: one block = 64 rows; loops over 64-column tiles of S = A·Bᵀ (never stored beyond one tile
//     in shared memory), online max/sum per row. The column statistics are the same kernel with A and B swapped.
//   * grad_tile_kernel: one block = one 64×64 tile of one row chunk; recomputes S, writes σ·G to the chunk slab
//     and adds Σ P·S (rows) and Σ Q·S (columns) to the scale gradients. The binding finishes with two GEMMs.
// Tile products use tensor cores through WMMA (16×16×16, fp16/bf16 in, fp32 accumulate; sm_80+); fp32 inputs take
// a SIMT path (fp32 FMA) so their results keep fp32 accuracy. Per-sample scales (temperatures) are applied in
// the epilogue; the oblique per-token normalisation is a prologue in Python (normalised copies, O(N·D)) whose
// Jacobian is applied after the GEMMs — one code path for every K and no extra kernel variants.
//
// This file includes no torch header, so CI compiles it with plain nvcc for sm_80 and sm_90a (csrc/compile_check.sh);
// csrc/cuda_binding.cpp (torch-dependent) is compiled only where a CUDA build of torch exists.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cstdint>

#include "lse_pair_cuda.h"

namespace fastcontrast {
namespace {

constexpr int BM = 64, BN = 64, BK = 32, PAD = 8, THREADS = 128;
constexpr float NEG_INF = -__builtin_huge_valf();

template <typename T> struct TensorCore { static constexpr bool value = false; };
template <> struct TensorCore<__half> { static constexpr bool value = true; };
template <> struct TensorCore<__nv_bfloat16> { static constexpr bool value = true; };

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16(v); }

template <typename T>
struct Smem {
  __align__(32) T a[BM][BK + PAD];
  __align__(32) T b[BN][BK + PAD];
  __align__(32) float s[BM][BN + 4];
};

// Features [k0, k0+BK) of the tile's BM rows of A and BN rows of B into shared memory (zero past the ends), then a
// barrier. BM == BN, so one index walks both.
template <typename T>
__device__ __forceinline__ void stage_k_slice(const T* __restrict__ A, const T* __restrict__ B, int64_t row0,
                                              int64_t row_end, int64_t col0, int64_t col_end, int64_t k0, int64_t D,
                                              int64_t lda, int64_t ldb, Smem<T>& sm) {
  static_assert(BM == BN, "one index walks the rows of both tiles");
  const T zero = from_float<T>(0.f);
  for (int e = threadIdx.x; e < BM * BK; e += THREADS) {
    const int r = e / BK, k = e % BK;
    const int64_t gk = k0 + k, ga = row0 + r, gb = col0 + r;
    sm.a[r][k] = (ga < row_end && gk < D) ? A[ga * lda + gk] : zero;
    sm.b[r][k] = (gb < col_end && gk < D) ? B[gb * ldb + gk] : zero;
  }
  __syncthreads();
}

// S tile (BM×BN, fp32) of rows [row0, row0+BM) of A against rows [col0, col0+BN) of B, into sm.s.
// Rows past row_end / col_end and features past D read as zero.
template <typename T>
__device__ void s_tile(const T* __restrict__ A, const T* __restrict__ B, int64_t row0, int64_t row_end, int64_t col0,
                       int64_t col_end, int64_t D, int64_t lda, int64_t ldb, Smem<T>& sm) {
  const int tid = threadIdx.x;
  if constexpr (TensorCore<T>::value) {
    using namespace nvcuda;
    const int warp = tid / 32;  // warp w owns rows 16w..16w+15 and all BN columns
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[BN / 16];
#pragma unroll
    for (int j = 0; j < BN / 16; ++j) wmma::fill_fragment(acc[j], 0.f);
    for (int64_t k0 = 0; k0 < D; k0 += BK) {
      stage_k_slice(A, B, row0, row_end, col0, col_end, k0, D, lda, ldb, sm);
#pragma unroll
      for (int kk = 0; kk < BK; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> af;
        wmma::load_matrix_sync(af, &sm.a[warp * 16][kk], BK + PAD);
#pragma unroll
        for (int j = 0; j < BN / 16; ++j) {
          // Bᵀ as a column-major K×N matrix is B's rows as stored
          wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> bf;
          wmma::load_matrix_sync(bf, &sm.b[j * 16][kk], BK + PAD);
          wmma::mma_sync(acc[j], af, bf, acc[j]);
        }
      }
      __syncthreads();
    }
#pragma unroll
    for (int j = 0; j < BN / 16; ++j)
      wmma::store_matrix_sync(&sm.s[warp * 16][j * 16], acc[j], BN + 4, wmma::mem_row_major);
  } else {
    // fp32: thread owns row tid/2 and 32 consecutive columns; fp32 FMA keeps full precision
    const int r = tid >> 1, c0 = (tid & 1) * (BN / 2);
    float acc[BN / 2];
#pragma unroll
    for (int j = 0; j < BN / 2; ++j) acc[j] = 0.f;
    for (int64_t k0 = 0; k0 < D; k0 += BK) {
      stage_k_slice(A, B, row0, row_end, col0, col_end, k0, D, lda, ldb, sm);
#pragma unroll 4
      for (int k = 0; k < BK; ++k) {
        const float av = sm.a[r][k];
#pragma unroll
        for (int j = 0; j < BN / 2; ++j) acc[j] = fmaf(av, static_cast<float>(sm.b[c0 + j][k]), acc[j]);
      }
      __syncthreads();
    }
#pragma unroll
    for (int j = 0; j < BN / 2; ++j) sm.s[r][c0 + j] = acc[j];
  }
  __syncthreads();
}

template <typename T>
__global__ void __launch_bounds__(THREADS) lse_rows_kernel(const T* __restrict__ A, const T* __restrict__ B,
                                                           const float* __restrict__ scale_a, float bias,
                                                           float* __restrict__ lse, int64_t Na, int64_t Nb,
                                                           int64_t D, int64_t lda, int64_t ldb) {
  __shared__ Smem<T> sm;
  const int tid = threadIdx.x, r = tid >> 1, half = tid & 1;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * BM, row = row0 + r;
  const float sa = row < Na ? scale_a[row] : 0.f;
  float m = NEG_INF, l = 0.f;
  for (int64_t col0 = 0; col0 < Nb; col0 += BN) {
    s_tile<T>(A, B, row0, Na, col0, Nb, D, lda, ldb, sm);
    float tmax = NEG_INF;
    for (int j = 0; j < BN / 2; ++j) {
      const int c = half * (BN / 2) + j;
      if (col0 + c < Nb) tmax = fmaxf(tmax, sa * sm.s[r][c] + bias);
    }
    if (tmax != NEG_INF) {  // a ragged last tile may leave this half-row empty
      const float nm = fmaxf(m, tmax);
      float sum = 0.f;
      for (int j = 0; j < BN / 2; ++j) {
        const int c = half * (BN / 2) + j;
        if (col0 + c < Nb) sum += __expf(sa * sm.s[r][c] + bias - nm);
      }
      l = (m == NEG_INF ? 0.f : l * __expf(m - nm)) + sum;
      m = nm;
    }
    __syncthreads();  // sm.s is rewritten by the next tile
  }
  const float m2 = __shfl_xor_sync(0xffffffffu, m, 1), l2 = __shfl_xor_sync(0xffffffffu, l, 1);
  const float M = fmaxf(m, m2);
  const float L = (m == NEG_INF ? 0.f : l * __expf(m - M)) + (m2 == NEG_INF ? 0.f : l2 * __expf(m2 - M));
  if (half == 0 && row < Na) lse[row] = M + logf(L);
}

template <typename T>
__global__ void __launch_bounds__(THREADS) grad_tile_kernel(
    const T* __restrict__ A, const T* __restrict__ B, const float* __restrict__ scale_a,
    const float* __restrict__ scale_b, float bias, const float* __restrict__ lse_a, const float* __restrict__ lse_b,
    const float* __restrict__ g_a, const float* __restrict__ g_b, const float* __restrict__ sigma_ptr,
    T* __restrict__ G, float* __restrict__ dscale_a, float* __restrict__ dscale_b, int64_t row_base, int64_t rc,
    int64_t Nb, int64_t D, int64_t lda, int64_t ldb, int64_t ldg) {
  __shared__ Smem<T> sm;
  const int tid = threadIdx.x, r = tid >> 1, half = tid & 1;
  const int64_t local0 = static_cast<int64_t>(blockIdx.x) * BM, row0 = row_base + local0;
  const int64_t col0 = static_cast<int64_t>(blockIdx.y) * BN;
  s_tile<T>(A, B, row0, row_base + rc, col0, Nb, D, lda, ldb, sm);
  const bool row_ok = local0 + r < rc;
  const int64_t row = row0 + r;
  const float sa = row_ok ? scale_a[row] : 0.f, la = row_ok ? lse_a[row] : 0.f, ga = row_ok ? g_a[row] : 0.f;
  const float sigma = *sigma_ptr;
  float ps = 0.f;
  for (int j = 0; j < BN / 2; ++j) {
    const int c = half * (BN / 2) + j;
    const int64_t col = col0 + c;
    float qs = 0.f;
    if (row_ok && col < Nb) {
      const float s = sm.s[r][c], sb = scale_b[col];
      const float p = __expf(sa * s + bias - la), q = __expf(sb * s + bias - lse_b[col]);
      G[(local0 + r) * ldg + col] = from_float<T>((ga * sa * p + g_b[col] * sb * q) * sigma);
      ps += p * s;
      qs = q * s;
    }
    sm.s[r][c] = qs;  // each element is owned by this thread: safe in place, read by columns below
  }
  ps += __shfl_xor_sync(0xffffffffu, ps, 1);
  if (half == 0 && row_ok) atomicAdd(dscale_a + row, ga * ps);
  __syncthreads();
  if (tid < BN && col0 + tid < Nb) {
    float cs = 0.f;
    for (int rr = 0; rr < BM; ++rr) cs += sm.s[rr][tid];
    atomicAdd(dscale_b + col0 + tid, g_b[col0 + tid] * cs);
  }
}

template <typename T>
cudaError_t launch_lse_rows_t(const void* A, const void* B, const float* scale_a, float bias, float* lse, int64_t Na,
                              int64_t Nb, int64_t D, int64_t lda, int64_t ldb, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((Na + BM - 1) / BM));
  lse_rows_kernel<T><<<grid, THREADS, 0, stream>>>(static_cast<const T*>(A), static_cast<const T*>(B), scale_a, bias,
                                                   lse, Na, Nb, D, lda, ldb);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_grad_tile_t(const void* A, const void* B, const float* scale_a, const float* scale_b, float bias,
                               const float* lse_a, const float* lse_b, const float* g_a, const float* g_b,
                               const float* sigma, void* G, float* dscale_a, float* dscale_b, int64_t row_base,
                               int64_t rc, int64_t Nb, int64_t D, int64_t lda, int64_t ldb, int64_t ldg,
                               cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((rc + BM - 1) / BM), static_cast<unsigned>((Nb + BN - 1) / BN));
  grad_tile_kernel<T><<<grid, THREADS, 0, stream>>>(static_cast<const T*>(A), static_cast<const T*>(B), scale_a,
                                                    scale_b, bias, lse_a, lse_b, g_a, g_b, sigma, static_cast<T*>(G),
                                                    dscale_a, dscale_b, row_base, rc, Nb, D, lda, ldb, ldg);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_lse_rows(DType dtype, const void* A, const void* B, const float* scale_a, float bias, float* lse,
                            int64_t Na, int64_t Nb, int64_t D, int64_t lda, int64_t ldb, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat: return launch_lse_rows_t<float>(A, B, scale_a, bias, lse, Na, Nb, D, lda, ldb, stream);
    case DType::kHalf: return launch_lse_rows_t<__half>(A, B, scale_a, bias, lse, Na, Nb, D, lda, ldb, stream);
    case DType::kBFloat16:
      return launch_lse_rows_t<__nv_bfloat16>(A, B, scale_a, bias, lse, Na, Nb, D, lda, ldb, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_grad_tile(DType dtype, const void* A, const void* B, const float* scale_a, const float* scale_b,
                             float bias, const float* lse_a, const float* lse_b, const float* g_a, const float* g_b,
                             const float* sigma, void* G, float* dscale_a, float* dscale_b, int64_t row_base,
                             int64_t rc, int64_t Nb, int64_t D, int64_t lda, int64_t ldb, int64_t ldg,
                             cudaStream_t stream) {
#define FC_GRAD(T)                                                                                                  \
  launch_grad_tile_t<T>(A, B, scale_a, scale_b, bias, lse_a, lse_b, g_a, g_b, sigma, G, dscale_a, dscale_b,        \
                        row_base, rc, Nb, D, lda, ldb, ldg, stream)
  switch (dtype) {
    case DType::kFloat: return FC_GRAD(float);
    case DType::kHalf: return FC_GRAD(__half);
    case DType::kBFloat16: return FC_GRAD(__nv_bfloat16);
  }
#undef FC_GRAD
  return cudaErrorInvalidValue;
}

}  // namespace fastcontrast
