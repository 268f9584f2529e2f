// C++ CPU kernels for the pairwise log-sum-exp behind every InfoNCE-family loss (see
// fastcontrast/ops/infonce/triton_kernels.py for the math). Same tiling as the Triton path: row blocks of R rows,
// S_blk = X_blk·Yᵀ through BLAS (at::mm), then fused, vectorisable passes over the R×M block; the column
// statistics are merged online across blocks. Memory: one R×M block, never N×M.
//
// (The file name says CPU; it also holds the module definition, which registers the CUDA entry points when
// setup.py compiles csrc/cuda_binding.cpp and lse_pair_cuda.cu with -DFASTCONTRAST_WITH_CUDA.)
//
// Normalisation is a prologue in Python (normalised fp32 copies, O(N·D)) with its Jacobian applied there: the
// block products dominate on a CPU, and BLAS wants plain dense operands.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "cpu_math.h"

namespace {

using fastcontrast::fast_exp;
using fastcontrast::for_each_row_block;

template <typename T>
void forward_impl(const at::Tensor& x, const at::Tensor& y, const T* a, const T* c, T bias, T* lse_r, T* lse_c,
                  int64_t budget) {
  const int64_t m = y.size(0);
  std::vector<T> col_max(m, -std::numeric_limits<T>::infinity()), col_sum(m, T(0));
  for_each_row_block<T>(x, y, budget, [&](int64_t r0, int64_t rc, const at::Tensor&, at::Tensor& s) {
    const T* S = s.data_ptr<T>();
    // rows: two passes over a contiguous row (max, then Σ exp)
    at::parallel_for(0, rc, 16, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const T* row = S + i * m;
        const T ai = a[r0 + i];
        T mx = -std::numeric_limits<T>::infinity();
        for (int64_t j = 0; j < m; ++j) mx = std::max(mx, ai * row[j] + bias);
        T sum = 0;
#pragma omp simd reduction(+ : sum)
        for (int64_t j = 0; j < m; ++j) sum += fast_exp<T>(ai * row[j] + bias - mx);
        lse_r[r0 + i] = mx + std::log(sum);
      }
    });
    // columns: each thread owns a range of columns and walks the block's rows (contiguous inner loop)
    at::parallel_for(0, m, 256, [&](int64_t j0, int64_t j1) {
      const int64_t w = j1 - j0;
      std::vector<T> bmax(w, -std::numeric_limits<T>::infinity()), bsum(w, T(0));
      for (int64_t i = 0; i < rc; ++i) {
        const T* row = S + i * m + j0;
        for (int64_t j = 0; j < w; ++j) bmax[j] = std::max(bmax[j], c[j0 + j] * row[j] + bias);
      }
      for (int64_t i = 0; i < rc; ++i) {
        const T* row = S + i * m + j0;
#pragma omp simd
        for (int64_t j = 0; j < w; ++j) bsum[j] += fast_exp<T>(c[j0 + j] * row[j] + bias - bmax[j]);
      }
      for (int64_t j = 0; j < w; ++j) {
        const T nm = std::max(col_max[j0 + j], bmax[j]);
        col_sum[j0 + j] = col_sum[j0 + j] * fast_exp<T>(col_max[j0 + j] - nm) + bsum[j] * fast_exp<T>(bmax[j] - nm);
        col_max[j0 + j] = nm;
      }
    });
  });
  for (int64_t j = 0; j < m; ++j) lse_c[j] = col_max[j] + std::log(col_sum[j]);
}

template <typename T>
void backward_impl(const at::Tensor& x, const at::Tensor& y, const T* a, const T* c, T bias, const T* lse_r,
                   const T* lse_c, const T* g_r, const T* g_c, at::Tensor& dx, at::Tensor& dy, T* da, T* dc,
                   int64_t budget) {
  const int64_t m = y.size(0);
  for_each_row_block<T>(x, y, budget, [&](int64_t r0, int64_t rc, const at::Tensor& xb, at::Tensor& s) {
    T* S = s.data_ptr<T>();
    // dc_j += g_c_j Σ_i Q_ij S_ij: column-owned, before S is overwritten by G
    at::parallel_for(0, m, 256, [&](int64_t j0, int64_t j1) {
      for (int64_t i = 0; i < rc; ++i) {
        const T* row = S + i * m;
#pragma omp simd
        for (int64_t j = j0; j < j1; ++j) {
          const T q = fast_exp<T>(c[j] * row[j] + bias - lse_c[j]);
          dc[j] += g_c[j] * q * row[j];
        }
      }
    });
    // G_ij = g_i a_i P_ij + h_j c_j Q_ij in place of S; da_i = g_i Σ_j P_ij S_ij
    at::parallel_for(0, rc, 16, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        T* row = S + i * m;
        const int64_t gi = r0 + i;
        const T ai = a[gi], wi = g_r[gi] * a[gi], li = lse_r[gi];
        T acc = 0;
#pragma omp simd reduction(+ : acc)
        for (int64_t j = 0; j < m; ++j) {
          const T sv = row[j];
          const T p = fast_exp<T>(ai * sv + bias - li);
          const T q = fast_exp<T>(c[j] * sv + bias - lse_c[j]);
          acc += p * sv;
          row[j] = wi * p + g_c[j] * c[j] * q;
        }
        da[gi] = g_r[gi] * acc;
      }
    });
    dx.narrow(0, r0, rc).copy_(at::mm(s, y));
    dy.addmm_(s.t(), xb);
  });
}

void check(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(t.dim() == 2 && t.is_contiguous(), name, " must be a contiguous 2-D tensor");
}

}  // namespace

// lse_pair forward: x (N, D), y (M, D), a (N,), c (M,) in one float dtype (fp32 or fp64).
std::vector<at::Tensor> lse_pair_cpu_forward(at::Tensor x, at::Tensor y, at::Tensor a, at::Tensor c, double bias,
                                             int64_t budget_bytes) {
  check(x, "x");
  check(y, "y");
  TORCH_CHECK(x.scalar_type() == y.scalar_type() && a.scalar_type() == x.scalar_type() &&
                  c.scalar_type() == x.scalar_type(), "x, y, a, c must share one dtype");
  auto lse_r = at::empty({x.size(0)}, x.options());
  auto lse_c = at::empty({y.size(0)}, x.options());
  a = a.contiguous();
  c = c.contiguous();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "lse_pair_cpu_forward", [&] {
    forward_impl<scalar_t>(x, y, a.data_ptr<scalar_t>(), c.data_ptr<scalar_t>(), static_cast<scalar_t>(bias),
                           lse_r.data_ptr<scalar_t>(), lse_c.data_ptr<scalar_t>(), budget_bytes);
  });
  return {lse_r, lse_c};
}

// Backward w.r.t. the (already normalised) x, y and the scales: returns dx, dy, da, dc.
std::vector<at::Tensor> lse_pair_cpu_backward(at::Tensor g_r, at::Tensor g_c, at::Tensor x, at::Tensor y, at::Tensor a,
                                              at::Tensor c, double bias, at::Tensor lse_r, at::Tensor lse_c,
                                              int64_t budget_bytes) {
  check(x, "x");
  check(y, "y");
  auto dx = at::empty_like(x);
  auto dy = at::zeros_like(y);
  auto da = at::empty_like(a);
  auto dc = at::zeros_like(c);
  g_r = g_r.contiguous();
  g_c = g_c.contiguous();
  a = a.contiguous();
  c = c.contiguous();
  lse_r = lse_r.contiguous();
  lse_c = lse_c.contiguous();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "lse_pair_cpu_backward", [&] {
    backward_impl<scalar_t>(x, y, a.data_ptr<scalar_t>(), c.data_ptr<scalar_t>(), static_cast<scalar_t>(bias),
                            lse_r.data_ptr<scalar_t>(), lse_c.data_ptr<scalar_t>(), g_r.data_ptr<scalar_t>(),
                            g_c.data_ptr<scalar_t>(), dx, dy, da.data_ptr<scalar_t>(), dc.data_ptr<scalar_t>(),
                            budget_bytes);
  });
  return {dx, dy, da, dc};
}

#ifdef FASTCONTRAST_WITH_CUDA
std::vector<at::Tensor> lse_pair_cuda_forward(at::Tensor x, at::Tensor y, at::Tensor a, at::Tensor c, double bias);
std::vector<at::Tensor> lse_pair_cuda_backward(at::Tensor g_r, at::Tensor g_c, at::Tensor x, at::Tensor y,
                                               at::Tensor a, at::Tensor c, double bias, at::Tensor lse_r,
                                               at::Tensor lse_c, int64_t budget_bytes);
at::Tensor sinkhorn_cuda(at::Tensor scores, double epsilon, int64_t n_iters);
bool has_cute();  // cuda_binding.cpp
#endif

at::Tensor sinkhorn_cpu(at::Tensor scores, double epsilon, int64_t n_iters);  // sinkhorn_cpu.cpp
std::vector<at::Tensor> soft_ce_cpu_forward(at::Tensor x, at::Tensor y, at::Tensor targets, double scale,
                                            int64_t budget_bytes);  // soft_ce_cpu.cpp
std::vector<at::Tensor> soft_ce_cpu_backward(at::Tensor g, at::Tensor x, at::Tensor y, at::Tensor targets,
                                             double scale, at::Tensor lse, int64_t budget_bytes);

bool has_cuda() {
#ifdef FASTCONTRAST_WITH_CUDA
  return true;
#else
  return false;
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastcontrast C++ kernels (CPU; CUDA when built with nvcc)";
  m.def("lse_pair_cpu_forward", &lse_pair_cpu_forward, "pairwise row/column log-sum-exp, tiled (CPU)");
  m.def("lse_pair_cpu_backward", &lse_pair_cpu_backward, "its backward, tiled (CPU)");
  m.def("sinkhorn_cpu", &sinkhorn_cpu, "Sinkhorn-Knopp in log space, potential form (CPU)");
  m.def("soft_ce_cpu_forward", &soft_ce_cpu_forward, "soft-target cross-entropy rows over tiled scores (CPU)");
  m.def("soft_ce_cpu_backward", &soft_ce_cpu_backward, "its backward (CPU)");
  m.def("has_cuda", &has_cuda, "whether CUDA kernels were compiled in");
#ifdef FASTCONTRAST_WITH_CUDA
  m.def("lse_pair_cuda_forward", &lse_pair_cuda_forward, "pairwise row/column log-sum-exp, tiled (CUDA, WMMA)");
  m.def("lse_pair_cuda_backward", &lse_pair_cuda_backward, "its backward: G slabs + cuBLAS GEMMs (CUDA)");
  m.def("sinkhorn_cuda", &sinkhorn_cuda, "Sinkhorn-Knopp in log space, potential form (CUDA)");
  m.def("has_cute", &has_cute, "whether the CuTe kernels (lse_pair_cute.cu) were compiled in");
#endif
}
