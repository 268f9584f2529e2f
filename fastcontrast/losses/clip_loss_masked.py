"""CLIP's symmetric InfoNCE with hard-negative text columns and false-negative masks (``clip_loss`` with
``text_negatives``, ``false_negative_ids`` or a guide), on every backend, O(N·d).

    loss = ½ mean_i [(lse_row_i − s·S_{i,p(i)}) + (lse_col_{p(i)} − s·S_{i,p(i)})],
    lse_row_i = log Σ_{j ∈ texts ∪ negatives, not drop_r(i, j)} exp(s·S_ij),
    lse_col_j = log Σ_{i, not drop_c(i, j)} exp(s·S_ij)                        (texts only),

S = x̂[ŷ; n̂]ᵀ (cosine when ``normalize``), p(i) the positive (labels, default the diagonal). Sources:

* NegCLIP (Yuksekgonul et al., "When and why vision-language models behave like bags-of-words", ICLR 2023):
  the negatives n (K, D) are extra captions that enter the image→text softmax only; they have no column of
  their own in the text→image direction.
* False negatives from group ids (this package's, an alternative to UniCL's shared targets that ``image_ids``/
  ``text_ids`` give): with ``false_negative_ids = (u, t)``, drop_r(i, j) = drop_c(i, j) ⊇ [u_i == t_j] for every
  j ≠ p(i) (a same-group text is neither target nor negative; negatives belong to no group).
* The guide (GISTEmbed, Solatorio 2024, arXiv:2402.16829; sentence-transformers' GISTEmbedLoss): with guide
  features (a frozen model's embeddings of the same batch, cosine), a negative whose guide score exceeds the
  positive's minus a margin is dropped: drop_r(i, j) ⊇ [ĝ_i·ĝ_j > thr_i], thr_i = gp_i − margin ("absolute") or
  gp_i − |gp_i|·margin ("relative"), gp_i = ĝx_i·ĝy_{p(i)}; the column direction (this package's extension: GIST
  is one-directional) uses column j's own positive score (the largest over the rows whose positive it is; a
  column that is no row's positive drops nothing by the guide).

Entries (i, p(i)) are never dropped. Every rule is evaluated per tile on O(N + M) vectors (``primitives.
lse_masked``): row and column statistics in one sweep, 4 GEMM units of 2·N·(M+K)·D per forward+backward (the
sweep, the recompute, two slab GEMMs) plus 2·N·(M+K)·Dg twice for a guide; composing two one-directional
``lse_rows`` would take 8. With negatives alone (nothing dropped) csrc's kernels run ``lse_pair`` on [y; n].
Dispatcher op ``infonce_masked``: reference (materialised, every rule an N×(M+K) matrix), dense (materialised,
the kernels' rule), fused (``fastcontrast::lse_masked``; the PyTorch tiles where csrc's kernels lack masks).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _validation as V
from ..dispatch import register, register_fused, resolve
from ..primitives import lse_masked as LM
from ..primitives import lse_pair as LP
from ..primitives import tiles as T


def _unit(t: Tensor, acc: torch.dtype) -> Tensor:
    return T.l2_normalize(t.to(acc))


def _hat(t: Tensor, normalize: bool, acc: torch.dtype) -> Tensor:
    return T.l2_normalize(t.to(acc)) if normalize else t.to(acc)


def guide_thresholds(gx: Tensor, gy: Tensor, labels: Optional[Tensor], m: int, margin: float, strategy: str):
    """(thr_row (N,), thr_col (M,)) from the guide's positive scores, O(N·Dg): GISTEmbed's rule per row; per
    column the largest positive score of the rows whose positive it is (+inf where it is nobody's: the guide
    drops nothing there)."""
    acc = T.acc_dtype(gx)
    n = gx.shape[0]
    gyp = gy if labels is None else gy[labels]
    gp = (_unit(gx, acc) * _unit(gyp, acc)).sum(dim=1)
    cols = torch.arange(n, device=gx.device) if labels is None else labels
    gp_c = torch.full((m,), float("-inf"), dtype=acc, device=gx.device).scatter_reduce(0, cols, gp, "amax")

    def thr(score):
        return score - margin if strategy == "absolute" else score - score.abs() * margin

    return thr(gp), torch.where(gp_c == float("-inf"), float("inf"), thr(gp_c))


def clip_masks(x, y, labels, negatives, fn_ids, guide, margin, strategy) -> LM.Masks:
    """The primitive's masks of one call: keep = p(i), ids over the M texts only, the guide over [y; n], column
    statistics for the M texts."""
    n, m = x.shape[0], y.shape[0]
    keep = torch.arange(n, device=x.device) if labels is None else labels
    gx = gy = thr_r = thr_c = None
    if guide is not None:
        gx, gyt, gyn = guide
        gy = gyt if gyn is None else torch.cat([gyt, gyn])
        thr_r, thr_c = guide_thresholds(gx, gyt, labels, m, margin, strategy)
    ids = fn_ids is not None
    return LM.Masks(keep=keep if (ids or guide is not None) else None, row_ids=fn_ids[0] if ids else None,
                    col_ids=fn_ids[1] if ids else None, exclude_same=ids, guide_x=gx, guide_y=gy,
                    guide_normalize=True, thr_r=thr_r, thr_c=thr_c, n_stat=m)


def _loss(lse_r, lse_c, x, y, scale, labels, normalize, acc):
    yp = y if labels is None else y[labels]
    pos = scale * (_hat(x, normalize, acc) * _hat(yp, normalize, acc)).sum(dim=1)
    lse_cp = lse_c if labels is None else lse_c[labels]
    return 0.5 * ((lse_r - pos).mean() + (lse_cp - pos).mean())


# ----------------------------------------------------------------------------------------------- reference
def infonce_masked_reference(x, y, scale, labels=None, normalize=False, negatives=None, fn_ids=None, guide=None,
                             margin=0.0, strategy="absolute"):
    """Readable ground truth: the N×(M+K) logits, each rule an explicit boolean matrix, both directions' CEs."""
    acc = T.acc_dtype(x)
    n, m = x.shape[0], y.shape[0]
    keys = y if negatives is None else torch.cat([y, negatives])
    s = _hat(x, normalize, acc) @ _hat(keys, normalize, acc).T  # N×(M+K)
    logits = scale.to(acc) * s
    p = torch.arange(n, device=x.device) if labels is None else labels
    rows = torch.arange(n, device=x.device)
    positive = torch.zeros_like(s, dtype=torch.bool)
    positive[rows, p] = True
    drop_r = torch.zeros_like(positive)
    drop_c = torch.zeros_like(positive)
    if fn_ids is not None:  # same group, texts only (a negative belongs to no group)
        drop_r[:, :m] = fn_ids[0][:, None] == fn_ids[1][None, :]
        drop_c = drop_r.clone()
    if guide is not None:
        gacc = T.acc_dtype(guide[0])
        gkeys = guide[1] if guide[2] is None else torch.cat([guide[1], guide[2]])
        gs = _unit(guide[0], gacc) @ _unit(gkeys, gacc).T
        gp = gs[rows, p]
        # column j's positive guide score: the largest over the rows whose positive it is (none: no threshold);
        # an N×M selection, no host read
        sel = p[:, None] == torch.arange(m, device=x.device)[None, :]
        gp_col = torch.where(sel, gp[:, None], float("-inf")).amax(dim=0)
        has = sel.any(dim=0)
        thr = (lambda v: v - margin) if strategy == "absolute" else (lambda v: v - v.abs() * margin)
        drop_r = drop_r | (gs > thr(gp)[:, None])
        drop_c[:, :m] = drop_c[:, :m] | ((gs[:, :m] > thr(gp_col)[None, :]) & has[None, :])
    drop_r, drop_c = drop_r & ~positive, drop_c & ~positive
    row = torch.logsumexp(logits.masked_fill(drop_r, float("-inf")), dim=1) - logits[rows, p]
    col_lse = torch.logsumexp(logits[:, :m].masked_fill(drop_c[:, :m], float("-inf")), dim=0)
    col = col_lse[p] - logits[rows, p]
    return 0.5 * (row.mean() + col.mean())


# ------------------------------------------------------------------------------------------ dense, fused
def infonce_masked_dense(x, y, scale, labels=None, normalize=False, negatives=None, fn_ids=None, guide=None,
                         margin=0.0, strategy="absolute"):
    """Materialised: the kernels' mask rule (``lse_masked.block_logits``) on all rows at once, autograd."""
    acc = T.acc_dtype(x)
    keys = y if negatives is None else torch.cat([y, negatives])
    masks = clip_masks(x, y, labels, negatives, fn_ids, guide, margin, strategy)
    s = _hat(x, normalize, acc) @ _hat(keys, normalize, acc).T
    gs = None
    if masks.guide_x is not None:
        gacc = T.acc_dtype(masks.guide_x)
        gs = _unit(masks.guide_x, gacc) @ _unit(masks.guide_y, gacc).T
    sc = scale.to(acc)
    zr, zc = LM.block_logits(s, gs, slice(None), sc.expand(x.shape[0]), sc.expand(keys.shape[0]), masks)
    return _loss(torch.logsumexp(zr, dim=1), torch.logsumexp(zc, dim=0), x, y, sc, labels, normalize, acc)


def infonce_masked_fused(x, y, scale, labels=None, normalize=False, negatives=None, fn_ids=None, guide=None,
                         margin=0.0, strategy="absolute", *, impl):
    """O((N+M+K)·D): ``fastcontrast::lse_masked`` on [y; n] with column statistics for the M texts (Triton or the
    PyTorch tiles); without masks (negatives alone) a compiled kernel's ``lse_pair`` on [y; n] (its first M column
    lse)."""
    acc = T.acc_dtype(x)
    keys = y if negatives is None else torch.cat([y, negatives])
    masks = clip_masks(x, y, labels, negatives, fn_ids, guide, margin, strategy)
    sc = scale.to(acc)
    a, c = sc.expand(x.shape[0]), sc.expand(keys.shape[0])
    if impl.kernel != "tiles" and not masks.any:  # nothing dropped: the compiled lse_pair (tuned, both kernels)
        zero = torch.zeros((), dtype=acc, device=x.device)
        lse_r, lse_c = LP.bound(impl.kernel, impl.backward_kernel)(x, keys, a, c, zero, normalize, 1)
        lse_c = lse_c[:y.shape[0]]
    else:  # a masked call on csrc's backends reaches here with the tiles (the dispatcher: needs=("masks",))
        lse_r, lse_c = LM.bound(impl.kernel, impl.backward_kernel, impl.backend)(x, keys, a, c, normalize, masks)
    return _loss(lse_r, lse_c, x, y, sc, labels, normalize, acc)


# ------------------------------------------------------------------------------------ the lse for the ring
class _MaterialisedMasked:
    """The masked pairwise lse of one block, materialised (dense/reference backends of the CLIP ring), with the
    backward the ring calls: the statistics are global (the ring's), taken as given. P = exp(z_r − lse_row),
    Q = exp(z_c − lse_col) (0 where dropped or where a whole row/column is), G = g·a·P + h·c·Q,
    dx = G k, dk = Gᵀ x, da = g Σ_j P∘S, dc = h Σ_i Q∘S."""

    @staticmethod
    def _logits(x, y, a, c, normalize, masks):
        acc = T.acc_dtype(x)
        if normalize:
            raise ValueError("the ring normalises before its blocks: normalize=False here")
        s = x.to(acc) @ y.to(acc).T
        gs = None
        if masks.guide_x is not None:
            gacc = T.acc_dtype(masks.guide_x)
            gs = _hat(masks.guide_x, masks.guide_normalize, gacc) @ _hat(masks.guide_y, masks.guide_normalize,
                                                                          gacc).T
        zr, zc = LM.block_logits(s, gs, slice(None), a.to(acc), c.to(acc), masks)
        return s, zr, zc

    def __call__(self, x, y, a, c, normalize, masks):
        _, zr, zc = self._logits(x, y, a, c, normalize, masks)
        return torch.logsumexp(zr, dim=1), torch.logsumexp(zc, dim=0)

    def backward(self, g_r, g_c, x, y, a, c, normalize, masks, lse_r, lse_c, acc_out=True):
        acc = T.acc_dtype(x)
        s, zr, zc = self._logits(x, y, a, c, normalize, masks)
        safe = lambda t: torch.where(t == float("-inf"), 0.0, t.to(acc))  # noqa: E731
        p = torch.exp(zr - safe(lse_r)[:, None])
        q = torch.exp(zc - safe(lse_c)[None, :])
        k = masks.n_stat
        g = g_r.to(acc)[:, None] * a.to(acc)[:, None] * p
        g[:, :k] += g_c.to(acc)[None, :] * c.to(acc)[None, :k] * q
        dc = torch.zeros(y.shape[0], dtype=acc, device=x.device)
        dc[:k] = g_c.to(acc) * (q * s[:, :k]).sum(dim=0)
        return g @ y.to(acc), g.T @ x.to(acc), g_r.to(acc) * (p * s).sum(dim=1), dc


_MATERIALISED = _MaterialisedMasked()


def _lse_masked_materialised():
    return _MATERIALISED


def _lse_masked_fused(*, impl):
    return LM.bound(impl.kernel, impl.backward_kernel, impl.backend)


# ----------------------------------------------------------------------------- the public path (clip_loss)
def run(x, y, scale, bias, labels, normalize, masked, backend):
    """clip_loss with negatives / false-negative masks / a guide, after ``functional.clip_loss`` checked the
    features, scale and labels and :func:`check_args` the rest (``masked``). The bias cancels in every softmax (as
    functional._infonce); out-of-range labels and a NaN guide (its scores compare False: nothing dropped) poison
    the loss instead of vanishing."""
    negatives, fn_ids, guide, margin, strategy, needs = masked
    V.check_finite(image_features=x, text_features=y, text_negatives=negatives,
                   **({} if guide is None else dict(guide_image_features=guide[0], guide_text_features=guide[1],
                                                    guide_text_negatives=guide[2])))
    k = 0 if negatives is None else negatives.shape[0]
    impl = resolve("infonce_masked", backend, x.device, x.shape[0] * (y.shape[0] + k), x.dtype, needs=needs)
    labels, bad = V.labels_guard(labels, y.shape[0])
    loss = impl(x, y, scale, labels, normalize, negatives, fn_ids, guide, margin, strategy)
    return V.poison(V.plus_zero_bias(loss, bias), bad, None if guide is None else V.nonfinite_flag(*guide))


# ------------------------------------------------------------------------------------------------- checks
STRATEGIES = ("absolute", "relative")


def check_args(x, y, image_ids, text_ids, text_negatives, false_negative_ids, guide_image_features,
               guide_text_features, guide_text_negatives, guide_margin, guide_margin_strategy):
    """The masked path's arguments of ``clip_loss`` checked (each error names its argument): None when none is
    given, else (negatives or None, fn_ids or None, guide (gx, gy, gn) or None, margin, strategy, needs)."""
    n, m = x.shape[0], y.shape[0]
    given = (text_negatives is not None or false_negative_ids is not None or guide_image_features is not None
             or guide_text_features is not None or guide_text_negatives is not None)
    if not given:
        if guide_margin != 0.0 or guide_margin_strategy != "absolute":
            raise ValueError("guide_margin/guide_margin_strategy set without a guide: pass guide_image_features "
                             "and guide_text_features")
        return None
    if image_ids is not None or text_ids is not None:
        raise ValueError("text_negatives, false_negative_ids and the guide are not combined with image_ids/text_ids "
                         "(UniCL's shared targets): false_negative_ids is the alternative that drops same-id texts")
    negatives = None
    if text_negatives is not None:
        V.check_features("text_negatives", text_negatives, 2)
        V.check_pair("text_features", y, "text_negatives", text_negatives)
        negatives = text_negatives
    fn_ids = None
    if false_negative_ids is not None:
        if not isinstance(false_negative_ids, (tuple, list)) or len(false_negative_ids) != 2:
            raise TypeError("false_negative_ids must be a pair (image_ids (N,), text_ids (M,)) of integer tensors, "
                            f"got {type(false_negative_ids).__name__}")
        fn_ids = V.check_ids(false_negative_ids[0], false_negative_ids[1], n, m, x)
    guide = _check_guide(x, n, m, negatives, guide_image_features, guide_text_features, guide_text_negatives)
    margin = V.check_positive_float("guide_margin", guide_margin, allow_zero=True)
    if guide_margin_strategy not in STRATEGIES:
        raise ValueError(f"guide_margin_strategy must be one of {STRATEGIES} (GISTEmbed's), got "
                         f"{guide_margin_strategy!r}")
    if guide is None and (margin != 0.0 or guide_margin_strategy != "absolute"):
        raise ValueError("guide_margin/guide_margin_strategy set without a guide: pass guide_image_features and "
                         "guide_text_features")
    needs = ("masks",) if fn_ids is not None or guide is not None else ()
    return negatives, fn_ids, guide, margin, guide_margin_strategy, needs


def _check_guide(x, n, m, negatives, gx, gy, gn):
    if (gx is None) != (gy is None):
        missing = "guide_text_features" if gy is None else "guide_image_features"
        raise ValueError(f"{missing} is required: guide_image_features and guide_text_features go together")
    if gx is None:
        if gn is not None:
            raise ValueError("guide_text_negatives given without guide_image_features/guide_text_features")
        return None
    for name, t, rows in (("guide_image_features", gx, n), ("guide_text_features", gy, m)):
        V.check_features(name, t, 2)
        if t.shape[0] != rows:
            raise ValueError(f"{name} must have {rows} rows (one per {name.split('_')[1]}), got {tuple(t.shape)}")
    V.check_pair("guide_image_features", gx, "guide_text_features", gy)
    if gx.device != x.device:
        raise ValueError(f"guide_image_features is on {gx.device} but the features are on {x.device}")
    if (gn is None) != (negatives is None):
        raise ValueError("guide_text_negatives is required with text_negatives and a guide (the guide scores every "
                         "column), and only then" if gn is None else
                         "guide_text_negatives given without text_negatives")
    if gn is not None:
        V.check_features("guide_text_negatives", gn, 2)
        V.check_pair("guide_text_features", gy, "guide_text_negatives", gn)
        if gn.shape[0] != negatives.shape[0]:
            raise ValueError(f"guide_text_negatives must have {negatives.shape[0]} rows (one per text_negatives "
                             f"row), got {tuple(gn.shape)}")
    return gx.detach(), gy.detach(), None if gn is None else gn.detach()


register("infonce_masked", "reference")(infonce_masked_reference)
register("infonce_masked", "dense")(infonce_masked_dense)
register_fused("infonce_masked", infonce_masked_fused, csrc_lacks=("masks",))
# lse_masked: resolve(...)() gives the masked lse of a block with its backward (what the CLIP ring runs per block)
register("lse_masked", "reference")(_lse_masked_materialised)
register("lse_masked", "dense")(_lse_masked_materialised)
register_fused("lse_masked", _lse_masked_fused, csrc_lacks=("masks",))
