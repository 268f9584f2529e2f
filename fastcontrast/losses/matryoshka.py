"""Matryoshka losses (Kusupati et al., "Matryoshka Representation Learning", NeurIPS 2022; sentence-transformers'
``MatryoshkaLoss``): the weighted sum of one contrastive loss at nested prefixes of the embedding, in one call
that costs about one loss.

For dims d_1 > d_2 > … > d_P (≤ D) and weights w_p, with x^(p) = x[:, :d_p] and, when ``normalize``, every
prefix normalised on its own (x̂^(p) = x^(p)/‖x^(p)‖, cosine similarity: what sentence-transformers'
MatryoshkaLoss does, truncating and re-normalising before the wrapped loss), S^(p) = x̂^(p) ŷ^(p)ᵀ and scale s:

* ``matryoshka_ce_rows`` = Σ_p w_p · mean_i [lse_j(s·S^(p)_ij) − s·S^(p)_{i,l_i}]  (MultipleNegativesRankingLoss:
  one direction, queries against every key, hard-negative columns included, l_i the positive's column);
* ``matryoshka_clip_loss`` = Σ_p w_p · ½ mean_i [(lse_j(s·S^(p)_ij) − s·S^(p)_{i,l_i})
  + (lse_{i'}(s·S^(p)_{i',l_i}) − s·S^(p)_{i,l_i})]  (clip_loss at each prefix, both directions).

Backends (dispatcher ops ``matryoshka_ce_rows`` and ``matryoshka_clip``):

* ``reference``: the definition, readable: the separate losses of ``clip_loss_reference`` at each prefix on the
  truncated, re-normalised features, materialised;
* ``dense``: the prefixes' similarities from one pass over the bands (S^(p) from the running sum of band
  products), materialised, autograd: 3 GEMM units (2·N·M·d each) instead of the reference's 3·Σ_p d_p / d;
  O(P·N·M) memory, exact second derivatives;
* ``triton`` (and its float64 form, the PyTorch tiles): the fused ``fastcontrast::matryoshka_lse``
  (``primitives/matryoshka.py``): every prefix's log-sum-exp from one K sweep with checkpoints, the backward's
  G combined per band so the feature-gradient GEMMs run once over d; O((N+M)·D) memory, 4 GEMM units whatever P.

The positive similarities s·S^(p)_{i,l_i} are O(N·D) row-wise dots (band sums, cumulated over prefixes), left to
autograd on every backend but the reference. The weights enter as the multipliers of the per-prefix losses, so a
weight tensor that requires grad gets its gradient.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..dispatch import register, register_fused
from ..primitives import matryoshka as MP
from ..primitives.tiles import acc_dtype, l2_normalize
from .clip_loss_reference import ce_rows_reference, infonce_reference


# ------------------------------------------------------------------------------------------------ reference
def _truncated(t: Tensor, d: int, normalize: bool) -> Tensor:
    t = t[:, :d].to(acc_dtype(t))
    return l2_normalize(t, dim=-1) if normalize else t


def matryoshka_ce_rows_reference(q, k, scale, labels, dims, weights, normalize):
    """Σ_p w_p · CE(s·q̂^(p) k̂^(p)ᵀ, labels): the separate one-directional losses, prefix by prefix."""
    total = 0.0
    for p, d in enumerate(dims):
        total = total + weights[p] * ce_rows_reference(_truncated(q, d, normalize), _truncated(k, d, normalize),
                                                       scale.to(acc_dtype(q)), None, labels)
    return total


def matryoshka_clip_reference(x, y, scale, labels, dims, weights, normalize):
    """Σ_p w_p · clip_loss(x̂^(p), ŷ^(p), s, labels): the separate symmetric losses, prefix by prefix."""
    n, m = x.shape[0], y.shape[0]
    s = scale.to(acc_dtype(x))
    total = 0.0
    for p, d in enumerate(dims):
        total = total + weights[p] * infonce_reference(_truncated(x, d, normalize), _truncated(y, d, normalize),
                                                       s.expand(n), s.expand(m), None, labels)
    return total


# -------------------------------------------------------------------------------- the prefixes, one pass of bands
def prefix_positive(x: Tensor, y_pos: Tensor, ends, normalize: bool) -> Tensor:
    """(P, N): S^(p)_{i, l_i} = ⟨x̂^(p)_i, ŷ^(p)_{l_i}⟩ for increasing ``ends``; y_pos (N, D) = y[labels]. O(N·D):
    each band's row-wise dots, cumulated over the prefixes, times the prefixes' inverse norms (differentiable)."""
    xa, ya = x.to(acc_dtype(x)), y_pos.to(acc_dtype(x))
    prod = xa[:, :ends[-1]] * ya[:, :ends[-1]]
    dots = torch.stack([prod[:, lo:hi].sum(dim=1) for lo, hi in MP.bands(ends)], dim=1).cumsum(dim=1)
    if normalize:
        dots = dots * MP.prefix_inv_norms(xa, ends) * MP.prefix_inv_norms(ya, ends)
    return dots.T


def _dense_lse(x, y, a, c, ends, normalize, cols):
    """(lse_row (P, N), lse_col (P, M) or None), materialised: S^(p) from the running sum of the band products,
    so the forward is one GEMM unit and autograd's backward (the running sum's gradient is the suffix sum of the
    prefixes' G) two more."""
    acc = acc_dtype(x)
    xa, ya, a, c = x.to(acc), y.to(acc), a.to(acc), c.to(acc)
    inv_x = MP.prefix_inv_norms(xa, ends) if normalize else None
    inv_y = MP.prefix_inv_norms(ya, ends) if normalize else None
    run, rows, columns = None, [], []
    for p, (lo, hi) in enumerate(MP.bands(ends)):
        prod = xa[:, lo:hi] @ ya[:, lo:hi].T
        run = prod if run is None else run + prod
        s = run * inv_x[:, p, None] * inv_y[None, :, p] if normalize else run
        rows.append(torch.logsumexp(a[:, None] * s, dim=1))
        if cols:
            columns.append(torch.logsumexp(c[None, :] * s, dim=0))
    return torch.stack(rows), (torch.stack(columns) if cols else None)


def _fused_lse(impl):
    return MP.MatryoshkaLse(impl.kernel, impl.backward_kernel, impl.backend)


def _increasing(dims, weights):
    """The kernels' order: prefix ends increasing, weights along."""
    return list(dims[::-1]), weights.flip(0)


def _ce_rows_from(lse, q, k, scale, labels, dims, weights, normalize):
    ends, w = _increasing(dims, weights)
    s = scale.to(acc_dtype(q))
    n, m = q.shape[0], k.shape[0]
    lse_r, _ = lse(q, k, s.expand(n), s.expand(m), ends, normalize, False)
    pos = prefix_positive(q, k[labels], ends, normalize)
    return (w.to(lse_r.dtype) * (lse_r - s * pos).mean(dim=1)).sum()


def _clip_from(lse, x, y, scale, labels, dims, weights, normalize):
    ends, w = _increasing(dims, weights)
    s = scale.to(acc_dtype(x))
    n, m = x.shape[0], y.shape[0]
    lse_r, lse_c = lse(x, y, s.expand(n), s.expand(m), ends, normalize, True)
    pos = prefix_positive(x, y if labels is None else y[labels], ends, normalize)
    lse_cp = lse_c if labels is None else lse_c[:, labels]  # text→image: column l_i's softmax over the images
    per = 0.5 * ((lse_r - s * pos).mean(dim=1) + (lse_cp - s * pos).mean(dim=1))
    return (w.to(per.dtype) * per).sum()


def matryoshka_ce_rows_dense(q, k, scale, labels, dims, weights, normalize):
    return _ce_rows_from(_dense_lse, q, k, scale, labels, dims, weights, normalize)


def matryoshka_clip_dense(x, y, scale, labels, dims, weights, normalize):
    return _clip_from(_dense_lse, x, y, scale, labels, dims, weights, normalize)


def matryoshka_ce_rows_fused(q, k, scale, labels, dims, weights, normalize, *, impl):
    return _ce_rows_from(_fused_lse(impl), q, k, scale, labels, dims, weights, normalize)


def matryoshka_clip_fused(x, y, scale, labels, dims, weights, normalize, *, impl):
    return _clip_from(_fused_lse(impl), x, y, scale, labels, dims, weights, normalize)


register("matryoshka_ce_rows", "reference")(matryoshka_ce_rows_reference)
register("matryoshka_ce_rows", "dense")(matryoshka_ce_rows_dense)
register("matryoshka_clip", "reference")(matryoshka_clip_reference)
register("matryoshka_clip", "dense")(matryoshka_clip_dense)
# Triton only: csrc has no Matryoshka kernel (the dispatcher refuses 'cpu'/'cuda', naming the op); float64 runs the
# PyTorch tiles of the same algorithm (the Triton kernels compute in float32)
# csrc has no Matryoshka kernels: its backends run the PyTorch tiles (the dispatcher's "prefixes" rule), so CPU
# "auto" above the crossover takes the O((N+M)·D) tiles, not the materialised reference
register_fused("matryoshka_ce_rows", matryoshka_ce_rows_fused, triton_float64="tiles", csrc_lacks=("prefixes",))
register_fused("matryoshka_clip", matryoshka_clip_fused, triton_float64="tiles", csrc_lacks=("prefixes",))
