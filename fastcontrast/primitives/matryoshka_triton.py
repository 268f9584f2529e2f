"""Triton kernels of the Matryoshka log-sum-exp (``matryoshka.py``): every nested prefix of the features in one K
sweep.

For prefix ends e_1 < … < e_P (band p = columns e_{p-1}..e_p, e_0 = 0) the sweep of one S tile accumulates the
partial products C^(p) = x[:, :e_p] y[:, :e_p]ᵀ along K; at each end e_p (a *checkpoint*) the tile
S^(p) = diag(r^(p)) C^(p) diag(q^(p)) (r, q: the prefixes' inverse norms, 1 without normalisation) feeds prefix p's
statistics, and the sweep goes on with the same accumulator. The K loop runs band by band (``_band``: a plain loop
over BLOCK_K chunks, which Triton pipelines), so a band narrower than BLOCK_K costs one (masked) chunk. The band
ends come in units of GRAIN columns: 16 when every end is a multiple of 16 (768, 512, 256, 128, 64, 32, 16), which
makes the loads provably aligned (vectorised, pipelined), else 1.

Forward (``_matryoshka_fwd_kernel``): a program owns BLOCK_M rows and walks every column tile; the rows' online
max and Σ2^(z − max) of all P prefixes stay in registers as (BLOCK_M, NPP) tensors (NPP = P rounded up to a power of
two, the prefix picked by a one-hot column); with COLS each tile's column statistics go to (row blocks, P, M)
buffers that the launcher merges (the column direction of CLIP).

Backward (``_matryoshka_grad_kernel``): the same sweep per tile recomputes S^(p); at each checkpoint

    G^(p) = g^(p)_i a_i P^(p) + h^(p)_j c_j Q^(p)        (dL/dS^(p); P, Q the row and column softmaxes)

and it stores σ·ρ^(p)_i G^(p) ρ'^(p)_j (ρ^(p) = r^(p)/r^(P), the prefix's norm relative to the full one's) to slab
p. After the sweep it turns the P slabs into their suffix sums H^(p) = Σ_{p' ≥ p} (in fp32 registers, one tile at a
time), which is what band p's feature-gradient GEMMs take: dX̂[:, band p] = H^(p) Ŷ[:, band p], so the GEMMs
run once over d instead of once per prefix. Per-tile partial sums (no float atomics): Σ_p g Σ_j P∘S per row
(PART_A) and Σ_p h Σ_i Q∘S per column (PART_B) for the scale gradients, and Σ_j G^(p)∘S^(p) per row and prefix
(PART_RA) and per column (PART_RB) for the normalisation's Jacobian.
"""
from __future__ import annotations

from .triton_support import tl, triton

if triton is not None:
    from .triton_tiles import LN2, LOG2E, _dot, _slab_tile_grouped

    @triton.jit
    def _band(A, B, rows, cols, row_mask, col_mask, ENDS, p, stride_am, stride_bm, acc, PRECISION: tl.constexpr,
              UPCAST: tl.constexpr, BLOCK_K: tl.constexpr, GRAIN: tl.constexpr):
        """acc += A[rows, band p] B[cols, band p]ᵀ, band p = columns ENDS[p]·GRAIN .. ENDS[p + 1]·GRAIN: a plain K loop
        (the shape Triton's software pipeliner handles). The ends are stored in units of GRAIN columns: GRAIN = 16
        (every prefix end a multiple of 16) lets Triton prove from the multiplication that the loads are 16-element
        aligned, so they vectorise and the loop pipelines; GRAIN = 1 serves any ends (element loads, as any
        unaligned launch)."""
        lo = tl.load(ENDS + p) * GRAIN
        hi = tl.load(ENDS + p + 1) * GRAIN
        for k0 in range(lo, hi, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            km = kk < hi
            a = tl.load(A + rows[:, None] * stride_am + kk[None, :], mask=row_mask[:, None] & km[None, :], other=0.0)
            b = tl.load(B + cols[:, None] * stride_bm + kk[None, :], mask=col_mask[:, None] & km[None, :], other=0.0)
            acc = _dot(a, tl.trans(b), acc, PRECISION, UPCAST)
        return acc

    @triton.jit
    def _prefix_tile(acc, inv_a, inv_b, rows, cols, row_mask, col_mask, p, P, NORM: tl.constexpr):
        """S^(p) of the tile: the partial product times prefix p's inverse norms ((N, P) and (M, P), row-major)."""
        if NORM:
            ra = tl.load(inv_a + rows * P + p, mask=row_mask, other=0.0)
            rb = tl.load(inv_b + cols * P + p, mask=col_mask, other=0.0)
            acc = acc * ra[:, None] * rb[None, :]
        return acc

    @triton.jit
    def _fwd_checkpoint(s, p, pidx, rows, cols, row_mask, col_mask, sa, sb, m_i, l_i, PMAX, PSUM, pid, P, Nb,
                        COLS: tl.constexpr):
        """Prefix p's S tile into its row statistics (column p of m_i, l_i) and, with COLS, its column partials."""
        z = tl.where(col_mask[None, :], s * sa[:, None], float("-inf"))
        sel = pidx[None, :] == p
        m_old = tl.max(tl.where(sel, m_i, float("-inf")), axis=1)
        l_old = tl.sum(tl.where(sel, l_i, 0.0), axis=1)
        m_new = tl.maximum(m_old, tl.max(z, axis=1))  # finite: every tile has a valid column
        l_new = l_old * tl.exp2(m_old - m_new) + tl.sum(tl.exp2(z - m_new[:, None]), axis=1)
        m_i = tl.where(sel, m_new[:, None], m_i)
        l_i = tl.where(sel, l_new[:, None], l_i)
        if COLS:
            zc = tl.where(row_mask[:, None], s * sb[None, :], float("-inf"))
            cm = tl.max(zc, axis=0)
            cs = tl.sum(tl.exp2(zc - cm[None, :]), axis=0)
            off = (pid * P + p).to(tl.int64) * Nb + cols
            tl.store(PMAX + off, cm, mask=col_mask)
            tl.store(PSUM + off, cs, mask=col_mask)
        return m_i, l_i

    @triton.jit
    def _matryoshka_fwd_kernel(A, B, inv_a, inv_b, scale_a, scale_b, LSE, PMAX, PSUM, ENDS, Na, Nb, P, stride_am,
                               stride_bm, NORM: tl.constexpr, COLS: tl.constexpr,
                               NPP: tl.constexpr, GRAIN: tl.constexpr, PRECISION: tl.constexpr,
                               UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                               BLOCK_K: tl.constexpr):
        """Rows' lse of every prefix (base e) to LSE (P, Na); with COLS this row block's column max and
        Σ2^(z − max) (base 2) of every prefix to PMAX/PSUM[pid, p]. Grid: (row blocks,)."""
        pid = tl.program_id(0)
        rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < Na
        sa = tl.load(scale_a + rows, mask=row_mask, other=1.0) * LOG2E  # base-2 logits: exp2 is the fast path
        pidx = tl.arange(0, NPP)
        m_i = tl.full((BLOCK_M, NPP), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((BLOCK_M, NPP), dtype=tl.float32)
        for n0 in range(0, Nb, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            col_mask = cols < Nb
            sb = tl.load(scale_b + cols, mask=col_mask, other=1.0) * LOG2E
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for p in range(0, P):  # band p, then prefix p's checkpoint: the sweep goes on with the same acc
                acc = _band(A, B, rows, cols, row_mask, col_mask, ENDS, p, stride_am, stride_bm, acc, PRECISION,
                            UPCAST, BLOCK_K, GRAIN)
                s = _prefix_tile(acc, inv_a, inv_b, rows, cols, row_mask, col_mask, p, P, NORM)
                m_i, l_i = _fwd_checkpoint(s, p, pidx, rows, cols, row_mask, col_mask, sa, sb, m_i, l_i, PMAX, PSUM,
                                           pid, P, Nb, COLS)
        out = (m_i + tl.log2(tl.where(pidx[None, :] < P, l_i, 1.0))) * LN2  # the padding columns: no log2(0)
        tl.store(LSE + pidx[None, :].to(tl.int64) * Na + rows[:, None], out,
                 mask=row_mask[:, None] & (pidx[None, :] < P))

    @triton.jit
    def _grad_checkpoint(s, p, rows, cols, local, row_mask, col_mask, row_pen, col_pen, sa, sb, lse_a, lse_b, g_a,
                         g_b, rat_a, rat_b, PART_RA, PART_RB, pid_m, pid_n, P, Na, Nb, stride_pa, stride_pb, da, dc,
                         NORM: tl.constexpr, COLS: tl.constexpr):
        """Prefix p's G tile (times the norm ratios when NORM) and its partial sums; returns (tile, da, dc)."""
        la = tl.load(lse_a + p * Na + rows, mask=row_mask, other=0.0) * LOG2E
        ga = tl.load(g_a + p * Na + rows, mask=row_mask, other=0.0)
        # outside the slab P = Q = 0 through -inf exponents built from the 1-D masks (no 2-D predicate kept live)
        pr = tl.exp2(s * (sa * LOG2E)[:, None] + (row_pen - la)[:, None] + col_pen[None, :])
        g = pr * (ga * sa)[:, None]
        da += ga * tl.sum(pr * s, axis=1)
        if COLS:
            lb = tl.load(lse_b + p * Nb + cols, mask=col_mask, other=0.0) * LOG2E
            gb = tl.load(g_b + p * Nb + cols, mask=col_mask, other=0.0)
            q = tl.exp2(s * (sb * LOG2E)[None, :] + (col_pen - lb)[None, :] + row_pen[:, None])
            g += q * (gb * sb)[None, :]
            dc += gb * tl.sum(q * s, axis=0)
        if NORM:
            gs = g * s
            tl.store(PART_RA + (pid_n * P + p) * stride_pa + local, tl.sum(gs, axis=1), mask=row_mask)
            tl.store(PART_RB + (pid_m * P + p) * stride_pb + cols, tl.sum(gs, axis=0), mask=col_mask)
            xr = tl.load(rat_a + rows * P + p, mask=row_mask, other=0.0)
            yr = tl.load(rat_b + cols * P + p, mask=col_mask, other=0.0)
            g = g * xr[:, None] * yr[None, :]
        return g, da, dc

    @triton.jit
    def _suffix_sums(G, local, cols, valid, P, stride_gp, stride_gm):
        """Slab p ← Σ_{p' ≥ p} slab p' for this tile, summed in fp32 (the band decomposition's H^(p))."""
        tl.debug_barrier()  # this program's stores above, in the dot's layout, are read back in another layout
        offs = local[:, None] * stride_gm + cols[None, :]
        h = tl.load(G + (P - 1).to(tl.int64) * stride_gp + offs, mask=valid, other=0.0).to(tl.float32)
        for i in range(1, P):
            at = G + (P - 1 - i).to(tl.int64) * stride_gp + offs
            h += tl.load(at, mask=valid, other=0.0).to(tl.float32)
            tl.store(at, h.to(G.dtype.element_ty), mask=valid)

    @triton.jit
    def _matryoshka_grad_kernel(A, B, inv_a, inv_b, rat_a, rat_b, scale_a, scale_b, lse_a, lse_b, g_a, g_b,
                                sigma_ptr, G, PART_A, PART_B, PART_RA, PART_RB, ENDS, row0, Na_chunk, Na, Nb, P,
                                stride_am, stride_bm, stride_gp, stride_gm, stride_pa, stride_pb,
                                NORM: tl.constexpr, COLS: tl.constexpr, GRAIN: tl.constexpr,
                                PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr,
                                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr = 1):
        """One tile of the slab rows row0 + [0, Na_chunk): the P slabs' tiles (σ·H^(p), see the module doc) and
        the tile's partial sums (PART_A[column tile, row], PART_B[row tile, column], PART_RA[column tile·P + p,
        row], PART_RB[row tile·P + p, column]), summed by the launcher in a fixed order."""
        pid_m, pid_n, local, rows, row_mask, cols, col_mask = _slab_tile_grouped(row0, Na_chunk, Nb, BLOCK_M,
                                                                                 BLOCK_N, GROUP)
        sa = tl.load(scale_a + rows, mask=row_mask, other=0.0)
        sb = tl.load(scale_b + cols, mask=col_mask, other=0.0)
        sigma = tl.load(sigma_ptr)
        row_pen = tl.where(row_mask, 0.0, float("-inf"))
        col_pen = tl.where(col_mask, 0.0, float("-inf"))
        valid = row_mask[:, None] & col_mask[None, :]
        da = tl.zeros((BLOCK_M,), dtype=tl.float32)
        dc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for p in range(0, P):
            acc = _band(A, B, rows, cols, row_mask, col_mask, ENDS, p, stride_am, stride_bm, acc, PRECISION, UPCAST,
                        BLOCK_K, GRAIN)
            s = _prefix_tile(acc, inv_a, inv_b, rows, cols, row_mask, col_mask, p, P, NORM)
            g, da, dc = _grad_checkpoint(s, p, rows, cols, local, row_mask, col_mask, row_pen, col_pen, sa, sb, lse_a,
                                         lse_b, g_a, g_b, rat_a, rat_b, PART_RA, PART_RB, pid_m, pid_n, P, Na, Nb,
                                         stride_pa, stride_pb, da, dc, NORM, COLS)
            tl.store(G + p * stride_gp + local[:, None] * stride_gm + cols[None, :], (g * sigma).to(G.dtype.element_ty),
                     mask=valid)
        tl.store(PART_A + pid_n * stride_pa + local, da, mask=row_mask)
        if COLS:
            tl.store(PART_B + pid_m * stride_pb + cols, dc, mask=col_mask)
        _suffix_sums(G, local, cols, valid, P, stride_gp, stride_gm)
