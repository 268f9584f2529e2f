// The pairwise log-sum-exp kernels on CuTe (CUTLASS 4), fp16/bf16 in, fp32 accumulate, sm_80+ (mma.sync also
// runs on sm_90; a TMA/WGMMA variant is the next step). Math and design as the Triton kernels
// (fastcontrast/ops/infonce/triton_kernels.py):
//   * lse_sweep_kernel: one CTA = 128 rows of A; for every 64-row tile of B it computes the S tile once and keeps
//     the rows' log-sum-exp online in registers, and writes the tile's column partials (max, Σ2^(z−max) over its
//     128 rows) to PMAX/PSUM[block] — the row and the column statistics from one sweep of S (the 4-unit scheme).
//   * grad_tile_kernel: one CTA = one 128×64 tile of one row chunk; recomputes S, writes σ·G to the slab and adds
//     g·Σ P·S, h·Σ Q·S to the scale gradients. The binding finishes with two cuBLAS GEMMs.
// Main loop: a 3-stage cp.async pipeline (LDGSTS) into 128-byte-swizzled shared memory, ldmatrix (LDSM) to
// registers, mma.sync 16×8×16 (HMMA); 8 warps stacked along M, each owning 16 full rows, so a row's statistics
// need only quad shuffles and a column's a shuffle over 8 lanes plus one exchange across the 8 warps.
// Rows, columns and features past the ends load as zeros (predicated copies); D must be a multiple of 8 and the
// rows 16-byte aligned (the binding checks, and falls back to the WMMA kernels otherwise).
//
// Numerics of these kernels have not been checked on a GPU yet: the binding uses them only with
// FASTCONTRAST_CUTE=1 (tests/test_cuda_cute.py and benchmarks/gpu_session.sh do), until a device run validates them.
#include <cuda_runtime.h>

#include <cute/tensor.hpp>

#include "lse_pair_cute.h"

namespace fastcontrast {
namespace cute_kernels {
namespace {

using namespace cute;

constexpr int BM = 128, BN = 64, BK = 64, STAGES = 3, THREADS = 256, WARPS = THREADS / 32;
constexpr float LOG2E = 1.4426950408889634f, LN2 = 0.6931471805599453f;
constexpr float NEG_INF = -__builtin_huge_valf();

template <typename T> struct MmaAtomFor;
template <> struct MmaAtomFor<half_t> { using type = SM80_16x8x16_F32F16F16F32_TN; };
template <> struct MmaAtomFor<bfloat16_t> { using type = SM80_16x8x16_F32BF16BF16F32_TN; };

template <typename T>
struct Kernel {
  // 8 rows × 64 features (128 B) per swizzle atom: ldmatrix reads it without bank conflicts
  using SmemAtom = decltype(composition(Swizzle<3, 3, 3>{}, Layout<Shape<_8, Int<BK>>, Stride<Int<BK>, _1>>{}));
  using SmemA = decltype(tile_to_shape(SmemAtom{}, Shape<Int<BM>, Int<BK>, Int<STAGES>>{}));
  using SmemB = decltype(tile_to_shape(SmemAtom{}, Shape<Int<BN>, Int<BK>, Int<STAGES>>{}));
  // 256 threads: 32 rows × 8 threads along K, 8 elements (16 B) each
  using G2S = decltype(make_tiled_copy(Copy_Atom<SM80_CP_ASYNC_CACHEGLOBAL<uint128_t>, T>{},
                                       Layout<Shape<_32, _8>, Stride<_8, _1>>{}, Layout<Shape<_1, _8>>{}));
  using Mma = decltype(make_tiled_mma(typename MmaAtomFor<T>::type{}, Layout<Shape<Int<WARPS>, _1, _1>>{},
                                      Tile<Int<BM>, Int<BN>, _16>{}));
  using S2R = Copy_Atom<SM75_U32x4_LDSM_N, T>;

  struct Smem {
    cute::array_aligned<T, cosize_v<SmemA>, 128> a;
    cute::array_aligned<T, cosize_v<SmemB>, 128> b;
    float cmax[WARPS][BN];  // per-warp column partials, merged across the warps
    float csum[WARPS][BN];
  };
};

// One predicated K-chunk copy: rows past `rows` and features past `kmax` become zeros in shared memory.
template <class TiledCopy, class Src, class Dst, class Crd>
__device__ __forceinline__ void copy_or_zero(TiledCopy const& tc, Src const& src, Dst&& dst, Crd const& crd,
                                             int rows, int kmax) {
  CUTE_UNROLL
  for (int m = 0; m < size<1>(src); ++m) {
    CUTE_UNROLL
    for (int k = 0; k < size<2>(src); ++k) {
      auto c = crd(0, m, k);
      if (get<0>(c) < rows && get<1>(c) < kmax) {
        copy(tc, src(_, m, k), dst(_, m, k));
      } else {
        clear(dst(_, m, k));
      }
    }
  }
}

// The S tile of row block `m_blk` × column tile `n_blk` into the accumulators tCrC (fp32): the pipelined main loop.
template <typename T, class TC>
__device__ __forceinline__ void s_tile(const T* A, const T* B, int Na, int Nb, int D, int lda, int ldb, int m_blk,
                                       int n_blk, typename Kernel<T>::Smem& sm, TC& tCrC) {
  using K = Kernel<T>;
  const int tid = threadIdx.x;
  Tensor mA = make_tensor(make_gmem_ptr(A), make_shape(Na, D), make_stride(lda, _1{}));
  Tensor mB = make_tensor(make_gmem_ptr(B), make_shape(Nb, D), make_stride(ldb, _1{}));
  Tensor cA = make_identity_tensor(make_shape(Na, D));
  Tensor cB = make_identity_tensor(make_shape(Nb, D));
  Tensor gA = local_tile(mA, make_tile(Int<BM>{}, Int<BK>{}), make_coord(m_blk, _));  // (BM, BK, k)
  Tensor gB = local_tile(mB, make_tile(Int<BN>{}, Int<BK>{}), make_coord(n_blk, _));
  Tensor iA = local_tile(cA, make_tile(Int<BM>{}, Int<BK>{}), make_coord(m_blk, _));
  Tensor iB = local_tile(cB, make_tile(Int<BN>{}, Int<BK>{}), make_coord(n_blk, _));
  Tensor sA = make_tensor(make_smem_ptr(sm.a.data()), typename K::SmemA{});  // (BM, BK, STAGES)
  Tensor sB = make_tensor(make_smem_ptr(sm.b.data()), typename K::SmemB{});

  typename K::G2S g2s;
  auto thr_g2s = g2s.get_slice(tid);
  Tensor tAgA = thr_g2s.partition_S(gA);  // (CPY, CPY_M, CPY_K, k)
  Tensor tAsA = thr_g2s.partition_D(sA);  // (CPY, CPY_M, CPY_K, STAGES)
  Tensor tAcA = thr_g2s.partition_S(iA);  // the (row, feature) of each copied vector, for the predicates
  Tensor tBgB = thr_g2s.partition_S(gB);
  Tensor tBsB = thr_g2s.partition_D(sB);
  Tensor tBcB = thr_g2s.partition_S(iB);

  typename K::Mma mma;
  auto thr_mma = mma.get_slice(tid);
  Tensor tCrA = thr_mma.partition_fragment_A(sA(_, _, 0));  // (MMA, MMA_M, MMA_K)
  Tensor tCrB = thr_mma.partition_fragment_B(sB(_, _, 0));
  auto s2r_a = make_tiled_copy_A(typename K::S2R{}, mma);
  auto s2r_b = make_tiled_copy_B(typename K::S2R{}, mma);
  Tensor tXsA = s2r_a.get_slice(tid).partition_S(sA);  // (CPY, MMA_M, MMA_K, STAGES)
  Tensor tXrA = s2r_a.get_slice(tid).retile_D(tCrA);
  Tensor tXsB = s2r_b.get_slice(tid).partition_S(sB);
  Tensor tXrB = s2r_b.get_slice(tid).retile_D(tCrB);

  const int k_tiles = (D + BK - 1) / BK;
  auto load = [&](int kt, int stage) {
    copy_or_zero(g2s, tAgA(_, _, _, kt), tAsA(_, _, _, stage), tAcA(_, _, _, kt), Na, D);
    copy_or_zero(g2s, tBgB(_, _, _, kt), tBsB(_, _, _, stage), tBcB(_, _, _, kt), Nb, D);
  };
  CUTE_UNROLL
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < k_tiles) load(s, s);
    cp_async_fence();
  }
  clear(tCrC);
  for (int kt = 0; kt < k_tiles; ++kt) {
    cp_async_wait<STAGES - 2>();
    __syncthreads();  // chunk kt is in shared memory, and every warp is done with chunk kt-1's stage
    const int next = kt + STAGES - 1;
    if (next < k_tiles) load(next, next % STAGES);
    cp_async_fence();
    const int stage = kt % STAGES;
    CUTE_UNROLL
    for (int kb = 0; kb < size<2>(tCrA); ++kb) {
      copy(s2r_a, tXsA(_, _, kb, stage), tXrA(_, _, kb));
      copy(s2r_b, tXsB(_, _, kb, stage), tXrB(_, _, kb));
      gemm(mma, tCrA(_, _, kb), tCrB(_, _, kb), tCrC);
    }
  }
  cp_async_wait<0>();
  __syncthreads();  // the next tile's loads may overwrite every stage
}

template <typename T>
__device__ __forceinline__ auto make_acc() {
  typename Kernel<T>::Mma mma;
  return partition_fragment_C(mma, Shape<Int<BM>, Int<BN>>{});
}

template <typename T>
__device__ __forceinline__ auto acc_coords() {
  typename Kernel<T>::Mma mma;
  return mma.get_slice(threadIdx.x).partition_C(make_identity_tensor(Shape<Int<BM>, Int<BN>>{}));
}

__device__ __forceinline__ float quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, 1));
  return fmaxf(v, __shfl_xor_sync(0xffffffff, v, 2));
}
__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffff, v, 1);
  return v + __shfl_xor_sync(0xffffffff, v, 2);
}
// over the 8 lanes of a warp that hold one column of the 16×8 accumulator layout (same lane % 4)
__device__ __forceinline__ float col_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, 4));
  v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, 8));
  return fmaxf(v, __shfl_xor_sync(0xffffffff, v, 16));
}
__device__ __forceinline__ float col_sum(float v) {
  v += __shfl_xor_sync(0xffffffff, v, 4);
  v += __shfl_xor_sync(0xffffffff, v, 8);
  return v + __shfl_xor_sync(0xffffffff, v, 16);
}

template <typename T>
__global__ void __launch_bounds__(THREADS) lse_sweep_kernel(const T* __restrict__ A, const T* __restrict__ B,
                                                            const float* __restrict__ scale_a,
                                                            const float* __restrict__ scale_b, float* __restrict__ lse,
                                                            float* __restrict__ pmax, float* __restrict__ psum,
                                                            int Na, int Nb, int D, int lda, int ldb, int ldp) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  auto& sm = *reinterpret_cast<typename Kernel<T>::Smem*>(smem_raw);
  const int m_blk = blockIdx.x, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  auto tCrC = make_acc<T>();
  auto tCcC = acc_coords<T>();
  // this thread's accumulator rows: value v lies in row get<0>(tCcC(v)); with warps stacked along M a thread holds
  // two rows (r and r + 8 of its warp's 16), the same for every column atom
  float sa[2], m_i[2] = {NEG_INF, NEG_INF}, l_i[2] = {0.f, 0.f};
  int rows[2];
  CUTE_UNROLL
  for (int h = 0; h < 2; ++h) {
    rows[h] = m_blk * BM + get<0>(tCcC(h * 2));
    sa[h] = rows[h] < Na ? scale_a[rows[h]] * LOG2E : 0.f;
  }
  const int n_tiles = (Nb + BN - 1) / BN;
  for (int n_blk = 0; n_blk < n_tiles; ++n_blk) {
    s_tile<T>(A, B, Na, Nb, D, lda, ldb, m_blk, n_blk, sm, tCrC);
    // rows: online max and sum over this tile's valid columns
    float tmax[2] = {NEG_INF, NEG_INF};
    CUTE_UNROLL
    for (int v = 0; v < size(tCrC); ++v) {
      const int h = (v / 2) % 2, col = n_blk * BN + get<1>(tCcC(v));
      if (col < Nb) tmax[h] = fmaxf(tmax[h], tCrC(v) * sa[h]);
    }
    float tsum[2] = {0.f, 0.f}, m_new[2];
    CUTE_UNROLL
    for (int h = 0; h < 2; ++h) m_new[h] = fmaxf(m_i[h], quad_max(tmax[h]));
    CUTE_UNROLL
    for (int v = 0; v < size(tCrC); ++v) {
      const int h = (v / 2) % 2, col = n_blk * BN + get<1>(tCcC(v));
      if (col < Nb) tsum[h] += exp2f(tCrC(v) * sa[h] - m_new[h]);
    }
    CUTE_UNROLL
    for (int h = 0; h < 2; ++h) {
      l_i[h] = l_i[h] * exp2f(m_i[h] - m_new[h]) + quad_sum(tsum[h]);
      m_i[h] = m_new[h];
    }
    // columns: this warp's 16 rows, then the 8 warps through shared memory
    CUTE_UNROLL
    for (int v = 0; v < size(tCrC); v += 4) {  // one 16×8 atom: columns c and c+1, rows r and r+8
      CUTE_UNROLL
      for (int j = 0; j < 2; ++j) {
        const int c = get<1>(tCcC(v + j)), col = n_blk * BN + c;
        const float sb = col < Nb ? scale_b[col] * LOG2E : 0.f;
        const float z0 = rows[0] < Na ? tCrC(v + j) * sb : NEG_INF;
        const float z1 = rows[1] < Na ? tCrC(v + j + 2) * sb : NEG_INF;
        const float wm = col_max(fmaxf(z0, z1));
        float ws = wm == NEG_INF ? 0.f : exp2f(z0 - wm) + exp2f(z1 - wm);
        ws = col_sum(ws);
        if (lane < 4) {
          sm.cmax[warp][c] = wm;
          sm.csum[warp][c] = ws;
        }
      }
    }
    __syncthreads();
    if (threadIdx.x < BN) {
      const int c = threadIdx.x, col = n_blk * BN + c;
      float mx = NEG_INF;
      for (int w = 0; w < WARPS; ++w) mx = fmaxf(mx, sm.cmax[w][c]);
      float sum = 0.f;
      for (int w = 0; w < WARPS; ++w) sum += sm.cmax[w][c] == NEG_INF ? 0.f : sm.csum[w][c] * exp2f(sm.cmax[w][c] - mx);
      if (col < Nb) {
        pmax[static_cast<int64_t>(m_blk) * ldp + col] = mx;
        psum[static_cast<int64_t>(m_blk) * ldp + col] = sum;
      }
    }
  }
  if (lane % 4 == 0) {
    CUTE_UNROLL
    for (int h = 0; h < 2; ++h)
      if (rows[h] < Na) lse[rows[h]] = (m_i[h] + log2f(l_i[h])) * LN2;
  }
}

template <typename T>
__global__ void __launch_bounds__(THREADS) grad_tile_kernel(
    const T* __restrict__ A, const T* __restrict__ B, const float* __restrict__ scale_a,
    const float* __restrict__ scale_b, const float* __restrict__ lse_a, const float* __restrict__ lse_b,
    const float* __restrict__ g_a, const float* __restrict__ g_b, const float* __restrict__ sigma_ptr,
    T* __restrict__ G, float* __restrict__ dscale_a, float* __restrict__ dscale_b, int row_base, int rc, int Nb,
    int D, int lda, int ldb, int ldg) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  auto& sm = *reinterpret_cast<typename Kernel<T>::Smem*>(smem_raw);
  const int m_blk = blockIdx.x, n_blk = blockIdx.y;
  auto tCrC = make_acc<T>();
  auto tCcC = acc_coords<T>();
  // the chunk's rows are rows row_base + [0, rc) of A: offset A so that the tile machinery sees a rc-row matrix
  s_tile<T>(A + static_cast<int64_t>(row_base) * lda, B, rc, Nb, D, lda, ldb, m_blk, n_blk, sm, tCrC);
  const float sigma = *sigma_ptr;
  float prow[2] = {0.f, 0.f};
  int lrow[2];
  float sa[2], la[2], ga[2];
  CUTE_UNROLL
  for (int h = 0; h < 2; ++h) {
    lrow[h] = m_blk * BM + get<0>(tCcC(h * 2));
    const bool ok = lrow[h] < rc;
    const int r = row_base + lrow[h];
    sa[h] = ok ? scale_a[r] : 0.f;
    la[h] = ok ? lse_a[r] * LOG2E : 0.f;
    ga[h] = ok ? g_a[r] : 0.f;
  }
  CUTE_UNROLL
  for (int v = 0; v < size(tCrC); v += 4) {
    CUTE_UNROLL
    for (int j = 0; j < 2; ++j) {
      const int col = n_blk * BN + get<1>(tCcC(v + j));
      const bool cok = col < Nb;
      const float sb = cok ? scale_b[col] : 0.f, lb = cok ? lse_b[col] * LOG2E : 0.f, gb = cok ? g_b[col] : 0.f;
      float qcol = 0.f;
      CUTE_UNROLL
      for (int h = 0; h < 2; ++h) {
        const float s = tCrC(v + j + 2 * h);
        const bool ok = cok && lrow[h] < rc;
        const float p = ok ? exp2f(s * sa[h] * LOG2E - la[h]) : 0.f;
        const float q = ok ? exp2f(s * sb * LOG2E - lb) : 0.f;
        prow[h] += p * s;
        qcol += q * s;
        if (ok) G[static_cast<int64_t>(lrow[h]) * ldg + col] = T((p * ga[h] * sa[h] + q * gb * sb) * sigma);
      }
      qcol = col_sum(qcol);
      if (cok && threadIdx.x % 32 < 4) atomicAdd(dscale_b + col, gb * qcol);
    }
  }
  CUTE_UNROLL
  for (int h = 0; h < 2; ++h) {
    const float s = quad_sum(prow[h]);
    if (threadIdx.x % 4 == 0 && lrow[h] < rc) atomicAdd(dscale_a + row_base + lrow[h], ga[h] * s);
  }
}

template <typename T>
constexpr int smem_bytes() { return static_cast<int>(sizeof(typename Kernel<T>::Smem)); }

template <typename T>
cudaError_t sweep_t(const void* A, const void* B, const float* scale_a, const float* scale_b, float* lse, float* pmax,
                    float* psum, int64_t Na, int64_t Nb, int64_t D, int64_t lda, int64_t ldb, int64_t ldp,
                    cudaStream_t stream) {
  auto kernel = lse_sweep_kernel<T>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes<T>());
  if (err != cudaSuccess) return err;
  const int blocks = static_cast<int>((Na + BM - 1) / BM);
  kernel<<<blocks, THREADS, smem_bytes<T>(), stream>>>(
      static_cast<const T*>(A), static_cast<const T*>(B), scale_a, scale_b, lse, pmax, psum, static_cast<int>(Na),
      static_cast<int>(Nb), static_cast<int>(D), static_cast<int>(lda), static_cast<int>(ldb), static_cast<int>(ldp));
  return cudaGetLastError();
}

template <typename T>
cudaError_t grad_t(const void* A, const void* B, const float* scale_a, const float* scale_b, const float* lse_a,
                   const float* lse_b, const float* g_a, const float* g_b, const float* sigma, void* G,
                   float* dscale_a, float* dscale_b, int64_t row_base, int64_t rc, int64_t Nb, int64_t D, int64_t lda,
                   int64_t ldb, int64_t ldg, cudaStream_t stream) {
  auto kernel = grad_tile_kernel<T>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes<T>());
  if (err != cudaSuccess) return err;
  dim3 grid(static_cast<unsigned>((rc + BM - 1) / BM), static_cast<unsigned>((Nb + BN - 1) / BN));
  kernel<<<grid, THREADS, smem_bytes<T>(), stream>>>(
      static_cast<const T*>(A), static_cast<const T*>(B), scale_a, scale_b, lse_a, lse_b, g_a, g_b, sigma,
      static_cast<T*>(G), dscale_a, dscale_b, static_cast<int>(row_base), static_cast<int>(rc), static_cast<int>(Nb),
      static_cast<int>(D), static_cast<int>(lda), static_cast<int>(ldb), static_cast<int>(ldg));
  return cudaGetLastError();
}

}  // namespace

bool supported(int64_t D, int64_t lda, int64_t ldb, const void* A, const void* B) {
  auto aligned = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  return D % 8 == 0 && lda % 8 == 0 && ldb % 8 == 0 && aligned(A) && aligned(B) && D < (1LL << 31);
}

cudaError_t launch_lse_sweep(bool bf16, const void* A, const void* B, const float* scale_a, const float* scale_b,
                             float* lse, float* pmax, float* psum, int64_t Na, int64_t Nb, int64_t D, int64_t lda,
                             int64_t ldb, int64_t ldp, cudaStream_t stream) {
  return bf16 ? sweep_t<bfloat16_t>(A, B, scale_a, scale_b, lse, pmax, psum, Na, Nb, D, lda, ldb, ldp, stream)
              : sweep_t<half_t>(A, B, scale_a, scale_b, lse, pmax, psum, Na, Nb, D, lda, ldb, ldp, stream);
}

cudaError_t launch_grad_tile(bool bf16, const void* A, const void* B, const float* scale_a, const float* scale_b,
                             const float* lse_a, const float* lse_b, const float* g_a, const float* g_b,
                             const float* sigma, void* G, float* dscale_a, float* dscale_b, int64_t row_base,
                             int64_t rc, int64_t Nb, int64_t D, int64_t lda, int64_t ldb, int64_t ldg,
                             cudaStream_t stream) {
  return bf16 ? grad_t<bfloat16_t>(A, B, scale_a, scale_b, lse_a, lse_b, g_a, g_b, sigma, G, dscale_a, dscale_b,
                                   row_base, rc, Nb, D, lda, ldb, ldg, stream)
              : grad_t<half_t>(A, B, scale_a, scale_b, lse_a, lse_b, g_a, g_b, sigma, G, dscale_a, dscale_b,
                               row_base, rc, Nb, D, lda, ldb, ldg, stream);
}

}  // namespace cute_kernels
}  // namespace fastcontrast
