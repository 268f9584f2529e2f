"""The hinge sweeps of the max-margin loss: autograd around the tiled hinge kernels (Triton on CUDA or the CPU
interpreter). ``HingeRows`` (Σ_j [o_i + S_ij]_+ over a row's negatives), ``HardestPair`` (VSE++'s hardest
negative, both directions, one sweep), ``PairHinge`` (the diagonal, both directions, one sweep). The loss built
on them: ``fastcontrast.losses.max_margin_loss``."""
from __future__ import annotations

import torch
from torch import Tensor

from . import tiles as T
from .configs import launch as launch_config
from .triton_support import triton

if triton is not None:
    from . import hinge_triton as K


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


def _no_double_backward():
    T.no_double_backward("max_margin_loss", "triton")


class HingeRows(torch.autograd.Function):
    """out_i = Σ_j [o_i + S_ij]_+ over the negatives of row i; S = ÂB̂ᵀ tiled. Forward one unit, backward one
    recompute and two GEMMs (the labelled sum; the diagonal and the hardest variant have their own functions)."""

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor, offset: Tensor, key_a: Tensor, key_b: Tensor, normalize: bool):
        a, b = a.contiguous(), b.contiguous()
        na, d = a.shape
        nb = b.shape[0]
        inv_a, inv_b = _kernel_norms(a, b, normalize)
        off = offset.detach().float().contiguous()
        ka, kb = key_a.to(torch.int32).contiguous(), key_b.to(torch.int32).contiguous()
        out = torch.empty(na, device=a.device, dtype=torch.float32)
        cnt = torch.empty(na, device=a.device, dtype=torch.float32)
        cfg, warps, stages = launch_config("_hinge_fwd_kernel", a.device, a.dtype)
        K._hinge_fwd_kernel[(triton.cdiv(na, cfg["BLOCK_M"]),)](
            a, b, inv_a, inv_b, off, ka, kb, out, cnt, cnt, cnt, cnt, na, nb, d, d, 1, a.stride(0), b.stride(0), 0,
            NORM=normalize, HARDEST=False, PRECISION=T.precision(a.dtype), UPCAST=T.upcast(a),
            num_warps=warps, num_stages=stages, **cfg)
        ctx.save_for_backward(a, b, off, ka, kb, cnt)
        ctx.normalize = normalize
        return out

    @staticmethod
    def backward(ctx, g_out: Tensor):
        _no_double_backward()
        a, b, off, ka, kb, cnt = ctx.saved_tensors
        na, d = a.shape
        nb = b.shape[0]
        g = g_out.float().contiguous()
        inv_a, inv_b, ah, bh = _gemm_operands(a, b, ctx.normalize)
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

        dah, dbh = T.slab_products(fill, ah, bh, torch.float32)
        da, db = _through_norms(a, b, inv_a, inv_b, dah * sigma, dbh * sigma, ctx.normalize)
        return da, db, (g * cnt).to(off.dtype), None, None, None


class HardestPair(torch.autograd.Function):
    """total = Σ_i [o_i + max_{j ∉ pos(i)} S_ij]_+ + Σ_i [o_i + max_{i': p(i') ≠ p(i)} S_{i',p(i)}]_+ (both
    directions of the hardest-negative hinge, VSE++), a scalar. One sweep of S = ÂB̂ᵀ finds the argmax of every row
    and every column (1 unit of 2·N·M·D); the gradient is a gather and a scatter of O((N+M)·D) at the argmax
    positions, no GEMM."""

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor, offset: Tensor, labels: Tensor, normalize: bool):
        a, b = a.contiguous(), b.contiguous()
        na, d = a.shape
        nb = b.shape[0]
        inv_a, inv_b = _kernel_norms(a, b, normalize)
        off = offset.detach().float().contiguous()
        lab = labels.to(torch.int32).contiguous()
        cols = torch.arange(nb, device=a.device, dtype=torch.int32)
        cfg, warps, stages = launch_config("_hinge_fwd_kernel", a.device, a.dtype)
        blocks = triton.cdiv(na, cfg["BLOCK_M"])
        out = torch.empty(na, device=a.device, dtype=torch.float32)
        cnt = torch.empty(na, device=a.device, dtype=torch.float32)
        arg = torch.empty(na, device=a.device, dtype=torch.int32)
        pmax = torch.empty(blocks, nb, device=a.device, dtype=torch.float32)
        parg = torch.empty(blocks, nb, device=a.device, dtype=torch.int32)
        K._hinge_fwd_kernel[(blocks,)](
            a, b, inv_a, inv_b, off, lab, cols, out, cnt, arg, pmax, parg, na, nb, d, d, 1, a.stride(0),
            b.stride(0), pmax.stride(0), NORM=normalize, HARDEST=True, PRECISION=T.precision(a.dtype),
            UPCAST=T.upcast(a), num_warps=warps, num_stages=stages, **cfg)
        col_max, blk = pmax.max(dim=0)  # column j's hardest negative row over the blocks
        col_arg = parg.gather(0, blk[None]).squeeze(0).long()
        z_c = off + col_max[labels]
        act_c = (z_c > 0).to(torch.float32)
        total = out.sum() + z_c.clamp_min(0).sum()
        ctx.save_for_backward(a, b, labels, cnt, arg, act_c, col_arg)
        ctx.normalize, ctx.off_dtype = normalize, offset.dtype
        return total

    @staticmethod
    def backward(ctx, g: Tensor):
        _no_double_backward()
        a, b, labels, cnt, arg, act_c, col_arg = ctx.saved_tensors
        inv_a, inv_b = _kernel_norms(a, b, ctx.normalize)
        ah32, bh32 = (T.apply_tokens(a, inv_a), T.apply_tokens(b, inv_b)) if ctx.normalize else (a.float(), b.float())
        g = g.float()
        w_r, w_c = g * cnt, g * act_c  # g where the row's / the pair's column hinge is active, else 0
        arg, row_c = arg.long(), col_arg[labels]  # row i's hardest column; pair i's hardest row of column p(i)
        dah = (w_r[:, None] * bh32[arg]).index_add_(0, row_c, w_c[:, None] * bh32[labels])
        dbh = torch.zeros_like(bh32).index_add_(0, arg, w_r[:, None] * ah32).index_add_(
            0, labels, w_c[:, None] * ah32[row_c])
        da, db = _through_norms(a, b, inv_a, inv_b, dah, dbh, ctx.normalize)
        return da, db, (w_r + w_c).to(ctx.off_dtype), None, None


class PairHinge(torch.autograd.Function):
    """total = Σ_i Σ_{j≠i} [o_i + S_ij]_+ + Σ_j Σ_{i≠j} [o_j + S_ij]_+, both directions of the diagonal hinge
    (pair i ↔ i, N = M), a scalar.

    With ``want_grad`` the forward sweep writes W_ij = ∂total/∂S_ij ∈ {0, 1, 2} one row slab at a time and the
    slab GEMMs W B̂, Wᵀ Â accumulate the feature gradients in fp32 right behind it (plus the active counts for the
    offsets); the backward only multiplies by the upstream scalar: 3 units of 2·N²·D. Without, the 1-unit sweep
    (``_hinge_pair_fwd_kernel``). Memory O(N·D) plus one slab; no float atomics."""

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor, offset: Tensor, normalize: bool, want_grad: bool):
        a, b = a.contiguous(), b.contiguous()
        n, d = a.shape
        off = offset.detach().float().contiguous()
        ctx.dtypes = (a.dtype, b.dtype, offset.dtype)
        if not want_grad:
            inv_a, inv_b = _kernel_norms(a, b, normalize)
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
            ctx.grads = None
            return out.sum() + psum.sum()
        inv_a, inv_b, ah, bh = _gemm_operands(a, b, normalize)
        cfg, warps, stages = launch_config("_hinge_pair_grad_tile_kernel", a.device, a.dtype)
        col_tiles = triton.cdiv(n, cfg["BLOCK_N"])
        total = torch.zeros((), device=a.device, dtype=torch.float32)
        cnt_r = torch.empty(n, device=a.device, dtype=torch.float32)
        cnt_c = torch.zeros(n, device=a.device, dtype=torch.float32)
        part = []

        def fill(r0, rc, slab):
            grid = (triton.cdiv(rc, cfg["BLOCK_M"]), col_tiles)
            if not part:  # the first slab is the tallest: tile sums, per-row and per-column counts
                part.extend([torch.empty(grid[0] * grid[1], device=a.device, dtype=torch.float32),
                             torch.empty(col_tiles, rc, device=a.device, dtype=torch.float32),
                             torch.empty(grid[0], n, device=a.device, dtype=torch.float32)])
            lp, rcnt, ccnt = part
            K._hinge_pair_grad_tile_kernel[grid](
                a, b, inv_a, inv_b, off, slab, lp, rcnt, ccnt, r0, rc, n, d, a.stride(0), b.stride(0),
                slab.stride(0), rcnt.stride(0), ccnt.stride(0), NORM=normalize, PRECISION=T.precision(a.dtype),
                UPCAST=T.upcast(a), num_warps=warps, num_stages=stages, **cfg)
            total.add_(lp[:grid[0] * grid[1]].sum())
            cnt_r[r0:r0 + rc] = rcnt[:, :rc].sum(dim=0)
            cnt_c.add_(ccnt[:grid[0]].sum(dim=0))

        need = ctx.needs_input_grad
        dah, dbh = T.slab_products(fill, ah, bh, torch.float32, need=(need[0], need[1]))
        if normalize:
            dah = None if dah is None else T.token_norm_backward(a, inv_a, dah)
            dbh = None if dbh is None else T.token_norm_backward(b, inv_b, dbh)
        ctx.grads = (dah, dbh, cnt_r + cnt_c)  # o_i enters row i's and column i's active hinges
        return total

    @staticmethod
    def backward(ctx, g: Tensor):
        _no_double_backward()
        da, db, d_off = ctx.grads
        adt, bdt, odt = ctx.dtypes
        g = g.float()
        return (None if da is None else (da * g).to(adt), None if db is None else (db * g).to(bdt),
                (d_off * g).to(odt), None, None)
