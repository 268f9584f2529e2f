"""Teacher–student distillation of CLIP (open_clip's ``DistillClipLoss``) without any N×M matrix.

Per row, the soft-target cross-entropy against the teacher's softmax P^T is linear in the student's logits:

    −Σ_j P^T_ij log softmax_j(s·⟨x_i, y_j⟩) = lse_i(s·x_i Yᵀ) − s·⟨x_i, V_i⟩,   V_i = Σ_j P^T_ij y_j,

so the distillation term needs the student's row/column log-sum-exp (the tiled ``fastcontrast::lse_pair`` of the
InfoNCE, which the contrastive term uses as well) and V, the teacher-softmax-weighted sum of the student's keys.
``fastcontrast::teacher_weighted_keys`` computes V a row block at a time (a byte budget, never N×M) and, in
backward, dY = P^Tᵀ·dV the same way, recomputing P^T from its saved log-sum-exp. The teacher gets no gradient.
"""
from __future__ import annotations

import functools
from typing import Tuple

import torch
from torch import Tensor

from ..._amp import register_custom_op as register_autocast
from ..._memtrack import OPAQUE_IMPLS
from ...dispatch import register
from .. import _tiles as T
from .function import lse_pair


def _blocks(n: int, m: int, t: Tensor):
    step = T.rows_per_block(n, m, torch.finfo(t.dtype).bits // 8)
    return range(0, n, step), step


@torch.library.custom_op("fastcontrast::teacher_weighted_keys", mutates_args=())
def teacher_weighted_keys(tq: Tensor, tk: Tensor, t_scale: Tensor, values: Tensor) -> Tuple[Tensor, Tensor]:
    """(V (N, D), lse (N,)): V_i = Σ_j softmax_j(t·⟨tq_i, tk_j⟩)·values_j; tq (N, Dt), tk (M, Dt) the teacher's
    features (no gradient), t a 0-d scale, values (M, D) the student's keys (gradient). Row blocks, never N×M."""
    return _twk_impl(tq, tk, t_scale, values)


def _twk_impl(tq, tk, t_scale, values):
    acc = T.acc_dtype(values)
    tq, tk, t, vals = tq.to(acc), tk.to(acc), t_scale.to(acc), values.to(acc)
    n = tq.shape[0]
    v = torch.empty(n, vals.shape[1], dtype=acc, device=vals.device)
    lse = torch.empty(n, dtype=acc, device=vals.device)
    starts, step = _blocks(n, tk.shape[0], tq)
    for i0 in starts:
        z = t * (tq[i0:i0 + step] @ tk.T)
        lse[i0:i0 + step] = torch.logsumexp(z, dim=1)
        v[i0:i0 + step] = torch.exp(z - lse[i0:i0 + step, None]) @ vals
    return v, lse


@teacher_weighted_keys.register_fake
def _(tq, tk, t_scale, values):
    acc = T.acc_dtype(values)
    return values.new_empty(tq.shape[0], values.shape[1], dtype=acc), values.new_empty(tq.shape[0], dtype=acc)


@torch.library.custom_op("fastcontrast::teacher_weighted_keys_backward", mutates_args=())
def teacher_weighted_keys_backward(g: Tensor, tq: Tensor, tk: Tensor, t_scale: Tensor, lse: Tensor,
                                   values: Tensor) -> Tensor:
    """d values = P^Tᵀ·g (M, D), P^T recomputed one row block at a time from the saved lse."""
    return _twk_backward_impl(g, tq, tk, t_scale, lse, values)


def _twk_backward_impl(g, tq, tk, t_scale, lse, values):
    acc = T.acc_dtype(values)
    tq, tk, t, g = tq.to(acc), tk.to(acc), t_scale.to(acc), g.to(acc)
    dv = torch.zeros(tk.shape[0], values.shape[1], dtype=acc, device=values.device)
    starts, step = _blocks(tq.shape[0], tk.shape[0], tq)
    for i0 in starts:
        p = torch.exp(t * (tq[i0:i0 + step] @ tk.T) - lse[i0:i0 + step, None])
        dv += p.T @ g[i0:i0 + step]
    return dv.to(values.dtype)


@teacher_weighted_keys_backward.register_fake
def _(g, tq, tk, t_scale, lse, values):
    return torch.empty_like(values)


def _twk_setup(ctx, inputs, output):
    tq, tk, t_scale, values = inputs
    ctx.save_for_backward(tq, tk, t_scale, output[1], values)


def _twk_backward(ctx, g, _g_lse):
    tq, tk, t_scale, lse, values = ctx.saved_tensors
    if g is None:
        return None, None, None, None
    return None, None, None, teacher_weighted_keys_backward(g.contiguous(), tq, tk, t_scale, lse, values)


teacher_weighted_keys.register_autograd(_twk_backward, setup_context=_twk_setup)


def _twk_backward_setup(ctx, inputs, output):
    g, tq, tk, t_scale, lse, values = inputs
    ctx.save_for_backward(tq, tk, t_scale)
    ctx.g_dtype = g.dtype


def _twk_double_backward(ctx, gg):
    """d values = P^Tᵀ·g is linear in g and free of values (the teacher has no gradient), so its own derivative is
    exact: ∂⟨gg, P^Tᵀ g⟩/∂g = P^T·gg, the op's forward with gg as the values. Second derivatives (a gradient
    penalty through distill_clip_loss) are then right on every backend whose lse_pair allows them."""
    tq, tk, t_scale = ctx.saved_tensors
    dg = teacher_weighted_keys(tq, tk, t_scale, gg)[0].to(ctx.g_dtype)
    return dg, None, None, None, None, None


teacher_weighted_keys_backward.register_autograd(_twk_double_backward, setup_context=_twk_backward_setup)
register_autocast("fastcontrast::teacher_weighted_keys", (0, 1, 3))
register_autocast("fastcontrast::teacher_weighted_keys_backward", (0, 1, 2, 5))
OPAQUE_IMPLS[torch.ops.fastcontrast.teacher_weighted_keys.default] = _twk_impl
OPAQUE_IMPLS[torch.ops.fastcontrast.teacher_weighted_keys_backward.default] = _twk_backward_impl


def _target(q: Tensor, k: Tensor, tq: Tensor, tk: Tensor, ts: Tensor) -> Tensor:
    """⟨q_i, Σ_j P^T_ij k_j⟩ (N,), P^T = softmax_j(t·⟨tq_i, tk_j⟩)."""
    v, _ = teacher_weighted_keys(tq.detach(), tk.detach(), ts.detach(), k)
    return (q.to(T.acc_dtype(q)) * v).sum(dim=1)


def _lse_rows(q: Tensor, k: Tensor, s: Tensor, impl: str) -> Tensor:
    zero = torch.zeros((), device=q.device, dtype=T.acc_dtype(q))
    return lse_pair(q, k, s.expand(q.shape[0]), s.expand(k.shape[0]), zero, False, 1, impl)[0]


def distill_fused(x: Tensor, y: Tensor, s: Tensor, tx: Tensor, ty: Tensor, ts: Tensor, labels_offset,
                  x_keys, y_keys, tx_keys, ty_keys, impl: str = "auto") -> Tuple[Tensor, Tensor]:
    """(contrastive, distill) of open_clip's DistillClipLoss, O((N+M)·D) memory.

    Local rows x, y (N, D) against keys y_keys, x_keys (M, D) (the same tensors in one process, the gathered
    batch under open_clip's ``local_loss``); row i's positive key is ``labels_offset + i``. The teacher tx, ty
    (rows) and tx_keys, ty_keys (keys) at scale ts carry no gradient.
    """
    acc = T.acc_dtype(x)
    s = s.to(acc)
    ts = ts.to(acc)
    if x_keys is x and y_keys is y:  # one batch: the image rows' column lse is the text rows' lse (one sweep)
        zero = torch.zeros((), device=x.device, dtype=acc)
        lse_i, lse_t = lse_pair(x, y, s.expand(x.shape[0]), s.expand(y.shape[0]), zero, False, 1, impl)
    else:  # local rows against gathered keys (open_clip's local_loss): each direction its own row sweep
        lse_i, lse_t = _lse_rows(x, y_keys, s, impl), _lse_rows(y, x_keys, s, impl)
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


register("distill", "reference")(distill_reference)
register("distill", "dense")(distill_reference)  # the materialised formula is the dense path (small batches)
for _b in ("triton", "cpu", "cuda"):
    register("distill", _b)(functools.partial(distill_fused, impl=_b))
