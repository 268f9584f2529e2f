"""The masked log-sum-exp over rows (and optionally columns) of S = x̂ŷᵀ: the fused op ``fastcontrast::lse_masked``.

``lse_masked(x (N, D), y (M, D), a (N,), c (M,), normalize, <masks>, kernel, backward_kernel)
-> (lse_row (N,), lse_col (n_stat,))``:

    lse_row_i = log Σ_{j: not drop_r(i, j)} exp(a_i S_ij + pen_ij),
    lse_col_j = log Σ_{i: not drop_c(i, j)} exp(c_j S_ij)                  (j < n_stat; n_stat = 0: rows only)

with every mask a rule on O(N + M) vectors, evaluated per tile (never an N×M mask in memory):

* same(i, j)   = j < M_id and row_ids_i == col_ids_j                     (the "same group" relation G)
* keep(i, j)   = j == keep_i                                             (row i's positive; -1: none)
* drop_r(i, j) = [exclude_same and same(i, j) or ⟨ĝx_i, ĝy_j⟩ > thr_r_i] and not keep(i, j)
* drop_c(i, j) = [exclude_same and same(i, j) or ⟨ĝx_i, ĝy_j⟩ > thr_c_j] and not keep(i, j)
* pen_ij       = sg(S_ij) · (pen_same_j if same(i, j) else pen_other_j)  (the hardness penalty: a value shift only,
  sg = stop-gradient: d lse_row_i / d S_ij = a_i P_ij)

The guide similarity ⟨ĝx_i, ĝy_j⟩ (ĝ L2-normalised when ``guide_normalize``) is computed in the same sweep as S
and gets no gradient. A row (column) whose every entry is dropped has lse = -inf (torch.logsumexp over -inf) and
a zero gradient. Backward, with upstream g (rows) and h (columns):

    P = exp(a S + pen − lse_row) (0 where dropped), Q = exp(c S − lse_col) (0 where dropped),
    G_ij = g_i a_i P_ij + h_j c_j Q_ij,  dX̂ = G Ŷ,  dŶ = Gᵀ X̂,
    da_i = g_i Σ_j P_ij S_ij,  dc_j = h_j Σ_i Q_ij S_ij.

Kernels: ``triton`` (``lse_masked_triton.py``: the masks inside the tile loop, forward and the backward's G
tiles) and ``tiles`` (the same tiling in PyTorch: row blocks, online column statistics, G in R×M slabs). Both
hold O((N + M)·(D + Dg)) memory. The C++/CUDA kernels of csrc/ have no masks: the dispatcher gives such calls
the tiles (``fastcontrast.dispatch``: ``needs=("masks",)``); this module refuses any other kernel.
Cost: 4 GEMM units of 2·N·M·D per forward+backward (the sweep, the recompute, two slab GEMMs), plus 2·N·M·Dg
twice for the guide (forward and recompute).
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from . import configs as C
from . import tiles as T
from .fused_op import DoubleBackward, fused_op
from .triton_support import triton

if triton is not None:
    from . import lse_masked_triton as K

KERNELS = ("triton", "tiles")
_NEG_INF = float("-inf")


class Masks(NamedTuple):
    """The masks of one call (module doc), every field O(N + M); None/False/0: not used."""
    keep: Optional[Tensor] = None  # (N,) int64: row i's kept column (-1: none)
    row_ids: Optional[Tensor] = None  # (N,) int64
    col_ids: Optional[Tensor] = None  # (M_id,) int64, M_id <= M: columns past M_id belong to no group
    exclude_same: bool = False
    guide_x: Optional[Tensor] = None  # (N, Dg)
    guide_y: Optional[Tensor] = None  # (M, Dg)
    guide_normalize: bool = False
    thr_r: Optional[Tensor] = None  # (N,) rows' guide thresholds
    thr_c: Optional[Tensor] = None  # (n_stat,) columns' guide thresholds (None: the column direction has no guide)
    pen_same: Optional[Tensor] = None  # (M,) coefficient of sg(S) added to the row logits of same-group cells
    pen_other: Optional[Tensor] = None  # (M,) ... of the other cells
    n_stat: int = 0  # columns with column statistics (the first n_stat)

    @property
    def any(self) -> bool:
        """Whether anything is dropped or shifted (else the plain row/column log-sum-exp; keep alone drops
        nothing: it only protects an entry from the other rules)."""
        return self.exclude_same or self.guide_x is not None or self.pen_same is not None


def check_masks(x: Tensor, y: Tensor, m: Masks) -> None:
    """Shapes and dtypes of the internal masks (the public functions check the user's arguments first)."""
    n, mm = x.shape[0], y.shape[0]

    def want(name, t, shape, kind):
        if t is None:
            return
        if tuple(t.shape) != shape:
            raise ValueError(f"lse_masked: {name} must have shape {shape}, got {tuple(t.shape)}")
        if kind == "int" and t.dtype != torch.int64:
            raise TypeError(f"lse_masked: {name} must be int64, got {t.dtype}")
        if kind == "float" and not t.is_floating_point():
            raise TypeError(f"lse_masked: {name} must be floating, got {t.dtype}")

    want("keep", m.keep, (n,), "int")
    want("row_ids", m.row_ids, (n,), "int")
    if (m.row_ids is None) != (m.col_ids is None):
        raise ValueError("lse_masked: row_ids and col_ids go together")
    if m.col_ids is not None and (m.col_ids.dim() != 1 or m.col_ids.shape[0] > mm):
        raise ValueError(f"lse_masked: col_ids must have shape (M_id,) with M_id <= {mm}")
    want("col_ids", m.col_ids, tuple(m.col_ids.shape) if m.col_ids is not None else (), "int")
    if m.exclude_same and m.row_ids is None:
        raise ValueError("lse_masked: exclude_same needs row_ids and col_ids")
    if (m.guide_x is None) != (m.guide_y is None) or (m.guide_x is None) != (m.thr_r is None):
        raise ValueError("lse_masked: guide_x, guide_y and thr_r go together")
    if m.guide_x is not None:
        if m.guide_x.dim() != 2 or m.guide_y.dim() != 2 or m.guide_x.shape[1] != m.guide_y.shape[1]:
            raise ValueError("lse_masked: guide_x (N, Dg) and guide_y (M, Dg) share Dg")
        want("guide_x", m.guide_x, (n, m.guide_x.shape[1]), "float")
        want("guide_y", m.guide_y, (mm, m.guide_x.shape[1]), "float")
        if m.guide_x.dtype != m.guide_y.dtype:
            raise TypeError("lse_masked: guide_x and guide_y must share a dtype")
    want("thr_r", m.thr_r, (n,), "float")
    if not 0 <= m.n_stat <= mm:
        raise ValueError(f"lse_masked: n_stat must lie in [0, {mm}], got {m.n_stat}")
    if m.thr_c is not None and m.guide_x is None:
        raise ValueError("lse_masked: thr_c needs the guide")
    want("thr_c", m.thr_c, (m.n_stat,), "float")
    if m.guide_x is not None and m.n_stat and m.thr_c is None:
        raise ValueError("lse_masked: column statistics with a guide need thr_c")
    if (m.pen_same is None) != (m.pen_other is None):
        raise ValueError("lse_masked: pen_same and pen_other go together")
    if m.pen_same is not None and m.row_ids is None:
        raise ValueError("lse_masked: the hardness penalty needs row_ids and col_ids (same/other cells)")
    want("pen_same", m.pen_same, (mm,), "float")
    want("pen_other", m.pen_other, (mm,), "float")


# -------------------------------------------------------------------------------------- blockwise PyTorch path
def _hat(t: Tensor, normalize: bool, acc: torch.dtype) -> Tensor:
    return T.apply_tokens(t, T.inv_token_norms(t, 1)).to(acc) if normalize else t.to(acc)


def _or(a: Optional[Tensor], b: Optional[Tensor]) -> Optional[Tensor]:
    return b if a is None else a if b is None else a | b


def block_logits(s: Tensor, gs: Optional[Tensor], rows: slice, a: Tensor, c: Tensor, m: Masks
                 ) -> Tuple[Tensor, Optional[Tensor]]:
    """(row logits (R, M), column logits (R, n_stat) or None) of one block of rows: a·S + pen and c·S, -inf where
    the masks drop an entry. ``s``: the block's S (R, M); ``gs``: its guide similarities or None."""
    r, mm = s.shape
    same = None
    if m.row_ids is not None:
        n_id = m.col_ids.shape[0]
        same = torch.zeros(r, mm, dtype=torch.bool, device=s.device)
        same[:, :n_id] = m.row_ids[rows, None] == m.col_ids[None, :]
    keep = None
    if m.keep is not None:
        keep = torch.arange(mm, device=s.device)[None, :] == m.keep[rows, None]
    zr = a[rows, None] * s
    if m.pen_same is not None:  # a value shift only: the penalty is computed on a detached S
        zr = zr + s.detach() * torch.where(same, m.pen_same[None, :], m.pen_other[None, :]).to(s.dtype)
    drop_ids = same if m.exclude_same else None
    drop = _or(drop_ids, None if gs is None else gs > m.thr_r[rows, None].to(gs.dtype))
    if drop is not None:
        zr = zr.masked_fill(drop & ~keep if keep is not None else drop, _NEG_INF)
    if not m.n_stat:
        return zr, None
    k = m.n_stat
    zc = c[None, :k] * s[:, :k]
    drop = _or(None if drop_ids is None else drop_ids[:, :k],
               None if m.thr_c is None else gs[:, :k] > m.thr_c[None, :].to(gs.dtype))
    if drop is not None:
        zc = zc.masked_fill(drop & ~keep[:, :k] if keep is not None else drop, _NEG_INF)
    return zr, zc


def _operands(x, y, a, c, normalize, m: Masks):
    """(x̂, ŷ, ĝx, ĝy, a, c) in the accumulation dtype (fp32; fp64 for fp64 features)."""
    acc = T.acc_dtype(x)
    xh, yh = _hat(x, normalize, acc), _hat(y, normalize, acc)
    gx = gy = None
    if m.guide_x is not None:  # the guide's own precision: fp64 guides stay fp64, others compute in fp32
        gacc = T.acc_dtype(m.guide_x)
        gx, gy = _hat(m.guide_x, m.guide_normalize, gacc), _hat(m.guide_y, m.guide_normalize, gacc)
    return xh, yh, gx, gy, a.to(acc), c.to(acc)


def _torch_fwd(x, y, a, c, normalize, m: Masks):
    xh, yh, gx, gy, a, c = _operands(x, y, a, c, normalize, m)
    acc = xh.dtype
    n, mm, k = xh.shape[0], yh.shape[0], m.n_stat
    lse_r = torch.empty(n, dtype=acc, device=x.device)
    col_max = torch.full((k,), _NEG_INF, dtype=acc, device=x.device)
    col_sum = torch.zeros(k, dtype=acc, device=x.device)
    for rows in T.row_blocks(n, mm, torch.finfo(acc).bits // 8):
        s = xh[rows] @ yh.T  # one block of rows: R×M, never N×M
        gs = None if gx is None else gx[rows] @ gy.T
        zr, zc = block_logits(s, gs, rows, a, c, m)
        lse_r[rows] = torch.logsumexp(zr, dim=1)
        if k:  # online column statistics; a column dropped in every row so far keeps max = -inf, sum = 0
            new_max = torch.maximum(col_max, zc.max(dim=0).values)
            safe = torch.where(new_max == _NEG_INF, 0.0, new_max)
            col_sum = col_sum * torch.exp(col_max - safe) + torch.exp(zc - safe).sum(dim=0)
            col_max = new_max
    return lse_r, col_max + col_sum.log()


def _safe_lse(lse: Tensor) -> Tensor:
    """lse with -inf (an entirely dropped row or column) replaced by 0: its P = exp(-inf − 0) = 0, not NaN."""
    return torch.where(lse == _NEG_INF, 0.0, lse)


def _torch_grad_tiles(xh, yh, gx, gy, a, c, m: Masks, lse_r, lse_c, g_r, g_c, sigma):
    """fill(r0, rc, slab, da, dc): σ·G for rows r0:r0+rc into slab[:rc], da[r0:r0+rc] set, dc accumulated."""
    k = m.n_stat
    lr, lc = _safe_lse(lse_r), _safe_lse(lse_c)

    def fill(r0, rc, slab, da, dc):
        sl = slice(r0, r0 + rc)
        s = xh[sl] @ yh.T
        zr, zc = block_logits(s, None if gx is None else gx[sl] @ gy.T, sl, a, c, m)
        p = torch.exp(zr - lr[sl, None])
        da[sl] = g_r[sl] * (p * s).sum(dim=1)
        w = p * (g_r[sl] * a[sl] * sigma)[:, None]
        if k:
            q = torch.exp(zc - lc[None, :])
            dc[:k] += g_c * (q * s[:, :k]).sum(dim=0)
            w[:, :k] += q * (g_c * c[:k] * sigma)[None, :]
        slab[:rc] = w.to(slab.dtype)

    return fill


# ----------------------------------------------------------------------------------------------- Triton launch
_LN2 = 0.6931471805599453


def _kernel_operands(x, y, a, c, normalize, m: Masks):
    """The kernels' arguments shared by forward and backward: contiguous features and fp32 vectors, a 1-element
    dummy for what a launch does not use (its constexpr switch off: never read), the switches."""
    f32 = x.new_empty(1, dtype=torch.float32)
    i64 = x.new_empty(1, dtype=torch.int64)

    def vec(t, dummy, dtype=torch.float32):
        return dummy if t is None else t.to(dtype).contiguous()

    guide = m.guide_x is not None
    # the kernels compute in fp32: a float64 guide is read as fp32 (its scores then round like the features')
    gx = (m.guide_x.float() if m.guide_x.dtype == torch.float64 else m.guide_x).contiguous() if guide else f32
    gy = (m.guide_y.float() if m.guide_y.dtype == torch.float64 else m.guide_y).contiguous() if guide else f32
    ptrs = (x.contiguous(), y.contiguous(), T.inv_token_norms(x, 1) if normalize else f32,
            T.inv_token_norms(y, 1) if normalize else f32, a.float().contiguous(), c.float().contiguous(), gx, gy,
            T.inv_token_norms(gx, 1) if guide and m.guide_normalize else f32,
            T.inv_token_norms(gy, 1) if guide and m.guide_normalize else f32,
            vec(m.keep, i64, torch.int64), vec(m.row_ids, i64, torch.int64), vec(m.col_ids, i64, torch.int64),
            vec(m.thr_r, f32), vec(m.thr_c, f32), vec(m.pen_same, f32), vec(m.pen_other, f32))
    n_id = 0 if m.col_ids is None else m.col_ids.shape[0]
    dg = gx.shape[1] if guide else 1
    flags = dict(NORM=normalize, GNORM=guide and m.guide_normalize, HAS_KEEP=m.keep is not None,
                 IDS=m.row_ids is not None, EXCL=m.exclude_same, GUIDE=guide, HARD=m.pen_same is not None,
                 COLS=m.n_stat > 0, PRECISION=T.precision(x.dtype),
                 GPRECISION=T.precision(gx.dtype) if guide else "ieee",
                 # the interpreter's bf16 work-around (tiles._dot) for both dots when either side is bf16 on the CPU
                 # (the same values in fp32); one flag, which a GPU launch (and the static report) sets False
                 UPCAST=T.upcast(x) or (guide and T.upcast(gx)))
    strides = (ptrs[0].stride(0), ptrs[1].stride(0), gx.stride(0) if guide else 1, gy.stride(0) if guide else 1)
    # what decides the tile (configs.is_aligned): the row widths and strides, the guide's only where it is read
    align = dict(D=x.shape[1], stride_am=strides[0], stride_bm=strides[1])
    if guide:
        align.update(DG=dg, stride_ga=strides[2], stride_gb=strides[3])
    return ptrs, (n_id, m.n_stat, x.shape[1], dg), strides, flags, align


def _guide_k(cfg: dict, x: Tensor, m: Masks) -> int:
    """The guide loop's K-chunk: the features' BLOCK_K, halved for a guide with wider elements than the features
    (an fp32 guide beside bf16 features), so that its pipeline stages fit the shared memory the table sized."""
    g_elt = 0 if m.guide_x is None else min(m.guide_x.element_size(), 4)  # float64 guides are read as fp32
    if g_elt > x.element_size():
        return max(16, cfg["BLOCK_K"] * x.element_size() // g_elt)
    return cfg["BLOCK_K"]


def _merge(top_parts: Tensor, sum_parts: Tensor) -> Tensor:
    """log Σ over partial (max, Σ2^(z − max)) pairs (base 2 in, base e out); -inf where every part is empty."""
    top = top_parts.amax(dim=0)
    safe = torch.where(top == _NEG_INF, 0.0, top)
    return (safe + torch.log2((sum_parts * torch.exp2(top_parts - safe)).sum(dim=0))) * _LN2


def _triton_fwd(x, y, a, c, normalize, m: Masks):
    from .lse_pair import _column_split

    n, mm, k = x.shape[0], y.shape[0], m.n_stat
    ptrs, ints, strides, flags, align = _kernel_operands(x, y, a, c, normalize, m)
    al = C.is_aligned("_lse_masked_fwd_kernel", **align)
    full = C.config("_lse_masked_fwd_kernel", x.device, x.dtype, al)
    cfg, warps, stages = C.launch("_lse_masked_fwd_kernel", x.device, x.dtype, al)
    n_blocks = triton.cdiv(n, cfg["BLOCK_M"])
    split = _column_split(n_blocks, triton.cdiv(mm, cfg["BLOCK_N"]), x.device, full)
    lse_r = torch.empty(n, device=x.device, dtype=torch.float32)
    pmax = torch.empty(n_blocks, max(k, 1), device=x.device, dtype=torch.float32)
    psum = torch.empty_like(pmax)
    rmax = torch.empty(split, n, device=x.device, dtype=torch.float32) if split > 1 else lse_r[:1]
    rsum = torch.empty(split, n, device=x.device, dtype=torch.float32) if split > 1 else lse_r[:1]
    K._lse_masked_fwd_kernel[(n_blocks, split)](
        *ptrs, lse_r, pmax, psum, rmax, rsum, n, mm, *ints, *strides, pmax.stride(0), **flags,
        BLOCK_KG=_guide_k(cfg, x, m), num_warps=warps, num_stages=stages, **cfg)
    if split > 1:
        lse_r = _merge(rmax, rsum)
    lse_c = _merge(pmax, psum) if k else lse_r.new_empty(0)
    return lse_r, lse_c


def _triton_grad_tiles(x, y, a, c, normalize, m: Masks, lse_r, lse_c, g_r, g_c, sigma):
    """(x̂, ŷ in the features' dtype for the slab GEMMs, fill): fill(r0, rc, slab, da, dc) writes σ·G for rows
    r0:r0+rc; the scale gradients from per-tile partials summed in a fixed order (no float atomics)."""
    n, mm, k = x.shape[0], y.shape[0], m.n_stat
    ptrs, ints, strides, flags, align = _kernel_operands(x, y, a, c, normalize, m)
    al = C.is_aligned("_masked_grad_tile_kernel", **align)
    cfg, warps, stages = C.launch("_masked_grad_tile_kernel", x.device, x.dtype, al)
    lr = _safe_lse(lse_r.float()).contiguous()
    lc = _safe_lse(lse_c.float()).contiguous() if k else lr[:1]
    gr, gc = g_r.float().contiguous(), (g_c.float().contiguous() if k else lr[:1])
    sig = sigma.float().reshape(1)
    xh = T.apply_tokens(x, T.inv_token_norms(x, 1)).to(x.dtype) if normalize else x
    yh = T.apply_tokens(y, T.inv_token_norms(y, 1)).to(y.dtype) if normalize else y
    parts = []

    def fill(r0, rc, slab, da, dc):
        grid = (triton.cdiv(rc, cfg["BLOCK_M"]), triton.cdiv(mm, cfg["BLOCK_N"]))
        if not parts:  # the first slab is the tallest
            parts.extend([torch.empty(grid[1], rc, device=x.device, dtype=torch.float32),
                          torch.empty(grid[0], max(k, 1), device=x.device, dtype=torch.float32)])
        pa, pb = parts
        K._masked_grad_tile_kernel[grid](
            *ptrs, lr, lc, gr, gc, sig, slab, pa, pb, r0, rc, mm, *ints, *strides, slab.stride(0), pa.stride(0),
            pb.stride(0), **flags, BLOCK_KG=_guide_k(cfg, x, m), num_warps=warps, num_stages=stages, **cfg)
        torch.sum(pa[:, :rc], dim=0, out=da[r0:r0 + rc])  # every row of a slab is in no other slab
        if k:
            dc[:k] += pb[:grid[0], :k].sum(dim=0)

    return xh, yh, fill


# ------------------------------------------------------------------------------------------------ the fused op
def _check_kernel(name: str, kernel: str) -> None:
    if kernel not in KERNELS:
        raise ValueError(f"{name} must be one of {KERNELS} (the dispatcher's Impl.kernel: the C++/CUDA kernels "
                         f"of csrc/ have no masks, the dispatcher gives masked calls the tiles), got {kernel!r}")


def _forward(x: Tensor, y: Tensor, a: Tensor, c: Tensor, normalize: bool, keep: Optional[Tensor],
             row_ids: Optional[Tensor], col_ids: Optional[Tensor], exclude_same: bool, guide_x: Optional[Tensor],
             guide_y: Optional[Tensor], guide_normalize: bool, thr_r: Optional[Tensor], thr_c: Optional[Tensor],
             pen_same: Optional[Tensor], pen_other: Optional[Tensor], n_stat: int, kernel: str,
             backward_kernel: str, backend: str = "") -> Tuple[Tensor, Tensor]:
    """(lse_row (N,), lse_col (n_stat,)) of the masked logits (module doc); S never materialised. ``backend``:
    the dispatcher's backend that chose these kernels (named by the double-backward error; "" = the kernel)."""
    _check_kernel("kernel", kernel)
    _check_kernel("backward_kernel", backward_kernel)
    m = Masks(keep, row_ids, col_ids, exclude_same, guide_x, guide_y, guide_normalize, thr_r, thr_c, pen_same,
              pen_other, n_stat)
    check_masks(x, y, m)
    if kernel == "triton":
        return _triton_fwd(x, y, a, c, normalize, m)
    return _torch_fwd(x, y, a, c, normalize, m)


def _forward_fake(x, y, a, c, normalize, keep, row_ids, col_ids, exclude_same, guide_x, guide_y, guide_normalize,
                  thr_r, thr_c, pen_same, pen_other, n_stat, kernel, backward_kernel, backend=""):
    acc = T.acc_dtype(x)
    return x.new_empty(x.shape[0], dtype=acc), x.new_empty(n_stat, dtype=acc)


def _backward(g_r: Tensor, g_c: Tensor, x: Tensor, y: Tensor, a: Tensor, c: Tensor, normalize: bool,
              keep: Optional[Tensor], row_ids: Optional[Tensor], col_ids: Optional[Tensor], exclude_same: bool,
              guide_x: Optional[Tensor], guide_y: Optional[Tensor], guide_normalize: bool, thr_r: Optional[Tensor],
              thr_c: Optional[Tensor], pen_same: Optional[Tensor], pen_other: Optional[Tensor], n_stat: int,
              lse_r: Tensor, lse_c: Tensor, kernel: str, acc_out: bool = False, backend: str = ""
              ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, dy, da, dc): gradients of Σ g_r·lse_row + Σ g_c·lse_col (module doc), the normalisation's Jacobian
    included; the guide and the penalty get none. ``acc_out``: returned in the accumulation dtype (a caller that
    sums blocks: the CLIP ring)."""
    _check_kernel("kernel", kernel)
    m = Masks(keep, row_ids, col_ids, exclude_same, guide_x, guide_y, guide_normalize, thr_r, thr_c, pen_same,
              pen_other, n_stat)
    n, mm, k = x.shape[0], y.shape[0], n_stat
    acc = T.acc_dtype(x)
    a_, c_ = a.to(acc), c.to(acc)
    g_r, g_c = g_r.to(acc), g_c.to(acc)
    # σ keeps max|σ·G| <= 2 (P, Q <= 1): no fp16 overflow in the slab; computed on the device (no host read)
    top = (g_r * a_).abs().max()
    if k:
        top = torch.maximum(top, (g_c * c_[:k]).abs().max())
    sigma = 1.0 / top.clamp_min(1e-30)
    da = torch.zeros(n, dtype=acc, device=x.device)
    dc = torch.zeros(mm, dtype=acc, device=x.device)
    if kernel == "triton":
        xh, yh, fill = _triton_grad_tiles(x, y, a_, c_, normalize, m, lse_r, lse_c, g_r, g_c, sigma)
    else:
        xh, yh, gx, gy, a_, c_ = _operands(x, y, a, c, normalize, m)
        fill = _torch_grad_tiles(xh, yh, gx, gy, a_, c_, m, lse_r.to(acc), lse_c.to(acc), g_r, g_c, sigma)
    dxh, dyh = T.slab_products(lambda r0, rc, slab: fill(r0, rc, slab, da, dc), xh, yh, acc)
    dxh, dyh = dxh / sigma, dyh / sigma
    if normalize:
        dxh = T.token_norm_backward(x, T.inv_token_norms(x, 1), dxh)
        dyh = T.token_norm_backward(y, T.inv_token_norms(y, 1), dyh)
    if acc_out:
        return dxh.to(acc), dyh.to(acc), da, dc
    return dxh.to(x.dtype), dyh.to(y.dtype), da.to(a.dtype), dc.to(c.dtype)


def _backward_fake(g_r, g_c, x, y, a, c, normalize, keep, row_ids, col_ids, exclude_same, guide_x, guide_y,
                   guide_normalize, thr_r, thr_c, pen_same, pen_other, n_stat, lse_r, lse_c, kernel, acc_out=False,
                   backend=""):
    return T.empty_grads(x, y, a, c, acc_out)


LSE_MASKED_OP = ("the fused masked log-sum-exp fastcontrast::lse_masked (lse_rows, clip_loss with text_negatives, "
                 "false_negative_ids or a guide)")
LSE_MASKED_ALTERNATIVE = "backend='reference' (or backend='dense')"
_N_MASK_ARGS = 13  # normalize, the 11 fields of Masks before n_stat, n_stat
_BACKWARD_KERNEL_AT = 2 + 4 + _N_MASK_ARGS + 2  # g_r, g_c, x, y, a, c, the masks, lse_r, lse_c, kernel


def _setup_context(ctx, inputs, output):
    args = inputs[:4 + _N_MASK_ARGS]
    ctx.is_tensor = [isinstance(v, Tensor) for v in args]  # tensors are saved, flags and None kept as they are
    ctx.others = [None if t else v for t, v in zip(ctx.is_tensor, args)]
    ctx.kernel, ctx.backward_kernel, ctx.backend = inputs[-3], inputs[-2], inputs[-1]
    ctx.save_for_backward(*[v for v in args if isinstance(v, Tensor)], *output)


def _no_create_graph(ctx):
    T.no_double_backward(LSE_MASKED_OP, ctx.backend or ctx.kernel, LSE_MASKED_ALTERNATIVE)


def _gradients(ctx, backward_op, g_r, g_c):
    saved = list(ctx.saved_tensors)
    lse_r, lse_c = saved[-2:]
    it = iter(saved[:-2])
    args = [next(it) if t else v for t, v in zip(ctx.is_tensor, ctx.others)]
    g_r = torch.zeros_like(lse_r) if g_r is None else g_r
    g_c = torch.zeros_like(lse_c) if g_c is None else g_c
    dx, dy, da, dc = backward_op(g_r, g_c, *args, lse_r, lse_c, ctx.backward_kernel, False, ctx.backend)
    return (dx, dy, da, dc) + (None,) * (_N_MASK_ARGS + 3)


lse_masked, lse_masked_backward = fused_op(
    "lse_masked", _forward, _backward, forward_fake=_forward_fake, backward_fake=_backward_fake,
    setup_context=_setup_context, gradients=_gradients, check_create_graph=_no_create_graph,
    autocast=(0, 1), backward_autocast=(2, 3),  # x, y follow the package's autocast policy (_amp)
    double_backward=DoubleBackward(LSE_MASKED_OP, LSE_MASKED_ALTERNATIVE,
                                   kernel_of=lambda inputs: inputs[-1] or inputs[_BACKWARD_KERNEL_AT]))


def _args(m: Masks):
    return (m.keep, m.row_ids, m.col_ids, bool(m.exclude_same), m.guide_x, m.guide_y, bool(m.guide_normalize),
            m.thr_r, m.thr_c, m.pen_same, m.pen_other, int(m.n_stat))


class LseMasked:
    """``lse_masked`` with its kernels bound (the dispatcher's ``Impl.kernel``, ``Impl.backward_kernel``).
    ``self(x, y, a, c, normalize, masks)`` -> (lse_row (N,), lse_col (n_stat,)); :meth:`backward` -> (dx, dy, da,
    dc) for callers that drive the backward themselves (the CLIP ring)."""

    def __init__(self, kernel: str, backward_kernel: str, backend: str = ""):
        _check_kernel("kernel", kernel)
        _check_kernel("backward_kernel", backward_kernel)
        self.kernel, self.backward_kernel, self.backend = kernel, backward_kernel, backend

    def __call__(self, x, y, a, c, normalize: bool, masks: Masks):
        return lse_masked(x, y, a, c, bool(normalize), *_args(masks), self.kernel, self.backward_kernel,
                          self.backend)

    def backward(self, g_r, g_c, x, y, a, c, normalize: bool, masks: Masks, lse_r, lse_c, acc_out=False):
        return lse_masked_backward(g_r, g_c, x, y, a, c, bool(normalize), *_args(masks), lse_r, lse_c,
                                   self.backward_kernel, acc_out, self.backend)


def bound(kernel: str, backward_kernel: str, backend: str = "") -> LseMasked:
    """``lse_masked`` with the dispatcher's kernels bound (``backend``: the dispatcher's backend, for errors)."""
    return LseMasked(kernel, backward_kernel, backend)
