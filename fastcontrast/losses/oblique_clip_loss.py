"""Oblique-manifold multi-token similarity (Sun): K class tokens per sample, each on its own sphere:
``oblique_clip_loss``. It runs on the ``infonce`` op of ``clip_loss.py`` with per-token normalisation
(tokens = K, features flattened to (N, K·d)); these are its readable references."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..primitives.tiles import l2_normalize
from .clip_loss_reference import infonce_reference


def oblique_similarity_reference(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """S_ij = Σ_k ⟨x̂_ik, ŷ_jk⟩ ∈ [−K, K]; x (N, K, d), y (M, K, d) -> (N, M)."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    return torch.einsum("nkd,mkd->nm", l2_normalize(x.to(acc), dim=-1), l2_normalize(y.to(acc), dim=-1))


def oblique_clip_loss_reference(x, y, logit_scale, logit_bias=None, labels=None):
    """InfoNCE (§1) on the oblique similarity: logits = s·S + b."""
    n = x.shape[0]
    s_ij = oblique_similarity_reference(x, y)
    # Written out here (not via the flattened trick the fast paths use) so the two routes check each other.
    scale = torch.as_tensor(logit_scale, device=x.device, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
    logits = scale * s_ij
    if logit_bias is not None:
        logits = logits + logit_bias
    if labels is None:
        labels = torch.arange(n, device=x.device)
    rows = torch.arange(n, device=x.device)
    i2t = F.cross_entropy(logits, labels)
    t2i = (torch.logsumexp(logits, dim=0)[labels] - logits[rows, labels]).mean()
    return (i2t + t2i) / 2


def oblique_flat_reference(x, y, logit_scale, logit_bias=None, labels=None):
    """Same loss through the flattened form used by fast paths: per-token normalise, flatten, plain InfoNCE."""
    n, k, d = x.shape
    s = torch.as_tensor(logit_scale, device=x.device, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
    return infonce_reference(
        x.reshape(n, k * d), y.reshape(y.shape[0], k * d), s.expand(n), s.expand(y.shape[0]),
        logit_bias, labels, normalize=True, tokens=k,
    )
