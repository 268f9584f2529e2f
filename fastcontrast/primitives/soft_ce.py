"""The soft-target cross-entropy of a row against K codes as the fused op ``fastcontrast::soft_ce_rows``:

    ℓ_i = −Σ_k T_ik log softmax_k(s·⟨x_i, y_k⟩) = (Σ_k T_ik)·lse_i − s·Σ_k T_ik ⟨x_i, y_k⟩,

where the target term rides in the lse pass and in the gradient block G = g·s·((Σ_k T_ik)·P − T), which saves two
of the six GEMMs of the lse-plus-GEMM form (the CPU is GEMM-bound). ``kernel``: "cpu" (the C++ kernel of csrc/)
or "tiles" (the same row blocks in PyTorch); never an N×K score matrix. CODIS's swapped prediction on the CPU
(``fastcontrast.losses.codebook_loss``).
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from .. import _ext
from . import tiles as T
from .fused_op import DoubleBackward, fused_op

KERNELS = ("cpu", "tiles")


def _check_kernel(kernel: str) -> None:
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")


def _forward(x: Tensor, y: Tensor, targets: Tensor, scale: float, kernel: str) -> Tuple[Tensor, Tensor]:
    """(ℓ (N,), lse (N,)): x (N, D), y (K, D), T (N, K), one float dtype."""
    _check_kernel(kernel)
    if kernel == "cpu":
        return tuple(_ext._C.soft_ce_cpu_forward(x, y, targets, float(scale), T.BLOCK_BYTES))
    loss, lse = torch.empty_like(x[:, 0]), torch.empty_like(x[:, 0])
    for rows in T.row_blocks(x.shape[0], y.shape[0], x.element_size()):
        s = scale * (x[rows] @ y.T)
        t = targets[rows]
        lse[rows] = torch.logsumexp(s, dim=1)
        loss[rows] = t.sum(1) * lse[rows] - (t * s).sum(1)
    return loss, lse


def _forward_fake(x, y, targets, scale, kernel):
    return x.new_empty(x.shape[0]), x.new_empty(x.shape[0])


def _backward(g: Tensor, x: Tensor, y: Tensor, targets: Tensor, scale: float, lse: Tensor, kernel: str
              ) -> Tuple[Tensor, Tensor]:
    """(dx, dy) of Σ_i g_i ℓ_i: G = g·scale·((Σ_k T_ik)·P − T) one row block at a time, then G·Y and Gᵀ·X."""
    _check_kernel(kernel)
    if kernel == "cpu":
        return tuple(_ext._C.soft_ce_cpu_backward(g, x, y, targets, float(scale), lse, T.BLOCK_BYTES))
    dx, dy = torch.empty_like(x), torch.zeros_like(y)
    for rows in T.row_blocks(x.shape[0], y.shape[0], x.element_size()):
        xb, t = x[rows], targets[rows]
        p = torch.exp(scale * (xb @ y.T) - lse[rows, None])
        gb = (g[rows, None] * scale) * (t.sum(1, keepdim=True) * p - t)
        dx[rows] = gb @ y
        dy += gb.T @ xb
    return dx, dy


def _backward_fake(g, x, y, targets, scale, lse, kernel):
    return torch.empty_like(x), torch.empty_like(y)


def _setup(ctx, inputs, output):
    x, y, targets, scale, kernel = inputs
    ctx.save_for_backward(x, y, targets, output[1])
    ctx.scale, ctx.kernel = scale, kernel


_OP = "codebook_loss (its fused soft cross-entropy fastcontrast::soft_ce_rows)"


def _no_create_graph(ctx):
    T.no_double_backward(_OP, ctx.kernel)  # create_graph=True: the kernel's gradient has no derivative


def _gradients(ctx, backward_op, g, _g_lse):
    x, y, targets, lse = ctx.saved_tensors
    dx, dy = backward_op(g.contiguous(), x, y, targets, ctx.scale, lse, ctx.kernel)
    return dx, dy, None, None, None


soft_ce_rows, soft_ce_rows_backward = fused_op(
    "soft_ce_rows", _forward, _backward, forward_fake=_forward_fake, backward_fake=_backward_fake,
    setup_context=_setup, gradients=_gradients, check_create_graph=_no_create_graph,
    autocast=(0, 1, 2), backward_autocast=(0, 1, 2, 3),  # x, y, targets: one dtype, as the kernel needs
    double_backward=DoubleBackward(_OP, kernel_of=lambda inputs: inputs[-1]))
