"""Cluster-softmax codebook losses (CODIS), readable ground truth.

CODIS has no public code; it builds on SwAV for the codebook (facebookresearch/swav ``main_swav.py``: Sinkhorn with
ε = 0.05 and 3 iterations, prototypes L2-normalised, τ = 0.1, the swapped directions averaged, a queue of earlier
batches in the Sinkhorn) and on ALBEF for the momentum teacher (salesforce/ALBEF ``models/model_pretrain.py``:
EMA m = 0.995, memory queues of teacher features, momentum-distillation soft targets α = 0.4).
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._tiles import l2_normalize


@torch.no_grad()
def sinkhorn_reference(scores: torch.Tensor, epsilon: float = 0.05, n_iters: int = 3) -> torch.Tensor:
    """Balanced soft assignment Q of N samples to K codes, in log space.

    Solves max ⟨Q, scores⟩ + ε·H(Q) with Q 1_K = 1_N (each row a distribution) and Qᵀ 1_N = (N/K) 1_K
    (codes used equally), by alternating column and row normalisation (rows last, so rows sum to 1 exactly).
    scores (N, K) -> Q (N, K), no gradient (teacher side).
    """
    n, k = scores.shape
    acc = torch.float64 if scores.dtype == torch.float64 else torch.float32
    log_q = scores.to(acc) / epsilon
    log_col_target = torch.log(torch.tensor(n / k, dtype=acc, device=scores.device))
    for _ in range(n_iters):
        log_q = log_q - torch.logsumexp(log_q, dim=0, keepdim=True) + log_col_target
        log_q = log_q - torch.logsumexp(log_q, dim=1, keepdim=True)
    return log_q.exp()


def _acc(t):
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def swapped_prediction_reference(z, q, codebook, tau, normalize_features=True, normalize_codes=True):
    """−mean_i Σ_k Q_ik log softmax_k(⟨ẑ_i, ĉ_k⟩/τ): cross-entropy of the cluster softmax against targets Q.

    z (N, D) student features, q (N, K) targets (no gradient), codebook (K, D); gradients to z and codebook.
    """
    acc = _acc(z)
    z, c = z.to(acc), codebook.to(acc)
    if normalize_features:
        z = l2_normalize(z, dim=-1)
    if normalize_codes:
        c = l2_normalize(c, dim=-1)
    logp = torch.log_softmax(z @ c.T / tau, dim=1)
    return -(q.to(acc) * logp).sum(dim=1).mean()


@torch.no_grad()
def teacher_scores(teacher_features, codebook, normalize_features=True, normalize_codes=True):
    """⟨ẑ_teacher, ĉ_k⟩ (N, K) in float32 (float64 for float64 input), no gradient."""
    acc = _acc(teacher_features)
    z, c = teacher_features.to(acc), codebook.detach().to(acc)
    if normalize_features:
        z = l2_normalize(z, dim=-1)
    if normalize_codes:
        c = l2_normalize(c, dim=-1)
    return z @ c.T


def codebook_loss_reference(
    image_features, text_features, teacher_image_features, teacher_text_features, codebook,
    tau=0.1, epsilon=0.05, n_iters=3, normalize_features=True, normalize_codes=True, reduction="mean",
    queue_image=None, queue_text=None,
):
    """½[−Σ_k Q_text(k) log P_image(k) − Σ_k Q_image(k) log P_text(k)], averaged over the batch (SwAV's mean of
    the swapped directions; ``reduction="sum"`` adds them).

    P = softmax(⟨z, c⟩/τ) from the student; Q = Sinkhorn(⟨z_teacher, c⟩) with no gradient, over the rows of
    ``queue_*`` (earlier teacher features) and the batch, kept for the batch only.
    """
    nf, nc = normalize_features, normalize_codes
    n = image_features.shape[0]

    def targets(teacher, queue):
        rows = teacher if queue is None else torch.cat([queue.to(teacher.dtype), teacher])
        return sinkhorn_reference(teacher_scores(rows, codebook, nf, nc), epsilon, n_iters)[-n:]

    q_img, q_txt = targets(teacher_image_features, queue_image), targets(teacher_text_features, queue_text)
    total = (swapped_prediction_reference(image_features, q_txt, codebook, tau, nf, nc)
             + swapped_prediction_reference(text_features, q_img, codebook, tau, nf, nc))
    return total / 2 if reduction == "mean" else total


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


class EMATeacher(nn.Module):
    """A frozen copy of a student updated as θ_t ← m·θ_t + (1 − m)·θ_s; never touches the student's grads."""

    def __init__(self, student: nn.Module, momentum: float = 0.995):
        super().__init__()
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must lie in [0, 1], got {momentum}")
        self.momentum = float(momentum)
        self.teacher = copy.deepcopy(student)
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.teacher.eval()

    @torch.no_grad()
    def update(self, student: nn.Module) -> None:
        t_params = list(self.teacher.parameters())
        s_params = list(student.parameters())
        if len(t_params) != len(s_params):
            raise ValueError("student does not have the teacher's architecture (parameter count differs)")
        for t, s in zip(t_params, s_params):
            t.mul_(self.momentum).add_(s.detach(), alpha=1.0 - self.momentum)
        for t, s in zip(self.teacher.buffers(), student.buffers()):
            t.copy_(s)

    @torch.no_grad()
    def forward(self, *args, **kwargs):
        return self.teacher(*args, **kwargs)
