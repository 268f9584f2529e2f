"""Teacher-softmax-weighted keys as the fused op ``fastcontrast::teacher_weighted_keys``:

    V_i = Σ_j softmax_j(t·⟨tq_i, tk_j⟩)·values_j,

a row block at a time (a byte budget, never N×M); in backward d values = P^Tᵀ·g the same way, P^T recomputed from
the saved log-sum-exp. The teacher (tq, tk, t) gets no gradient. Serves the distillation term of
``fastcontrast.losses.distill_clip_loss``.
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from . import tiles as T
from .fused_op import DoubleBackward, fused_op


def _forward(tq: Tensor, tk: Tensor, t_scale: Tensor, values: Tensor) -> Tuple[Tensor, Tensor]:
    """(V (N, D), lse (N,)): tq (N, Dt), tk (M, Dt) the teacher's features, t a 0-d scale, values (M, D)."""
    acc = T.acc_dtype(values)
    tq, tk, t, vals = tq.to(acc), tk.to(acc), t_scale.to(acc), values.to(acc)
    n = tq.shape[0]
    v = torch.empty(n, vals.shape[1], dtype=acc, device=vals.device)
    lse = torch.empty(n, dtype=acc, device=vals.device)
    for rows in T.row_blocks(n, tk.shape[0], torch.finfo(acc).bits // 8):
        z = t * (tq[rows] @ tk.T)
        lse[rows] = torch.logsumexp(z, dim=1)
        v[rows] = torch.exp(z - lse[rows, None]) @ vals
    return v, lse


def _forward_fake(tq, tk, t_scale, values):
    acc = T.acc_dtype(values)
    return values.new_empty(tq.shape[0], values.shape[1], dtype=acc), values.new_empty(tq.shape[0], dtype=acc)


def _backward(g: Tensor, tq: Tensor, tk: Tensor, t_scale: Tensor, lse: Tensor, values: Tensor) -> Tensor:
    """d values = P^Tᵀ·g (M, D), P^T recomputed one row block at a time from the saved lse."""
    acc = T.acc_dtype(values)
    tq, tk, t, g = tq.to(acc), tk.to(acc), t_scale.to(acc), g.to(acc)
    dv = torch.zeros(tk.shape[0], values.shape[1], dtype=acc, device=values.device)
    for rows in T.row_blocks(tq.shape[0], tk.shape[0], torch.finfo(acc).bits // 8):
        p = torch.exp(t * (tq[rows] @ tk.T) - lse[rows, None])
        dv += p.T @ g[rows]
    return dv.to(values.dtype)


def _backward_fake(g, tq, tk, t_scale, lse, values):
    return torch.empty_like(values)


def _setup(ctx, inputs, output):
    tq, tk, t_scale, values = inputs
    ctx.save_for_backward(tq, tk, t_scale, output[1], values)


def _gradients(ctx, backward_op, g, _g_lse):
    tq, tk, t_scale, lse, values = ctx.saved_tensors
    if g is None:
        return None, None, None, None
    return None, None, None, backward_op(g.contiguous(), tq, tk, t_scale, lse, values)


def _double_setup(ctx, inputs, output):
    g, tq, tk, t_scale, lse, values = inputs
    ctx.save_for_backward(tq, tk, t_scale)
    ctx.g_dtype = g.dtype


def _double_backward(ctx, gg):
    """d values = P^Tᵀ·g is linear in g and free of values (the teacher has no gradient), so its own derivative is
    exact: ∂⟨gg, P^Tᵀ g⟩/∂g = P^T·gg, the op's forward with gg as the values. Second derivatives (a gradient
    penalty through distill_clip_loss) are then right on every backend whose lse_pair allows them."""
    tq, tk, t_scale = ctx.saved_tensors
    dg = teacher_weighted_keys(tq, tk, t_scale, gg)[0].to(ctx.g_dtype)
    return dg, None, None, None, None, None


teacher_weighted_keys, teacher_weighted_keys_backward = fused_op(
    "teacher_weighted_keys", _forward, _backward, forward_fake=_forward_fake, backward_fake=_backward_fake,
    setup_context=_setup, gradients=_gradients, autocast=(0, 1, 3), backward_autocast=(0, 1, 2, 5),
    double_backward=DoubleBackward("teacher_weighted_keys", rule=(_double_setup, _double_backward)))
