"""Triton kernels of the masked log-sum-exp (``lse_masked.py``: the math and the masks' rules).

The masks are rules on O(N + M) vectors, evaluated per S tile in the epilogue (:func:`_mask_logits`): group ids
of the tile's rows and columns, the rows' kept column, the guide similarity of the same tile (a second K loop
over the guide's Dg in the same sweep, no gradient), the hardness coefficients of the tile's columns. No N×M mask
exists anywhere. Each switch is a constexpr (HAS_KEEP, IDS, EXCL, GUIDE, HARD, COLS): a launch compiles only
the rules it uses. These are kernels of their own beside ``_lse_fwd_kernel`` / ``_grad_tile_kernel``
(lse_pair_triton.py), which stay exactly as they were (their signatures and builds: the static report's rows).

Forward (``_lse_masked_fwd_kernel``): a program owns BLOCK_M rows and walks the column tiles of its split,
keeping the rows' statistics online (base 2); with COLS it writes each tile's column max and Σ2^(z − max) over its
rows for the first N_STAT columns (merged by the launcher, as lse_pair's). An entirely dropped row keeps max =
-inf, sum = 0 (its lse is -inf): the online update rescales by 2^(m_old − m_safe), m_safe = 0 while nothing
has been kept, so no -inf − (-inf) appears.

Backward (``_masked_grad_tile_kernel``): the S tile and its masks recomputed, P = 2^(z − lse_row) and (COLS) Q,
σ·G = σ(g·a·P + h·c·Q) stored to the R×M slab, the scale gradients' per-tile partials (no float atomics); the
launcher passes lse with -inf replaced by 0 (P = 0 there, not NaN). The slab's GEMMs run in ATen.
"""
from __future__ import annotations

from .triton_support import tl, triton

if triton is not None:
    from .triton_tiles import LN2, LOG2E, _s_tile, _slab_tile_grouped

    @triton.jit
    def _mask_logits(s, gs, rows, cols, row_mask, col_mask, sa, sb, KEEP, RID, CID, THR_R, THR_C, PEN_S, PEN_O,
                     N_ID, N_STAT, HAS_KEEP: tl.constexpr, IDS: tl.constexpr, EXCL: tl.constexpr,
                     GUIDE: tl.constexpr, HARD: tl.constexpr, COLS: tl.constexpr):
        """(row logits a·S + pen, column logits c·S) of one finished S tile, base 2 (``sa``, ``sb``: the scales
        × log2 e), -inf where a mask drops the entry or outside the matrix; column logits only for the first
        N_STAT columns (and only when COLS: else the row logits are returned twice)."""
        row_pen = tl.where(row_mask, 0.0, float("-inf"))
        col_pen = tl.where(col_mask, 0.0, float("-inf"))
        z = s * sa[:, None]
        if IDS:  # G_ij = [row_ids_i == col_ids_j], columns past N_ID in no group
            id_cols = cols < N_ID
            rid = tl.load(RID + rows, mask=row_mask, other=0)
            cid = tl.load(CID + cols, mask=id_cols, other=0)
            same = (rid[:, None] == cid[None, :]) & id_cols[None, :]
            if HARD:  # α·sg(S) by the cell: the coefficients of the same-group and the other cells per column
                ps = tl.load(PEN_S + cols, mask=col_mask, other=0.0) * LOG2E
                po = tl.load(PEN_O + cols, mask=col_mask, other=0.0) * LOG2E
                z += s * tl.where(same, ps[None, :], po[None, :])
        if HAS_KEEP:
            kp = tl.load(KEEP + rows, mask=row_mask, other=-1)
            kept = cols[None, :] == kp[:, None]
        if GUIDE:
            thr = tl.load(THR_R + rows, mask=row_mask, other=0.0)
            drop = gs > thr[:, None]
            if EXCL:
                drop = drop | same
            if HAS_KEEP:
                drop = drop & (~kept)
            z = tl.where(drop, float("-inf"), z)
        elif EXCL:
            drop = same
            if HAS_KEEP:
                drop = drop & (~kept)
            z = tl.where(drop, float("-inf"), z)
        z = z + row_pen[:, None] + col_pen[None, :]
        if COLS:
            stat = cols < N_STAT
            zc = s * sb[None, :]
            if GUIDE:
                thr_c = tl.load(THR_C + cols, mask=stat, other=0.0)
                drop_c = gs > thr_c[None, :]
                if EXCL:
                    drop_c = drop_c | same
                if HAS_KEEP:
                    drop_c = drop_c & (~kept)
                zc = tl.where(drop_c, float("-inf"), zc)
            elif EXCL:
                drop_c = same
                if HAS_KEEP:
                    drop_c = drop_c & (~kept)
                zc = tl.where(drop_c, float("-inf"), zc)
            zc = zc + row_pen[:, None] + tl.where(stat, 0.0, float("-inf"))[None, :]
            return z, zc
        return z, z

    @triton.jit
    def _lse_masked_fwd_kernel(A, B, inv_a, inv_b, scale_a, scale_b, GA, GB, ginv_a, ginv_b, KEEP, RID, CID, THR_R,
                               THR_C, PEN_S, PEN_O, LSE, PMAX, PSUM, RMAX, RSUM, Na, Nb, N_ID, N_STAT, D, DG,
                               stride_am, stride_bm, stride_ga, stride_gb, stride_p, NORM: tl.constexpr,
                               GNORM: tl.constexpr, HAS_KEEP: tl.constexpr, IDS: tl.constexpr, EXCL: tl.constexpr,
                               GUIDE: tl.constexpr, HARD: tl.constexpr, COLS: tl.constexpr,
                               PRECISION: tl.constexpr, GPRECISION: tl.constexpr, UPCAST: tl.constexpr,
                               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                               BLOCK_KG: tl.constexpr):
        """Rows' lse (base e) to LSE (or, with several column splits, their max and Σ2^(z − max) to RMAX/RSUM
        [split]); with COLS this row block's column max and Σ2^(z − max) (base 2) to PMAX/PSUM[pid] for the
        first N_STAT columns. Grid (row blocks, column splits)."""
        pid = tl.program_id(0)
        split = tl.program_id(1)
        n_split = tl.num_programs(1)
        rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < Na
        sa = tl.load(scale_a + rows, mask=row_mask, other=1.0) * LOG2E
        m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
        tiles = tl.cdiv(tl.cdiv(Nb, BLOCK_N), n_split)
        n_lo = split * tiles * BLOCK_N
        n_hi = tl.minimum(Nb, n_lo + tiles * BLOCK_N)
        for n0 in range(n_lo, n_hi, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            col_mask = cols < n_hi
            s = _s_tile(A, B, inv_a, inv_b, rows, cols, row_mask, col_mask, D, D, 1, stride_am, stride_bm, NORM,
                        False, PRECISION, UPCAST, BLOCK_M, BLOCK_N, BLOCK_K)
            gs = s
            if GUIDE:  # the guide's tile in the same sweep: a second K loop over Dg
                gs = _s_tile(GA, GB, ginv_a, ginv_b, rows, cols, row_mask, col_mask, DG, DG, 1, stride_ga,
                             stride_gb, GNORM, False, GPRECISION, UPCAST, BLOCK_M, BLOCK_N, BLOCK_KG)
            sb = sa
            if COLS:
                sb = tl.load(scale_b + cols, mask=col_mask, other=1.0) * LOG2E
            z, zc = _mask_logits(s, gs, rows, cols, row_mask, col_mask, sa, sb, KEEP, RID, CID, THR_R, THR_C, PEN_S,
                                 PEN_O, N_ID, N_STAT, HAS_KEEP, IDS, EXCL, GUIDE, HARD, COLS)
            m_new = tl.maximum(m_i, tl.max(z, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(z - m_safe[:, None]), axis=1)
            m_i = m_new
            if COLS:
                cm = tl.max(zc, axis=0)
                cs = tl.sum(tl.exp2(zc - tl.where(cm == float("-inf"), 0.0, cm)[None, :]), axis=0)
                stat = col_mask & (cols < N_STAT)
                tl.store(PMAX + pid * stride_p + cols, cm, mask=stat)
                tl.store(PSUM + pid * stride_p + cols, cs, mask=stat)
        if n_split == 1:  # an entirely dropped row: m_i = -inf, l_i = 0 -> -inf (log2 of 1, not of 0; NaN stays)
            tl.store(LSE + rows, (m_i + tl.log2(tl.where(l_i == 0, 1.0, l_i))) * LN2, mask=row_mask)
        else:
            tl.store(RMAX + split * Na + rows, m_i, mask=row_mask)
            tl.store(RSUM + split * Na + rows, l_i, mask=row_mask)

    @triton.jit
    def _masked_grad_tile_kernel(A, B, inv_a, inv_b, scale_a, scale_b, GA, GB, ginv_a, ginv_b, KEEP, RID, CID,
                                 THR_R, THR_C, PEN_S, PEN_O, lse_a, lse_b, g_a, g_b, sigma_ptr, G, PART_A, PART_B,
                                 row0, Na_chunk, Nb, N_ID, N_STAT, D, DG, stride_am, stride_bm, stride_ga, stride_gb,
                                 stride_gm, stride_pa, stride_pb, NORM: tl.constexpr, GNORM: tl.constexpr,
                                 HAS_KEEP: tl.constexpr, IDS: tl.constexpr, EXCL: tl.constexpr, GUIDE: tl.constexpr,
                                 HARD: tl.constexpr, COLS: tl.constexpr, PRECISION: tl.constexpr,
                                 GPRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr,
                                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_KG: tl.constexpr,
                                 GROUP: tl.constexpr = 1):
        """One S tile (and its guide tile) -> σ·G tile to the row-chunk slab; g·Σ_j P·S per row to
        PART_A[column tile, slab row] and (COLS) h·Σ_i Q·S per column to PART_B[row tile, column]."""
        pid_m, pid_n, local, rows, row_mask, cols, col_mask = _slab_tile_grouped(row0, Na_chunk, Nb, BLOCK_M,
                                                                                 BLOCK_N, GROUP)
        s = _s_tile(A, B, inv_a, inv_b, rows, cols, row_mask, col_mask, D, D, 1, stride_am, stride_bm, NORM, False,
                    PRECISION, UPCAST, BLOCK_M, BLOCK_N, BLOCK_K)
        gs = s
        if GUIDE:
            gs = _s_tile(GA, GB, ginv_a, ginv_b, rows, cols, row_mask, col_mask, DG, DG, 1, stride_ga, stride_gb,
                         GNORM, False, GPRECISION, UPCAST, BLOCK_M, BLOCK_N, BLOCK_KG)
        a = tl.load(scale_a + rows, mask=row_mask, other=0.0)
        b = a
        if COLS:
            b = tl.load(scale_b + cols, mask=col_mask, other=0.0)
        z, zc = _mask_logits(s, gs, rows, cols, row_mask, col_mask, a * LOG2E, b * LOG2E, KEEP, RID, CID, THR_R,
                             THR_C, PEN_S, PEN_O, N_ID, N_STAT, HAS_KEEP, IDS, EXCL, GUIDE, HARD, COLS)
        sigma = tl.load(sigma_ptr)
        la = tl.load(lse_a + rows, mask=row_mask, other=0.0) * LOG2E
        ga = tl.load(g_a + rows, mask=row_mask, other=0.0)
        p = tl.exp2(z - la[:, None])
        g = p * (ga * a * sigma)[:, None]
        tl.store(PART_A + pid_n * stride_pa + local, ga * tl.sum(p * s, axis=1), mask=row_mask)
        if COLS:
            stat = col_mask & (cols < N_STAT)
            lb = tl.load(lse_b + cols, mask=stat, other=0.0) * LOG2E
            gb = tl.load(g_b + cols, mask=stat, other=0.0)
            q = tl.exp2(zc - lb[None, :])
            g += q * (gb * b * sigma)[None, :]
            tl.store(PART_B + pid_m * stride_pb + cols, gb * tl.sum(q * s, axis=0), mask=stat)
        valid = row_mask[:, None] & col_mask[None, :]
        tl.store(G + local[:, None] * stride_gm + cols[None, :], g.to(G.dtype.element_ty), mask=valid)
