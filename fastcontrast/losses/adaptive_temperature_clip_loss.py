"""InfoNCE with a temperature per sample (MM-TS's loss with τ_i(t) from ``mmts_temperature``):
``adaptive_temperature_clip_loss``. It runs on the ``infonce`` op of ``clip_loss.py`` with per-row scales
a_i = 1/τ_i and per-column scales c_j = 1/τ'_j; this is its readable reference (materialised).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..primitives.tiles import l2_normalize


def adaptive_temperature_clip_loss_reference(x, y, tau_image, tau_text, labels=None, logit_bias=None, normalize=False):
    """Row i of image→text uses ⟨x_i,y_j⟩/τ_i; column j of text→image uses ⟨x_i,y_j⟩/τ'_j."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    x, y = x.to(acc), y.to(acc)
    if normalize:
        x, y = l2_normalize(x, dim=-1), l2_normalize(y, dim=-1)
    s = x @ y.T
    n = x.shape[0]
    if labels is None:
        labels = torch.arange(n, device=x.device)
    rows = torch.arange(n, device=x.device)
    l_row = s / tau_image.to(acc)[:, None]
    l_col = s / tau_text.to(acc)[None, :]
    if logit_bias is not None:
        l_row, l_col = l_row + logit_bias, l_col + logit_bias
    i2t = F.cross_entropy(l_row, labels)
    t2i = (torch.logsumexp(l_col, dim=0)[labels] - l_col[rows, labels]).mean()
    return (i2t + t2i) / 2
