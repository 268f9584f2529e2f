"""Teacher–student distillation of CLIP (open_clip's ``DistillClipLoss``): ``distill_clip_loss``, no N×M matrix.

Per row, the soft-target cross-entropy against the teacher's softmax P^T is linear in the student's logits:

    −Σ_j P^T_ij log softmax_j(s·⟨x_i, y_j⟩) = lse_i(s·x_i Yᵀ) − s·⟨x_i, V_i⟩,   V_i = Σ_j P^T_ij y_j,

so the distillation term needs the student's row/column log-sum-exp (the tiled ``fastcontrast::lse_pair`` of the
InfoNCE, which the contrastive term uses as well) and V, the teacher-softmax-weighted sum of the student's keys
(``fastcontrast::teacher_weighted_keys``, ``primitives/weighted_keys.py``). The teacher gets no gradient.
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from ..dispatch import register, register_fused
from ..primitives import lse_pair as LP
from ..primitives import tiles as T
from ..primitives.weighted_keys import teacher_weighted_keys


def _target(q: Tensor, k: Tensor, tq: Tensor, tk: Tensor, ts: Tensor) -> Tensor:
    """⟨q_i, Σ_j P^T_ij k_j⟩ (N,), P^T = softmax_j(t·⟨tq_i, tk_j⟩)."""
    v, _ = teacher_weighted_keys(tq.detach(), tk.detach(), ts.detach(), k)
    return (q.to(T.acc_dtype(q)) * v).sum(dim=1)


def _lse_rows(q: Tensor, k: Tensor, s: Tensor, lse) -> Tensor:
    zero = torch.zeros((), device=q.device, dtype=T.acc_dtype(q))
    return lse(q, k, s.expand(q.shape[0]), s.expand(k.shape[0]), zero, False, 1)[0]


def distill_fused(x: Tensor, y: Tensor, s: Tensor, tx: Tensor, ty: Tensor, ts: Tensor, labels_offset,
                  x_keys, y_keys, tx_keys, ty_keys, lse) -> Tuple[Tensor, Tensor]:
    """(contrastive, distill) of open_clip's DistillClipLoss, O((N+M)·D) memory; ``lse``: the bound
    ``fastcontrast::lse_pair`` (``primitives.lse_pair.bound(kernel, backward_kernel)``).

    Local rows x, y (N, D) against keys y_keys, x_keys (M, D) (the same tensors in one process, the gathered
    batch under open_clip's ``local_loss``); row i's positive key is ``labels_offset + i``. The teacher tx, ty
    (rows) and tx_keys, ty_keys (keys) at scale ts carry no gradient.
    """
    acc = T.acc_dtype(x)
    s = s.to(acc)
    ts = ts.to(acc)
    if x_keys is x and y_keys is y:  # one batch: the image rows' column lse is the text rows' lse (one sweep)
        zero = torch.zeros((), device=x.device, dtype=acc)
        lse_i, lse_t = lse(x, y, s.expand(x.shape[0]), s.expand(y.shape[0]), zero, False, 1)
    else:  # local rows against gathered keys (open_clip's local_loss): each direction its own row sweep
        lse_i, lse_t = _lse_rows(x, y_keys, s, lse), _lse_rows(y, x_keys, s, lse)
    tgt_i, tgt_t = _target(x, y_keys, tx, ty_keys, ts), _target(y, x_keys, ty, tx_keys, ts)
    n = x.shape[0]
    pos_i = (x.to(acc) * y_keys[labels_offset:labels_offset + n].to(acc)).sum(dim=1)
    pos_t = (y.to(acc) * x_keys[labels_offset:labels_offset + n].to(acc)).sum(dim=1)
    contrastive = 0.5 * ((lse_i - s * pos_i).mean() + (lse_t - s * pos_t).mean())
    distill = 0.5 * ((lse_i - s * tgt_i).mean() + (lse_t - s * tgt_t).mean())
    return contrastive, distill


def distill_reference(x, y, s, tx, ty, ts, labels_offset=0, x_keys=None, y_keys=None, tx_keys=None, ty_keys=None):
    """Materialised ground truth, open_clip's formula: logits L = s·X Yᵀ, teacher logits L^T = t·X^T Y^Tᵀ;
    contrastive ½[CE(L, p) + CE(Lᵀ, p)], distill ½[−Σ softmax(L^T) log_softmax(L) over rows, and over columns]."""
    import torch.nn.functional as F

    acc = T.acc_dtype(x)
    x_keys = x if x_keys is None else x_keys
    y_keys = y if y_keys is None else y_keys
    tx_keys = tx if tx_keys is None else tx_keys
    ty_keys = ty if ty_keys is None else ty_keys
    s, ts = torch.as_tensor(s).to(acc), torch.as_tensor(ts).to(acc).detach()
    li = s * x.to(acc) @ y_keys.to(acc).T
    lt = s * y.to(acc) @ x_keys.to(acc).T
    with torch.no_grad():
        ti = ts * tx.to(acc) @ ty_keys.to(acc).T
        tt = ts * ty.to(acc) @ tx_keys.to(acc).T
    labels = torch.arange(x.shape[0], device=x.device) + labels_offset
    contrastive = (F.cross_entropy(li, labels) + F.cross_entropy(lt, labels)) / 2

    def soft(t, logit):
        return -(t.softmax(dim=1) * logit.log_softmax(dim=1)).sum(dim=1).mean()

    return contrastive, (soft(ti, li) + soft(tt, lt)) / 2


def _distill(x, y, s, tx, ty, ts, labels_offset, x_keys, y_keys, tx_keys, ty_keys, *, impl):
    return distill_fused(x, y, s, tx, ty, ts, labels_offset, x_keys, y_keys, tx_keys, ty_keys,
                         LP.bound(impl.kernel, impl.backward_kernel))


register("distill", "reference")(distill_reference)
register("distill", "dense")(distill_reference)  # the materialised formula is the dense path (small batches)
register_fused("distill", _distill)
