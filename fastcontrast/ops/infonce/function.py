"""The fused pairwise log-sum-exp as a ``torch.library`` custom op with autograd, and the InfoNCE built on it.

``fastcontrast::lse_pair(x, y, a, c, bias, normalize, tokens) -> (lse_row (N,), lse_col (M,))`` runs the Triton
kernels where Triton can run (CUDA, or the CPU under TRITON_INTERPRET=1) and otherwise a blockwise PyTorch
implementation of the same tiling (row blocks, online column statistics, recompute in backward): both keep
O((N+M)·D) memory. Being a custom op with a fake (meta) implementation, it compiles under ``torch.compile``
without a graph break.
"""
from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch
from torch import Tensor

from ... import _ext
from ..._amp import register_custom_op as register_autocast
from ..._memtrack import OPAQUE_IMPLS
from ...dispatch import register
from .. import _tiles as T
from .._configs import config as launch_config_full
from .._configs import launch as launch_config
from .._tiles import apply_tokens as _apply_tokens
from .._tiles import inv_token_norms, precision as _precision, token_norm_backward, triton_ok as _triton_ok
from .._tiles import upcast as _upcast
from .._triton_support import IMPORT_ERROR as _TRITON_IMPORT_ERROR

# ----------------------------------------------------------------------------------------------- Triton launch
def _triton_fwd(x, y, a, c, bias, normalize, tokens):
    """Row and column lse from one sweep of S: the kernel writes the rows' lse and per-row-block column
    partials, merged here (base 2, as the kernel keeps them)."""
    from . import triton_kernels as K

    n, d = x.shape
    m = y.shape[0]
    x, y = x.contiguous(), y.contiguous()
    inv_x = inv_token_norms(x, tokens) if normalize else x.new_empty(1, dtype=torch.float32)
    inv_y = inv_token_norms(y, tokens) if normalize else x.new_empty(1, dtype=torch.float32)
    ntok, dt = (tokens, d // tokens) if normalize else (1, d)
    full = launch_config_full("_lse_fwd_kernel", x.device, x.dtype)
    cfg, warps, stages = launch_config("_lse_fwd_kernel", x.device, x.dtype)
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
        MULTI=ntok > 1, HAS_BIAS=True, PRECISION=_precision(x.dtype), UPCAST=_upcast(x), num_warps=warps,
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
    from . import triton_kernels as K

    n, d = x.shape
    m = y.shape[0]
    ntok, dt = (tokens, d // tokens) if normalize else (1, d)
    cfg, warps, stages = launch_config("_grad_tile_kernel", x.device, x.dtype)
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
            NORM=normalize, MULTI=ntok > 1, HAS_BIAS=True, PRECISION=_precision(x.dtype), UPCAST=_upcast(x),
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


def _lse_backward_slabs(g_r, g_c, x, y, a, c, bias, lse_r, lse_c, normalize, tokens, use_triton):
    """dX̂ = G Ŷ and dŶ = Gᵀ X̂ one row chunk of G at a time: G never exists beyond an R×M slab."""
    n, d = x.shape
    m = y.shape[0]
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    inv_x = inv_token_norms(x, tokens) if normalize else None
    inv_y = inv_token_norms(y, tokens) if normalize else None
    gemm_dtype = x.dtype if use_triton else acc  # tensor-core GEMMs in the input dtype on the fast path
    xh = _apply_tokens(x, inv_x).to(gemm_dtype) if normalize else x.to(gemm_dtype)
    yh = _apply_tokens(y, inv_y).to(gemm_dtype) if normalize else y.to(gemm_dtype)
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
    xh = _apply_tokens(x, inv_token_norms(x, tokens)) if normalize else x.to(acc)
    yh = _apply_tokens(y, inv_token_norms(y, tokens)) if normalize else y.to(acc)
    a, c, b = a.to(acc), c.to(acc), bias.to(acc)
    n, m = xh.shape[0], yh.shape[0]
    lse_r = torch.empty(n, dtype=acc, device=x.device)
    col_max = torch.full((m,), float("-inf"), dtype=acc, device=x.device)
    col_sum = torch.zeros(m, dtype=acc, device=x.device)
    step = T.rows_per_block(n, m, torch.finfo(acc).bits // 8)
    for i0 in range(0, n, step):
        s = xh[i0:i0 + step] @ yh.T  # one block of rows: step×M, never N×M
        lse_r[i0:i0 + step] = torch.logsumexp(a[i0:i0 + step, None] * s + b, dim=1)
        zc = c[None, :] * s + b
        blk_max = zc.max(dim=0).values
        new_max = torch.maximum(col_max, blk_max)
        col_sum = col_sum * torch.exp(col_max - new_max) + torch.exp(zc - new_max).sum(dim=0)
        col_max = new_max
    return lse_r, col_max + col_sum.log()


# ------------------------------------------------------------------------------------------------- custom ops
def _choose(impl: str, x: Tensor) -> str:
    """Which implementation runs: the one asked for when it can, else the blockwise PyTorch tiles."""
    if impl in ("triton", "auto") and _triton_ok(x):
        return "triton"
    if impl == "cuda" and x.device.type == "cuda" and _ext.cuda_unavailable_reason() is None:
        return "cuda"
    if impl in ("cpu", "auto") and x.device.type == "cpu" and _ext._C is not None:
        return "cpu"
    return "torch"


def _cpu_operands(x, y, a, c, normalize, tokens):
    # the C++ kernels take dense fp32/fp64 operands; normalisation is this prologue (Jacobian in backward)
    acc = T.acc_dtype(x)
    xh = _apply_tokens(x, inv_token_norms(x, tokens)) if normalize else x.to(acc).contiguous()
    yh = _apply_tokens(y, inv_token_norms(y, tokens)) if normalize else y.to(acc).contiguous()
    return xh.contiguous(), yh.contiguous(), a.to(acc).contiguous(), c.to(acc).contiguous()


def _cuda_operands(x, y, normalize, tokens):
    # the CUDA kernels take dense operands in the input dtype (tensor cores); normalisation is this prologue
    if not normalize:
        return x.contiguous(), y.contiguous()
    return (_apply_tokens(x, inv_token_norms(x, tokens)).to(x.dtype).contiguous(),
            _apply_tokens(y, inv_token_norms(y, tokens)).to(y.dtype).contiguous())


@torch.library.custom_op("fastcontrast::lse_pair", mutates_args=())
def lse_pair(x: Tensor, y: Tensor, a: Tensor, c: Tensor, bias: Tensor, normalize: bool, tokens: int,
             impl: str = "auto") -> Tuple[Tensor, Tensor]:
    """(lse_row (N,), lse_col (M,)) of a·S + b over columns and c·S + b over rows; S = x̂ŷᵀ, never materialised.

    ``impl``: "triton", "cpu" (the C++ extension) or "auto"; whatever cannot run falls back to PyTorch tiles.
    """
    return _lse_pair_impl(x, y, a, c, bias, normalize, tokens, impl)


def _lse_pair_impl(x, y, a, c, bias, normalize, tokens, impl="auto"):
    which = _choose(impl, x)
    if which == "triton":
        return _triton_fwd(x, y, a, c, bias, normalize, tokens)
    # csrc kernels: a constant bias leaves the softmax unchanged, lse(aS + b) = lse(aS) + b, so it is added to
    # the statistics here, as a tensor: passing it to the kernel as a number would be a host read per call
    if which == "cpu":
        xh, yh, a_, c_ = _cpu_operands(x, y, a, c, normalize, tokens)
        lr, lc = _ext._C.lse_pair_cpu_forward(xh, yh, a_, c_, 0.0, T.BLOCK_BYTES)
        return lr + bias, lc + bias
    if which == "cuda":
        xh, yh = _cuda_operands(x, y, normalize, tokens)
        lr, lc = _ext._C.lse_pair_cuda_forward(xh, yh, a.float(), c.float(), 0.0)
        return lr + bias, lc + bias
    return _torch_fwd(x, y, a, c, bias, normalize, tokens)


@lse_pair.register_fake
def _(x, y, a, c, bias, normalize, tokens, impl="auto"):
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    return x.new_empty(x.shape[0], dtype=acc), x.new_empty(y.shape[0], dtype=acc)


@torch.library.custom_op("fastcontrast::lse_pair_backward", mutates_args=())
def lse_pair_backward(g_r: Tensor, g_c: Tensor, x: Tensor, y: Tensor, a: Tensor, c: Tensor, bias: Tensor,
                      lse_r: Tensor, lse_c: Tensor, normalize: bool, tokens: int, impl: str = "auto"
                      ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, dy, da, dc): gradients of Σ g_r·lse_row + Σ g_c·lse_col, the normalisation's Jacobian included."""
    return _lse_pair_backward_impl(g_r, g_c, x, y, a, c, bias, lse_r, lse_c, normalize, tokens, impl)


def _backward_choice(impl: str, x: Tensor) -> str:
    """:func:`_choose` for the backward. Under torch.use_deterministic_algorithms(True) the CUDA kernels of csrc/
    (they add the scale gradients with atomicAdd, in an order that changes from run to run) give way to the
    PyTorch tiles: the same math with fixed-order reductions. The Triton kernels are deterministic in every mode.
    The flag is read on the host at launch: no sync."""
    which = _choose(impl, x)
    if which == "cuda" and torch.are_deterministic_algorithms_enabled():
        return "torch"
    return which


def _lse_pair_backward_impl(g_r, g_c, x, y, a, c, bias, lse_r, lse_c, normalize, tokens, impl="auto"):
    which = _backward_choice(impl, x)
    if which == "cuda":  # P = exp(aS + b − lse) = exp(aS − (lse − b)): the bias stays a tensor (see forward)
        xh, yh = _cuda_operands(x, y, normalize, tokens)
        dxh, dyh, da, dc = _ext._C.lse_pair_cuda_backward(g_r, g_c, xh, yh, a, c, 0.0, lse_r - bias, lse_c - bias,
                                                          T.BLOCK_BYTES)
    elif which == "cpu":
        xh, yh, a_, c_ = _cpu_operands(x, y, a, c, normalize, tokens)
        acc = xh.dtype
        dxh, dyh, da, dc = _ext._C.lse_pair_cpu_backward(
            g_r.to(acc).contiguous(), g_c.to(acc).contiguous(), xh, yh, a_, c_, 0.0,
            (lse_r - bias).to(acc), (lse_c - bias).to(acc), T.BLOCK_BYTES)
    else:
        dxh, dyh, da, dc = _lse_backward_slabs(g_r, g_c, x, y, a, c, bias, lse_r, lse_c, normalize, tokens,
                                               use_triton=which == "triton")
    if normalize:
        dxh = token_norm_backward(x, inv_token_norms(x, tokens), dxh)
        dyh = token_norm_backward(y, inv_token_norms(y, tokens), dyh)
    return dxh.to(x.dtype), dyh.to(y.dtype), da.to(a.dtype), dc.to(c.dtype)


@lse_pair_backward.register_fake
def _(g_r, g_c, x, y, a, c, bias, lse_r, lse_c, normalize, tokens, impl="auto"):
    return torch.empty_like(x), torch.empty_like(y), torch.empty_like(a), torch.empty_like(c)


# Double backward: lse_pair's backward is a fused kernel (or the PyTorch tiles, recomputing P and Q from the saved
# lse): no derivative of its own. Raise where a differentiable gradient is asked for (create_graph=True, checked in
# _backward) and, for direct callers of lse_pair_backward, where one would be taken through it.
LSE_PAIR_OP = ("the fused log-sum-exp fastcontrast::lse_pair (clip_loss, oblique_clip_loss, "
               "adaptive_temperature_clip_loss, ce_rows, codebook_loss, momentum_contrastive_loss, distill_clip_loss)")
LSE_PAIR_ALTERNATIVE = "backend='reference' (or backend='dense' for the InfoNCE losses and distill_clip_loss)"


def _setup_context(ctx, inputs, output):
    x, y, a, c, bias, normalize, tokens, impl = inputs
    ctx.save_for_backward(x, y, a, c, bias, *output)
    ctx.normalize, ctx.tokens, ctx.impl = normalize, tokens, impl


def _backward(ctx, g_r, g_c):
    T.no_double_backward(LSE_PAIR_OP, ctx.impl, LSE_PAIR_ALTERNATIVE)
    x, y, a, c, bias, lse_r, lse_c = ctx.saved_tensors
    g_r = torch.zeros_like(lse_r) if g_r is None else g_r
    g_c = torch.zeros_like(lse_c) if g_c is None else g_c
    dx, dy, da, dc = lse_pair_backward(g_r, g_c, x, y, a, c, bias, lse_r, lse_c, ctx.normalize, ctx.tokens,
                                       ctx.impl)
    dbias = (g_r.sum() + g_c.sum()).to(bias.dtype).reshape(bias.shape)  # Σ_j P_ij = 1 per row and column
    return dx, dy, da, dc, dbias, None, None, None


lse_pair.register_autograd(_backward, setup_context=_setup_context)


def _lse_backward_no_double_backward(ctx, *grads):
    raise T.double_backward_error(LSE_PAIR_OP, ctx.backend, LSE_PAIR_ALTERNATIVE)


def _lse_backward_setup(ctx, inputs, output):
    ctx.backend = inputs[-1]  # the backend asked for ('triton' on float64 runs its PyTorch tiles: no derivative)


lse_pair_backward.register_autograd(_lse_backward_no_double_backward, setup_context=_lse_backward_setup)
register_autocast("fastcontrast::lse_pair", (0, 1))  # x, y follow the package's autocast policy (_amp)
register_autocast("fastcontrast::lse_pair_backward", (2, 3))

# Memory accounting (fastcontrast._memtrack) looks inside these ops instead of seeing them as one opaque call.
OPAQUE_IMPLS[torch.ops.fastcontrast.lse_pair.default] = _lse_pair_impl
OPAQUE_IMPLS[torch.ops.fastcontrast.lse_pair_backward.default] = _lse_pair_backward_impl


# ---------------------------------------------------------------------------------------------- the InfoNCE
def infonce_fused(x: Tensor, y: Tensor, row_scale: Tensor, col_scale: Tensor, bias: Optional[Tensor],
                  labels: Tensor, normalize: bool, tokens: int, impl: str = "auto") -> Tensor:
    """InfoNCE through ``lse_pair``: ½ mean_i[(lse_row_i − a_i s_i − b) + (lse_col_{p(i)} − c_{p(i)} s_i − b)].

    The positive similarity s_i = ⟨x̂_i, ŷ_{p(i)}⟩ is an O(N·D) row-wise dot, left to autograd.
    """
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    b = torch.zeros((), device=x.device, dtype=acc) if bias is None else bias.to(acc)
    a, c = row_scale.to(acc), col_scale.to(acc)
    lse_r, lse_c = lse_pair(x, y, a, c, b, normalize, tokens, impl)
    yp = y if labels is None else y[labels]  # labels None: the diagonal
    if normalize:
        xf, ypf = _apply_tokens(x, inv_token_norms(x, tokens)), _apply_tokens(yp, inv_token_norms(yp, tokens))
    else:
        xf, ypf = x.to(acc), yp.to(acc)
    pos = (xf * ypf).sum(dim=1)
    lse_cp, c_p = (lse_c, c) if labels is None else (lse_c[labels], c[labels])
    return 0.5 * ((lse_r - a * pos).mean() + (lse_cp - c_p * pos).mean()) - b


def ce_rows_fused(a: Tensor, b: Tensor, scale: Tensor, bias: Optional[Tensor], labels: Tensor,
                  impl: str = "auto") -> Tensor:
    """mean_i [lse_j(s·⟨a_i, b_j⟩ + bias) − s·⟨a_i, b_{l_i}⟩ − bias] through ``lse_pair`` (row statistics)."""
    acc = T.acc_dtype(a)
    bb = torch.zeros((), device=a.device, dtype=acc) if bias is None else bias.to(acc)
    s = scale.to(acc)
    lse_r, _ = lse_pair(a, b, s.expand(a.shape[0]), s.expand(b.shape[0]), bb, False, 1, impl)
    pos = (a.to(acc) * b[labels].to(acc)).sum(dim=1)
    return (lse_r - s * pos - bb).mean()


if _TRITON_IMPORT_ERROR is None:
    import triton  # noqa: E402  (only for cdiv in the launchers)

    register("infonce", "triton")(functools.partial(infonce_fused, impl="triton"))
    register("ce_rows", "triton")(functools.partial(ce_rows_fused, impl="triton"))

# backends "cpu" and "cuda": the same op on the C++/CUDA kernels of csrc/ (offered only when they are built)
for _b in ("cpu", "cuda"):
    register("infonce", _b)(functools.partial(infonce_fused, impl=_b))
    register("ce_rows", _b)(functools.partial(ce_rows_fused, impl=_b))
