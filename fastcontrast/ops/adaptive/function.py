"""Fused max-margin loss: autograd around the hinge kernels (Triton on CUDA or the CPU interpreter)."""
from __future__ import annotations

import torch
from torch import Tensor

from ...dispatch import register
from .. import _tiles as T
from .._configs import launch as launch_config
from .._triton_support import IMPORT_ERROR as _TRITON_IMPORT_ERROR


class HingeRows(torch.autograd.Function):
    """out_i = Σ_j [o_i + S_ij]_+ (or its hardest term) over the negatives of row i; S = ÂB̂ᵀ tiled."""

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor, offset: Tensor, key_a: Tensor, key_b: Tensor, hardest: bool,
                normalize: bool):
        from . import triton_kernels as K

        a, b = a.contiguous(), b.contiguous()
        na, d = a.shape
        nb = b.shape[0]
        dummy = a.new_empty(1, dtype=torch.float32)
        inv_a = T.inv_token_norms(a, 1) if normalize else dummy
        inv_b = T.inv_token_norms(b, 1) if normalize else dummy
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
        inv_a = T.inv_token_norms(a, 1) if ctx.normalize else None
        inv_b = T.inv_token_norms(b, 1) if ctx.normalize else None
        ah = T.apply_tokens(a, inv_a).to(a.dtype) if ctx.normalize else a
        bh = T.apply_tokens(b, inv_b).to(b.dtype) if ctx.normalize else b
        if ctx.hardest:
            w = g * cnt  # g_i where the hardest hinge is active, else 0
            dah = w[:, None] * bh[arg.long()].to(acc)
            dbh = torch.zeros(nb, d, dtype=acc, device=a.device).index_add_(0, arg.long(), w[:, None] * ah.to(acc))
        else:
            cfg, warps, stages = launch_config("_hinge_grad_tile_kernel", a.device, a.dtype)
            dummy = a.new_empty(1, dtype=torch.float32)

            def fill(r0, rc, slab):
                grid = (triton.cdiv(rc, cfg["BLOCK_M"]), triton.cdiv(nb, cfg["BLOCK_N"]))
                K._hinge_grad_tile_kernel[grid](
                    a, b, inv_a if ctx.normalize else dummy, inv_b if ctx.normalize else dummy, off, ka, kb, g,
                    slab, r0, rc, nb, d, d, 1, a.stride(0), b.stride(0), slab.stride(0),
                    NORM=ctx.normalize, PRECISION=T.precision(a.dtype), UPCAST=T.upcast(a),
                    num_warps=warps, num_stages=stages, **cfg)

            dah, dbh = T.slab_products(fill, ah, bh, acc)
        if ctx.normalize:
            dah = T.token_norm_backward(a, inv_a, dah)
            dbh = T.token_norm_backward(b, inv_b, dbh)
        return dah.to(a.dtype), dbh.to(b.dtype), (g * cnt).to(off.dtype), None, None, None, None


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
    yp = y[labels]
    if normalize:
        xf, ypf = T.apply_tokens(x, T.inv_token_norms(x, 1)), T.apply_tokens(yp, T.inv_token_norms(yp, 1))
    else:
        xf, ypf = x.to(acc), yp.to(acc)
    off = margin - (xf * ypf).sum(dim=1)  # o_i = m_i − S_{i,p(i)}, its gradient flows to both features
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
