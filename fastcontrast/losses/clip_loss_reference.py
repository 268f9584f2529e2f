"""Readable ground truth for the symmetric InfoNCE family (SPEC §1). Materialises the N×M logits.

Everything fast in this package is checked against these functions.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..primitives.tiles import acc_dtype, l2_normalize


def normalize_tokens(x: torch.Tensor, tokens: int) -> torch.Tensor:
    """L2-normalise each of ``tokens`` equal chunks of the last dim: (N, K·d) -> (N, K·d), each chunk on S^{d-1}."""
    n, kd = x.shape
    return l2_normalize(x.reshape(n, tokens, kd // tokens), dim=-1).reshape(n, kd)


def lse_pair_reference(x, y, row_scale, col_scale, bias=None):
    """Row and column log-sum-exp of the two scaled logit matrices.

    lse_row_i = log Σ_j exp(a_i·⟨x_i,y_j⟩ + b),  lse_col_j = log Σ_i exp(c_j·⟨x_i,y_j⟩ + b).
    x (N, D), y (M, D), a = row_scale (N,), c = col_scale (M,), b scalar or None. Returns ((N,), (M,)).
    """
    s = x.float() @ y.float().T if x.dtype != torch.float64 else x @ y.T
    row = row_scale[:, None] * s
    col = col_scale[None, :] * s
    if bias is not None:
        row = row + bias
        col = col + bias
    return torch.logsumexp(row, dim=1), torch.logsumexp(col, dim=0)


def infonce_reference(
    x: torch.Tensor,
    y: torch.Tensor,
    row_scale: torch.Tensor,
    col_scale: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    labels: Optional[torch.Tensor] = None,
    normalize: bool = False,
    tokens: int = 1,
) -> torch.Tensor:
    """Symmetric InfoNCE with a scale per row (image→text) and per column (text→image).

    loss = ½·mean_i[ CE(a_i·S_i· + b, p(i)) + CE(c_{p(i)}·S_{·p(i)} + b, i) ], S = x̂ ŷᵀ, one term pair per
    positive pair (i, p(i)); for p = identity this is CLIP's ½(CE_rows + CE_cols).
    ``tokens`` > 1 splits D into K tokens, each normalised on its own sphere when ``normalize`` (oblique).
    """
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    x, y = x.to(acc), y.to(acc)  # low-precision inputs are upcast once, before any arithmetic
    if normalize:
        x, y = normalize_tokens(x, tokens), normalize_tokens(y, tokens)
    s = x @ y.T  # N×M, the thing the fused kernels never hold
    n = x.shape[0]
    if labels is None:
        labels = torch.arange(n, device=x.device)
    logits_row = row_scale.to(acc)[:, None] * s
    logits_col = col_scale.to(acc)[None, :] * s
    if bias is not None:
        logits_row = logits_row + bias
        logits_col = logits_col + bias
    rows = torch.arange(n, device=x.device)
    loss_i2t = F.cross_entropy(logits_row, labels)
    # text→image: for each positive pair, softmax over the images in column p(i), target row i
    loss_t2i = (torch.logsumexp(logits_col, dim=0)[labels] - logits_col[rows, labels]).mean()
    return (loss_i2t + loss_t2i) / 2


def clip_loss_reference(image_features, text_features, logit_scale, logit_bias=None, labels=None, normalize=False):
    """CLIP's loss: ½[CE(s·XYᵀ + b, labels) + CE(s·YXᵀ + b, labels)] (open_clip's ClipLoss for the diagonal)."""
    n, m = image_features.shape[0], text_features.shape[0]
    acc = torch.float64 if image_features.dtype == torch.float64 else torch.float32
    s = torch.as_tensor(logit_scale, device=image_features.device, dtype=acc)
    return infonce_reference(
        image_features, text_features, s.expand(n), s.expand(m), logit_bias, labels, normalize
    )


def ce_rows_reference(a, b, scale, bias=None, labels=None):
    """One direction only: mean_i CE(s·a_i bᵀ + bias, labels_i) (open_clip's local_loss terms)."""
    acc = torch.float64 if a.dtype == torch.float64 else torch.float32
    logits = scale.to(acc) * (a.to(acc) @ b.to(acc).T)
    if bias is not None:
        logits = logits + bias
    return F.cross_entropy(logits, labels)


def infonce_ids_reference(x, y, a, c, bias, image_ids, text_ids, normalize=False, tokens=1):
    """Readable ground truth: the N×M positive mask, targets normalised per row (and per column), soft CE."""
    acc = acc_dtype(x)
    x, y = x.to(acc), y.to(acc)
    if normalize:
        n, m = x.shape[0], y.shape[0]
        x = l2_normalize(x.reshape(n, tokens, -1), dim=-1).reshape(n, -1)
        y = l2_normalize(y.reshape(m, tokens, -1), dim=-1).reshape(m, -1)
    s = x @ y.T
    b = 0.0 if bias is None else bias.to(acc)
    mask = (image_ids[:, None] == text_ids[None, :]).to(acc)
    t_row = mask / mask.sum(dim=1, keepdim=True).clamp_min(1)
    t_col = mask / mask.sum(dim=0, keepdim=True).clamp_min(1)
    row = -(t_row * torch.log_softmax(a.to(acc)[:, None] * s + b, dim=1)).sum(dim=1)
    col = -(t_col * torch.log_softmax(c.to(acc)[None, :] * s + b, dim=0)).sum(dim=0)
    return 0.5 * (row.mean() + col.mean())
