"""The Matryoshka log-sum-exp: the pairwise log-sum-exp at every nested prefix of the features in one sweep, as the
fused op ``fastcontrast::matryoshka_lse``.

``matryoshka_lse(x (N, D), y (M, D), a (N,), c (M,), ends, normalize, cols, kernel, backward_kernel)
-> (lse_row (P, N), lse_col (P, M), or (P, 0) when not ``cols``)``, ``ends`` = e_1 < … < e_P ≤ D:

    C^(p) = x[:, :e_p] y[:, :e_p]ᵀ,  S^(p) = diag(r^(p)) C^(p) diag(q^(p)),
    r^(p)_i = 1 / max(‖x_i[:e_p]‖, 1e-12), q^(p)_j likewise (both 1 when not ``normalize``),
    lse_row^(p)_i = log Σ_j exp(a_i S^(p)_ij),   lse_col^(p)_j = log Σ_i exp(c_j S^(p)_ij).

Cost. The prefixes share their partial products, C^(p) = C^(p−1) + x[:, band p] y[:, band p]ᵀ (band p = columns
e_{p−1}..e_p, e_0 = 0): one sweep over K computes every S^(p), one GEMM unit (2·N·M·e_P FLOPs) for all P
prefixes. The backward (gradients of Σ_p Σ_i g^(p)_i lse_row^(p)_i + Σ_p Σ_j h^(p)_j lse_col^(p)_j) combines the
prefixes per band. With G^(p) = dL/dS^(p) = g^(p) a ∘ P^(p) + h^(p) c ∘ Q^(p) (P, Q the row and column
softmaxes) and H^(p) = Σ_{p' ≥ p} diag(r^(p')) G^(p') diag(q^(p')) (the prefixes that contain band p),

    dx[:, band p] = H^(p) y[:, band p] − x[:, band p] ∘ Σ_{p' ≥ p} (r^(p'))² ρ^(p'),  ρ^(p)_i = Σ_j G^(p)_ij S^(p)_ij,
    dy[:, band p] = H^(p)ᵀ x[:, band p] − y[:, band p] ∘ Σ_{p' ≥ p} (q^(p'))² σ^(p'),  σ^(p)_j = Σ_i G^(p)_ij S^(p)_ij,
    da_i = Σ_p g^(p)_i Σ_j P^(p)_ij S^(p)_ij,   dc_j = Σ_p h^(p)_j Σ_i Q^(p)_ij S^(p)_ij

(the second terms are the normalisation's Jacobian, O(N·D)). The band GEMMs together are two GEMM units, as for
one loss: forward + backward is 4 units (sweep, recompute, two GEMMs) whatever P, where the P separate losses
take 4·Σ_p e_p / e_P units (1.94× at e = d/16, d/8, d/4, d/2, d). The GEMMs take unit-norm operands
x̂ = r^(P) x, ŷ = q^(P) y and the slabs the ratios r^(p)/r^(P), q^(p)/q^(P) (≥ 1, near 1), so that 16-bit slabs
keep their range (scaled by σ as in ``lse_pair``).

Kernels: ``triton`` (``matryoshka_triton.py``: the sweep with checkpoints and a backward that writes the P slabs
already suffix-summed) or ``tiles`` (the same blockwise algorithm in PyTorch, row blocks of R×M: O((N+M)·D) memory
plus R×M·(P+2); float64-exact). The dispatcher decides which (``Impl.kernel``).
"""
from __future__ import annotations

from typing import List, Tuple

import torch
from torch import Tensor

from . import configs as C
from . import tiles as T
from .fused_op import DoubleBackward, fused_op
from .triton_support import triton

if triton is not None:
    from . import matryoshka_triton as K

KERNELS = ("triton", "tiles")
EPS = 1e-12  # F.normalize's: a prefix shorter than this is divided by EPS instead (no gradient through its norm)
_LN2 = 0.6931471805599453


def bands(ends) -> List[Tuple[int, int]]:
    """[(e_{p−1}, e_p)]: the columns each prefix adds to the previous one."""
    return list(zip((0,) + tuple(ends[:-1]), tuple(ends)))


def prefix_inv_norms(x: Tensor, ends) -> Tensor:
    """(N, P): 1/max(‖x[:, :e_p]‖, EPS) per prefix in the accumulation dtype, range-safe and differentiable
    (:func:`tiles.inv_l2_norm`, F.normalize's convention)."""
    xa = x.to(T.acc_dtype(x))
    return torch.stack([T.inv_l2_norm(xa[:, :e], dim=1).squeeze(1) for e in ends], dim=1)


def _prefix_norms(x: Tensor, ends) -> Tuple[Tensor, Tensor]:
    """(inv (N, P), active (N, P)) without autograd, for the kernels: the inverse prefix norms of
    :func:`prefix_inv_norms` from one pass over x (the bands' squared sums, cumulated) and where a prefix is longer
    than EPS (its inverse norm has a derivative; the clamp's branch has none). Range-safe as tiles.inv_l2_norm:
    the squares are taken of x / max|x|."""
    xa = x.detach().to(T.acc_dtype(x))[:, :ends[-1]]
    m = xa.abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(xa.dtype).tiny)
    u = xa / m
    sq = torch.stack([u[:, lo:hi].square().sum(dim=1) for lo, hi in bands(ends)], dim=1).cumsum(dim=1)
    nrm = sq.sqrt()  # ‖x[:, :e_p]‖ / m
    return torch.maximum(nrm, EPS / m).reciprocal() / m, nrm * m > EPS


def _check(ends, d: int, kernel: str, backward_kernel: str) -> None:
    if kernel not in KERNELS or backward_kernel not in KERNELS:
        raise ValueError(f"kernel and backward_kernel must be in {KERNELS} (the dispatcher's Impl.kernel), got "
                         f"{kernel!r}, {backward_kernel!r}")
    if not ends or any(b <= a for a, b in bands(ends)) or ends[-1] > d:
        raise ValueError(f"ends must be strictly increasing in [1, {d}], got {list(ends)}")


# -------------------------------------------------------------------------------------------- PyTorch tiles
def _tiles_fwd(x, y, a, c, ends, normalize, cols):
    acc = T.acc_dtype(x)
    n, m, P = x.shape[0], y.shape[0], len(ends)
    xa, ya, a, c = x.to(acc), y.to(acc), a.to(acc), c.to(acc)
    inv_x = _prefix_norms(x, ends)[0] if normalize else None
    inv_y = _prefix_norms(y, ends)[0] if normalize else None
    lse_r = torch.empty(P, n, dtype=acc, device=x.device)
    col_max = torch.full((P, m if cols else 0), float("-inf"), dtype=acc, device=x.device)
    col_sum = torch.zeros(P, m if cols else 0, dtype=acc, device=x.device)
    for rows in T.row_blocks(n, m, torch.finfo(acc).bits // 8):
        run = torch.zeros(rows.stop - rows.start, m, dtype=acc, device=x.device)  # C^(p), one R×M block
        for p, (lo, hi) in enumerate(bands(ends)):
            torch.addmm(run, xa[rows, lo:hi], ya[:, lo:hi].T, out=run)  # + this band: the sweep goes on
            # a_i S^(p)_ij = a_i r_i q_j C_ij: the row factors folded into one vector (two passes over the block)
            rf, cf = (a[rows] * inv_x[rows, p], inv_y[:, p]) if normalize else (a[rows], None)
            z = run * rf[:, None]
            lse_r[p, rows] = torch.logsumexp(z.mul_(cf[None, :]) if normalize else z, dim=1)
            if cols:  # the column direction's online statistics, one block of rows at a time
                zc = run * (inv_x[rows, p, None] if normalize else 1.0)
                zc.mul_((c * inv_y[:, p] if normalize else c)[None, :])
                new_max = torch.maximum(col_max[p], zc.max(dim=0).values)
                col_sum[p] = col_sum[p] * torch.exp(col_max[p] - new_max) + torch.exp(zc - new_max).sum(dim=0)
                col_max[p] = new_max
    return lse_r, col_max + col_sum.log()


def _tiles_fill(xa, ya, a, c, inv_x, inv_y, rat_x, rat_y, lse_r, lse_c, g_r, g_c, ends, cols, sigma):
    """fill(r0, rc, slabs, da, dc, rho, sig): σ·H^(p) of rows r0:r0+rc into slabs[p, :rc] (the suffix sums of
    σ·diag(ratio) G^(p) diag(ratio)), da/rho for those rows, dc/sig accumulated: the Triton kernel's work in
    PyTorch."""
    normalize = inv_x is not None

    def fill(r0, rc, slabs, da, dc, rho, sig):
        sl = slice(r0, r0 + rc)
        run = torch.zeros(rc, ya.shape[0], dtype=xa.dtype, device=xa.device)
        for p, (lo, hi) in enumerate(bands(ends)):
            torch.addmm(run, xa[sl, lo:hi], ya[:, lo:hi].T, out=run)
            # in place where a block is not needed again: each pass over an R×M block is what costs on a CPU
            s = torch.mul(run, inv_x[sl, p, None]).mul_(inv_y[None, :, p]) if normalize else run
            g = torch.mul(s, a[sl, None]).sub_(lse_r[p, sl, None]).exp_()  # P^(p), then G^(p) in its place
            da[sl] += g_r[p, sl] * (g * s).sum(dim=1)
            g.mul_((g_r[p, sl] * a[sl])[:, None])
            if cols:
                q = torch.mul(s, c[None, :]).sub_(lse_c[p, None, :]).exp_()
                dc += g_c[p] * (q * s).sum(dim=0)
                g.add_(q.mul_((g_c[p] * c)[None, :]))
            if normalize:
                gs = g * s
                rho[p, sl] = gs.sum(dim=1)
                sig[p] += gs.sum(dim=0)
                torch.mul(g, (rat_x[sl, p] * sigma)[:, None], out=slabs[p, :rc]).mul_(rat_y[None, :, p])
            else:
                torch.mul(g, sigma, out=slabs[p, :rc])
        for p in range(len(ends) - 2, -1, -1):  # H^(p) = Σ_{p' ≥ p}: the prefixes that contain band p
            slabs[p, :rc] += slabs[p + 1, :rc]

    return fill


# ----------------------------------------------------------------------------------------------- Triton launch
_ENDS = {}  # (ends, device) -> (band ends in units of GRAIN on the device, GRAIN): copied to the device once


def _band_ends(ends, device: torch.device) -> Tuple[Tensor, int]:
    """((P + 1,) int32: 0, e_1, …, e_P in units of ``grain``; grain): grain = 16 when every end is a multiple of 16
    (the kernels' loads then vectorise and their K loop pipelines: see ``_band``), else 1."""
    key = (tuple(ends), device)
    if key not in _ENDS:
        grain = 16 if all(e % 16 == 0 for e in ends) else 1
        _ENDS[key] = (torch.tensor([0] + [e // grain for e in ends], dtype=torch.int32, device=device), grain)
    return _ENDS[key]


def _npp(p: int) -> int:
    return max(2, triton.next_power_of_2(p))


def _triton_fwd(x, y, a, c, ends, normalize, cols):
    """Every prefix's row lse and (``cols``) per-row-block column partials from one sweep, merged here (base 2)."""
    n, m, P = x.shape[0], y.shape[0], len(ends)
    x, y = x.contiguous(), y.contiguous()
    dummy = x.new_empty(1, dtype=torch.float32)
    inv_x = _prefix_norms(x, ends)[0].float().contiguous() if normalize else dummy
    inv_y = _prefix_norms(y, ends)[0].float().contiguous() if normalize else dummy
    cfg, warps, stages = C.launch("_matryoshka_fwd_kernel", x.device, x.dtype)
    e, grain = _band_ends(ends, x.device)
    n_blocks = triton.cdiv(n, cfg["BLOCK_M"])
    lse_r = torch.empty(P, n, device=x.device, dtype=torch.float32)
    pmax = torch.empty(n_blocks, P, m, device=x.device, dtype=torch.float32) if cols else dummy
    psum = torch.empty(n_blocks, P, m, device=x.device, dtype=torch.float32) if cols else dummy
    K._matryoshka_fwd_kernel[(n_blocks,)](
        x, y, inv_x, inv_y, a.float().contiguous(), c.float().contiguous(), lse_r, pmax, psum, e, n, m, P,
        x.stride(0), y.stride(0), NORM=normalize, COLS=cols, NPP=_npp(P), GRAIN=grain,
        PRECISION=T.precision(x.dtype), UPCAST=T.upcast(x), num_warps=warps, num_stages=stages, **cfg)
    if not cols:
        return lse_r, lse_r.new_empty(P, 0)
    top = pmax.amax(dim=0)
    return lse_r, (top + torch.log2((psum * torch.exp2(pmax - top)).sum(dim=0))) * _LN2


def _triton_fill(x, y, inv_x, inv_y, rat_x, rat_y, a, c, lse_r, lse_c, g_r, g_c, ends, cols, sigma):
    """:func:`_tiles_fill`'s contract on the Triton kernel; the partial sums are summed here over the tiles in a
    fixed order (no float atomics: the same bits every run)."""
    n, m, P = x.shape[0], y.shape[0], len(ends)
    normalize = inv_x is not None
    dummy = x.new_empty(1, dtype=torch.float32)
    f32 = lambda t: t.float().contiguous() if t is not None and t.numel() else dummy  # noqa: E731
    cfg, warps, stages = C.launch("_matryoshka_grad_kernel", x.device, x.dtype)
    e, grain = _band_ends(ends, x.device)
    args = [f32(inv_x), f32(inv_y), f32(rat_x), f32(rat_y), f32(a), f32(c), f32(lse_r), f32(lse_c), f32(g_r),
            f32(g_c), sigma.float().reshape(1)]
    parts = []

    def fill(r0, rc, slabs, da, dc, rho, sig):
        grid = (triton.cdiv(rc, cfg["BLOCK_M"]), triton.cdiv(m, cfg["BLOCK_N"]))
        if not parts:  # the first slab is the tallest
            parts.extend([torch.empty(grid[1], rc, device=x.device, dtype=torch.float32),
                          torch.empty(grid[0], m, device=x.device, dtype=torch.float32) if cols else dummy,
                          torch.empty(grid[1] * P, rc, device=x.device, dtype=torch.float32) if normalize else dummy,
                          torch.empty(grid[0] * P, m, device=x.device, dtype=torch.float32) if normalize else dummy])
        pa, pb, pra, prb = parts
        K._matryoshka_grad_kernel[grid](
            x, y, *args, slabs, pa, pb, pra, prb, e, r0, rc, n, m, P, x.stride(0), y.stride(0), slabs.stride(0),
            slabs.stride(1), pa.stride(0), m, NORM=normalize, COLS=cols, GRAIN=grain,
            PRECISION=T.precision(x.dtype), UPCAST=T.upcast(x), num_warps=warps, num_stages=stages, **cfg)
        torch.sum(pa[:, :rc], dim=0, out=da[r0:r0 + rc])  # every row of a slab is in no other slab
        if cols:
            dc.add_(pb[:grid[0]].sum(dim=0))
        if normalize:
            rho[:, r0:r0 + rc] = pra.view(grid[1], P, -1)[:, :, :rc].sum(dim=0)
            sig.add_(prb.view(-1, P, m)[:grid[0]].sum(dim=0))

    return fill


# ---------------------------------------------------------------------------------------------- the backward
def _band_products(fill, xh: Tensor, yh: Tensor, ends, acc: torch.dtype) -> Tuple[Tensor, Tensor]:
    """(H Ŷ, Hᵀ X̂) band by band, accumulated in ``acc``: fill(r0, rc, slabs) writes σ·H^(p) of rows r0:r0+rc into
    slabs[p, :rc]; band p's products take slab p and band p's columns, so the GEMMs run once over e_P."""
    n, m, P = xh.shape[0], yh.shape[0], len(ends)
    sdt = T.slab_dtype(xh)
    if sdt != xh.dtype:  # 16-bit on the CPU: fp32 operands, converted once (O((N+M)·D))
        xh, yh = xh.to(sdt), yh.to(sdt)
    rows = T.rows_per_block(n, m * (P + 2), torch.finfo(sdt).bits // 8)  # P slabs and the sweep's temporaries
    slabs = torch.empty(P, min(rows, n), m, dtype=sdt, device=xh.device)
    dx = [torch.empty(n, hi - lo, dtype=acc, device=xh.device) for lo, hi in bands(ends)]
    dy = [torch.zeros(m, hi - lo, dtype=acc, device=xh.device) for lo, hi in bands(ends)]
    for r0 in range(0, n, rows):
        rc = min(rows, n - r0)
        fill(r0, rc, slabs)
        for p, (lo, hi) in enumerate(bands(ends)):
            T._gemm_into(dx[p][r0:r0 + rc], slabs[p, :rc], yh[:, lo:hi], accumulate=False)
            T._gemm_into(dy[p], slabs[p, :rc].T, xh[r0:r0 + rc, lo:hi], accumulate=True)
    return torch.cat(dx, dim=1), torch.cat(dy, dim=1)


def _norm_jacobian(d_hat: Tensor, t: Tensor, inv: Tensor, active: Tensor, rho: Tensor, ends) -> Tensor:
    """d_hat·r^(P) − t[:, band p] ∘ Σ_{p' ≥ p} active·(r^(p'))² ρ^(p') (module doc), (N, e_P)."""
    acc = d_hat.dtype
    k = (active.to(acc) * inv * inv * rho.T).flip(1).cumsum(1).flip(1)
    coef = torch.cat([k[:, p:p + 1].expand(-1, hi - lo) for p, (lo, hi) in enumerate(bands(ends))], dim=1)
    return d_hat * inv[:, -1:] - t[:, :ends[-1]].to(acc) * coef


def _sigma(g_r, g_c, a, c, rat_x, rat_y, cols):
    """1 / a bound of |H|: each slab element sums P terms |g a P + h c Q| ≤ max|g a| + max|h c| times the ratios."""
    bound = (g_r * a[None, :]).abs().amax(dim=1)
    if cols:
        bound = bound + (g_c * c[None, :]).abs().amax(dim=1)
    if rat_x is not None:
        bound = bound * rat_x.amax(dim=0) * rat_y.amax(dim=0)
    return 1.0 / bound.sum().clamp_min(1e-30)


def _operands(x, y, ends, normalize, acc):
    """(x in acc, y in acc, x̂, ŷ, then per side (inverse prefix norms, their ratios to the full prefix's, where
    active), Nones without normalize) of the backward."""
    e = ends[-1]
    xa, ya = x.to(acc), y.to(acc)
    if not normalize:
        return xa, ya, xa[:, :e], ya[:, :e], (None,) * 3, (None,) * 3
    (inv_x, act_x), (inv_y, act_y) = _prefix_norms(x, ends), _prefix_norms(y, ends)
    return (xa, ya, xa[:, :e] * inv_x[:, -1:], ya[:, :e] * inv_y[:, -1:], (inv_x, inv_x / inv_x[:, -1:], act_x),
            (inv_y, inv_y / inv_y[:, -1:], act_y))


# ------------------------------------------------------------------------------------------------ the fused op
def _forward(x: Tensor, y: Tensor, a: Tensor, c: Tensor, ends: List[int], normalize: bool, cols: bool, kernel: str,
             backward_kernel: str, backend: str = "") -> Tuple[Tensor, Tensor]:
    """(lse_row (P, N), lse_col (P, M) or (P, 0)) of every prefix (module doc); S^(p) never materialised.
    ``backend``: the dispatcher's backend that chose these kernels (named by the double-backward error)."""
    _check(ends, x.shape[1], kernel, backward_kernel)
    if kernel == "triton":
        return _triton_fwd(x, y, a, c, ends, normalize, cols)
    return _tiles_fwd(x, y, a, c, ends, normalize, cols)


def _forward_fake(x, y, a, c, ends, normalize, cols, kernel, backward_kernel, backend=""):
    acc = T.acc_dtype(x)
    return x.new_empty(len(ends), x.shape[0], dtype=acc), x.new_empty(len(ends), y.shape[0] if cols else 0, dtype=acc)


def _backward(g_r: Tensor, g_c: Tensor, x: Tensor, y: Tensor, a: Tensor, c: Tensor, lse_r: Tensor, lse_c: Tensor,
              ends: List[int], normalize: bool, cols: bool, kernel: str) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, dy, da, dc): gradients of Σ_p Σ_i g_r[p, i] lse_row[p, i] + Σ_p Σ_j g_c[p, j] lse_col[p, j], the
    prefixes combined per band (module doc), the normalisation's Jacobian included."""
    _check(ends, x.shape[1], kernel, kernel)
    acc = T.acc_dtype(x)
    (n, d), m, P = x.shape, y.shape[0], len(ends)
    xa, ya, xh, yh, (inv_x, rat_x, act_x), (inv_y, rat_y, act_y) = _operands(x, y, ends, normalize, acc)
    a_, c_, g_r, lse_r, g_c, lse_c = (t.to(acc) for t in (a, c, g_r, lse_r, g_c, lse_c))
    sigma = _sigma(g_r, g_c, a_, c_, rat_x, rat_y, cols)  # on the device: no host read
    da, dc = torch.zeros(n, dtype=acc, device=x.device), torch.zeros(m, dtype=acc, device=x.device)
    rho = torch.zeros(P, n if normalize else 0, dtype=acc, device=x.device)
    sig = torch.zeros(P, m if normalize else 0, dtype=acc, device=x.device)
    if kernel == "triton":
        fill = _triton_fill(x.contiguous(), y.contiguous(), inv_x, inv_y, rat_x, rat_y, a_, c_, lse_r, lse_c, g_r,
                            g_c, ends, cols, sigma)
        xh, yh = xh.to(x.dtype), yh.to(y.dtype)  # tensor-core GEMMs in the inputs' dtype on the fast path
    else:
        fill = _tiles_fill(xa, ya, a_, c_, inv_x, inv_y, rat_x, rat_y, lse_r, lse_c, g_r, g_c, ends, cols, sigma)
    dx, dy = _band_products(lambda r0, rc, slabs: fill(r0, rc, slabs, da, dc, rho, sig), xh, yh, ends, acc)
    dx, dy = dx / sigma, dy / sigma
    if normalize:
        dx, dy = _norm_jacobian(dx, x, inv_x, act_x, rho, ends), _norm_jacobian(dy, y, inv_y, act_y, sig, ends)
    if ends[-1] < d:  # the columns past the largest prefix take no part
        dx, dy = (torch.cat([t, t.new_zeros(t.shape[0], d - ends[-1])], dim=1) for t in (dx, dy))
    return dx.to(x.dtype), dy.to(y.dtype), da.to(a.dtype), dc.to(c.dtype)


def _backward_fake(g_r, g_c, x, y, a, c, lse_r, lse_c, ends, normalize, cols, kernel):
    return T.empty_grads(x, y, a, c)


MATRYOSHKA_OP = ("the fused Matryoshka log-sum-exp fastcontrast::matryoshka_lse (matryoshka_ce_rows, "
                 "matryoshka_clip_loss)")
MATRYOSHKA_ALTERNATIVE = "backend='reference' (or backend='dense')"


def _setup_context(ctx, inputs, output):
    x, y, a, c, ends, normalize, cols, kernel, backward_kernel, backend = inputs
    ctx.save_for_backward(x, y, a, c, *output)
    ctx.ends, ctx.normalize, ctx.cols = list(ends), normalize, cols
    ctx.kernel, ctx.backward_kernel, ctx.backend = kernel, backward_kernel, backend


def _gradients(ctx, backward_op, g_r, g_c):
    x, y, a, c, lse_r, lse_c = ctx.saved_tensors
    g_r = torch.zeros_like(lse_r) if g_r is None else g_r
    g_c = torch.zeros_like(lse_c) if g_c is None else g_c
    dx, dy, da, dc = backward_op(g_r, g_c, x, y, a, c, lse_r, lse_c, ctx.ends, ctx.normalize, ctx.cols,
                                 ctx.backward_kernel)
    return dx, dy, da, dc, None, None, None, None, None, None


matryoshka_lse, matryoshka_lse_backward = fused_op(
    "matryoshka_lse", _forward, _backward, forward_fake=_forward_fake, backward_fake=_backward_fake,
    setup_context=_setup_context, gradients=_gradients,
    check_create_graph=lambda ctx: T.no_double_backward(MATRYOSHKA_OP, ctx.backend or ctx.kernel,
                                                        MATRYOSHKA_ALTERNATIVE),
    autocast=(0, 1), backward_autocast=(2, 3),  # x, y follow the package's autocast policy (_amp)
    double_backward=DoubleBackward(MATRYOSHKA_OP, MATRYOSHKA_ALTERNATIVE, kernel_of=lambda inputs: inputs[11]))


class MatryoshkaLse:
    """``matryoshka_lse`` with the dispatcher's kernels bound: ``self(x, y, a, c, ends, normalize, cols)``."""

    def __init__(self, kernel: str, backward_kernel: str, backend: str = ""):
        self.kernel, self.backward_kernel, self.backend = kernel, backward_kernel, backend

    def __call__(self, x, y, a, c, ends, normalize=True, cols=False):
        return matryoshka_lse(x, y, a, c, list(ends), bool(normalize), bool(cols), self.kernel, self.backward_kernel,
                              self.backend)
