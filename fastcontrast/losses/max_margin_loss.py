"""The bidirectional max-margin (hinge) loss of MM-TS and its AVION baseline: ``max_margin_loss``.

[m_i − S_{i,p(i)} + S_ij]_+ over negatives j of row i and [m_i − S_{i,p(i)} + S_{i',p(i)}]_+ over negatives i' of
column p(i), m scalar or per pair (MM-TS: m_i = τ_i(t)), reduced as the authors' code does (mean over all terms;
SergShel/MM-TS avion/avion/losses/losses.py). This package's extensions: ``reduction="sum"`` and ``hardest``
(VSE++). The reference materialises S; the fused path runs the hinge sweeps of ``primitives/hinge_sweep.py``
(Triton, float32: float64 runs the reference), O((N+M)·D) memory.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..dispatch import register, register_fused
from ..primitives import hinge_sweep as H
from ..primitives import tiles as T
from ..primitives.tiles import l2_normalize


def max_margin_loss_reference(x, y, margin, labels=None, hardest: bool = False, normalize: bool = True,
                              reduction: str = "mean"):
    """Bidirectional hinge: [m_i − S_{i,p(i)} + S_ij]_+ over columns j ∉ pos(i) and [m_i − S_{i,p(i)} + S_{i',p(i)}]_+
    over rows i' that are not positives of column p(i); m scalar or per pair (N,).

    reduction "mean" (MM-TS / AVION): mean over all those terms, 2n(n−1) of them for the diagonal. "sum" (this
    package's earlier choice): sum over negatives, mean over pairs. ``hardest`` keeps only the largest violation
    per pair and direction (VSE++, an extension): "mean" averages the 2n kept terms, "sum" adds the two
    directions and averages over pairs.
    """
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    x, y = x.to(acc), y.to(acc)
    if normalize:
        x, y = l2_normalize(x, dim=-1), l2_normalize(y, dim=-1)
    s = x @ y.T
    n, m_cols = s.shape
    if labels is None:
        labels = torch.arange(n, device=x.device)
    rows = torch.arange(n, device=x.device)
    pos = s[rows, labels]  # (N,)
    marg = torch.as_tensor(margin, dtype=acc, device=x.device)
    marg = marg[:, None] if marg.dim() == 1 else marg
    is_pos = torch.zeros(n, m_cols, dtype=torch.bool, device=s.device).scatter_(1, labels[:, None], True)  # E_ij
    # image→text: row i against every non-positive column
    cost_row = (marg - pos[:, None] + s).clamp(min=0).masked_fill(is_pos, 0)
    # text→image: column p(i) against every row that is not a positive of that column
    col_s = s[:, labels].T  # (N pairs, N rows): S_{i', p(i)}
    col_is_pos = is_pos[:, labels].T
    cost_col = (marg - pos[:, None] + col_s).clamp(min=0).masked_fill(col_is_pos, 0)
    if hardest:
        total = cost_row.max(dim=1).values + cost_col.max(dim=1).values
        return total.mean() / 2 if reduction == "mean" else total.mean()
    if reduction == "mean":
        return (cost_row.sum() + cost_col.sum()) / ((~is_pos).sum() + (~col_is_pos).sum())
    return (cost_row.sum(dim=1) + cost_col.sum(dim=1)).mean()


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
    yp = y if labels is None else y[labels]
    if normalize:
        xf, ypf = T.apply_tokens(x, T.inv_token_norms(x, 1)), T.apply_tokens(yp, T.inv_token_norms(yp, 1))
    else:
        xf, ypf = x.to(acc), yp.to(acc)
    off = margin - (xf * ypf).sum(dim=1)  # o_i = m_i − S_{i,p(i)}, its gradient flows to both features
    n = x.shape[0]
    if hardest:  # both directions' hardest negatives from one sweep (HardestPair)
        lab = torch.arange(n, device=x.device) if labels is None else labels
        total = H.HardestPair.apply(x, y, off, lab, normalize)
        return total / (2 * n) if reduction == "mean" else total / n
    if labels is None:  # the diagonal: both directions from one sweep (PairHinge)
        want_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (x, y, off))
        total = H.PairHinge.apply(x, y, off, normalize, want_grad)
        return total / (2 * n * (n - 1)) if reduction == "mean" else total / n
    cols = torch.arange(y.shape[0], device=y.device)
    i2t = H.HingeRows.apply(x, y, off, labels, cols, normalize)
    t2i = H.HingeRows.apply(yp, x, off, labels, labels, normalize)
    if reduction == "mean":
        return (i2t.sum() + t2i.sum()) / negative_count(labels, y.shape[0]).to(acc)
    return (i2t + t2i).mean()


register("max_margin", "reference")(max_margin_loss_reference)
register_fused("max_margin", max_margin_fused, backends=("triton",), triton_float64="reference")
