"""The materialised InfoNCE for small batches: one GEMM for S, log-softmax on the N×M logits, and a
hand-written backward (two GEMMs), all in one autograd node.

Below a few thousand rows the tiled kernels are launch- and overhead-bound: the N×M logits fit easily and a
dense GEMM is the fastest way through. This path computes the same loss as :func:`infonce_fused` (row scale a,
column scale c, labels p, per-token normalisation):

    loss = −½·mean_i[log softmax_j(a_i S_ij)_{p(i)} + log softmax_i(c_j S_ij)_{i, p(i)}]
    dL_row = w·(P − E), dL_col = h·Q − w·E,  G = a∘dL_row + c∘dL_col,  dX̂ = G Ŷ, dŶ = Gᵀ X̂

(P, Q: the row and column softmaxes, E the positive indicator, w = g/(2N), h_j = #{i: p(i) = j}). S and the
two log-softmaxes are kept for the backward: O(N·M) memory, which is why ``"auto"`` takes this path only below a
size threshold (:mod:`fastcontrast.dispatch`). float64 stays float64 (gradcheck-able); fp16/bf16 features
multiply into a float32 S (no rounded logits). Every op here costs microseconds of dispatch at small N, so the
common case (one logit scale, the diagonal) has its own, shorter path (:class:`DenseClip`).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..primitives.tiles import acc_dtype, apply_tokens, inv_token_norms, token_norm_backward


def _gemm_acc(a: Tensor, b: Tensor, acc: torch.dtype) -> Tensor:
    """a @ b in ``acc`` precision: fp16/bf16 operands on CUDA go to a float32 output directly."""
    if a.dtype == acc:
        return a @ b
    if a.is_cuda:
        try:
            return torch.mm(a, b, out_dtype=acc)
        except (RuntimeError, TypeError):
            pass
    return a.to(acc) @ b.to(acc)


def _grad_gemm(gm: Tensor, other: Tensor, acc: torch.dtype) -> Tensor:
    """gm @ other in ``acc``. On CUDA with fp16/bf16 features the weights go to the tensor cores in the features'
    dtype, scaled by 1/max|gm| first (as the fused kernels' slabs) so that small weights do not flush to zero."""
    if other.dtype == acc or not other.is_cuda:
        return gm @ other.to(acc)
    sigma = gm.abs().amax().clamp_min(1e-30)
    return _gemm_acc((gm / sigma).to(other.dtype), other, acc) * sigma


def _similarity(x: Tensor, y: Tensor, normalize: bool, tokens: int):
    """(S in the accumulation dtype, x̂, ŷ, inverse token norms or None): the forward prologue of both paths."""
    if normalize:
        inv_x, inv_y = inv_token_norms(x, tokens), inv_token_norms(y, tokens)
        xh, yh = apply_tokens(x, inv_x).to(x.dtype), apply_tokens(y, inv_y).to(y.dtype)
    else:
        inv_x = inv_y = None
        xh, yh = x, y
    return _gemm_acc(xh, yh.T, acc_dtype(x)), xh, yh, inv_x, inv_y


def _feature_grads(ctx, gm: Tensor, coef: Tensor, x, y, xh, yh, inv_x, inv_y):
    """(dx, dy) from the gradient weights of S: coef·G Ŷ and coef·Gᵀ X̂, through the normalisation when asked."""
    acc = gm.dtype
    dx = dy = None
    if ctx.needs_input_grad[0]:
        dx = _grad_gemm(gm, yh, acc) * coef
        dx = (token_norm_backward(x, inv_x, dx) if ctx.normalize else dx).to(x.dtype)
    if ctx.needs_input_grad[1]:
        dy = _grad_gemm(gm.T, xh, acc) * coef
        dy = (token_norm_backward(y, inv_y, dy) if ctx.normalize else dy).to(y.dtype)
    return dx, dy


def _differentiable_grads(ctx, g, x, y, a, c, labels, needs=None, shared=None):
    """(dx, dy, da, dc) as a differentiable graph: the reference's autograd formula on the same inputs, so that
    double backward (gradient penalties, meta-learning) gets exact second derivatives. The hand-written backward
    works on saved, detached softmaxes: differentiating it would silently drop terms. ``shared``: a 0-d scale
    expanded into a and c, whose gradient is returned in place of da (dc is then None)."""
    from .clip_loss_reference import infonce_reference

    needs = ctx.needs_input_grad[:4] if needs is None else needs
    targets = [x, y, shared if shared is not None else a, c]
    want = [t for t, w in zip(targets, needs) if w]
    with torch.enable_grad():
        loss = infonce_reference(x, y, a, c, None, labels, ctx.normalize, ctx.tokens)
        got = iter(torch.autograd.grad(loss, want, g, create_graph=True))
    return tuple(next(got) if w else None for w in needs)


class DenseInfoNCE(torch.autograd.Function):
    """The general case: scales per row (a) and per column (c), positives p(i) (None: the diagonal)."""

    @staticmethod
    def forward(ctx, x: Tensor, y: Tensor, a: Tensor, c: Tensor, labels: Optional[Tensor], normalize: bool,
                tokens: int) -> Tensor:
        s, xh, yh, inv_x, inv_y = _similarity(x, y, normalize, tokens)
        a_, c_ = a.to(s.dtype), c.to(s.dtype)
        lsm_r = torch.log_softmax(a_[:, None] * s, 1)
        lsm_c = torch.log_softmax(c_[None, :] * s, 0)
        if labels is None:
            pos_r, pos_c = lsm_r.diagonal(), lsm_c.diagonal()
        else:
            pos_r, pos_c = lsm_r.gather(1, labels[:, None]), lsm_c.gather(1, labels[:, None])
        loss = (pos_r.sum() + pos_c.sum()) / (-2 * x.shape[0])
        ctx.save_for_backward(x, y, xh, yh, inv_x, inv_y, a_, c_, s, lsm_r, lsm_c, labels, a, c)
        ctx.normalize, ctx.tokens = normalize, tokens
        return loss

    @staticmethod
    def backward(ctx, g: Tensor):
        x, y, xh, yh, inv_x, inv_y, a, c, s, lsm_r, lsm_c, labels, a_in, c_in = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: a gradient that must itself be differentiable
            return _differentiable_grads(ctx, g, x, y, a_in, c_in, labels) + (None, None, None)
        n, m = s.shape
        acc = s.dtype
        w = g.to(acc) / (2 * n)
        # dL_row = w·(P − E); dL_col = h·Q − w·E, h_j = w·#{i: p(i) = j}; E the positive indicator
        d_r = lsm_r.exp()
        q = lsm_c.exp()
        if labels is None:
            d_r.diagonal().sub_(1)
            d_c = q
            d_c.diagonal().sub_(1)
        else:
            h = torch.zeros(m, dtype=acc, device=s.device).index_add_(0, labels, torch.ones(n, dtype=acc,
                                                                                              device=s.device))
            d_r.scatter_add_(1, labels[:, None], torch.full((n, 1), -1.0, dtype=acc, device=s.device))
            d_c = q.mul_(h[None, :]).scatter_add_(1, labels[:, None], torch.full((n, 1), -1.0, dtype=acc,
                                                                                   device=s.device))
        gm = (a[:, None] * d_r).add_(c[None, :] * d_c)
        dx, dy = _feature_grads(ctx, gm, w, x, y, xh, yh, inv_x, inv_y)
        da = dc = None
        if ctx.needs_input_grad[2]:
            da = (w * (d_r * s).sum(dim=1)).to(a.dtype)
        if ctx.needs_input_grad[3]:
            dc = (w * (d_c * s).sum(dim=0)).to(c.dtype)
        return dx, dy, da, dc, None, None, None


class DenseClip(torch.autograd.Function):
    """CLIP's case, the common one, with as few ops as the math allows (every op is µs of overhead at small N):
    one scale s for rows and columns, the diagonal as positives. L = s·S; loss = (Σlse_r + Σlse_c − 2·tr L)/(2N);
    G = P + Q − 2I, dX̂ = (s·g/2N)·G Ŷ, dŶ = (s·g/2N)·Gᵀ X̂, ds = (g/2N)·⟨G, S⟩. A constant bias cancels."""

    @staticmethod
    def forward(ctx, x: Tensor, y: Tensor, scale: Tensor, normalize: bool, tokens: int) -> Tensor:
        s, xh, yh, inv_x, inv_y = _similarity(x, y, normalize, tokens)
        sc = scale if scale.dtype == s.dtype else scale.to(s.dtype)
        logits = s * sc
        # log_softmax is one fused kernel per direction (logsumexp is several): it matters at small N
        lsm_r, lsm_c = torch.log_softmax(logits, 1), torch.log_softmax(logits, 0)
        loss = (lsm_r.diagonal().sum() + lsm_c.diagonal().sum()) / (-2 * x.shape[0])
        ctx.save_for_backward(x, y, xh, yh, inv_x, inv_y, sc, s, lsm_r, lsm_c, scale)
        ctx.normalize, ctx.tokens = normalize, tokens
        return loss

    @staticmethod
    def backward(ctx, g: Tensor):
        x, y, xh, yh, inv_x, inv_y, sc, s, lsm_r, lsm_c, scale = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True (see _differentiable_grads)
            n, m = x.shape[0], y.shape[0]
            ctx_needs = ctx.needs_input_grad[:3]
            dx, dy, ds, _ = _differentiable_grads(ctx, g, x, y, scale.expand(n), scale.expand(m), None,
                                                  needs=ctx_needs + (False,), shared=scale)
            return dx, dy, ds, None, None
        w = g.to(s.dtype) / (2 * s.shape[0])
        gm = lsm_r.exp().add_(lsm_c.exp())
        gm.diagonal().sub_(2)
        dx, dy = _feature_grads(ctx, gm, w * sc, x, y, xh, yh, inv_x, inv_y)
        ds = None
        if ctx.needs_input_grad[2]:
            ds = (w * torch.dot(gm.view(-1), s.view(-1))).to(sc.dtype)
        return dx, dy, ds, None, None


def _shared_scalar(a: Tensor, c: Tensor) -> bool:
    """a and c are the same 0-d tensor expanded (how clip_loss and oblique_clip_loss pass one logit scale)."""
    if not (a.stride() == (0,) and c.stride() == (0,) and a.dtype == c.dtype):
        return False
    if torch.compiler.is_compiling():  # a traced graph cannot compare data pointers (fullgraph breaks); views can
        return a._base is not None and a._base is c._base
    return a.data_ptr() == c.data_ptr()


def infonce_dense(x: Tensor, y: Tensor, row_scale: Tensor, col_scale: Tensor, bias: Optional[Tensor],
                  labels: Optional[Tensor], normalize: bool, tokens: int) -> Tensor:
    """InfoNCE on the materialised logits with one autograd node (see the module doc); labels None = diagonal.
    A bias is a constant shift of every logit, to which the softmax is blind: it changes neither value nor
    gradients of this loss (its gradient is 0)."""
    if labels is None and _shared_scalar(row_scale, col_scale) and x.shape[0] == y.shape[0]:
        loss = DenseClip.apply(x, y, row_scale.as_strided((), ()), normalize, tokens)
    else:
        loss = DenseInfoNCE.apply(x, y, row_scale, col_scale, labels, normalize, tokens)
    return loss if bias is None else loss + 0 * bias  # keeps the bias in the graph: its gradient is an exact 0
