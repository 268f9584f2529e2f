// Shared helpers of the C++ CPU kernels.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#include <algorithm>

namespace fastcontrast {

// exp(x) for x <= 0 (every call here subtracts a running max first). The generic version is std::exp: float64
// is the dtype that validates everything else, so it must be exact to double rounding (a polynomial tuned for
// float gave 1e-8 relative errors there).
template <typename T>
inline T fast_exp(T x) {
  return std::exp(x);
}

// float: written so that gcc vectorises the loops around it (no libm call): 2^(x·log2 e) = 2^k · p(f), p a
// degree-6 minimax polynomial on [-0.5, 0.5] (relative error < 2e-7, about one float ulp).
template <>
inline float fast_exp<float>(float x) {
  x = x < -87.0f ? -87.0f : x;
  const float t = x * 1.44269504f;
  const float kf = (t + 12582912.0f) - 12582912.0f;  // round to nearest via 1.5·2^23: SSE2-vectorisable
  const float f = (t - kf) * 0.69314718f;
  float p = 1.0f / 720;
  p = p * f + 1.0f / 120;
  p = p * f + 1.0f / 24;
  p = p * f + 1.0f / 6;
  p = p * f + 0.5f;
  p = p * f + 1.0f;
  p = p * f + 1.0f;
  // 2^k through the exponent bits: vectorisable, unlike ldexp
  const int32_t k = static_cast<int32_t>(kf);
  int32_t bits;
  std::memcpy(&bits, &p, sizeof(bits));
  bits += k << 23;
  float r;
  std::memcpy(&r, &bits, sizeof(r));
  return r;
}

// Rows of one R × m block of `elt`-byte elements within the byte budget, and at most half of n, so an n × m buffer
// never exists (fastcontrast/ops/_tiles.py: rows_per_block).
inline int64_t rows_per_block(int64_t n, int64_t m, int64_t budget_bytes, int64_t elt) {
  int64_t r = budget_bytes / (elt * std::max<int64_t>(m, 1));
  r = std::max<int64_t>(1, r);
  return std::max<int64_t>(1, std::min<int64_t>(r, (n + 1) / 2));
}

// The row-block driver of every tiled CPU kernel: body(r0, rc, xb, s) for each block of rc rows, with
// xb = x[r0 : r0 + rc] and s = xb·yᵀ (rc × m, contiguous, through BLAS); s is the block's scratch, which a backward
// may overwrite with its gradient weights. Only one block of s exists at a time.
template <typename T, typename Body>
void for_each_row_block(const at::Tensor& x, const at::Tensor& y, int64_t budget_bytes, Body&& body) {
  const int64_t n = x.size(0);
  const int64_t R = rows_per_block(n, y.size(0), budget_bytes, sizeof(T));
  const at::Tensor yt = y.t();
  for (int64_t r0 = 0; r0 < n; r0 += R) {
    const int64_t rc = std::min(R, n - r0);
    const at::Tensor xb = x.narrow(0, r0, rc);
    at::Tensor s = at::mm(xb, yt).contiguous();
    body(r0, rc, xb, s);
  }
}

}  // namespace fastcontrast
