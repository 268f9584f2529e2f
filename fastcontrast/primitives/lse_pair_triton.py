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

from .triton_support import tl, triton

if triton is not None:
    from .triton_tiles import LN2, LOG2E, _flat_step, _norm_tile, _s_tile, _slab_tile_grouped

    @triton.jit
    def _lse_fwd_epilogue(s, rows, cols, row_mask, col_mask, sa, bias, m_i, l_i, scale_b, PMAX, PSUM, pid,
                          stride_p):
        """One finished S tile: the rows' online statistics updated, the tile's column statistics stored."""
        z = tl.where(col_mask[None, :], s * sa[:, None] + bias, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(z, axis=1))
        l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(z - m_new[:, None]), axis=1)
        sb = tl.load(scale_b + cols, mask=col_mask, other=1.0) * LOG2E
        zc = tl.where(row_mask[:, None], s * sb[None, :] + bias, float("-inf"))
        cm = tl.max(zc, axis=0)
        cs = tl.sum(tl.exp2(zc - cm[None, :]), axis=0)
        tl.store(PMAX + pid * stride_p + cols, cm, mask=col_mask)
        tl.store(PSUM + pid * stride_p + cols, cs, mask=col_mask)
        return m_new, l_i

    @triton.jit
    def _lse_fwd_kernel(A, B, inv_a, inv_b, scale_a, scale_b, bias_ptr, LSE, PMAX, PSUM, RMAX, RSUM, Na, Nb, D, DT,
                        K, stride_am, stride_bm, stride_p, NORM: tl.constexpr, MULTI: tl.constexpr,
                        HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        FLAT: tl.constexpr = False):
        """Rows' lse (base e) to LSE; this row block's column max and Σ2^(z − max) (base 2) to PMAX/PSUM[pid].

        Grid (row blocks, column splits). With one split the program walks every column tile and writes LSE;
        with several (so that small N still fills the GPU) split s walks its share of the column tiles and
        writes its rows' max and Σ2^(z − max) (base 2) to RMAX/RSUM[s], which the launcher merges.
        FLAT (one K token): one loop over (column tile, K-chunk) pairs, so the copies of the next tile's first
        K-chunks are issued while this tile's last ones multiply — the K pipeline never restarts cold at a
        column tile, as the nested loop's does (its ttgir drains every copy and MMA group per column tile).
        """
        pid = tl.program_id(0)
        split = tl.program_id(1)
        n_split = tl.num_programs(1)
        rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < Na
        sa = tl.load(scale_a + rows, mask=row_mask, other=1.0) * LOG2E  # base-2 logits: exp2 is the fast path
        bias = tl.load(bias_ptr) * LOG2E if HAS_BIAS else 0.0
        m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
        tiles = tl.cdiv(tl.cdiv(Nb, BLOCK_N), n_split)  # column tiles per split
        n_lo = split * tiles * BLOCK_N
        n_hi = tl.minimum(Nb, n_lo + tiles * BLOCK_N)
        if FLAT and not MULTI:
            k_iters = tl.cdiv(D, BLOCK_K)
            my_tiles = tl.maximum(tl.cdiv(n_hi - n_lo, BLOCK_N), 0)
            ra = tl.load(inv_a + rows, mask=row_mask, other=0.0) if NORM else 1.0  # the rows' inverse norms
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for it in range(0, my_tiles * k_iters):
                _, cols, col_mask, last, acc = _flat_step(A, B, rows, row_mask, it, k_iters, n_lo, n_hi, D, stride_am,
                                                          stride_bm, acc, PRECISION, UPCAST, BLOCK_N, BLOCK_K)
                if last:
                    s = _norm_tile(acc, ra, inv_b, cols, col_mask, NORM)
                    m_i, l_i = _lse_fwd_epilogue(s, rows, cols, row_mask, col_mask, sa, bias, m_i, l_i, scale_b,
                                                 PMAX, PSUM, pid, stride_p)
                    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        else:
            for n0 in range(n_lo, n_hi, BLOCK_N):
                cols = n0 + tl.arange(0, BLOCK_N)
                col_mask = cols < n_hi
                s = _s_tile(A, B, inv_a, inv_b, rows, cols, row_mask, col_mask, D, DT, K, stride_am, stride_bm,
                            NORM, MULTI, PRECISION, UPCAST, BLOCK_M, BLOCK_N, BLOCK_K)
                m_i, l_i = _lse_fwd_epilogue(s, rows, cols, row_mask, col_mask, sa, bias, m_i, l_i, scale_b,
                                             PMAX, PSUM, pid, stride_p)
        if n_split == 1:
            tl.store(LSE + rows, (m_i + tl.log2(l_i)) * LN2, mask=row_mask)
        else:
            tl.store(RMAX + split * Na + rows, m_i, mask=row_mask)
            tl.store(RSUM + split * Na + rows, l_i, mask=row_mask)

    @triton.jit
    def _grad_tile_kernel(A, B, inv_a, inv_b, scale_a, scale_b, bias_ptr, lse_a, lse_b, g_a, g_b, sigma_ptr,
                          G, PART_A, PART_B, row0, Na_chunk, Nb, D, DT, K, stride_am, stride_bm, stride_gm,
                          stride_pa, stride_pb, NORM: tl.constexpr, MULTI: tl.constexpr, HAS_BIAS: tl.constexpr,
                          PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr = 1):
        """One S tile -> σ·G tile stored to the row-chunk slab; this tile's g·Σ_j P·S per row to
        PART_A[column tile, slab row] and h·Σ_i Q·S per column to PART_B[row tile, column]: no float atomics, the
        launcher sums the partials over the tiles in a fixed order (bitwise repeatable, deterministic mode or not).
        GROUP: column tiles swept together by the programs in flight (L2 reuse), see _slab_tile_grouped."""
        pid_m, pid_n, local, rows, row_mask, cols, col_mask = _slab_tile_grouped(row0, Na_chunk, Nb, BLOCK_M,
                                                                                 BLOCK_N, GROUP)
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
        # outside the slab P = Q = 0 through -inf exponents built from the 1-D masks: a 2-D select would keep a
        # predicate per element live and spill a 128×128 tile (200 B of stack on sm_90; 16 B this way)
        row_pen = tl.where(row_mask, 0.0, float("-inf"))
        col_pen = tl.where(col_mask, 0.0, float("-inf"))
        p = tl.exp2(s * (sa * LOG2E)[:, None] + (bias - la + row_pen)[:, None] + col_pen[None, :])
        q = tl.exp2(s * (sb * LOG2E)[None, :] + (bias - lb + col_pen)[None, :] + row_pen[:, None])
        g = p * (ga * sa * sigma)[:, None] + q * (gb * sb * sigma)[None, :]
        tl.store(G + local[:, None] * stride_gm + cols[None, :], g.to(G.dtype.element_ty), mask=valid)
        tl.store(PART_A + pid_n * stride_pa + local, ga * tl.sum(p * s, axis=1), mask=row_mask)
        tl.store(PART_B + pid_m * stride_pb + cols, gb * tl.sum(q * s, axis=0), mask=col_mask)
