"""The pairwise log-sum-exp of every InfoNCE-family loss, as the fused op ``fastcontrast::lse_pair``.

``lse_pair(x, y, a, c, bias, normalize, tokens, kernel, backward_kernel) -> (lse_row (N,), lse_col (M,))``:

    S = x̂ŷᵀ (per-token normalised when ``normalize``; K = ``tokens``),
    lse_row_i = log Σ_j exp(a_i S_ij + b),   lse_col_j = log Σ_i exp(c_j S_ij + b),

never materialising S: Triton kernels (``lse_pair_triton.py``), the C++/CUDA kernels of csrc/, or ``tiles``, a
blockwise PyTorch implementation of the same tiling (row blocks, online column statistics, recompute in
backward). All keep O((N+M)·D) memory. ``kernel`` / ``backward_kernel`` are decided by the dispatcher
(``fastcontrast.dispatch``: ``Impl.kernel``); this module runs what it is told.
"""
from __future__ import annotations

import functools
from typing import Tuple

import torch
from torch import Tensor

from .. import _ext
from . import configs as C
from . import tiles as T
from .fused_op import DoubleBackward, fused_op
from .triton_support import triton

if triton is not None:
    from . import lse_pair_triton as K

KERNELS = ("triton", "cuda", "cpu", "tiles")


# ----------------------------------------------------------------------------------------------- Triton launch
def _triton_fwd(x, y, a, c, bias, normalize, tokens):
    """Row and column lse from one sweep of S: the kernel writes the rows' lse and per-row-block column
    partials, merged here (base 2, as the kernel keeps them)."""
    n, d = x.shape
    m = y.shape[0]
    x, y = x.contiguous(), y.contiguous()
    inv_x = T.inv_token_norms(x, tokens) if normalize else x.new_empty(1, dtype=torch.float32)
    inv_y = T.inv_token_norms(y, tokens) if normalize else x.new_empty(1, dtype=torch.float32)
    ntok, dt = (tokens, d // tokens) if normalize else (1, d)
    al = C.is_aligned("_lse_fwd_kernel", D=d, DT=dt, stride_am=x.stride(0), stride_bm=y.stride(0))
    full = C.config("_lse_fwd_kernel", x.device, x.dtype, al)
    cfg, warps, stages = C.launch("_lse_fwd_kernel", x.device, x.dtype, al)
    n_blocks = triton.cdiv(n, cfg["BLOCK_M"])
    split = _column_split(n_blocks, triton.cdiv(m, cfg["BLOCK_N"]), x.device, full)
    lse_r = torch.empty(n, device=x.device, dtype=torch.float32)
    pmax = torch.empty(n_blocks, m, device=x.device, dtype=torch.float32)
    psum = torch.empty(n_blocks, m, device=x.device, dtype=torch.float32)
    # the column splits' row partials (base 2), merged below; unused (1 element) with one split
    rmax = torch.empty(split, n, device=x.device, dtype=torch.float32) if split > 1 else lse_r[:1]
    rsum = torch.empty(split, n, device=x.device, dtype=torch.float32) if split > 1 else lse_r[:1]
    K._lse_fwd_kernel[(n_blocks, split)](
        x, y, inv_x, inv_y, a.float().contiguous(), c.float().contiguous(), bias.float().reshape(1), lse_r, pmax,
        psum, rmax, rsum, n, m, d, dt, ntok, x.stride(0), y.stride(0), pmax.stride(0), NORM=normalize,
        MULTI=ntok > 1, HAS_BIAS=True, PRECISION=T.precision(x.dtype), UPCAST=T.upcast(x), num_warps=warps,
        num_stages=stages, **cfg)
    if split > 1:
        top_r = rmax.amax(dim=0)
        lse_r = (top_r + torch.log2((rsum * torch.exp2(rmax - top_r)).sum(dim=0))) * _LN2
    top = pmax.amax(dim=0)
    lse_c = (top + torch.log2((psum * torch.exp2(pmax - top)).sum(dim=0))) * _LN2
    return lse_r, lse_c


_INTERPRETER_SMS = 4  # the SM count the column split aims at under TRITON_INTERPRET (so tests run the split)


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return _INTERPRETER_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def _column_split(n_blocks: int, col_tiles: int, device: torch.device, cfg: dict) -> int:
    """Column splits of the forward grid: enough that n_blocks × splits fills one wave (SMs × CTAs per SM)
    when the row blocks alone do not; each split keeps at least 2 column tiles. 1 when COL_SPLIT is off."""
    if not cfg.get("COL_SPLIT", False):
        return 1
    wave = _sm_count(device) * cfg.get("CTAS", 1)
    if n_blocks >= wave:
        return 1
    return max(1, min(triton.cdiv(wave, n_blocks), col_tiles // 2))


_LN2 = 0.6931471805599453


def _triton_grad_tiles(x, y, inv_x, inv_y, a, c, bias, lse_r, lse_c, g_r, g_c, sigma, normalize, tokens):
    """Returns fill(r0, rc, slab, da, dc): σ·G for rows r0:r0+rc into slab[:rc], da[r0:r0+rc] set, dc accumulated.

    The scale gradients come from per-tile partials (the kernel's PART_A, PART_B) summed here over the tiles in a
    fixed order, not from float atomics: the same bits every run, as torch.use_deterministic_algorithms asks, in
    every mode (as many plain stores as there were atomics, plus two small sums per slab; not yet timed on a GPU)."""
    n, d = x.shape
    m = y.shape[0]
    ntok, dt = (tokens, d // tokens) if normalize else (1, d)
    al = C.is_aligned("_grad_tile_kernel", D=d, DT=dt, stride_am=x.stride(0), stride_bm=y.stride(0))
    cfg, warps, stages = C.launch("_grad_tile_kernel", x.device, x.dtype, al)
    b = bias.float().reshape(1)
    a32, c32 = a.float().contiguous(), c.float().contiguous()
    g_r, g_c = g_r.float().contiguous(), g_c.float().contiguous()
    parts = []

    def fill(r0, rc, slab, da, dc):
        grid = (triton.cdiv(rc, cfg["BLOCK_M"]), triton.cdiv(m, cfg["BLOCK_N"]))
        if not parts:  # the first slab is the tallest: (column tiles × its rows), (its row tiles × M)
            parts.extend([torch.empty(grid[1], rc, device=x.device, dtype=torch.float32),
                          torch.empty(grid[0], m, device=x.device, dtype=torch.float32)])
        pa, pb = parts
        K._grad_tile_kernel[grid](
            x, y, inv_x, inv_y, a32, c32, b, lse_r, lse_c, g_r, g_c, sigma, slab, pa, pb, r0, rc, m, d, dt, ntok,
            x.stride(0), y.stride(0), slab.stride(0), pa.stride(0), pb.stride(0),
            NORM=normalize, MULTI=ntok > 1, HAS_BIAS=True, PRECISION=T.precision(x.dtype), UPCAST=T.upcast(x),
            num_warps=warps, num_stages=stages, **cfg)
        torch.sum(pa[:, :rc], dim=0, out=da[r0:r0 + rc])  # every row of a slab is in no other slab
        dc.add_(pb[:grid[0]].sum(dim=0))

    return fill


def _torch_grad_tiles(xh, yh, a, c, bias, lse_r, lse_c, g_r, g_c, sigma):
    """The same tile computation as _grad_tile_kernel, one row chunk at a time, in PyTorch."""
    def fill(r0, rc, slab, da, dc):
        sl = slice(r0, r0 + rc)
        s = xh[sl] @ yh.T
        p = torch.exp(a[sl, None] * s + bias - lse_r[sl, None])
        q = torch.exp(c[None, :] * s + bias - lse_c[None, :])
        da[sl] += g_r[sl] * (p * s).sum(dim=1)
        dc += g_c * (q * s).sum(dim=0)
        slab[:rc] = (p * (g_r[sl] * a[sl] * sigma)[:, None] + q * (g_c * c * sigma)[None, :]).to(slab.dtype)

    return fill


def lse_backward_slabs(g_r, g_c, x, y, a, c, bias, lse_r, lse_c, normalize, tokens, use_triton):
    """dX̂ = G Ŷ and dŶ = Gᵀ X̂ one row chunk of G at a time: G never exists beyond an R×M slab."""
    n, d = x.shape
    m = y.shape[0]
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    inv_x = T.inv_token_norms(x, tokens) if normalize else None
    inv_y = T.inv_token_norms(y, tokens) if normalize else None
    gemm_dtype = x.dtype if use_triton else acc  # tensor-core GEMMs in the input dtype on the fast path
    xh = T.apply_tokens(x, inv_x).to(gemm_dtype) if normalize else x.to(gemm_dtype)
    yh = T.apply_tokens(y, inv_y).to(gemm_dtype) if normalize else y.to(gemm_dtype)
    a_, c_, b_ = a.to(acc), c.to(acc), bias.to(acc)
    g_r, g_c, lse_r, lse_c = g_r.to(acc), g_c.to(acc), lse_r.to(acc).contiguous(), lse_c.to(acc).contiguous()
    # σ keeps max|σ·G| <= 2 (P, Q <= 1): no fp16 overflow, small terms stay representable; computed on device
    sigma = 1.0 / torch.maximum((g_r * a_).abs().max(), (g_c * c_).abs().max()).clamp_min(1e-30)
    da = torch.zeros(n, dtype=acc, device=x.device)
    dc = torch.zeros(m, dtype=acc, device=x.device)
    if use_triton:
        x_c, y_c = x.contiguous(), y.contiguous()
        dummy = x.new_empty(1, dtype=torch.float32)
        fill = _triton_grad_tiles(x_c, y_c, inv_x if normalize else dummy, inv_y if normalize else dummy,
                                  a_, c_, b_, lse_r, lse_c, g_r, g_c, sigma.reshape(1), normalize, tokens)
    else:
        fill = _torch_grad_tiles(xh, yh, a_, c_, b_, lse_r, lse_c, g_r, g_c, sigma)
    dxh, dyh = T.slab_products(lambda r0, rc, slab: fill(r0, rc, slab, da, dc), xh, yh, acc)
    inv_sigma = 1.0 / sigma
    return dxh * inv_sigma, dyh * inv_sigma, da, dc


# -------------------------------------------------------------------------------------- blockwise PyTorch path
def _torch_fwd(x, y, a, c, bias, normalize, tokens):
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    xh = T.apply_tokens(x, T.inv_token_norms(x, tokens)) if normalize else x.to(acc)
    yh = T.apply_tokens(y, T.inv_token_norms(y, tokens)) if normalize else y.to(acc)
    a, c, b = a.to(acc), c.to(acc), bias.to(acc)
    n, m = xh.shape[0], yh.shape[0]
    lse_r = torch.empty(n, dtype=acc, device=x.device)
    col_max = torch.full((m,), float("-inf"), dtype=acc, device=x.device)
    col_sum = torch.zeros(m, dtype=acc, device=x.device)
    for rows in T.row_blocks(n, m, torch.finfo(acc).bits // 8):
        s = xh[rows] @ yh.T  # one block of rows: R×M, never N×M
        lse_r[rows] = torch.logsumexp(a[rows, None] * s + b, dim=1)
        zc = c[None, :] * s + b
        blk_max = zc.max(dim=0).values
        new_max = torch.maximum(col_max, blk_max)
        col_sum = col_sum * torch.exp(col_max - new_max) + torch.exp(zc - new_max).sum(dim=0)
        col_max = new_max
    return lse_r, col_max + col_sum.log()


# ------------------------------------------------------------------------------------------------ the fused op
def _cpu_operands(x, y, a, c, normalize, tokens):
    # the C++ kernels take dense fp32/fp64 operands; normalisation is this prologue (Jacobian in backward)
    acc = T.acc_dtype(x)
    xh = T.apply_tokens(x, T.inv_token_norms(x, tokens)) if normalize else x.to(acc).contiguous()
    yh = T.apply_tokens(y, T.inv_token_norms(y, tokens)) if normalize else y.to(acc).contiguous()
    return xh.contiguous(), yh.contiguous(), a.to(acc).contiguous(), c.to(acc).contiguous()


def _cuda_operands(x, y, normalize, tokens):
    # the CUDA kernels take dense operands in the input dtype (tensor cores); normalisation is this prologue
    if not normalize:
        return x.contiguous(), y.contiguous()
    return (T.apply_tokens(x, T.inv_token_norms(x, tokens)).to(x.dtype).contiguous(),
            T.apply_tokens(y, T.inv_token_norms(y, tokens)).to(y.dtype).contiguous())


def _check_kernel(name: str, kernel: str) -> None:
    if kernel not in KERNELS:
        raise ValueError(f"{name} must be one of {KERNELS} (the dispatcher's Impl.kernel), got {kernel!r}")


def _forward(x: Tensor, y: Tensor, a: Tensor, c: Tensor, bias: Tensor, normalize: bool, tokens: int,
             kernel: str, backward_kernel: str) -> Tuple[Tensor, Tensor]:
    """(lse_row (N,), lse_col (M,)) of a·S + b over columns and c·S + b over rows; S = x̂ŷᵀ, never materialised."""
    _check_kernel("kernel", kernel)
    _check_kernel("backward_kernel", backward_kernel)
    if kernel == "triton":
        return _triton_fwd(x, y, a, c, bias, normalize, tokens)
    # csrc kernels: a constant bias leaves the softmax unchanged, lse(aS + b) = lse(aS) + b, so it is added to
    # the statistics here, as a tensor: passing it to the kernel as a number would be a host read per call
    if kernel == "cpu":
        xh, yh, a_, c_ = _cpu_operands(x, y, a, c, normalize, tokens)
        lr, lc = _ext._C.lse_pair_cpu_forward(xh, yh, a_, c_, 0.0, T.BLOCK_BYTES)
        return lr + bias, lc + bias
    if kernel == "cuda":
        xh, yh = _cuda_operands(x, y, normalize, tokens)
        lr, lc = _ext._C.lse_pair_cuda_forward(xh, yh, a.float(), c.float(), 0.0)
        return lr + bias, lc + bias
    return _torch_fwd(x, y, a, c, bias, normalize, tokens)


def _forward_fake(x, y, a, c, bias, normalize, tokens, kernel, backward_kernel):
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    return x.new_empty(x.shape[0], dtype=acc), x.new_empty(y.shape[0], dtype=acc)


def _backward(g_r: Tensor, g_c: Tensor, x: Tensor, y: Tensor, a: Tensor, c: Tensor, bias: Tensor, lse_r: Tensor,
              lse_c: Tensor, normalize: bool, tokens: int, kernel: str, acc_out: bool = False
              ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, dy, da, dc): gradients of Σ g_r·lse_row + Σ g_c·lse_col, the normalisation's Jacobian included.
    ``acc_out``: dx, dy, da, dc stay in the accumulation dtype (fp32/fp64) instead of the inputs' dtypes, for a
    caller that sums them over blocks (the CLIP ring)."""
    _check_kernel("kernel", kernel)
    if kernel == "cuda":  # P = exp(aS + b − lse) = exp(aS − (lse − b)): the bias stays a tensor (see forward)
        xh, yh = _cuda_operands(x, y, normalize, tokens)
        dxh, dyh, da, dc = _ext._C.lse_pair_cuda_backward(g_r, g_c, xh, yh, a, c, 0.0, lse_r - bias, lse_c - bias,
                                                          T.BLOCK_BYTES)
    elif kernel == "cpu":
        xh, yh, a_, c_ = _cpu_operands(x, y, a, c, normalize, tokens)
        acc = xh.dtype
        dxh, dyh, da, dc = _ext._C.lse_pair_cpu_backward(
            g_r.to(acc).contiguous(), g_c.to(acc).contiguous(), xh, yh, a_, c_, 0.0,
            (lse_r - bias).to(acc), (lse_c - bias).to(acc), T.BLOCK_BYTES)
    else:
        dxh, dyh, da, dc = lse_backward_slabs(g_r, g_c, x, y, a, c, bias, lse_r, lse_c, normalize, tokens,
                                              use_triton=kernel == "triton")
    if normalize:
        dxh = T.token_norm_backward(x, T.inv_token_norms(x, tokens), dxh)
        dyh = T.token_norm_backward(y, T.inv_token_norms(y, tokens), dyh)
    if acc_out:
        acc = T.acc_dtype(x)
        return dxh.to(acc), dyh.to(acc), da.to(acc), dc.to(acc)
    return dxh.to(x.dtype), dyh.to(y.dtype), da.to(a.dtype), dc.to(c.dtype)


def _backward_fake(g_r, g_c, x, y, a, c, bias, lse_r, lse_c, normalize, tokens, kernel, acc_out=False):
    return T.empty_grads(x, y, a, c, acc_out)


# Double backward: lse_pair's backward is a fused kernel (or the PyTorch tiles, recomputing P and Q from the saved
# lse): no derivative of its own. Raise where a differentiable gradient is asked for (create_graph=True) and, for
# direct callers of lse_pair_backward, where one would be taken through it.
LSE_PAIR_OP = ("the fused log-sum-exp fastcontrast::lse_pair (clip_loss, oblique_clip_loss, "
               "adaptive_temperature_clip_loss, ce_rows, codebook_loss, momentum_contrastive_loss, distill_clip_loss)")
LSE_PAIR_ALTERNATIVE = "backend='reference' (or backend='dense' for the InfoNCE losses and distill_clip_loss)"


def _setup_context(ctx, inputs, output):
    x, y, a, c, bias, normalize, tokens, kernel, backward_kernel = inputs
    ctx.save_for_backward(x, y, a, c, bias, *output)
    ctx.normalize, ctx.tokens, ctx.kernel, ctx.backward_kernel = normalize, tokens, kernel, backward_kernel


def _no_create_graph(ctx):
    T.no_double_backward(LSE_PAIR_OP, ctx.kernel, LSE_PAIR_ALTERNATIVE)


def _gradients(ctx, backward_op, g_r, g_c):
    x, y, a, c, bias, lse_r, lse_c = ctx.saved_tensors
    g_r = torch.zeros_like(lse_r) if g_r is None else g_r
    g_c = torch.zeros_like(lse_c) if g_c is None else g_c
    dx, dy, da, dc = backward_op(g_r, g_c, x, y, a, c, bias, lse_r, lse_c, ctx.normalize, ctx.tokens,
                                 ctx.backward_kernel)
    dbias = (g_r.sum() + g_c.sum()).to(bias.dtype).reshape(bias.shape)  # Σ_j P_ij = 1 per row and column
    return dx, dy, da, dc, dbias, None, None, None, None


lse_pair, lse_pair_backward = fused_op(
    "lse_pair", _forward, _backward, forward_fake=_forward_fake, backward_fake=_backward_fake,
    setup_context=_setup_context, gradients=_gradients, check_create_graph=_no_create_graph,
    autocast=(0, 1), backward_autocast=(2, 3),  # x, y follow the package's autocast policy (_amp)
    double_backward=DoubleBackward(LSE_PAIR_OP, LSE_PAIR_ALTERNATIVE, kernel_of=lambda inputs: inputs[11]))


class LsePair:
    """``lse_pair`` with its kernels bound: what the dispatcher's "lse_pair" op returns for a fused backend.
    ``self(x, y, a, c, b, normalize, tokens)`` -> (lse_row, lse_col); :meth:`backward` -> (dx, dy, da, dc)."""

    def __init__(self, kernel: str, backward_kernel: str):
        self.kernel, self.backward_kernel = kernel, backward_kernel

    def __call__(self, x, y, a, c, bias, normalize=False, tokens=1):
        return lse_pair(x, y, a, c, bias, normalize, tokens, self.kernel, self.backward_kernel)

    def backward(self, g_r, g_c, x, y, a, c, bias, lse_r, lse_c, normalize=False, tokens=1, acc_out=False):
        return lse_pair_backward(g_r, g_c, x, y, a, c, bias, lse_r, lse_c, normalize, tokens, self.backward_kernel,
                                 acc_out)


def bound(kernel: str, backward_kernel: str) -> LsePair:
    """``lse_pair`` with the dispatcher's kernels bound (``Impl.kernel``, ``Impl.backward_kernel``)."""
    return LsePair(kernel, backward_kernel)
