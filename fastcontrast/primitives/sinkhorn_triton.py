"""Triton kernels for Sinkhorn–Knopp in potential (log) form over a stored N×K score matrix.

Q_ik = exp(S_ik/ε + u_i + v_k). One iteration is two reductions over S, no N×K temporaries:
    v_k = log(N/K) − lse_i(S_ik/ε + u_i)        (columns sum to N/K)
    u_i =          − lse_k(S_ik/ε + v_k)        (rows sum to 1)
"""
from __future__ import annotations

from .triton_support import tl, triton

if triton is not None:
    from .triton_tiles import LN2, LOG2E

    @triton.jit
    def _lse_axis_kernel(S, bias, OUT, R, C, stride_r, scale, offset, AXIS: tl.constexpr,
                         BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        """AXIS=1: OUT_i = offset − lse_k(S_ik·scale + bias_k); AXIS=0: OUT_k = offset − lse_i(S_ik·scale + bias_i)."""
        pid = tl.program_id(0)
        if AXIS == 1:
            outs = pid * BLOCK_R + tl.arange(0, BLOCK_R)
            omask = outs < R
            m = tl.full((BLOCK_R,), float("-inf"), dtype=tl.float32)
            l = tl.zeros((BLOCK_R,), dtype=tl.float32)
            for c0 in range(0, C, BLOCK_C):
                cols = c0 + tl.arange(0, BLOCK_C)
                cm = cols < C
                s = tl.load(S + outs[:, None] * stride_r + cols[None, :], mask=omask[:, None] & cm[None, :], other=0.0)
                b = tl.load(bias + cols, mask=cm, other=0.0)
                z = tl.where(cm[None, :], (s.to(tl.float32) * scale + b[None, :]) * LOG2E, float("-inf"))
                mn = tl.maximum(m, tl.max(z, axis=1))
                l = l * tl.exp2(m - mn) + tl.sum(tl.exp2(z - mn[:, None]), axis=1)
                m = mn
            tl.store(OUT + outs, offset - (m + tl.log2(l)) * LN2, mask=omask)
        else:
            outs = pid * BLOCK_C + tl.arange(0, BLOCK_C)
            omask = outs < C
            m = tl.full((BLOCK_C,), float("-inf"), dtype=tl.float32)
            l = tl.zeros((BLOCK_C,), dtype=tl.float32)
            for r0 in range(0, R, BLOCK_R):
                rows = r0 + tl.arange(0, BLOCK_R)
                rm = rows < R
                s = tl.load(S + rows[:, None] * stride_r + outs[None, :], mask=rm[:, None] & omask[None, :], other=0.0)
                b = tl.load(bias + rows, mask=rm, other=0.0)
                z = tl.where(rm[:, None], (s.to(tl.float32) * scale + b[:, None]) * LOG2E, float("-inf"))
                mn = tl.maximum(m, tl.max(z, axis=0))
                l = l * tl.exp2(m - mn) + tl.sum(tl.exp2(z - mn[None, :]), axis=0)
                m = mn
            tl.store(OUT + outs, offset - (m + tl.log2(l)) * LN2, mask=omask)

    @triton.jit
    def _sinkhorn_out_kernel(S, u, v, Q, R, C, stride_r, stride_q, scale,
                             BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        rm, cm = rows < R, cols < C
        mask = rm[:, None] & cm[None, :]
        s = tl.load(S + rows[:, None] * stride_r + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        ur = tl.load(u + rows, mask=rm, other=0.0)
        vc = tl.load(v + cols, mask=cm, other=0.0)
        q = tl.exp2((s * scale + ur[:, None] + vc[None, :]) * LOG2E)
        tl.store(Q + rows[:, None] * stride_q + cols[None, :], q, mask=mask)
