"""SigLIP's sigmoid loss (Zhai et al. 2023), the reference: materialises the N×M logits as open_clip does."""
from __future__ import annotations

import torch
import torch.nn.functional as F


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
