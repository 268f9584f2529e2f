// Sinkhorn–Knopp on the CPU, in log space and potential form (the Triton kernel's math,
// fastcontrast/ops/codebook/triton_kernels.py): log Q_ik = s_ik/ε + u_i + v_k, and each half-iteration of the
// reference (columns to mass N/K, then rows to 1) only updates one potential:
//   v_k = log(N/K) − lse_i(s_ik/ε + u_i),   u_i = −lse_k(s_ik/ε + v_k).
// So the iterations read the scores and write two vectors; the only N×K write is Q at the end.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "cpu_math.h"

namespace {

using fastcontrast::fast_exp;

template <typename T>
void sinkhorn_impl(const T* S, int64_t n, int64_t k, T inv_eps, int64_t n_iters, T* Q) {
  const T ninf = -std::numeric_limits<T>::infinity();
  const T log_col = std::log(static_cast<T>(n) / static_cast<T>(k));
  std::vector<T> u(n, T(0)), v(k, T(0));
  // column pass: rows are split into chunks, each chunk keeps its own (max, Σexp) per column over contiguous row
  // segments, then the chunks are merged; row-major S is never walked down a column
  const int64_t n_chunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads() * 4, (n + 63) / 64));
  const int64_t chunk = (n + n_chunks - 1) / n_chunks;
  std::vector<T> pmax(n_chunks * k), psum(n_chunks * k);
  for (int64_t it = 0; it < n_iters; ++it) {
    at::parallel_for(0, n_chunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        T* mx = pmax.data() + c * k;
        T* sm = psum.data() + c * k;
        std::fill(mx, mx + k, ninf);
        std::fill(sm, sm + k, T(0));
        const int64_t i0 = c * chunk, i1 = std::min(n, i0 + chunk);
        for (int64_t i = i0; i < i1; ++i) {
          const T* row = S + i * k;
          const T ui = u[i];
          for (int64_t j = 0; j < k; ++j) mx[j] = std::max(mx[j], row[j] * inv_eps + ui);
        }
        for (int64_t i = i0; i < i1; ++i) {
          const T* row = S + i * k;
          const T ui = u[i];
#pragma omp simd
          for (int64_t j = 0; j < k; ++j) sm[j] += fast_exp<T>(row[j] * inv_eps + ui - mx[j]);
        }
      }
    });
    at::parallel_for(0, k, 256, [&](int64_t j0, int64_t j1) {
      for (int64_t j = j0; j < j1; ++j) {
        T m = ninf;
        for (int64_t c = 0; c < n_chunks; ++c) m = std::max(m, pmax[c * k + j]);
        T s = 0;
        for (int64_t c = 0; c < n_chunks; ++c)
          if (pmax[c * k + j] != ninf) s += psum[c * k + j] * fast_exp<T>(pmax[c * k + j] - m);
        v[j] = log_col - (m + std::log(s));
      }
    });
    // row pass: two sweeps over one contiguous row
    at::parallel_for(0, n, 16, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const T* row = S + i * k;
        T m = ninf;
        for (int64_t j = 0; j < k; ++j) m = std::max(m, row[j] * inv_eps + v[j]);
        T s = 0;
#pragma omp simd reduction(+ : s)
        for (int64_t j = 0; j < k; ++j) s += fast_exp<T>(row[j] * inv_eps + v[j] - m);
        u[i] = -(m + std::log(s));
      }
    });
  }
  at::parallel_for(0, n, 16, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const T* row = S + i * k;
      T* out = Q + i * k;
      const T ui = u[i];
      // after the last row pass every exponent is ≤ 0 up to rounding, the range fast_exp is exact in
#pragma omp simd
      for (int64_t j = 0; j < k; ++j) out[j] = fast_exp<T>(row[j] * inv_eps + ui + v[j]);
    }
  });
}

}  // namespace

// scores (N, K) contiguous fp32/fp64 -> Q (N, K): rows sum to 1, columns to N/K (after the final row pass,
// columns to within the reference's own tolerance).
at::Tensor sinkhorn_cpu(at::Tensor scores, double epsilon, int64_t n_iters) {
  TORCH_CHECK(scores.device().is_cpu() && scores.dim() == 2 && scores.is_contiguous(),
              "scores must be a contiguous 2-D CPU tensor");
  TORCH_CHECK(epsilon > 0 && n_iters >= 1, "epsilon must be > 0 and n_iters >= 1");
  auto q = at::empty_like(scores);
  AT_DISPATCH_FLOATING_TYPES(scores.scalar_type(), "sinkhorn_cpu", [&] {
    sinkhorn_impl<scalar_t>(scores.data_ptr<scalar_t>(), scores.size(0), scores.size(1),
                            static_cast<scalar_t>(1.0 / epsilon), n_iters, q.data_ptr<scalar_t>());
  });
  return q;
}
