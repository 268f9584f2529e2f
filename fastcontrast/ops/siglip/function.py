"""Fused SigLIP loss: the all-pairs softplus sum as a tiled Triton op with a slab backward; positives in PyTorch.

−Σ_j log σ(z_ij l_ij) = Σ_j softplus(l_ij) − l_{i,p(i)}  (z = +1 only at the positive), so the loss is one
row-reduction over tiles of S plus an O(N·D) positive term.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ...dispatch import register
from .. import _tiles as T
from .._configs import launch as launch_config
from .._triton_support import IMPORT_ERROR as _TRITON_IMPORT_ERROR


class SoftplusRows(torch.autograd.Function):
    """f_i = Σ_j softplus(s⟨x_i, y_j⟩ + b): (N,), with gradients to x, y, s and b."""

    @staticmethod
    def forward(ctx, x, y, scale, bias):
        from . import triton_kernels as K

        x, y = x.contiguous(), y.contiguous()
        n, d = x.shape
        m = y.shape[0]
        s32, b32 = scale.detach().float().reshape(1), bias.detach().float().reshape(1)
        out = torch.empty(n, device=x.device, dtype=torch.float32)
        cfg, warps, stages = launch_config("_softplus_rows_kernel", x.device, x.dtype)
        K._softplus_rows_kernel[(triton.cdiv(n, cfg["BLOCK_M"]),)](
            x, y, s32, b32, out, n, m, d, x.stride(0), y.stride(0), PRECISION=T.precision(x.dtype),
            UPCAST=T.upcast(x), num_warps=warps, num_stages=stages, **cfg)
        ctx.save_for_backward(x, y, s32, b32)
        ctx.scale_dtype, ctx.bias_dtype = scale.dtype, bias.dtype
        return out

    @staticmethod
    def backward(ctx, g):
        from . import triton_kernels as K

        x, y, s32, b32 = ctx.saved_tensors
        n, d = x.shape
        m = y.shape[0]
        g = g.float().contiguous()
        sigma = (1.0 / (g.abs().max() * s32.abs()).clamp_min(1e-30)).reshape(1)  # keeps σ·s·W <= 1 (fp16 slabs)
        dsum_s = torch.zeros(n, device=x.device, dtype=torch.float32)
        dsum_b = torch.zeros(n, device=x.device, dtype=torch.float32)
        cfg, warps, stages = launch_config("_sigmoid_grad_tile_kernel", x.device, x.dtype)

        def fill(r0, rc, slab):
            grid = (triton.cdiv(rc, cfg["BLOCK_M"]), triton.cdiv(m, cfg["BLOCK_N"]))
            K._sigmoid_grad_tile_kernel[grid](
                x, y, s32, b32, g, sigma, slab, dsum_s, dsum_b, r0, rc, m, d, x.stride(0), y.stride(0),
                slab.stride(0), PRECISION=T.precision(x.dtype), UPCAST=T.upcast(x), num_warps=warps,
                num_stages=stages, **cfg)

        dx, dy = T.slab_products(fill, x, y, torch.float32)
        dx, dy = dx / sigma, dy / sigma
        return (dx.to(x.dtype), dy.to(y.dtype), dsum_s.sum().to(ctx.scale_dtype),
                dsum_b.sum().to(ctx.bias_dtype))


def siglip_fused(x: Tensor, y: Tensor, scale: Tensor, bias: Optional[Tensor], labels: Optional[Tensor],
                 negative_only: bool) -> Tensor:
    b = torch.zeros((), device=x.device) if bias is None else bias
    f = SoftplusRows.apply(x, y, scale, b)
    total = f.sum()
    if not negative_only:
        n = x.shape[0]
        lab = torch.arange(n, device=x.device) if labels is None else labels
        pos = (x.float() * y[lab].float()).sum(dim=1)
        total = total - (scale * pos + b).sum()
    return total / x.shape[0]


if _TRITON_IMPORT_ERROR is None:
    import triton  # noqa: E402

    register("siglip", "triton")(siglip_fused)
