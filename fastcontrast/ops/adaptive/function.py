"""Fused max-margin loss: autograd around the hinge kernels (Triton on CUDA or the CPU interpreter)."""
from __future__ import annotations

import torch
from torch import Tensor

from ...dispatch import register
from .. import _tiles as T
from .._configs import launch as launch_config
from .._triton_support import IMPORT_ERROR as _TRITON_IMPORT_ERROR


def _kernel_norms(a: Tensor, b: Tensor, normalize: bool):
    """The inverse row norms the kernels read; a 1-element dummy (never read) when not normalising."""
    if normalize:
        return T.inv_token_norms(a, 1), T.inv_token_norms(b, 1)
    dummy = a.new_empty(1, dtype=torch.float32)
    return dummy, dummy


def _gemm_operands(a: Tensor, b: Tensor, normalize: bool):
    """(inv_a, inv_b, â, b̂): the kernels' inverse norms and the backward GEMMs' operands in the features' dtype."""
    inv_a, inv_b = _kernel_norms(a, b, normalize)
    if not normalize:
        return inv_a, inv_b, a, b
    return inv_a, inv_b, T.apply_tokens(a, inv_a).to(a.dtype), T.apply_tokens(b, inv_b).to(b.dtype)


def _through_norms(a: Tensor, b: Tensor, inv_a: Tensor, inv_b: Tensor, dah: Tensor, dbh: Tensor, normalize: bool):
    """Gradients w.r.t. â, b̂ carried back through the normalisation, in the features' dtypes."""
    if normalize:
        dah, dbh = T.token_norm_backward(a, inv_a, dah), T.token_norm_backward(b, inv_b, dbh)
    return dah.to(a.dtype), dbh.to(b.dtype)


class HingeRows(torch.autograd.Function):
    """out_i = Σ_j [o_i + S_ij]_+ (or its hardest term) over the negatives of row i; S = ÂB̂ᵀ tiled."""

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor, offset: Tensor, key_a: Tensor, key_b: Tensor, hardest: bool,
                normalize: bool):
        from . import triton_kernels as K

        a, b = a.contiguous(), b.contiguous()
        na, d = a.shape
        nb = b.shape[0]
        inv_a, inv_b = _kernel_norms(a, b, normalize)
        off = offset.detach().float().contiguous()
        ka, kb = key_a.to(torch.int32).contiguous(), key_b.to(torch.int32).contiguous()
        out = torch.empty(na, device=a.device, dtype=torch.float32)
        cnt = torch.empty(na, device=a.device, dtype=torch.float32)
        arg = torch.empty(na, device=a.device, dtype=torch.int32)
        cfg, warps, stages = launch_config("_hinge_fwd_kernel", a.device, a.dtype)
        K._hinge_fwd_kernel[(triton.cdiv(na, cfg["BLOCK_M"]),)](
            a, b, inv_a, inv_b, off, ka, kb, out, cnt, arg, na, nb, d, d, 1, a.stride(0), b.stride(0),
            NORM=normalize, HARDEST=hardest, PRECISION=T.precision(a.dtype), UPCAST=T.upcast(a),
            num_warps=warps, num_stages=stages, **cfg)
        ctx.save_for_backward(a, b, off, ka, kb, cnt, arg)
        ctx.hardest, ctx.normalize = hardest, normalize
        return out

    @staticmethod
    def backward(ctx, g_out: Tensor):
        from . import triton_kernels as K

        a, b, off, ka, kb, cnt, arg = ctx.saved_tensors
        na, d = a.shape
        nb = b.shape[0]
        acc = torch.float32
        g = g_out.float().contiguous()
        inv_a, inv_b, ah, bh = _gemm_operands(a, b, ctx.normalize)
        if ctx.hardest:
            w = g * cnt  # g_i where the hardest hinge is active, else 0
            dah = w[:, None] * bh[arg.long()].to(acc)
            dbh = torch.zeros(nb, d, dtype=acc, device=a.device).index_add_(0, arg.long(), w[:, None] * ah.to(acc))
        else:
            cfg, warps, stages = launch_config("_hinge_grad_tile_kernel", a.device, a.dtype)
            sigma = g.abs().amax().clamp_min(1e-30)  # the slab holds g/σ <= 1: the mean's 1/(2N²) would flush in fp16
            g_s = g / sigma

            def fill(r0, rc, slab):
                grid = (triton.cdiv(rc, cfg["BLOCK_M"]), triton.cdiv(nb, cfg["BLOCK_N"]))
                K._hinge_grad_tile_kernel[grid](
                    a, b, inv_a, inv_b, off, ka, kb, g_s,
                    slab, r0, rc, nb, d, d, 1, a.stride(0), b.stride(0), slab.stride(0),
                    NORM=ctx.normalize, PRECISION=T.precision(a.dtype), UPCAST=T.upcast(a),
                    num_warps=warps, num_stages=stages, **cfg)

            dah, dbh = T.slab_products(fill, ah, bh, acc)
            dah, dbh = dah * sigma, dbh * sigma
        da, db = _through_norms(a, b, inv_a, inv_b, dah, dbh, ctx.normalize)
        return da, db, (g * cnt).to(off.dtype), None, None, None, None


class PairHinge(torch.autograd.Function):
    """Both directions of the diagonal hinge (pair i ↔ i, N = M) from one sweep of S: (out_row (N,), out_col (N,)),
    out_row_i = Σ_{j≠i} [o_i + S_ij]_+, out_col_j = Σ_{i≠j} [o_j + S_ij]_+. Forward one unit of 2·N²·D, backward
    one recompute and two GEMMs: 4 units, where two HingeRows passes take 8."""

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor, offset: Tensor, normalize: bool):
        from . import triton_kernels as K

        a, b = a.contiguous(), b.contiguous()
        n, d = a.shape
        inv_a, inv_b = _kernel_norms(a, b, normalize)
        off = offset.detach().float().contiguous()
        cfg, warps, stages = launch_config("_hinge_pair_fwd_kernel", a.device, a.dtype)
        n_blocks = triton.cdiv(n, cfg["BLOCK_M"])
        out = torch.empty(n, device=a.device, dtype=torch.float32)
        cnt = torch.empty(n, device=a.device, dtype=torch.float32)
        psum = torch.empty(n_blocks, n, device=a.device, dtype=torch.float32)
        pcnt = torch.empty(n_blocks, n, device=a.device, dtype=torch.float32)
        K._hinge_pair_fwd_kernel[(n_blocks,)](
            a, b, inv_a, inv_b, off, out, cnt, psum, pcnt, n, d, a.stride(0), b.stride(0), psum.stride(0),
            NORM=normalize, PRECISION=T.precision(a.dtype), UPCAST=T.upcast(a), num_warps=warps,
            num_stages=stages, **cfg)
        out_c, cnt_c = psum.sum(dim=0), pcnt.sum(dim=0)
        ctx.save_for_backward(a, b, off, cnt, cnt_c)
        ctx.normalize = normalize
        return out, out_c

    @staticmethod
    def backward(ctx, g_r: Tensor, g_c: Tensor):
        from . import triton_kernels as K

        a, b, off, cnt, cnt_c = ctx.saved_tensors
        n, d = a.shape
        g_r = torch.zeros(n, device=a.device) if g_r is None else g_r.float().contiguous()
        g_c = torch.zeros(n, device=a.device) if g_c is None else g_c.float().contiguous()
        inv_a, inv_b, ah, bh = _gemm_operands(a, b, ctx.normalize)
        sigma = torch.maximum(g_r.abs().amax(), g_c.abs().amax()).clamp_min(1e-30)  # slab entries <= 2
        gr_s, gc_s = g_r / sigma, g_c / sigma
        cfg, warps, stages = launch_config("_hinge_pair_grad_tile_kernel", a.device, a.dtype)

        def fill(r0, rc, slab):
            grid = (triton.cdiv(rc, cfg["BLOCK_M"]), triton.cdiv(n, cfg["BLOCK_N"]))
            K._hinge_pair_grad_tile_kernel[grid](
                a, b, inv_a, inv_b, off, gr_s, gc_s, slab,
                r0, rc, n, d, a.stride(0), b.stride(0), slab.stride(0), NORM=ctx.normalize,
                PRECISION=T.precision(a.dtype), UPCAST=T.upcast(a), num_warps=warps, num_stages=stages, **cfg)

        dah, dbh = T.slab_products(fill, ah, bh, torch.float32)
        da, db = _through_norms(a, b, inv_a, inv_b, dah * sigma, dbh * sigma, ctx.normalize)
        d_off = g_r * cnt + g_c * cnt_c  # o_i enters row i's and column i's active hinges
        return da, db, d_off.to(off.dtype), None


def negative_count(labels: Tensor, n_cols: int) -> Tensor:
    """Number of hinge terms of both directions: N·(M−1) image→text plus N² − Σ_c n_c² text→image (n_c: rows
    whose positive is column c), 2N(N−1) for the diagonal. On the device: no host read."""
    n = labels.shape[0]
    per_col = torch.zeros(n_cols, device=labels.device, dtype=torch.float64).index_add_(
        0, labels, torch.ones(n, device=labels.device, dtype=torch.float64))
    return n * (n_cols - 1) + n * n - (per_col * per_col).sum()


def max_margin_fused(x: Tensor, y: Tensor, margin, labels: Tensor, hardest: bool, normalize: bool,
                     reduction: str = "mean") -> Tensor:
    """Bidirectional hinge with a scalar or per-pair margin (same definition and reductions as the reference),
    O((N+M)·D) memory."""
    acc = torch.float32
    yp = y if labels is None else y[labels]
    if normalize:
        xf, ypf = T.apply_tokens(x, T.inv_token_norms(x, 1)), T.apply_tokens(yp, T.inv_token_norms(yp, 1))
    else:
        xf, ypf = x.to(acc), yp.to(acc)
    off = margin - (xf * ypf).sum(dim=1)  # o_i = m_i − S_{i,p(i)}, its gradient flows to both features
    n = x.shape[0]
    if labels is None and not hardest:  # the diagonal: both directions from one sweep (PairHinge)
        out_r, out_c = PairHinge.apply(x, y, off, normalize)
        total = out_r.sum() + out_c.sum()
        return total / (2 * n * (n - 1)) if reduction == "mean" else total / n
    if labels is None:
        labels = torch.arange(n, device=x.device)
        yp = y
    cols = torch.arange(y.shape[0], device=y.device)
    i2t = HingeRows.apply(x, y, off, labels, cols, hardest, normalize)
    t2i = HingeRows.apply(yp, x, off, labels, labels, hardest, normalize)
    if hardest:
        return (i2t + t2i).mean() / 2 if reduction == "mean" else (i2t + t2i).mean()
    if reduction == "mean":
        return (i2t.sum() + t2i.sum()) / negative_count(labels, y.shape[0]).to(acc)
    return (i2t + t2i).mean()


if _TRITON_IMPORT_ERROR is None:
    import triton  # noqa: E402

    register("max_margin", "triton")(max_margin_fused)
