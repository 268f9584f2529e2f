"""Triton kernels for the pairwise log-sum-exp at the heart of every InfoNCE-family loss.

One primitive serves CLIP, oblique (K tokens) and per-sample temperature losses:

    S_ij       = Σ_k r_ik q_jk ⟨x_ik, y_jk⟩          (r, q: per-token inverse norms, 1 when not normalising)
    lse_row_i  = log Σ_j exp(a_i S_ij + b)            (a: per-row scale, b: bias)
    lse_col_j  = log Σ_i exp(c_j S_ij + b)            (c: per-column scale)

Forward, one sweep of S (``_lse_fwd_kernel``): a program owns BLOCK_M rows and walks every column tile once,
keeping the row statistics online in registers and writing each tile's column statistics (max and Σexp over its
rows) to a (row blocks × M) buffer that a small reduction merges. S is computed once, not once per direction:
that buffer, 2·⌈N/BLOCK_M⌉·M floats (256 MiB at N = M = 64k, BLOCK_M = 128), is the price. No tile of S is kept.

Backward, with upstream grads g (rows) and h (columns):

    G_ij  = g_i a_i P_ij + h_j c_j Q_ij,   P = exp(a S + b − lse_row), Q = exp(c S + b − lse_col)
    dX̂ = G Ŷ,  dŶ = Gᵀ X̂,  da_i = g_i Σ_j P_ij S_ij,  dc_j = h_j Σ_i Q_ij S_ij

S is recomputed tile by tile (as FlashAttention does) by ``_grad_tile_kernel``, which writes G for one chunk
of R rows (an R×M slab, R fixed by a byte budget, so memory stays O(M)); the two products with the slab then
run as dense GEMMs. Forward + backward: 4 units of 2·N·M·D (the sweep, the recompute, two GEMMs). Keeping a
BLOCK_M×D accumulator in registers instead (the FlashAttention layout) does not fit for D = 768..1024 and forced
a recompute of S per D-chunk: measured 3.5× slower on an H100 (RESULTS.md). G is stored scaled by
σ = 1/max|g·a|, so fp16 slabs neither overflow nor flush small probabilities to zero.
"""
from __future__ import annotations

from .._triton_support import tl, triton

if triton is not None:
    from .._triton_tiles import LN2, LOG2E, _s_tile, _slab_tile

    @triton.jit
    def _lse_fwd_kernel(A, B, inv_a, inv_b, scale_a, scale_b, bias_ptr, LSE, PMAX, PSUM, Na, Nb, D, DT, K,
                        stride_am, stride_bm, stride_p, NORM: tl.constexpr, MULTI: tl.constexpr,
                        HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """Rows' lse (base e) to LSE; this row block's column max and Σ2^(z − max) (base 2) to PMAX/PSUM[pid]."""
        pid = tl.program_id(0)
        rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < Na
        sa = tl.load(scale_a + rows, mask=row_mask, other=1.0) * LOG2E  # base-2 logits: exp2 is the fast path
        bias = tl.load(bias_ptr) * LOG2E if HAS_BIAS else 0.0
        m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for n0 in range(0, Nb, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            col_mask = cols < Nb
            s = _s_tile(A, B, inv_a, inv_b, rows, cols, row_mask, col_mask, D, DT, K, stride_am, stride_bm,
                        NORM, MULTI, PRECISION, UPCAST, BLOCK_M, BLOCK_N, BLOCK_K)
            # rows: online over the column tiles
            z = tl.where(col_mask[None, :], s * sa[:, None] + bias, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(z, axis=1))
            l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(z - m_new[:, None]), axis=1)
            m_i = m_new
            # columns: this tile's partial statistics, merged over the row blocks afterwards
            sb = tl.load(scale_b + cols, mask=col_mask, other=1.0) * LOG2E
            zc = tl.where(row_mask[:, None], s * sb[None, :] + bias, float("-inf"))
            cm = tl.max(zc, axis=0)
            cs = tl.sum(tl.exp2(zc - cm[None, :]), axis=0)
            tl.store(PMAX + pid * stride_p + cols, cm, mask=col_mask)
            tl.store(PSUM + pid * stride_p + cols, cs, mask=col_mask)
        tl.store(LSE + rows, (m_i + tl.log2(l_i)) * LN2, mask=row_mask)

    @triton.jit
    def _grad_tile_kernel(A, B, inv_a, inv_b, scale_a, scale_b, bias_ptr, lse_a, lse_b, g_a, g_b, sigma_ptr,
                          G, dscale_a, dscale_b, row0, Na_chunk, Nb, D, DT, K, stride_am, stride_bm, stride_gm,
                          NORM: tl.constexpr, MULTI: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
                          UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_K: tl.constexpr):
        """One S tile -> σ·G tile stored to the row-chunk slab; Σ P·S and Σ Q·S added to the scale grads."""
        local, rows, row_mask, cols, col_mask = _slab_tile(row0, Na_chunk, Nb, BLOCK_M, BLOCK_N)
        s = _s_tile(A, B, inv_a, inv_b, rows, cols, row_mask, col_mask, D, DT, K, stride_am, stride_bm,
                    NORM, MULTI, PRECISION, UPCAST, BLOCK_M, BLOCK_N, BLOCK_K)
        sa = tl.load(scale_a + rows, mask=row_mask, other=0.0)
        la = tl.load(lse_a + rows, mask=row_mask, other=0.0) * LOG2E
        ga = tl.load(g_a + rows, mask=row_mask, other=0.0)
        sb = tl.load(scale_b + cols, mask=col_mask, other=0.0)
        lb = tl.load(lse_b + cols, mask=col_mask, other=0.0) * LOG2E
        gb = tl.load(g_b + cols, mask=col_mask, other=0.0)
        bias = tl.load(bias_ptr) * LOG2E if HAS_BIAS else 0.0
        sigma = tl.load(sigma_ptr)
        valid = row_mask[:, None] & col_mask[None, :]
        p = tl.where(valid, tl.exp2(s * (sa * LOG2E)[:, None] + bias - la[:, None]), 0.0)
        q = tl.where(valid, tl.exp2(s * (sb * LOG2E)[None, :] + bias - lb[None, :]), 0.0)
        g = p * (ga * sa * sigma)[:, None] + q * (gb * sb * sigma)[None, :]
        tl.store(G + local[:, None] * stride_gm + cols[None, :], g.to(G.dtype.element_ty), mask=valid)
        tl.atomic_add(dscale_a + rows, ga * tl.sum(p * s, axis=1), mask=row_mask)
        tl.atomic_add(dscale_b + cols, gb * tl.sum(q * s, axis=0), mask=col_mask)
