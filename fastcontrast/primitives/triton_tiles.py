"""Triton helpers shared by the kernels of every family: the S-tile product with per-token normalisation."""
from __future__ import annotations

from .triton_support import tl, triton

if triton is not None:
    # Compiled kernels may read module globals only when they are constexpr.
    LOG2E = tl.constexpr(1.4426950408889634)
    LN2 = tl.constexpr(0.6931471805599453)

    @triton.jit
    def _dot(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
        # UPCAST: Triton's CPU interpreter mis-computes bf16 tl.dot (seen with triton 3.9), so under
        # TRITON_INTERPRET the operands are widened; values are the same bf16 numbers, products exact in fp32.
        if UPCAST:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        return tl.dot(a, b, acc, input_precision=PRECISION)

    @triton.jit
    def _flat_step(A, B, rows, row_mask, it, k_iters, n_lo, n_hi, D, stride_am, stride_bm, acc,
                   PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """Step ``it`` of a flattened (column tile × K-chunk) sweep of S = A Bᵀ (one token): acc += the chunk's
        product. One loop over both keeps the K pipeline's copies of the next tile in flight across tiles (no
        drain per column tile). Returns (n0, cols, col_mask, last, acc); at the tile's ``last`` chunk acc holds
        the finished tile: the caller scales it (:func:`_norm_tile`), runs its epilogue and resets acc."""
        t = it // k_iters
        ki = it - t * k_iters
        n0 = n_lo + t * BLOCK_N
        cols = n0 + tl.arange(0, BLOCK_N)
        col_mask = cols < n_hi
        kk = ki * BLOCK_K + tl.arange(0, BLOCK_K)
        km = kk < D
        a = tl.load(A + rows[:, None] * stride_am + kk[None, :], mask=row_mask[:, None] & km[None, :], other=0.0)
        b = tl.load(B + cols[:, None] * stride_bm + kk[None, :], mask=col_mask[:, None] & km[None, :], other=0.0)
        return n0, cols, col_mask, ki == k_iters - 1, _dot(a, tl.trans(b), acc, PRECISION, UPCAST)

    @triton.jit
    def _norm_tile(s, ra, inv_b, cols, col_mask, NORM: tl.constexpr):
        """A finished single-token S tile times the rows' (``ra``) and columns' inverse norms when NORM."""
        if NORM:
            rb = tl.load(inv_b + cols, mask=col_mask, other=0.0)
            s = s * ra[:, None] * rb[None, :]
        return s

    @triton.jit
    def _slab_tile(row0, Na_chunk, Nb, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """This program's tile of a backward slab (rows row0 + [0, Na_chunk) × all Nb columns), grid (M tiles,
        N tiles): (slab-local rows, global rows, row mask, columns, column mask)."""
        local = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        return local, row0 + local, local < Na_chunk, cols, cols < Nb

    @triton.jit
    def _slab_tile_grouped(row0, Na_chunk, Nb, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP: tl.constexpr):
        """:func:`_slab_tile` with the program order grouped for L2: the (M tiles, N tiles) grid is read as one
        sequence in which GROUP column tiles are swept together, rows fastest within the group, so the ~132
        programs in flight share GROUP column tiles and ~132/GROUP row tiles (GROUP = 1: the plain 2-D order).
        Returns the tile's (row tile, column tile) indices first: where its per-tile partial sums go."""
        n_m = tl.num_programs(0)
        n_n = tl.num_programs(1)
        pid = tl.program_id(1) * n_m + tl.program_id(0)
        per_group = GROUP * n_m
        first_n = (pid // per_group) * GROUP
        size = tl.minimum(n_n - first_n, GROUP)
        pid_n = first_n + (pid % per_group) % size
        pid_m = (pid % per_group) // size
        local = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        return pid_m, pid_n, local, row0 + local, local < Na_chunk, cols, cols < Nb

    @triton.jit
    def _s_tile(A, B, inv_a, inv_b, rows, cols, row_mask, col_mask, D, DT, K,
                stride_am, stride_bm, NORM: tl.constexpr, MULTI: tl.constexpr, PRECISION: tl.constexpr,
                UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """S tile (BLOCK_M, BLOCK_N) in fp32; per-token inverse norms applied to the fp32 partial sums.

        MULTI (K > 1 tokens of DT each) runs one K-loop per token, each scaled by its tokens' norms. Otherwise
        the loop is a plain load-load-dot over D, the one shape Triton's software pipeliner handles (the
        nested token loop compiled to a single shared-memory stage), and the norms scale the finished tile.
        """
        offs_k = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if MULTI:
            for t in range(0, K):
                part = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                tok_end = (t + 1) * DT
                for k0 in range(t * DT, tok_end, BLOCK_K):
                    kk = k0 + offs_k
                    km = kk < tok_end
                    a = tl.load(A + rows[:, None] * stride_am + kk[None, :], mask=row_mask[:, None] & km[None, :],
                                other=0.0)
                    b = tl.load(B + cols[:, None] * stride_bm + kk[None, :], mask=col_mask[:, None] & km[None, :],
                                other=0.0)
                    part = _dot(a, tl.trans(b), part, PRECISION, UPCAST)
                if NORM:
                    ra = tl.load(inv_a + rows * K + t, mask=row_mask, other=0.0)
                    rb = tl.load(inv_b + cols * K + t, mask=col_mask, other=0.0)
                    part = part * ra[:, None] * rb[None, :]
                acc += part
        else:
            for k0 in range(0, D, BLOCK_K):
                kk = k0 + offs_k
                km = kk < D
                a = tl.load(A + rows[:, None] * stride_am + kk[None, :], mask=row_mask[:, None] & km[None, :],
                            other=0.0)
                b = tl.load(B + cols[:, None] * stride_bm + kk[None, :], mask=col_mask[:, None] & km[None, :],
                            other=0.0)
                acc = _dot(a, tl.trans(b), acc, PRECISION, UPCAST)
            if NORM:
                ra = tl.load(inv_a + rows, mask=row_mask, other=0.0)
                rb = tl.load(inv_b + cols, mask=col_mask, other=0.0)
                acc = acc * ra[:, None] * rb[None, :]
        return acc
