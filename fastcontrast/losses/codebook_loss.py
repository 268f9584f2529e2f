"""CODIS's codebook term (SwAV's swapped prediction with Sinkhorn targets): ``codebook_loss``.

CODIS has no public code; it builds on SwAV for the codebook (facebookresearch/swav ``main_swav.py``: Sinkhorn with
ε = 0.05 and 3 iterations, prototypes L2-normalised, τ = 0.1, the swapped directions averaged, a queue of earlier
batches in the Sinkhorn) and on ALBEF for the momentum teacher (``momentum_contrastive_loss.py``).

Swapped prediction: −mean_i Σ_k Q_ik log softmax_k(ẑ_i·ĉ_k/τ) = mean_i [ (Σ_k Q_ik)·lse_i − ⟨ẑ_i, (QĈ)_i⟩/τ ],
never an N×K logit matrix on the fused backends: Triton/CUDA take lse_i from ``fastcontrast::lse_pair`` (tiled,
recomputing in backward) and QĈ as one GEMM; the CPU takes ``fastcontrast::soft_ce_rows``, where the target term
rides in the lse pass and in the gradient block (two GEMMs fewer: the CPU is GEMM-bound). The targets Q (N×K, no
gradient) are the only N×K buffer. Dispatcher op: ``swapped_prediction`` (one direction); the Sinkhorn is
``sinkhorn.py``'s.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..dispatch import register, register_fused
from ..primitives import lse_pair as LP
from ..primitives import tiles as T
from ..primitives.soft_ce import soft_ce_rows
from ..primitives.tiles import l2_normalize
from .sinkhorn import sinkhorn_reference


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


def swapped_prediction_fused(z: Tensor, q: Tensor, codebook: Tensor, tau: float, normalize_features: bool = True,
                             normalize_codes: bool = True, *, impl) -> Tensor:
    """−mean_i Σ_k Q_ik log softmax_k(⟨ẑ_i, ĉ_k⟩/τ) without an N×K logit matrix; gradients to z and codebook."""
    acc = T.acc_dtype(z)
    n, k = z.shape[0], codebook.shape[0]
    # the two sides may be normalised differently, so normalisation happens here (autograd carries it)
    zh = T.apply_tokens(z, T.inv_token_norms(z, 1)) if normalize_features else z.to(acc)
    ch = T.apply_tokens(codebook, T.inv_token_norms(codebook, 1)) if normalize_codes else codebook.to(acc)
    if impl.kernel == "cpu":  # dense fp32 (fp64) operands for BLAS; the normalisation's Jacobian through autograd
        loss, _ = soft_ce_rows(zh.contiguous(), ch.contiguous(), q.to(acc).contiguous(), 1.0 / tau, "cpu")
        return loss.mean()
    lse = LP.bound(impl.kernel, impl.backward_kernel)
    inv_tau = torch.full((n,), 1.0 / tau, device=z.device, dtype=acc)
    col_scale = torch.full((k,), 1.0 / tau, device=z.device, dtype=acc)
    zero = torch.zeros((), device=z.device, dtype=acc)
    if normalize_features == normalize_codes:  # normalisation fused in the kernel (fp32 per-token norms)
        lse, _ = lse(z, codebook.to(z.dtype), inv_tau, col_scale, zero, normalize_features, 1)
    else:  # kernel operands: the normalised copies, in the input dtype (tensor cores)
        lse, _ = lse(zh.to(z.dtype), ch.to(z.dtype), inv_tau, col_scale, zero, False, 1)
    q = q.to(acc)
    target = (zh * (q @ ch)).sum(dim=1) / tau  # Σ_k Q_ik ⟨ẑ_i, ĉ_k⟩/τ as one GEMM and a row dot
    return (q.sum(dim=1) * lse - target).mean()


register("swapped_prediction", "reference")(swapped_prediction_reference)
register_fused("swapped_prediction", swapped_prediction_fused)
