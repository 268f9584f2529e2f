"""The all-pairs softplus sweep Σ_ij softplus(s⟨x_i, y_j⟩ + b) as a tiled Triton op with a slab backward.

SigLIP's loss is this sum plus an O(N·D) positive term (``fastcontrast.losses.siglip_loss``):
−Σ_j log σ(z_ij l_ij) = Σ_j softplus(l_ij) − l_{i,p(i)} (z = +1 only at the positive).
"""
from __future__ import annotations


import torch

from . import tiles as T
from .configs import is_aligned
from .configs import launch as launch_config
from .triton_support import triton

if triton is not None:
    from . import softplus_triton as K


class SoftplusSum(torch.autograd.Function):
    """Σ_ij softplus(s⟨x_i, y_j⟩ + b), a scalar, with gradients to x (N, D), y (M, D), s and b.

    With ``want_grad`` the forward sweep also writes W = σ(l) one row slab at a time, and the slab GEMMs
    s·W Y, s·Wᵀ X accumulate the feature gradients in fp32 right behind it; the backward only multiplies by the
    upstream scalar: 3 units of 2·N·M·D in all (1 sweep + 2 GEMMs). Without, the forward is the 1-unit sweep.
    Memory O((N+M)·D) plus one G slab of the byte budget (``_tiles.rows_per_block``); no float atomics."""

    @staticmethod
    def forward(ctx, x, y, scale, bias, want_grad: bool):
        x, y = x.contiguous(), y.contiguous()
        n, d = x.shape
        m = y.shape[0]
        s32, b32 = scale.detach().float().reshape(1), bias.detach().float().reshape(1)
        ctx.scale_shape, ctx.bias_shape = scale.shape, bias.shape
        ctx.dtypes = (x.dtype, y.dtype, scale.dtype, bias.dtype)
        if not want_grad:
            out = torch.empty(n, device=x.device, dtype=torch.float32)
            cfg, warps, stages = launch_config("_softplus_rows_kernel", x.device, x.dtype)
            K._softplus_rows_kernel[(triton.cdiv(n, cfg["BLOCK_M"]),)](
                x, y, s32, b32, out, n, m, d, x.stride(0), y.stride(0), PRECISION=T.precision(x.dtype),
                UPCAST=T.upcast(x), num_warps=warps, num_stages=stages, **cfg)
            ctx.grads = None
            return out.sum()
        al = is_aligned("_sigmoid_grad_tile_kernel", D=d, stride_am=x.stride(0), stride_bm=y.stride(0))
        cfg, warps, stages = launch_config("_sigmoid_grad_tile_kernel", x.device, x.dtype, al)
        col_tiles = triton.cdiv(m, cfg["BLOCK_N"])
        sums = torch.zeros(3, device=x.device, dtype=torch.float32)  # Σ softplus, Σ σ·S, Σ σ
        part = []

        def fill(r0, rc, slab):
            grid = (triton.cdiv(rc, cfg["BLOCK_M"]), col_tiles)
            if not part:  # the first slab is the tallest
                part.append(torch.empty(3, grid[0] * grid[1], device=x.device, dtype=torch.float32))
            p = part[0]
            K._sigmoid_grad_tile_kernel[grid](
                x, y, s32, b32, slab, p, r0, rc, m, d, x.stride(0), y.stride(0), slab.stride(0), p.stride(0),
                PRECISION=T.precision(x.dtype), UPCAST=T.upcast(x), num_warps=warps, num_stages=stages, **cfg)
            sums.add_(p[:, :grid[0] * grid[1]].sum(dim=1))

        need = ctx.needs_input_grad
        dx, dy = T.slab_products(fill, x, y, torch.float32, need=(need[0], need[1]))
        ctx.grads = (None if dx is None else dx.mul_(s32), None if dy is None else dy.mul_(s32), sums[1], sums[2])
        return sums[0].clone()

    @staticmethod
    def backward(ctx, g):
        T.no_double_backward("siglip_loss", "triton")  # the gradients are the forward's, scaled by g
        dx, dy, ds, db = ctx.grads
        g = g.float()
        xdt, ydt, sdt, bdt = ctx.dtypes
        return (None if dx is None else (dx * g).to(xdt), None if dy is None else (dy * g).to(ydt),
                (ds * g).to(sdt).reshape(ctx.scale_shape), (db * g).to(bdt).reshape(ctx.bias_shape), None)
