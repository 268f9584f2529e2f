"""Triton kernels for the pairwise log-sum-exp at the heart of every InfoNCE-family loss.

One primitive serves CLIP, oblique (K tokens) and per-sample temperature losses:

    S_ij       = Σ_k r_ik q_jk ⟨x_ik, y_jk⟩          (r, q: per-token inverse norms, 1 when not normalising)
    lse_row_i  = log Σ_j exp(a_i S_ij + b)            (a: per-row scale, b: bias)

The column statistics are the same kernel with the two sides swapped, so there is one forward kernel and one
backward kernel. Neither ever holds more than a BLOCK_M×BLOCK_N tile of S: memory is O((N+M)·D).

Backward (for the row side; the other side is the swapped call), with upstream grads g (rows) and h (cols):

    G_ij  = g_i a_i P_ij + h_j c_j Q_ij,   P = exp(a S + b − lse_row), Q = exp(c S + b − lse_col)
    dX̂_i = Σ_j G_ij ŷ_j,                  da_i = g_i Σ_j P_ij S_ij

S is recomputed tile by tile (as FlashAttention does). The dX̂ accumulator is BLOCK_M×BLOCK_DO, so wide
features are split over a second grid axis of D-chunks, each recomputing S (cost: cdiv(D, BLOCK_DO) S-tiles).
"""
from __future__ import annotations

from .._triton_support import tl, triton

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
    def _s_tile(A, B, inv_a, inv_b, rows, cols, row_mask, col_mask, D, DT, K,
                stride_am, stride_bm, NORM: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """S tile (BLOCK_M, BLOCK_N) in fp32; per-token inverse norms applied to the fp32 partial sums."""
        offs_k = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for t in range(0, K):
            part = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            tok_end = (t + 1) * DT
            for k0 in range(t * DT, tok_end, BLOCK_K):
                kk = k0 + offs_k
                km = kk < tok_end
                a = tl.load(A + rows[:, None] * stride_am + kk[None, :], mask=row_mask[:, None] & km[None, :], other=0.0)
                b = tl.load(B + cols[:, None] * stride_bm + kk[None, :], mask=col_mask[:, None] & km[None, :], other=0.0)
                part = _dot(a, tl.trans(b), part, PRECISION, UPCAST)
            if NORM:
                ra = tl.load(inv_a + rows * K + t, mask=row_mask, other=0.0)
                rb = tl.load(inv_b + cols * K + t, mask=col_mask, other=0.0)
                part = part * ra[:, None] * rb[None, :]
            acc += part
        return acc

    @triton.jit
    def _lse_fwd_kernel(A, B, inv_a, inv_b, scale_a, bias_ptr, LSE, Na, Nb, D, DT, K, stride_am, stride_bm,
                        NORM: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
                        UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
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
                        NORM, PRECISION, UPCAST, BLOCK_M, BLOCK_N, BLOCK_K)
            z = s * sa[:, None] + bias
            z = tl.where(col_mask[None, :], z, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(z, axis=1))
            l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(z - m_new[:, None]), axis=1)
            m_i = m_new
        tl.store(LSE + rows, (m_i + tl.log2(l_i)) * LN2, mask=row_mask)

    @triton.jit
    def _lse_bwd_kernel(A, B, inv_a, inv_b, scale_a, scale_b, bias_ptr, lse_a, lse_b, g_a, g_b,
                        dA, dscale_a, Na, Nb, D, DT, K, stride_am, stride_bm, stride_dm,
                        NORM: tl.constexpr, MULTI_TOKEN: tl.constexpr, HAS_BIAS: tl.constexpr,
                        PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DO: tl.constexpr):
        pid = tl.program_id(0)
        pid_d = tl.program_id(1)
        rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < Na
        offs_do = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
        do_mask = offs_do < D
        sa = tl.load(scale_a + rows, mask=row_mask, other=0.0)
        la = tl.load(lse_a + rows, mask=row_mask, other=0.0) * LOG2E
        ga = tl.load(g_a + rows, mask=row_mask, other=0.0)
        bias = tl.load(bias_ptr) * LOG2E if HAS_BIAS else 0.0
        acc = tl.zeros((BLOCK_M, BLOCK_DO), dtype=tl.float32)
        dsa = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for n0 in range(0, Nb, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            col_mask = cols < Nb
            s = _s_tile(A, B, inv_a, inv_b, rows, cols, row_mask, col_mask, D, DT, K, stride_am, stride_bm,
                        NORM, PRECISION, UPCAST, BLOCK_M, BLOCK_N, BLOCK_K)
            sb = tl.load(scale_b + cols, mask=col_mask, other=0.0)
            lb = tl.load(lse_b + cols, mask=col_mask, other=0.0) * LOG2E
            gb = tl.load(g_b + cols, mask=col_mask, other=0.0)
            valid = row_mask[:, None] & col_mask[None, :]
            p = tl.where(valid, tl.exp2(s * (sa * LOG2E)[:, None] + bias - la[:, None]), 0.0)
            q = tl.where(valid, tl.exp2(s * (sb * LOG2E)[None, :] + bias - lb[None, :]), 0.0)
            dsa += tl.sum(p * s, axis=1)
            g = p * (ga * sa)[:, None] + q * (gb * sb)[None, :]
            b_ptrs = B + cols[:, None] * stride_bm + offs_do[None, :]
            bmask = col_mask[:, None] & do_mask[None, :]
            if MULTI_TOKEN:
                # ŷ_j = y_j · q_j,tok(d): the token changes along the chunk, so scale the loaded tile itself
                tok = offs_do // DT
                rb = tl.load(inv_b + cols[:, None] * K + tok[None, :], mask=bmask, other=0.0)
                braw = tl.load(b_ptrs, mask=bmask, other=0.0)
                bt = (braw.to(tl.float32) * rb).to(braw.dtype)
                acc = _dot(g.to(braw.dtype), bt, acc, PRECISION, UPCAST)
            else:
                if NORM:
                    rb1 = tl.load(inv_b + cols, mask=col_mask, other=0.0)
                    g = g * rb1[None, :]
                bt = tl.load(b_ptrs, mask=bmask, other=0.0)
                acc = _dot(g.to(bt.dtype), bt, acc, PRECISION, UPCAST)
        d_ptrs = dA + rows[:, None] * stride_dm + offs_do[None, :]
        tl.store(d_ptrs, acc, mask=row_mask[:, None] & do_mask[None, :])
        if pid_d == 0:  # every D-chunk computed the same dsa; one writes it
            tl.store(dscale_a + rows, ga * dsa, mask=row_mask)
