"""CLIP's symmetric InfoNCE (``clip_loss``; also what ``oblique_clip_loss`` and ``adaptive_temperature_clip_loss``
run on) and its one-directional building block ``ce_rows``, on every backend.

Dispatcher ops registered here (``fastcontrast.dispatch``):

* ``infonce``: ½ mean_i[(lse_row_i − a_i s_i − b) + (lse_col_{p(i)} − c_{p(i)} s_i − b)], s_i = ⟨x̂_i, ŷ_{p(i)}⟩;
* ``infonce_ids``: the same with groups of positives from ids (UniCL's uniform targets);
* ``ce_rows`` / ``ce_rows_ids``: mean_i [lse_j(s·⟨a_i, b_j⟩ + bias) − s·⟨a_i, b_{l_i}⟩ − bias] (open_clip's
  ``local_loss``), without / with ids;
* ``lse_pair``: the pairwise log-sum-exp itself with a ``backward`` (what the CLIP ring runs per block).

Implementations: ``clip_loss_reference.py`` (ground truth, materialised), ``clip_loss_dense.py`` (materialised, one
autograd node), and the fused ones below on ``fastcontrast::lse_pair`` (``primitives/lse_pair.py``: Triton, csrc,
or PyTorch tiles for float64 on the Triton backend), O((N+M)·D) memory.

With ids, row i's target is uniform over its positives P(i) = {j : t_j = u_i} (UniCL, Yang et al. CVPR 2022,
eqs. 2-3), each direction normalised over its own:

    ℓ_i = −(1/|P(i)|) Σ_{j∈P(i)} log softmax_j(a_i S_ij + b) = lse_i − b − a_i·⟨x̂_i, mean_{j∈P(i)} ŷ_j⟩,

linear in S past the lse: it needs only per-group sums of the other side's features (``primitives/groups.py``).
A row with no positive (its id on no row of the other side) has an empty target: its cross-entropy is 0 and it
still counts in the mean over the N (or M) rows, so the mean over ranks of the local losses is the global loss.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..dispatch import register, register_fused
from ..primitives import lse_pair as LP
from ..primitives import tiles as T
from ..primitives.groups import group_means
from .clip_loss_dense import infonce_dense
from .clip_loss_reference import ce_rows_reference, infonce_ids_reference, infonce_reference, lse_pair_reference


def _lse_op(impl):
    """The fused lse of the resolved kernels: (x, y, a, c, b, normalize, tokens) -> (lse_row, lse_col)."""
    return LP.bound(impl.kernel, impl.backward_kernel)


def _hat(t: Tensor, normalize: bool, tokens: int) -> Tensor:
    acc = T.acc_dtype(t)
    return T.apply_tokens(t, T.inv_token_norms(t, tokens)) if normalize else t.to(acc)


def _materialised_lse(x, y, a, c, b, normalize=False, tokens=1):
    s = _hat(x, normalize, tokens) @ _hat(y, normalize, tokens).T
    return torch.logsumexp(a[:, None] * s + b, dim=1), torch.logsumexp(c[None, :] * s + b, dim=0)


# ----------------------------------------------------------------------------------------------- fused
def infonce_fused(x: Tensor, y: Tensor, row_scale: Tensor, col_scale: Tensor, bias: Optional[Tensor],
                  labels: Optional[Tensor], normalize: bool, tokens: int, *, impl) -> Tensor:
    """InfoNCE through ``lse_pair``: ½ mean_i[(lse_row_i − a_i s_i − b) + (lse_col_{p(i)} − c_{p(i)} s_i − b)].

    The positive similarity s_i = ⟨x̂_i, ŷ_{p(i)}⟩ is an O(N·D) row-wise dot, left to autograd.
    """
    acc = T.acc_dtype(x)
    b = torch.zeros((), device=x.device, dtype=acc) if bias is None else bias.to(acc)
    a, c = row_scale.to(acc), col_scale.to(acc)
    lse_r, lse_c = _lse_op(impl)(x, y, a, c, b, normalize, tokens)
    yp = y if labels is None else y[labels]  # labels None: the diagonal
    pos = (_hat(x, normalize, tokens) * _hat(yp, normalize, tokens)).sum(dim=1)
    lse_cp, c_p = (lse_c, c) if labels is None else (lse_c[labels], c[labels])
    return 0.5 * ((lse_r - a * pos).mean() + (lse_cp - c_p * pos).mean()) - b


def ce_rows_fused(a: Tensor, b: Tensor, scale: Tensor, bias: Optional[Tensor], labels: Tensor, *, impl) -> Tensor:
    """mean_i [lse_j(s·⟨a_i, b_j⟩ + bias) − s·⟨a_i, b_{l_i}⟩ − bias] through ``lse_pair`` (row statistics)."""
    acc = T.acc_dtype(a)
    bb = torch.zeros((), device=a.device, dtype=acc) if bias is None else bias.to(acc)
    s = scale.to(acc)
    lse_r, _ = _lse_op(impl)(a, b, s.expand(a.shape[0]), s.expand(b.shape[0]), bb, False, 1)
    pos = (a.to(acc) * b[labels].to(acc)).sum(dim=1)
    return (lse_r - s * pos - bb).mean()


# ------------------------------------------------------------------------------------------------- ids
def infonce_ids(x: Tensor, y: Tensor, a: Tensor, c: Tensor, bias, image_ids: Tensor, text_ids: Tensor,
                normalize: bool, tokens: int, lse=_materialised_lse) -> Tensor:
    """½[mean_i ℓ^{i→t}_i + mean_j ℓ^{t→i}_j] with positives from ids; x (N, D), y (M, D), a (N,), c (M,);
    ``lse``: the backend's pairwise log-sum-exp (materialised on dense, ``lse_pair`` on the fused backends)."""
    acc = T.acc_dtype(x)
    b = torch.zeros((), device=x.device, dtype=acc) if bias is None else bias.to(acc)
    a, c = a.to(acc), c.to(acc)
    xh, yh = _hat(x, normalize, tokens), _hat(y, normalize, tokens)
    lse_r, lse_c = lse(x, y, a, c, b, normalize, tokens)
    y_bar, has_r = group_means(image_ids, text_ids, yh)
    x_bar, has_c = group_means(text_ids, image_ids, xh)
    row = torch.where(has_r, lse_r - b - a * (xh * y_bar).sum(dim=1), torch.zeros_like(lse_r))
    col = torch.where(has_c, lse_c - b - c * (yh * x_bar).sum(dim=1), torch.zeros_like(lse_c))
    return 0.5 * (row.mean() + col.mean())


def infonce_ids_fused(x, y, a, c, bias, image_ids, text_ids, normalize, tokens, *, impl) -> Tensor:
    return infonce_ids(x, y, a, c, bias, image_ids, text_ids, normalize, tokens, lse=_lse_op(impl))


def ce_rows_ids(q: Tensor, k: Tensor, scale: Tensor, bias, q_ids: Tensor, k_ids: Tensor,
                lse=_materialised_lse) -> Tensor:
    """One direction: mean_i ℓ_i of rows q (N, D) against keys k (M, D) (open_clip's local_loss form)."""
    acc = T.acc_dtype(q)
    b = torch.zeros((), device=q.device, dtype=acc) if bias is None else bias.to(acc)
    s = scale.to(acc)
    qh, kh = q.to(acc), k.to(acc)
    lse_r, _ = lse(q, k, s.expand(q.shape[0]), s.expand(k.shape[0]), b, False, 1)
    k_bar, has = group_means(q_ids, k_ids, kh)
    return torch.where(has, lse_r - b - s * (qh * k_bar).sum(dim=1), torch.zeros_like(lse_r)).mean()


def ce_rows_ids_fused(q, k, scale, bias, q_ids, k_ids, *, impl) -> Tensor:
    return ce_rows_ids(q, k, scale, bias, q_ids, k_ids, lse=_lse_op(impl))


# ------------------------------------------------------------------------------------ the lse for the ring
class _MaterialisedLse:
    """The pairwise lse of one block, materialised (dense/reference), with the backward the CLIP ring calls
    (no fastcontrast:: op). The ring's statistics are global (summed over every block), so the backward takes
    them as given: P = exp(aS + b − lse_row), Q = exp(cS + b − lse_col), G = g_r·a·P + g_c·c·Q,
    dx̂ = G ŷ, dŷ = Gᵀ x̂, da = g_r Σ_j P∘S, dc = g_c Σ_i Q∘S."""

    def __call__(self, x, y, a, c, bias, normalize=False, tokens=1):
        return lse_pair_reference(_hat(x, normalize, tokens), _hat(y, normalize, tokens), a, c, bias)

    def backward(self, g_r, g_c, x, y, a, c, bias, lse_r, lse_c, normalize=False, tokens=1, acc_out=True):
        acc = T.acc_dtype(x)  # computed in the accumulation dtype, and returned in it (the ring sums blocks)
        if normalize:
            raise ValueError("the ring normalises before its blocks: normalize=False here")
        xa, ya, a, c, b = x.to(acc), y.to(acc), a.to(acc), c.to(acc), bias.to(acc)
        s = xa @ ya.T
        p = torch.exp(a[:, None] * s + b - lse_r.to(acc)[:, None])
        q = torch.exp(c[None, :] * s + b - lse_c.to(acc)[None, :])
        g = g_r.to(acc)[:, None] * a[:, None] * p + g_c.to(acc)[None, :] * c[None, :] * q
        return g @ ya, g.T @ xa, g_r.to(acc) * (p * s).sum(dim=1), g_c.to(acc) * (q * s).sum(dim=0)


_MATERIALISED = _MaterialisedLse()


def _lse_pair_materialised():
    return _MATERIALISED


def _lse_pair_fused(*, impl):
    return _lse_op(impl)


# ------------------------------------------------------------------------------------------ registrations
register("infonce", "reference")(infonce_reference)
register("infonce", "dense")(infonce_dense)
register("infonce_ids", "reference")(infonce_ids_reference)
register("infonce_ids", "dense")(infonce_ids)
register("ce_rows", "reference")(ce_rows_reference)
register("ce_rows_ids", "reference")(ce_rows_ids)
register("lse_pair", "reference")(_lse_pair_materialised)  # lse_pair: resolve(...)() gives the bound lse
register("lse_pair", "dense")(_lse_pair_materialised)
# Triton, and the C++/CUDA kernels of csrc/ (offered only when built: the dispatcher says so)
register_fused("infonce", infonce_fused)
register_fused("infonce_ids", infonce_ids_fused)
register_fused("ce_rows", ce_rows_fused)
register_fused("ce_rows_ids", ce_rows_ids_fused)
register_fused("lse_pair", _lse_pair_fused)
