// Soft-target cross-entropy over a tiled score matrix on the CPU: the cluster-softmax loss of the codebook family.
//   ℓ_i = −Σ_k T_ik log softmax_k(s·⟨x_i, y_k⟩) = (Σ_k T_ik)·lse_i − s·Σ_k T_ik ⟨x_i, y_k⟩
//   ∂ℓ_i/∂S_ik = s·((Σ_k T_ik)·P_ik − T_ik),   P = softmax_k(s·S)
// The target term rides in the same pass as the log-sum-exp (forward) and in the same gradient block G (backward),
// so one GEMM forward and three backward (recompute S, G·Y, Gᵀ·X) — no separate T·Y GEMM, no column statistics.
// Memory: one R × K block of S/G (byte budget), the targets T (N × K, given) and O(N) statistics.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "cpu_math.h"

namespace {

using fastcontrast::fast_exp;
using fastcontrast::for_each_row_block;

template <typename T>
void soft_ce_forward_impl(const at::Tensor& x, const at::Tensor& y, const T* tgt, T scale, T* loss, T* lse,
                          int64_t budget) {
  const int64_t k = y.size(0);
  for_each_row_block<T>(x, y, budget, [&](int64_t r0, int64_t rc, const at::Tensor&, at::Tensor& s) {
    const T* S = s.data_ptr<T>();
    at::parallel_for(0, rc, 16, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const T* row = S + i * k;
        const T* t = tgt + (r0 + i) * k;
        T mx = -std::numeric_limits<T>::infinity(), dot = 0, mass = 0;
        for (int64_t j = 0; j < k; ++j) {
          mx = std::max(mx, scale * row[j]);
          dot += t[j] * row[j];
          mass += t[j];
        }
        T sum = 0;
#pragma omp simd reduction(+ : sum)
        for (int64_t j = 0; j < k; ++j) sum += fast_exp<T>(scale * row[j] - mx);
        const T l = mx + std::log(sum);
        lse[r0 + i] = l;
        loss[r0 + i] = mass * l - scale * dot;
      }
    });
  });
}

template <typename T>
void soft_ce_backward_impl(const T* g, const at::Tensor& x, const at::Tensor& y, const T* tgt, T scale, const T* lse,
                           at::Tensor& dx, at::Tensor& dy, int64_t budget) {
  const int64_t k = y.size(0);
  for_each_row_block<T>(x, y, budget, [&](int64_t r0, int64_t rc, const at::Tensor& xb, at::Tensor& s) {
    T* S = s.data_ptr<T>();
    // G_ik = g_i·s·(mass_i·P_ik − T_ik), written over S
    at::parallel_for(0, rc, 16, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        T* row = S + i * k;
        const T* t = tgt + (r0 + i) * k;
        T mass = 0;
#pragma omp simd reduction(+ : mass)
        for (int64_t j = 0; j < k; ++j) mass += t[j];
        const T w = g[r0 + i] * scale, l = lse[r0 + i];
#pragma omp simd
        for (int64_t j = 0; j < k; ++j) row[j] = w * (mass * fast_exp<T>(scale * row[j] - l) - t[j]);
      }
    });
    dx.narrow(0, r0, rc).copy_(at::mm(s, y));
    dy.addmm_(s.t(), xb);
  });
}

void check2d(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.dim() == 2 && t.is_contiguous(), name, " must be a contiguous 2-D CPU tensor");
}

void check_args(const at::Tensor& x, const at::Tensor& y, const at::Tensor& t) {
  check2d(x, "x");
  check2d(y, "y");
  check2d(t, "targets");
  TORCH_CHECK(x.size(1) == y.size(1), "x and y must share the feature dim");
  TORCH_CHECK(t.size(0) == x.size(0) && t.size(1) == y.size(0), "targets must be (N, K)");
  TORCH_CHECK(x.scalar_type() == y.scalar_type() && t.scalar_type() == x.scalar_type(),
              "x, y, targets must share one dtype");
}

}  // namespace

// x (N, D), y (K, D), targets (N, K), one float dtype (fp32/fp64) -> per-row loss (N,), lse (N,)
std::vector<at::Tensor> soft_ce_cpu_forward(at::Tensor x, at::Tensor y, at::Tensor targets, double scale,
                                            int64_t budget_bytes) {
  check_args(x, y, targets);
  auto loss = at::empty({x.size(0)}, x.options());
  auto lse = at::empty({x.size(0)}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "soft_ce_cpu_forward", [&] {
    soft_ce_forward_impl<scalar_t>(x, y, targets.data_ptr<scalar_t>(), static_cast<scalar_t>(scale),
                                   loss.data_ptr<scalar_t>(), lse.data_ptr<scalar_t>(), budget_bytes);
  });
  return {loss, lse};
}

// g: gradient of the per-row losses (N,) -> dx (N, D), dy (K, D); no gradient to the targets
std::vector<at::Tensor> soft_ce_cpu_backward(at::Tensor g, at::Tensor x, at::Tensor y, at::Tensor targets,
                                             double scale, at::Tensor lse, int64_t budget_bytes) {
  check_args(x, y, targets);
  g = g.to(x.scalar_type()).contiguous();
  lse = lse.contiguous();
  auto dx = at::empty_like(x);
  auto dy = at::zeros_like(y);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "soft_ce_cpu_backward", [&] {
    soft_ce_backward_impl<scalar_t>(g.data_ptr<scalar_t>(), x, y, targets.data_ptr<scalar_t>(),
                                    static_cast<scalar_t>(scale), lse.data_ptr<scalar_t>(), dx, dy, budget_bytes);
  });
  return {dx, dy};
}
