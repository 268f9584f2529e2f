"""ALBEF's image-text contrastive term with momentum distillation (CODIS's instance terms):
``momentum_contrastive_loss``.

−mean_i Σ_j T_ij log softmax_j(s·⟨q̂_i, k̂_j⟩) over the keys k = [teacher keys of the batch; queue], with
T = α·softmax_j(s·⟨t̂_i, k̂_j⟩) + (1 − α)·onehot(i) (salesforce/ALBEF ``models/model_pretrain.py``). The fused
backends never build the N×(N+Q) matrix: lse tiled by ``fastcontrast::lse_pair``, the soft-target term as
V = softmax(s·t̂K̂ᵀ)K̂ in row blocks.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..dispatch import register, register_fused
from ..primitives import lse_pair as LP
from ..primitives import tiles as T
from ..primitives.tiles import l2_normalize


def _acc(t):
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def momentum_contrastive_reference(query, keys, teacher_query=None, queue=None, logit_scale=1 / 0.07, alpha=0.4,
                                   normalize=True):
    """ALBEF's image-text contrastive term with momentum distillation, one direction, materialised:
    −mean_i Σ_j T_ij log softmax_j(s·⟨q̂_i, k̂_j⟩) over the keys k = [teacher keys of the batch; queue], with
    T = α·softmax_j(s·⟨t̂_i, k̂_j⟩) + (1 − α)·onehot(i) (t: the teacher's query features; no gradient).

    query (N, D) student; keys (N, D) teacher features of the other (or, intra-modal, the same) modality,
    positive i ↔ i; queue (Q, D) earlier teacher keys; teacher_query (N, D) needed when α > 0.
    """
    acc = _acc(query)
    q = l2_normalize(query.to(acc), dim=-1) if normalize else query.to(acc)
    with torch.no_grad():
        k = keys if queue is None else torch.cat([keys, queue.to(keys.dtype)])
        k = l2_normalize(k.to(acc), dim=-1) if normalize else k.to(acc)
        s = torch.as_tensor(logit_scale, dtype=acc, device=query.device).detach()
        target = torch.zeros(q.shape[0], k.shape[0], dtype=acc, device=query.device)
        target[torch.arange(q.shape[0]), torch.arange(q.shape[0])] = 1.0
        if alpha > 0:
            t = l2_normalize(teacher_query.to(acc), dim=-1) if normalize else teacher_query.to(acc)
            target = alpha * torch.softmax(s * t @ k.T, dim=1) + (1 - alpha) * target
    logits = torch.as_tensor(logit_scale, dtype=acc, device=query.device) * q @ k.T
    return -(torch.log_softmax(logits, dim=1) * target).sum(dim=1).mean()


@torch.no_grad()
def soft_target_values(t: Tensor, k: Tensor, scale: Tensor) -> Tensor:
    """V_i = Σ_j softmax_j(s·⟨t_i, k_j⟩)·k_j (N, D), a row block at a time (a byte budget, never N×M): the
    momentum teacher's soft targets, already multiplied into the keys (attention with values = keys)."""
    v = torch.empty_like(t)
    for rows in T.row_blocks(t.shape[0], k.shape[0], t.element_size()):
        v[rows] = torch.softmax(scale * (t[rows] @ k.T), dim=1) @ k
    return v


def momentum_contrastive_fused(query: Tensor, keys: Tensor, teacher_query, queue, logit_scale: Tensor,
                               alpha: float, normalize: bool, *, impl) -> Tensor:
    """ALBEF's contrastive term with momentum distillation without an N×(N+Q) matrix:
    −Σ_j T_ij log softmax_j(L_ij) = lse_i(L) − s·⟨q̂_i, α·V_i + (1 − α)·k̂_i⟩, V the teacher-softmax-weighted
    keys (no gradient), lse from the tiled ``lse_pair`` (gradients to the query and the scale)."""
    acc = T.acc_dtype(query)
    n = query.shape[0]
    s = logit_scale.to(acc)
    with torch.no_grad():
        k = keys if queue is None else torch.cat([keys, queue.to(keys.dtype)])
        kh = T.apply_tokens(k, T.inv_token_norms(k, 1)) if normalize else k.to(acc)
    zero = torch.zeros((), device=query.device, dtype=acc)
    lse, _ = LP.bound(impl.kernel, impl.backward_kernel)(query, k.to(query.dtype), s.expand(n),
                                                         s.expand(k.shape[0]), zero, normalize, 1)
    qh = T.apply_tokens(query, T.inv_token_norms(query, 1)) if normalize else query.to(acc)
    target = kh[:n]
    if alpha > 0:
        th = T.apply_tokens(teacher_query, T.inv_token_norms(teacher_query, 1)) if normalize else \
            teacher_query.to(acc)
        target = alpha * soft_target_values(th.detach(), kh, s.detach()) + (1 - alpha) * target
    return (lse - s * (qh * target).sum(dim=1)).mean()


register("momentum_contrastive", "reference")(momentum_contrastive_reference)
register_fused("momentum_contrastive", momentum_contrastive_fused)
