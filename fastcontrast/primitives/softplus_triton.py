"""Triton kernels for SigLIP's all-pairs term Σ_j softplus(s·S_ij + b), tiled; never an N×M buffer.

Forward without gradients: f_i = Σ_j softplus(l_ij) (``_softplus_rows_kernel``, one sweep of S). Forward with
gradients (``_sigmoid_grad_tile_kernel``, the same sweep): W_ij = σ(l_ij) = ∂softplus(l_ij)/∂l_ij one row-chunk
slab at a time for the two GEMMs behind it, plus per-tile Σ softplus(l), Σ σ(l)·S (scale) and Σ σ(l) (bias).
"""
from __future__ import annotations

from .triton_support import tl, triton

if triton is not None:
    from .triton_tiles import _s_tile, _slab_tile

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
    def _sigmoid_grad_tile_kernel(A, B, scale_ptr, bias_ptr, W, PART, row0, Na_chunk, Nb, D, stride_am, stride_bm,
                                  stride_wm, stride_p, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """One tile of the fused forward sweep (grid: row tiles of the slab × column tiles): l = s·S_ij + b,
        W_ij = σ(l_ij) into the slab, and this tile's Σ softplus(l), Σ σ(l)·S and Σ σ(l) to PART[0..2, tile]
        (tile = pid0·#pid1 + pid1): no atomics, the host sums the partials in a fixed order."""
        local, rows, row_mask, cols, col_mask = _slab_tile(row0, Na_chunk, Nb, BLOCK_M, BLOCK_N)
        t = _s_tile(A, B, A, B, rows, cols, row_mask, col_mask, D, D, 1, stride_am, stride_bm,
                    False, False, PRECISION, UPCAST, BLOCK_M, BLOCK_N, BLOCK_K)
        s = tl.load(scale_ptr)
        b = tl.load(bias_ptr)
        valid = row_mask[:, None] & col_mask[None, :]
        z = t * s + b
        e = tl.exp(-tl.abs(z))  # one exp for both: softplus(z) = max(z, 0) + log(1 + e), σ(z) from e
        sp = tl.where(valid, tl.maximum(z, 0.0) + tl.log(1.0 + e), 0.0)
        sig = tl.where(valid, tl.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e)), 0.0)
        tl.store(W + local[:, None] * stride_wm + cols[None, :], sig.to(W.dtype.element_ty), mask=valid)
        tile = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
        tl.store(PART + tile, tl.sum(tl.sum(sp, axis=1), axis=0))
        tl.store(PART + stride_p + tile, tl.sum(tl.sum(sig * t, axis=1), axis=0))
        tl.store(PART + 2 * stride_p + tile, tl.sum(tl.sum(sig, axis=1), axis=0))
