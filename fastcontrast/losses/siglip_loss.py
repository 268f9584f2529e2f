"""SigLIP's sigmoid loss (Zhai et al. 2023): ``siglip_loss``, on every backend.

−(1/N) Σ_ij log σ(z_ij (s⟨x_i, y_j⟩ + b)), z = +1 at the positives and −1 elsewhere. Since
−Σ_j log σ(z_ij l_ij) = Σ_j softplus(l_ij) − l_{i,p(i)} (z = +1 only at the positive), the fused loss is one
all-pairs softplus sweep (``primitives/softplus_sweep.py``: 3 GEMM units forward+backward, 1 without grad) plus an
O(N·D) positive term. Dispatcher ops: ``siglip`` (labels / the diagonal / negative_only) and ``siglip_ids`` (groups
of positives, SigLIP+'s ``inverse_count`` weights). The reference materialises the N×M logits as open_clip does.
The Triton kernels compute in float32: float64 runs the reference.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..dispatch import register, register_fused
from ..primitives import tiles as T
from ..primitives.groups import group_sums
from ..primitives.softplus_sweep import SoftplusSum


def siglip_loss_reference(x, y, logit_scale, logit_bias=None, labels=None, negative_only=False):
    """−(1/N) Σ_ij log σ(z_ij·(s⟨x_i, y_j⟩ + b)), z = +1 at (i, p(i)), −1 elsewhere (all −1 if negative_only)."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    logits = logit_scale.to(acc) * (x.to(acc) @ y.to(acc).T)
    if logit_bias is not None:
        logits = logits + logit_bias
    z = -torch.ones_like(logits)
    if not negative_only:
        n = x.shape[0]
        labels = torch.arange(n, device=x.device) if labels is None else labels
        z[torch.arange(n, device=x.device), labels] = 1.0
    return -F.logsigmoid(z * logits).sum() / x.shape[0]


def siglip_fused(x: Tensor, y: Tensor, scale: Tensor, bias: Optional[Tensor], labels: Optional[Tensor],
                 negative_only: bool) -> Tensor:
    b = torch.zeros((), device=x.device) if bias is None else bias
    want_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (x, y, scale, b))
    total = SoftplusSum.apply(x, y, scale, b, want_grad)
    if not negative_only:
        n = x.shape[0]
        lab = torch.arange(n, device=x.device) if labels is None else labels
        pos = (x.float() * y[lab].float()).sum(dim=1)
        total = total - (scale * pos + b).sum()
    return total / x.shape[0]


# −log σ(z·u) is softplus(u) for a negative and softplus(u) − u for a positive, u = s·S + b, so
#     Σ_neg softplus(u) + Σ_pos w·(softplus(u) − u) = Σ_all softplus(u) + Σ_pos [(w − 1)·softplus(u) − w·u]:
# the all-pairs term is the siglip op with negative_only=True; w = 1 ("none") leaves a linear correction (group
# sums); SigLIP+'s w_ij = ½(1/k_i + 1/k'_j) ("inverse_count") adds a non-linear term over the positive pairs,
# computed here in row blocks with the ids' mask made per block (never N×M), recomputed in backward.


class _PositiveSoftplus(torch.autograd.Function):
    """Σ_{pairs with equal ids} (w_ij − 1)·softplus(s⟨x_i, y_j⟩ + b), w_ij = ½(r_i + c_j); gradients to x, y, s, b."""

    @staticmethod
    def forward(ctx, x, y, s, b, iid, tid, r, c):
        acc = T.acc_dtype(x)
        xa, ya = x.to(acc), y.to(acc)
        total = torch.zeros((), dtype=acc, device=x.device)
        for sl in T.row_blocks(x.shape[0], y.shape[0], torch.finfo(acc).bits // 8):
            u = s * (xa[sl] @ ya.T) + b
            coef = torch.where(iid[sl, None] == tid[None, :], 0.5 * (r[sl, None] + c[None, :]) - 1, 0.0)
            total = total + (coef * F.softplus(u)).sum()
        ctx.save_for_backward(x, y, s, b, iid, tid, r, c)
        return total

    @staticmethod
    def backward(ctx, g):
        x, y, s, b, iid, tid, r, c = ctx.saved_tensors
        acc = T.acc_dtype(x)
        xa, ya = x.to(acc), y.to(acc)
        dx, dy = torch.empty_like(xa), torch.zeros_like(ya)
        ds, db = torch.zeros((), dtype=acc, device=x.device), torch.zeros((), dtype=acc, device=x.device)
        for sl in T.row_blocks(x.shape[0], y.shape[0], torch.finfo(acc).bits // 8):
            sim = xa[sl] @ ya.T
            coef = torch.where(iid[sl, None] == tid[None, :], 0.5 * (r[sl, None] + c[None, :]) - 1, 0.0)
            gu = g * coef * torch.sigmoid(s * sim + b)  # d/du of the block's sum
            dx[sl] = s * (gu @ ya)
            dy += s * (gu.T @ xa[sl])
            ds += (gu * sim).sum()
            db += gu.sum()
        return dx.to(x.dtype), dy.to(y.dtype), ds.to(s.dtype), db.to(b.dtype), None, None, None, None


def siglip_ids(every_fn, x: Tensor, y: Tensor, scale: Tensor, bias, image_ids: Tensor, text_ids: Tensor,
               weighting: str, count_image_ids=None) -> Tensor:
    """(1/N)[Σ_neg softplus(u_ij) + Σ_pos w_ij·softplus(−u_ij)], u = s⟨x_i, y_j⟩ + b, positives where ids are
    equal; w = 1 ("none") or ½(1/k_i + 1/k'_j) ("inverse_count", SigLIP+). ``every_fn``: the backend's siglip op.
    ``count_image_ids``: the ids whose images k'_j counts (every rank's, when x holds one rank's rows)."""
    if weighting == "none":
        return siglip_ids_terms(every_fn, x, y, scale, bias, image_ids, text_ids, None, None)
    ones = torch.ones(max(x.shape[0], y.shape[0]), 1, dtype=T.acc_dtype(x), device=x.device)
    _, k_row = group_sums(image_ids, text_ids, ones[:y.shape[0]])  # k_i: the texts sharing image i's id
    col_ids = image_ids if count_image_ids is None else count_image_ids
    _, k_col = group_sums(text_ids, col_ids, ones[:1].expand(col_ids.shape[0], 1))  # k'_j
    r, c = 1.0 / k_row.clamp_min(1), 1.0 / k_col.clamp_min(1)
    return siglip_ids_terms(every_fn, x, y, scale, bias, image_ids, text_ids, r, c)


def siglip_ids_terms(every_fn, x: Tensor, yb: Tensor, scale: Tensor, bias, iid: Tensor, tid: Tensor, r, c
                     ) -> Tensor:
    """(1/N) Σ_ij −v_ij log σ(z_ij u_ij) of the images x (N, D) against the texts yb (M_b, D), z = +1 where the
    ids are equal; v = 1, or SigLIP+'s ½(r_i + c_j) on the positives when r (N,), c (M_b,) are given (the inverse
    counts, global ones in a distributed block). The all-pairs softplus sum is ``every_fn`` (the backend's siglip
    op, every pair a negative); the positives' terms are group sums (``primitives/groups.py``): no N×M_b mask."""
    acc = T.acc_dtype(x)
    n = x.shape[0]
    sa = scale.to(acc)
    ba = torch.zeros((), device=x.device, dtype=acc) if bias is None else bias.to(acc)
    every = every_fn(x, yb, scale, bias, None, True)  # (1/N) Σ_all softplus(u): every pair a negative
    xa, ya = x.to(acc), yb.to(acc)
    y_sum, k_row = group_sums(iid, tid, ya)  # the block's positives of each image: Σ y_j, their number
    if r is None:
        return every - (sa * (xa * y_sum).sum() + ba * k_row.sum()) / n
    x_sum, k_col = group_sums(tid, iid, xa)
    linear = 0.5 * ((r * (sa * (xa * y_sum).sum(dim=1) + ba * k_row)).sum()
                    + (c * (sa * (ya * x_sum).sum(dim=1) + ba * k_col)).sum())
    nonlinear = _PositiveSoftplus.apply(x, yb, sa, ba, iid, tid, r.detach(), c.detach())
    return every + (nonlinear - linear) / n


def siglip_ids_reference(x, y, scale, bias, image_ids, text_ids, weighting="none"):
    """Materialised: −(1/N) Σ_ij v_ij log σ(z_ij u_ij), z = +1 where ids are equal, v = 1 on negatives and w on
    positives (w = 1, or ½(1/k_i + 1/k'_j) with k the row/column positive counts)."""
    acc = T.acc_dtype(x)
    u = scale.to(acc) * (x.to(acc) @ y.to(acc).T)
    if bias is not None:
        u = u + bias.to(acc)
    pos = image_ids[:, None] == text_ids[None, :]
    z = torch.where(pos, 1.0, -1.0).to(acc)
    v = torch.ones_like(u)
    if weighting == "inverse_count":
        k_r = pos.sum(dim=1, keepdim=True).clamp_min(1).to(acc)
        k_c = pos.sum(dim=0, keepdim=True).clamp_min(1).to(acc)
        v = torch.where(pos, 0.5 * (1 / k_r + 1 / k_c), v)
    return -(v * F.logsigmoid(z * u)).sum() / x.shape[0]


def siglip_ids_fused(x, y, scale, bias, image_ids, text_ids, weighting) -> Tensor:
    return siglip_ids(siglip_fused, x, y, scale, bias, image_ids, text_ids, weighting)


register("siglip", "reference")(siglip_loss_reference)
register_fused("siglip", siglip_fused, backends=("triton",), triton_float64="reference")
register("siglip_ids", "reference")(siglip_ids_reference)
register_fused("siglip_ids", siglip_ids_fused, backends=("triton",), triton_float64="reference")
