// PyTorch binding of the CUDA kernels (lse_pair_cuda.cu). Compiled only with a CUDA build of torch
// (setup.py, or the JIT loader in fastcontrast/_ext.py on a GPU machine).
#include <torch/extension.h>
#include <torch/version.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "lse_pair_cuda.h"
#include "sinkhorn_cuda.h"
#ifdef FASTCONTRAST_WITH_CUTE
#include <cstdlib>
#include <cstring>

#include "lse_pair_cute.h"
#endif

namespace {

fastcontrast::DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return fastcontrast::DType::kFloat;
    case at::kHalf: return fastcontrast::DType::kHalf;
    case at::kBFloat16: return fastcontrast::DType::kBFloat16;
    default: TORCH_CHECK(false, "fastcontrast CUDA kernels take float32, float16 or bfloat16, got ", t.scalar_type());
  }
  return fastcontrast::DType::kFloat;
}

void check(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.dim() == 2 && t.is_contiguous(), name, " must be a contiguous 2-D CUDA tensor");
}

void ok(cudaError_t e) { TORCH_CHECK(e == cudaSuccess, "fastcontrast CUDA kernel failed: ", cudaGetErrorString(e)); }

// out (fp32) = a·b, or += a·b, for 16-bit a, b without a 16-bit product: addmm.dtype accumulates into out itself
// where this torch allows an fp32 self (newer releases), else mm.dtype writes an fp32 product that is added;
// torch before 2.9 has neither, and the product is rounded to a's dtype first (the pre-issue-17 behaviour).
void gemm_into(at::Tensor out, const at::Tensor& a, const at::Tensor& b, bool accumulate) {
  if (a.scalar_type() == out.scalar_type()) {
    if (accumulate) out.addmm_(a, b);
    else at::mm_out(out, a, b);
    return;
  }
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 9)
  static int mode = -1;  // 0: addmm.dtype into out, 1: mm.dtype then add (probed on the first call)
  if (mode != 1) {
    try {
      at::addmm_out(out, out, a, b, out.scalar_type(), accumulate ? 1 : 0, 1);
      mode = 0;
      return;
    } catch (const c10::Error&) {
      if (mode == 0) throw;
      mode = 1;
    }
  }
  if (accumulate) out.add_(at::mm(a, b, out.scalar_type()));
  else at::mm_out(out, a, b, out.scalar_type());
#else
  if (accumulate) out.add_(at::mm(a, b));
  else out.copy_(at::mm(a, b));
#endif
}

// The CuTe kernels (lse_pair_cute.cu) take fp16/bf16 operands with D % 8 == 0 and 16-byte rows. Until a GPU run
// has validated them they are opt-in: FASTCONTRAST_CUTE=1.
bool use_cute(const at::Tensor& x, const at::Tensor& y) {
#ifdef FASTCONTRAST_WITH_CUTE
  static const bool on = [] {
    const char* v = std::getenv("FASTCONTRAST_CUTE");
    return v != nullptr && std::strcmp(v, "1") == 0;
  }();
  const auto t = x.scalar_type();
  return on && (t == at::kHalf || t == at::kBFloat16) &&
         fastcontrast::cute_kernels::supported(x.size(1), x.stride(0), y.stride(0), x.data_ptr(), y.data_ptr());
#else
  (void)x;
  (void)y;
  return false;
#endif
}

}  // namespace

bool has_cute() {
#ifdef FASTCONTRAST_WITH_CUTE
  return true;
#else
  return false;
#endif
}

std::vector<at::Tensor> lse_pair_cuda_forward(at::Tensor x, at::Tensor y, at::Tensor a, at::Tensor c, double bias) {
  check(x, "x");
  check(y, "y");
  TORCH_CHECK(x.scalar_type() == y.scalar_type(), "x and y must share a dtype");
  a = a.to(at::kFloat).contiguous();
  c = c.to(at::kFloat).contiguous();
  auto lse_r = at::empty({x.size(0)}, x.options().dtype(at::kFloat));
  auto lse_c = at::empty({y.size(0)}, x.options().dtype(at::kFloat));
  auto stream = c10::cuda::getCurrentCUDAStream().stream();
#ifdef FASTCONTRAST_WITH_CUTE
  if (use_cute(x, y) && bias == 0.0) {  // one sweep: rows' lse + per-block column partials, merged here (base 2)
    const int64_t blocks = (x.size(0) + 127) / 128;
    auto pmax = at::empty({blocks, y.size(0)}, x.options().dtype(at::kFloat));
    auto psum = at::empty({blocks, y.size(0)}, x.options().dtype(at::kFloat));
    ok(fastcontrast::cute_kernels::launch_lse_sweep(
        x.scalar_type() == at::kBFloat16, x.data_ptr(), y.data_ptr(), a.data_ptr<float>(), c.data_ptr<float>(),
        lse_r.data_ptr<float>(), pmax.data_ptr<float>(), psum.data_ptr<float>(), x.size(0), y.size(0), x.size(1),
        x.stride(0), y.stride(0), pmax.stride(0), stream));
    auto top = pmax.amax(0);
    lse_c = (top + at::log2((psum * at::exp2(pmax - top)).sum(0))) * 0.6931471805599453;
    return {lse_r, lse_c};
  }
#endif
  const auto dt = dtype_of(x);
  ok(fastcontrast::launch_lse_rows(dt, x.data_ptr(), y.data_ptr(), a.data_ptr<float>(), static_cast<float>(bias),
                                   lse_r.data_ptr<float>(), x.size(0), y.size(0), x.size(1), x.stride(0), y.stride(0),
                                   stream));
  ok(fastcontrast::launch_lse_rows(dt, y.data_ptr(), x.data_ptr(), c.data_ptr<float>(), static_cast<float>(bias),
                                   lse_c.data_ptr<float>(), y.size(0), x.size(0), x.size(1), y.stride(0), x.stride(0),
                                   stream));
  return {lse_r, lse_c};
}

// Gradients w.r.t. x̂, ŷ (fp32) and the scales: G one slab of R rows at a time, then two cuBLAS GEMMs with fp32
// output into the fp32 gradients (gemm_into); R from the byte budget.
std::vector<at::Tensor> lse_pair_cuda_backward(at::Tensor g_r, at::Tensor g_c, at::Tensor x, at::Tensor y,
                                               at::Tensor a, at::Tensor c, double bias, at::Tensor lse_r,
                                               at::Tensor lse_c, int64_t budget_bytes) {
  check(x, "x");
  check(y, "y");
  const int64_t n = x.size(0), m = y.size(0);
  auto f = [](const at::Tensor& t) { return t.to(at::kFloat).contiguous(); };
  g_r = f(g_r), g_c = f(g_c), a = f(a), c = f(c), lse_r = f(lse_r), lse_c = f(lse_c);
  // σ keeps |σ·G| <= 2 for fp16 slabs (P, Q <= 1); computed on the device, no host sync
  auto sigma = at::reciprocal(at::maximum((g_r * a).abs().max(), (g_c * c).abs().max()).clamp_min(1e-30)).reshape({1});
  int64_t rows = budget_bytes / (static_cast<int64_t>(x.element_size()) * std::max<int64_t>(m, 1));
  rows = std::max<int64_t>(1, std::min<int64_t>(rows >= 64 ? rows / 64 * 64 : rows, (n + 1) / 2));
  auto slab = at::empty({std::min(rows, n), m}, x.options());
  auto dx = at::empty({n, x.size(1)}, x.options().dtype(at::kFloat));
  auto dy = at::zeros({m, x.size(1)}, x.options().dtype(at::kFloat));
  auto da = at::zeros({n}, x.options().dtype(at::kFloat));
  auto dc = at::zeros({m}, x.options().dtype(at::kFloat));
  auto stream = c10::cuda::getCurrentCUDAStream().stream();
  const bool cute = use_cute(x, y) && bias == 0.0;
  for (int64_t r0 = 0; r0 < n; r0 += rows) {
    const int64_t rc = std::min(rows, n - r0);
#ifdef FASTCONTRAST_WITH_CUTE
    if (cute) {
      ok(fastcontrast::cute_kernels::launch_grad_tile(
          x.scalar_type() == at::kBFloat16, x.data_ptr(), y.data_ptr(), a.data_ptr<float>(), c.data_ptr<float>(),
          lse_r.data_ptr<float>(), lse_c.data_ptr<float>(), g_r.data_ptr<float>(), g_c.data_ptr<float>(),
          sigma.data_ptr<float>(), slab.data_ptr(), da.data_ptr<float>(), dc.data_ptr<float>(), r0, rc, m, x.size(1),
          x.stride(0), y.stride(0), slab.stride(0), stream));
      auto g = slab.narrow(0, 0, rc);
      gemm_into(dx.narrow(0, r0, rc), g, y, false);
      gemm_into(dy, g.t(), x.narrow(0, r0, rc), true);
      continue;
    }
#endif
    (void)cute;
    ok(fastcontrast::launch_grad_tile(dtype_of(x), x.data_ptr(), y.data_ptr(), a.data_ptr<float>(), c.data_ptr<float>(),
                                      static_cast<float>(bias), lse_r.data_ptr<float>(), lse_c.data_ptr<float>(),
                                      g_r.data_ptr<float>(), g_c.data_ptr<float>(), sigma.data_ptr<float>(),
                                      slab.data_ptr(), da.data_ptr<float>(), dc.data_ptr<float>(), r0, rc, m, x.size(1),
                                      x.stride(0), y.stride(0), slab.stride(0), stream));
    auto g = slab.narrow(0, 0, rc);
    gemm_into(dx.narrow(0, r0, rc), g, y, false);  // fp32 products, accumulated in fp32
    gemm_into(dy, g.t(), x.narrow(0, r0, rc), true);
  }
  return {dx / sigma, dy / sigma, da, dc};
}

// Sinkhorn on fp32 scores (N, K): the potentials stay on the device; chunks of rows for the column statistics so a
// small K still gives the GPU enough blocks.
at::Tensor sinkhorn_cuda(at::Tensor scores, double epsilon, int64_t n_iters) {
  check(scores, "scores");
  TORCH_CHECK(scores.scalar_type() == at::kFloat, "scores must be float32 for the CUDA Sinkhorn kernel");
  TORCH_CHECK(epsilon > 0 && n_iters >= 1, "epsilon must be > 0 and n_iters >= 1");
  const int64_t n = scores.size(0), k = scores.size(1);
  const int parts = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((n + 255) / 256, 1024)));
  auto opts = scores.options();
  auto q = at::empty({n, k}, opts);
  auto u = at::zeros({n}, opts);
  auto v = at::empty({k}, opts);
  auto work = at::empty({2 * parts * k}, opts);
  ok(fastcontrast::launch_sinkhorn(scores.data_ptr<float>(), q.data_ptr<float>(), u.data_ptr<float>(),
                                   v.data_ptr<float>(), work.data_ptr<float>(), n, k, scores.stride(0),
                                   static_cast<float>(1.0 / epsilon), static_cast<float>(std::log(double(n) / k)),
                                   static_cast<int>(n_iters), parts, c10::cuda::getCurrentCUDAStream().stream()));
  return q;
}
