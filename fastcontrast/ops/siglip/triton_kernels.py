"""Triton kernels for SigLIP's all-pairs term Σ_j softplus(s·S_ij + b), tiled; never an N×M buffer.

Forward: f_i = Σ_j softplus(l_ij). Backward: W_ij = g_i σ(l_ij), stored (×σ-scale) one row-chunk slab at a time
for the two GEMMs; Σ_j W_ij S_ij and Σ_j W_ij are accumulated for the scale and bias gradients.
"""
from __future__ import annotations

from .._triton_support import tl, triton

if triton is not None:
    from .._triton_tiles import _s_tile, _slab_tile

    @triton.jit
    def _softplus(z):
        return tl.maximum(z, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(z)))

    @triton.jit
    def _softplus_rows_kernel(A, B, scale_ptr, bias_ptr, OUT, Na, Nb, D, stride_am, stride_bm,
                              PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr,
                              BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pid = tl.program_id(0)
        rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < Na
        s = tl.load(scale_ptr)
        b = tl.load(bias_ptr)
        acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for n0 in range(0, Nb, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            col_mask = cols < Nb
            t = _s_tile(A, B, A, B, rows, cols, row_mask, col_mask, D, D, 1, stride_am, stride_bm,
                        False, False, PRECISION, UPCAST, BLOCK_M, BLOCK_N, BLOCK_K)
            sp = _softplus(t * s + b)
            acc += tl.sum(tl.where(col_mask[None, :], sp, 0.0), axis=1)
        tl.store(OUT + rows, acc, mask=row_mask)

    @triton.jit
    def _sigmoid_grad_tile_kernel(A, B, scale_ptr, bias_ptr, g_a, sigma_ptr, W, dsum_s, dsum_b, row0, Na_chunk,
                                  Nb, D, stride_am, stride_bm, stride_wm, PRECISION: tl.constexpr,
                                  UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                                  BLOCK_K: tl.constexpr):
        local, rows, row_mask, cols, col_mask = _slab_tile(row0, Na_chunk, Nb, BLOCK_M, BLOCK_N)
        t = _s_tile(A, B, A, B, rows, cols, row_mask, col_mask, D, D, 1, stride_am, stride_bm,
                    False, False, PRECISION, UPCAST, BLOCK_M, BLOCK_N, BLOCK_K)
        s = tl.load(scale_ptr)
        b = tl.load(bias_ptr)
        sigma = tl.load(sigma_ptr)
        ga = tl.load(g_a + rows, mask=row_mask, other=0.0)
        valid = row_mask[:, None] & col_mask[None, :]
        w = tl.where(valid, ga[:, None] / (1.0 + tl.exp(-(t * s + b))), 0.0)
        tl.store(W + local[:, None] * stride_wm + cols[None, :], (w * (s * sigma)).to(W.dtype.element_ty), mask=valid)
        tl.atomic_add(dsum_s + rows, tl.sum(w * t, axis=1), mask=row_mask)
        tl.atomic_add(dsum_b + rows, tl.sum(w, axis=1), mask=row_mask)
