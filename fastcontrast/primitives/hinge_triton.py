"""Triton kernels for the max-margin (hinge) loss of MM-TS, tiled like the InfoNCE kernels.

For row i of A against every row j of B that is a negative (key_b[j] != key_a[i]):

    sum:      out_i = Σ_j [o_i + S_ij]_+,   cnt_i = #{j : o_i + S_ij > 0}
    hardest:  out_i = [max_j (o_i + S_ij)]_+, arg_i = the argmax        (VSE++)

with o_i = margin − S_{i,p(i)}. The image→text term is (A, B) = (X, Y), keys (labels, arange(M)); the
text→image term is (A, B) = (Y[labels], X), keys (labels, labels). The backward of the sum variant writes the
0/g_i indicator W of active hinges one row-chunk slab at a time and finishes with two GEMMs (``_tiles``).
The hardest variant takes both directions from one sweep of (X, Y): the row maxima here, the column maxima as
per-block partials (PMAX/PARG). The diagonal (pairs i ↔ i) has its own pair: ``_hinge_pair_fwd_kernel`` (loss
only) and ``_hinge_pair_grad_tile_kernel`` (loss, counts and the slab W of the fused forward).
"""
from __future__ import annotations

from .triton_support import tl, triton

if triton is not None:
    from .triton_tiles import _flat_step, _norm_tile, _s_tile, _slab_tile

    @triton.jit
    def _hinge_fwd_epilogue(s, n0, rows, cols, row_mask, col_mask, off, ka, key_b, best, arg, acc, cnt, PMAX, PARG,
                            pid, stride_p, HARDEST: tl.constexpr, BLOCK_M: tl.constexpr):
        """One finished S tile: the rows' running hinge sums and counts (or hardest negatives) updated; HARDEST
        also stores the tile's column maxima over this block's negative rows."""
        kb = tl.load(key_b + cols, mask=col_mask, other=-2)
        neg = col_mask[None, :] & (kb[None, :] != ka[:, None])
        z = off[:, None] + s
        if HARDEST:
            zm = tl.where(neg, z, float("-inf"))
            bm = tl.max(zm, axis=1)
            ba = tl.argmax(zm, axis=1).to(tl.int32)
            upd = (bm > best) | (bm != bm)  # a NaN (an overflowed S) sticks: the loss says so
            arg = tl.where(upd, n0 + ba, arg)
            best = tl.where(upd, bm, best)
            sc = tl.where(neg & row_mask[:, None], s, float("-inf"))
            tl.store(PMAX + pid * stride_p + cols, tl.max(sc, axis=0), mask=col_mask)
            tl.store(PARG + pid * stride_p + cols, pid * BLOCK_M + tl.argmax(sc, axis=0).to(tl.int32),
                     mask=col_mask)
        else:
            act = neg & ((z > 0) | (z != z))  # [z]_+ keeps a NaN (inf − inf of an overflowed S), as clamp does
            acc += tl.sum(tl.where(act, z, 0.0), axis=1)
            cnt += tl.sum(act.to(tl.float32), axis=1)
        return best, arg, acc, cnt

    @triton.jit
    def _hinge_fwd_kernel(A, B, inv_a, inv_b, offset, key_a, key_b, OUT, CNT, ARG, PMAX, PARG, Na, Nb, D, DT, K,
                          stride_am, stride_bm, stride_p, NORM: tl.constexpr, HARDEST: tl.constexpr,
                          PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, FLAT: tl.constexpr = False):
        """One row block against every column tile. HARDEST also writes, per column j, this block's largest S_ij
        over its rows i that are negatives of j, and that row, to PMAX/PARG[pid, j] (the column direction's
        hardest negative, merged over the blocks afterwards): both directions from this one sweep.
        FLAT: one loop over (column tile, K-chunk) pairs, as in _lse_fwd_kernel, so the next tile's first
        K-chunks are in flight while this tile's last ones multiply (the nested loop drains every copy per tile)."""
        pid = tl.program_id(0)
        rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < Na
        off = tl.load(offset + rows, mask=row_mask, other=0.0)
        ka = tl.load(key_a + rows, mask=row_mask, other=-1)
        best = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        arg = tl.zeros((BLOCK_M,), dtype=tl.int32)
        acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
        cnt = tl.zeros((BLOCK_M,), dtype=tl.float32)
        if FLAT:
            k_iters = tl.cdiv(D, BLOCK_K)
            ra = tl.load(inv_a + rows, mask=row_mask, other=0.0) if NORM else 1.0  # the rows' inverse norms
            s_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for it in range(0, tl.cdiv(Nb, BLOCK_N) * k_iters):
                n0, cols, col_mask, last, s_acc = _flat_step(A, B, rows, row_mask, it, k_iters, 0, Nb, D, stride_am,
                                                             stride_bm, s_acc, PRECISION, UPCAST, BLOCK_N, BLOCK_K)
                if last:
                    s = _norm_tile(s_acc, ra, inv_b, cols, col_mask, NORM)
                    best, arg, acc, cnt = _hinge_fwd_epilogue(s, n0, rows, cols, row_mask, col_mask, off, ka, key_b,
                                                              best, arg, acc, cnt, PMAX, PARG, pid, stride_p,
                                                              HARDEST, BLOCK_M)
                    s_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        else:
            for n0 in range(0, Nb, BLOCK_N):
                cols = n0 + tl.arange(0, BLOCK_N)
                col_mask = cols < Nb
                s = _s_tile(A, B, inv_a, inv_b, rows, cols, row_mask, col_mask, D, DT, K, stride_am, stride_bm,
                            NORM, False, PRECISION, UPCAST, BLOCK_M, BLOCK_N, BLOCK_K)
                best, arg, acc, cnt = _hinge_fwd_epilogue(s, n0, rows, cols, row_mask, col_mask, off, ka, key_b,
                                                          best, arg, acc, cnt, PMAX, PARG, pid, stride_p, HARDEST,
                                                          BLOCK_M)
        if HARDEST:
            tl.store(OUT + rows, tl.where(best < 0, 0.0, best), mask=row_mask)
            tl.store(CNT + rows, (best > 0).to(tl.float32), mask=row_mask)
            tl.store(ARG + rows, arg, mask=row_mask)
        else:
            tl.store(OUT + rows, acc, mask=row_mask)
            tl.store(CNT + rows, cnt, mask=row_mask)

    @triton.jit
    def _hinge_grad_tile_kernel(A, B, inv_a, inv_b, offset, key_a, key_b, g_a, W, row0, Na_chunk, Nb, D, DT, K,
                                stride_am, stride_bm, stride_wm, NORM: tl.constexpr, PRECISION: tl.constexpr,
                                UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                                BLOCK_K: tl.constexpr):
        """W_ij = g_i·[j negative and o_i + S_ij > 0] for one tile of one row chunk."""
        local, rows, row_mask, cols, col_mask = _slab_tile(row0, Na_chunk, Nb, BLOCK_M, BLOCK_N)
        s = _s_tile(A, B, inv_a, inv_b, rows, cols, row_mask, col_mask, D, DT, K, stride_am, stride_bm,
                    NORM, False, PRECISION, UPCAST, BLOCK_M, BLOCK_N, BLOCK_K)
        off = tl.load(offset + rows, mask=row_mask, other=0.0)
        ka = tl.load(key_a + rows, mask=row_mask, other=-1)
        ga = tl.load(g_a + rows, mask=row_mask, other=0.0)
        kb = tl.load(key_b + cols, mask=col_mask, other=-2)
        valid = row_mask[:, None] & col_mask[None, :]
        act = valid & (kb[None, :] != ka[:, None]) & (off[:, None] + s > 0)
        w = tl.where(act, ga[:, None], 0.0)
        tl.store(W + local[:, None] * stride_wm + cols[None, :], w.to(W.dtype.element_ty), mask=valid)

    @triton.jit
    def _hinge_pair_fwd_kernel(A, B, inv_a, inv_b, offset, OUT, CNT, PSUM, PCNT, N, D, stride_am, stride_bm,
                               stride_p, NORM: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """Both directions of the diagonal hinge from one sweep of S (N×N, pair i ↔ i, o = margin − S_ii):
        rows: OUT_i = Σ_{j≠i} [o_i + S_ij]_+, CNT_i = #active; columns: this row block's partial
        Σ_{i≠j} [o_j + S_ij]_+ and #active to PSUM/PCNT[pid, j], summed over the row blocks afterwards."""
        pid = tl.program_id(0)
        rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < N
        off_r = tl.load(offset + rows, mask=row_mask, other=0.0)
        acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
        cnt = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            col_mask = cols < N
            s = _s_tile(A, B, inv_a, inv_b, rows, cols, row_mask, col_mask, D, D, 1, stride_am, stride_bm,
                        NORM, False, PRECISION, UPCAST, BLOCK_M, BLOCK_N, BLOCK_K)
            neg = row_mask[:, None] & col_mask[None, :] & (rows[:, None] != cols[None, :])
            z = off_r[:, None] + s
            act = neg & ((z > 0) | (z != z))
            acc += tl.sum(tl.where(act, z, 0.0), axis=1)
            cnt += tl.sum(act.to(tl.float32), axis=1)
            off_c = tl.load(offset + cols, mask=col_mask, other=0.0)
            zc = off_c[None, :] + s
            actc = neg & ((zc > 0) | (zc != zc))
            tl.store(PSUM + pid * stride_p + cols, tl.sum(tl.where(actc, zc, 0.0), axis=0), mask=col_mask)
            tl.store(PCNT + pid * stride_p + cols, tl.sum(actc.to(tl.float32), axis=0), mask=col_mask)
        tl.store(OUT + rows, acc, mask=row_mask)
        tl.store(CNT + rows, cnt, mask=row_mask)

    @triton.jit
    def _hinge_pair_grad_tile_kernel(A, B, inv_a, inv_b, offset, W, LPART, RCNT, CCNT, row0, Na_chunk, N, D,
                                     stride_am, stride_bm, stride_wm, stride_r, stride_c, NORM: tl.constexpr,
                                     PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr,
                                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """One tile of the fused forward sweep of the diagonal hinge (grid: row tiles of the slab × column tiles):
        W_ij = [o_i + S_ij > 0] + [o_j + S_ij > 0] over i ≠ j (= ∂total/∂S_ij) into the slab; this tile's hinge sum
        to LPART[tile], its per-row active counts to RCNT[pid1, row], its per-column ones to CCNT[pid0, col]:
        no atomics, the host sums the partials in a fixed order."""
        local, rows, row_mask, cols, col_mask = _slab_tile(row0, Na_chunk, N, BLOCK_M, BLOCK_N)
        s = _s_tile(A, B, inv_a, inv_b, rows, cols, row_mask, col_mask, D, D, 1, stride_am, stride_bm,
                    NORM, False, PRECISION, UPCAST, BLOCK_M, BLOCK_N, BLOCK_K)
        off_r = tl.load(offset + rows, mask=row_mask, other=0.0)
        off_c = tl.load(offset + cols, mask=col_mask, other=0.0)
        valid = row_mask[:, None] & col_mask[None, :]
        neg = valid & (rows[:, None] != cols[None, :])
        zr = off_r[:, None] + s
        zc = off_c[None, :] + s
        act_r = neg & ((zr > 0) | (zr != zr))  # NaN kept (see _hinge_rows_kernel)
        act_c = neg & ((zc > 0) | (zc != zc))
        w = act_r.to(tl.float32) + act_c.to(tl.float32)
        tl.store(W + local[:, None] * stride_wm + cols[None, :], w.to(W.dtype.element_ty), mask=valid)
        hinge = tl.where(act_r, zr, 0.0) + tl.where(act_c, zc, 0.0)
        tile = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
        tl.store(LPART + tile, tl.sum(tl.sum(hinge, axis=1), axis=0))
        tl.store(RCNT + tl.program_id(1) * stride_r + local, tl.sum(act_r.to(tl.float32), axis=1), mask=row_mask)
        tl.store(CCNT + tl.program_id(0) * stride_c + cols, tl.sum(act_c.to(tl.float32), axis=0), mask=col_mask)
