"""The public Matryoshka losses: argument checks, one dispatcher decision, the call. Re-exported by
``fastcontrast.functional`` (and ``fastcontrast``); defined here, beside their implementations
(``losses/matryoshka.py``), because functional.py holds 600 lines at most (tests/test_layers.py).

A stable interface (a sentence-transformers integration calls it): ``matryoshka_ce_rows`` is
MultipleNegativesRankingLoss under MatryoshkaLoss, ``matryoshka_clip_loss`` the symmetric CLIP loss under it.
``dims`` are strictly decreasing, largest first (the order MatryoshkaLoss sorts them in), each at most D, the
weights aligned with them. Sampling a subset of the dims per step (MatryoshkaLoss's ``n_dims_per_step``) is the
caller's: pass the sampled dims and their weights.
"""
from __future__ import annotations

import numbers
from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .. import _validation as V
from .._amp import autocast_aware
from ..dispatch import resolve
from ..primitives.tiles import acc_dtype
from . import matryoshka  # noqa: F401  (registers the implementations)

Scalar = Union[float, Tensor]
Dims = Sequence[int]
Weights = Optional[Union[Sequence[float], Tensor]]


def check_dims(dims, weights, d: int, like: Tensor) -> Tuple[Tuple[int, ...], Tensor]:
    """(dims as a tuple, weights as a (P,) tensor on ``like``'s device): dims a non-empty sequence of ints,
    strictly decreasing, each in [1, d]; weights None (all 1, MatryoshkaLoss's default), one finite number per
    dim, or a (P,) float tensor (kept as given: a weight that requires grad gets its gradient)."""
    if dims is None:
        raise ValueError("dims is required: the nested embedding sizes, strictly decreasing (largest first, e.g. "
                         "(768, 512, 256, 128, 64), as MatryoshkaLoss's matryoshka_dims)")
    if isinstance(dims, (str, bytes, Tensor)) or not isinstance(dims, Sequence):
        raise TypeError(f"dims must be a sequence of ints (e.g. a tuple), got {type(dims).__name__}")
    if len(dims) == 0:
        raise ValueError("dims must hold at least one embedding size")
    for i, v in enumerate(dims):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise TypeError(f"dims[{i}] must be an int, got {type(v).__name__}")
        if not 1 <= v <= d:
            raise ValueError(f"dims[{i}] = {v} must lie in [1, {d}] (the features' dimension D = {d})")
    dims = tuple(int(v) for v in dims)
    if any(b >= a for a, b in zip(dims, dims[1:])):
        raise ValueError(f"dims must be strictly decreasing (largest first, as MatryoshkaLoss sorts them), got "
                         f"{list(dims)}")
    return dims, _weights(weights, len(dims), like)


def _check_inputs(first, second, logit_scale, dims, weights, normalize):
    """The checks both public functions make on (name, features) pairs and the Matryoshka arguments: (scale,
    dims, weights, normalize)."""
    (na, a), (nb, b) = first, second
    V.check_features(na, a, 2)
    V.check_features(nb, b, 2)
    V.check_pair(na, a, nb, b)
    scale = V.as_scalar_tensor("logit_scale", logit_scale, a)
    dims, w = check_dims(dims, weights, a.shape[1], a)
    return scale, dims, w, _check_normalize(normalize)


def _weights(weights, p: int, like: Tensor) -> Tensor:
    wdt = acc_dtype(like)
    if weights is None:
        return torch.ones(p, dtype=wdt, device=like.device)
    if isinstance(weights, Tensor):
        if weights.dim() != 1 or weights.numel() != p:
            raise ValueError(f"weights must have shape ({p},): one weight per dim, got {tuple(weights.shape)}")
        return V.check_vector("weights", weights, p, like, positive=False)
    if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence):
        raise TypeError(f"weights must be a sequence of numbers or a tensor of shape ({p},), got "
                        f"{type(weights).__name__}")
    if len(weights) != p:
        raise ValueError(f"weights has {len(weights)} entries but dims has {p}: give one weight per dim")
    for i, w in enumerate(weights):
        if isinstance(w, bool) or not isinstance(w, numbers.Real):
            raise TypeError(f"weights[{i}] must be a number, got {type(w).__name__}")
        if w != w or w in (float("inf"), float("-inf")):
            raise ValueError(f"weights[{i}] must be finite, got {w}")
    return torch.tensor([float(w) for w in weights], dtype=wdt, device=like.device)


def _check_normalize(normalize) -> bool:
    if not isinstance(normalize, bool):
        raise TypeError(f"normalize must be a bool, got {type(normalize).__name__}")
    return normalize


@autocast_aware("queries", "keys")
def matryoshka_ce_rows(queries: Tensor, keys: Tensor, logit_scale: Scalar, labels: Optional[Tensor] = None,
                       dims: Dims = None, weights: Weights = None, normalize: bool = True,
                       backend: str = "auto") -> Tensor:
    """Σ_p w_p · mean_i [lse_j(s·S^(p)_ij) − s·S^(p)_{i,l_i}], S^(p) = q̂^(p) k̂^(p)ᵀ on the first d_p features
    (each prefix normalised on its own when ``normalize``: cosine; else dot products of the prefixes).

    MultipleNegativesRankingLoss (sentence-transformers) under MatryoshkaLoss, in one call of about one loss's
    cost. queries (N, D); keys (M, D): every document column, the positives and any hard negatives; labels (N,):
    each query's positive column, default i (the layout [positives; hard negatives], M ≥ N); logit_scale s: the
    multiplier (MNRL's ``scale``, 20). dims: strictly decreasing, each ≤ D; weights: one per dim (default 1).
    Returns a 0-d float32 loss (float64 for float64 features).
    """
    scale, dims, w, normalize = _check_inputs(("queries", queries), ("keys", keys), logit_scale, dims, weights,
                                              normalize)
    n, m = queries.shape[0], keys.shape[0]
    if labels is None:
        if m < n:
            raise ValueError(f"labels are required when keys has fewer rows than queries ({m} < {n}): the default "
                             "pairs query i with key i")
        labels = torch.arange(n, device=queries.device)
    labels = V.check_labels(labels, n, m, queries)
    V.check_finite(queries=queries, keys=keys)
    impl = resolve("matryoshka_ce_rows", backend, queries.device, n * m * len(dims), queries.dtype,
                   needs=("prefixes",))
    labels, bad = V.labels_guard(labels, m)  # out-of-range labels: NaN, not a plausible number
    return V.poison(impl(queries, keys, scale, labels, dims, w, normalize), bad)


@autocast_aware("image_features", "text_features")
def matryoshka_clip_loss(image_features: Tensor, text_features: Tensor, logit_scale: Scalar, dims: Dims = None,
                         weights: Weights = None, normalize: bool = True, labels: Optional[Tensor] = None,
                         backend: str = "auto") -> Tensor:
    """Σ_p w_p · clip_loss at prefix p: ½ mean_i[(lse_j(s·S^(p)_ij) − s·S^(p)_{i,l_i}) + (lse_{i'}(s·S^(p)_{i',l_i})
    − s·S^(p)_{i,l_i})], S^(p) = x̂^(p) ŷ^(p)ᵀ on the first d_p features (each prefix normalised on its own when
    ``normalize``).

    image_features (N, D), text_features (M, D); labels (N,): each image's positive text (default the diagonal,
    N = M), as in :func:`fastcontrast.clip_loss`; dims strictly decreasing, each ≤ D; weights one per dim (default
    1). Returns a 0-d float32 loss (float64 for float64 features).
    """
    scale, dims, w, normalize = _check_inputs(("image_features", image_features), ("text_features", text_features),
                                              logit_scale, dims, weights, normalize)
    n, m = image_features.shape[0], text_features.shape[0]
    labels = V.check_labels(labels, n, m, image_features, diagonal_as_none=True)
    V.check_finite(image_features=image_features, text_features=text_features)
    impl = resolve("matryoshka_clip", backend, image_features.device, n * m * len(dims), image_features.dtype,
                   needs=("prefixes",))
    labels, bad = V.labels_guard(labels, m)
    return V.poison(impl(image_features, text_features, scale, labels, dims, w, normalize), bad)
