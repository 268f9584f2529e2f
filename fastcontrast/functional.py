"""Public functional losses. Each validates its inputs, then hands the work to the backend the dispatcher picks.

Shapes: N image rows, M text rows, D features (K tokens of d for the oblique loss). Every function takes
``backend="auto" | "triton" | "cuda" | "cpu" | "reference"``.
"""
from __future__ import annotations

from typing import Optional, Union

import torch

from . import _validation as V
from . import losses  # noqa: F401  (registers implementations)
from ._amp import autocast_aware
from .dispatch import resolve
from .losses.codebook_loss import teacher_scores
from .losses.lse_rows import lse_rows  # noqa: F401  (public, defined there)
from .losses.matryoshka_api import matryoshka_ce_rows, matryoshka_clip_loss  # noqa: F401  (public, defined there)
from .losses.temperature import cosine_schedule, density_to_temperature

Scalar = Union[float, torch.Tensor]


def _bias(logit_bias, like):
    if logit_bias is None:
        return None
    return V.as_scalar_tensor("logit_bias", logit_bias, like, positive=False)


def _check_image_text(image_features, text_features):
    V.check_features("image_features", image_features, 2)
    V.check_features("text_features", text_features, 2)
    V.check_pair("image_features", image_features, "text_features", text_features)


def _infonce(x, y, row_scale, col_scale, bias, labels, normalize, tokens, backend, ids=None):
    # A constant bias cancels in every softmax here (lse(l + b) − (l_p + b)): it changes nothing but the rounding,
    # and a |b| ≫ |s·S| leaves the logits no digits (kernels that add b to the lse and take it off again then
    # overflow exp). So the loss is computed without it (V.plus_zero_bias keeps its zero gradient and NaN).
    if ids is not None:  # groups of positives (UniCL): the backend's lse plus per-group sums (losses/clip_loss.py)
        impl = resolve("infonce_ids", backend, x.device, x.shape[0] * y.shape[0], x.dtype)
        loss = impl(x, y, row_scale, col_scale, None, ids[0], ids[1], normalize, tokens)
        return V.plus_zero_bias(loss, bias)
    impl = resolve("infonce", backend, x.device, x.shape[0] * y.shape[0], x.dtype)
    labels, bad = V.labels_guard(labels, y.shape[0])  # out-of-range labels: NaN, not a plausible number
    loss = impl(x, y, row_scale, col_scale, None, labels, normalize, tokens)
    return V.poison(V.plus_zero_bias(loss, bias), bad)


def _ids_or_labels(image_ids, text_ids, labels, n, m, like):
    """(ids or None, labels): group ids replace labels; without them, labels as before."""
    ids = V.check_ids(image_ids, text_ids, n, m, like, labels)
    if ids[0] is not None:
        return ids, None
    return None, V.check_labels(labels, n, m, like, diagonal_as_none=True)


@autocast_aware("image_features", "text_features", "text_negatives")
def clip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: Scalar,
    logit_bias: Optional[Scalar] = None,
    labels: Optional[torch.Tensor] = None,
    normalize: bool = False,
    backend: str = "auto",
    image_ids: Optional[torch.Tensor] = None,
    text_ids: Optional[torch.Tensor] = None,
    text_negatives: Optional[torch.Tensor] = None,
    false_negative_ids=None,
    guide_image_features: Optional[torch.Tensor] = None,
    guide_text_features: Optional[torch.Tensor] = None,
    guide_text_negatives: Optional[torch.Tensor] = None,
    guide_margin: float = 0.0,
    guide_margin_strategy: str = "absolute",
) -> torch.Tensor:
    """CLIP's symmetric InfoNCE: ½[CE(s·XYᵀ + b, p) + CE(s·YXᵀ + b, p⁻¹)].

    image_features (N, D), text_features (M, D); logit_scale s is the multiplier (open_clip passes
    ``logit_scale.exp()``); labels (N,) give each image's positive text (default: the diagonal, N == M).
    ``normalize=True`` L2-normalises the features inside, gradient included. Returns a 0-d float32 loss.
    ``image_ids`` (N,), ``text_ids`` (M,) (instead of labels): every pair with equal ids is a positive, each row's
    target uniform over its positives, both directions (UniCL): ½[mean_i CE_i + mean_j CE_j]; a row with no
    positive contributes 0. With unique ids (one text per image) it is the loss above.

    Hard negatives and false negatives (losses/clip_loss_masked.py, docs/math.md), O(N·d) on the fused backends:
    ``text_negatives`` (K, D): extra captions in the image→text softmax only (NegCLIP); ``false_negative_ids`` =
    (image_ids (N,), text_ids (M,)): same-id texts other than the positive leave both directions' denominators
    (this package's alternative to UniCL's shared targets); ``guide_image_features`` (N, Dg),
    ``guide_text_features`` (M, Dg) (and ``guide_text_negatives`` (K, Dg) with negatives): a frozen guide's
    embeddings; a negative whose guide cosine exceeds the positive's minus ``guide_margin`` is dropped
    (GISTEmbed; ``guide_margin_strategy`` "absolute" or "relative": minus |positive|·margin). Not with
    image_ids/text_ids.
    """
    _check_image_text(image_features, text_features)
    n, m = image_features.shape[0], text_features.shape[0]
    scale = V.as_scalar_tensor("logit_scale", logit_scale, image_features)
    bias = _bias(logit_bias, image_features)
    from .losses import clip_loss_masked as CM

    masked = CM.check_args(image_features, text_features, image_ids, text_ids, text_negatives, false_negative_ids,
                           guide_image_features, guide_text_features, guide_text_negatives, guide_margin,
                           guide_margin_strategy)
    if masked is not None:
        labels = V.check_labels(labels, n, m, image_features, diagonal_as_none=True)
        return CM.run(image_features, text_features, scale, bias, labels, normalize, masked, backend)
    ids, labels = _ids_or_labels(image_ids, text_ids, labels, n, m, image_features)
    V.check_finite(image_features=image_features, text_features=text_features)
    return _infonce(image_features, text_features, scale.expand(n), scale.expand(m), bias, labels, normalize, 1,
                    backend, ids)


@autocast_aware("image_features", "text_features")
def siglip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: Scalar,
    logit_bias: Optional[Scalar] = None,
    labels: Optional[torch.Tensor] = None,
    negative_only: bool = False,
    backend: str = "auto",
    image_ids: Optional[torch.Tensor] = None,
    text_ids: Optional[torch.Tensor] = None,
    weighting: str = "none",
) -> torch.Tensor:
    """SigLIP's sigmoid loss: −(1/N) Σ_ij log σ(z_ij (s⟨x_i, y_j⟩ + b)), z = +1 at (i, labels_i) and −1 elsewhere.

    image_features (N, D), text_features (M, D); labels default to the diagonal; ``negative_only`` makes every
    pair a negative (open_clip's term for another rank's texts). Matches ``open_clip.loss.SigLipLoss``.
    ``image_ids`` (N,), ``text_ids`` (M,) (instead of labels): every pair with equal ids is a positive (z = +1);
    ``weighting="inverse_count"`` weighs each positive's term by ½(1/k_i + 1/k'_j), k the positives of its row and
    column (siglip-kernel's SigLIP+), still summed over pairs / N. With unique ids it is the loss above.
    """
    _check_image_text(image_features, text_features)
    scale = V.as_scalar_tensor("logit_scale", logit_scale, image_features)
    bias = _bias(logit_bias, image_features)
    n, m = image_features.shape[0], text_features.shape[0]
    if weighting not in ("none", "inverse_count"):
        raise ValueError(f"weighting must be 'none' or 'inverse_count' (SigLIP+), got {weighting!r}")
    ids = V.check_ids(image_ids, text_ids, n, m, image_features, labels)
    if ids[0] is not None and negative_only:
        raise ValueError("negative_only makes every pair a negative: it cannot be combined with image_ids/text_ids")
    if labels is not None and negative_only:  # else they would be ignored without a word
        raise ValueError("negative_only makes every pair a negative: it cannot be combined with labels")
    if ids[0] is None and weighting != "none":
        raise ValueError("weighting='inverse_count' needs image_ids and text_ids (the groups of positives)")
    labels = None if negative_only or ids[0] is not None else V.check_labels(labels, n, m, image_features)
    V.check_finite(image_features=image_features, text_features=text_features)
    if ids[0] is not None:
        impl = resolve("siglip_ids", backend, image_features.device, n * m, image_features.dtype)
        return impl(image_features, text_features, scale, bias, ids[0], ids[1], weighting)
    impl = resolve("siglip", backend, image_features.device, n * m, image_features.dtype)
    labels, bad = V.labels_guard(labels, m)
    return V.poison(impl(image_features, text_features, scale, bias, labels, bool(negative_only)), bad)


@autocast_aware("a", "b")
def ce_rows(a: torch.Tensor, b: torch.Tensor, logit_scale: Scalar, logit_bias: Optional[Scalar] = None,
            labels: Optional[torch.Tensor] = None, backend: str = "auto") -> torch.Tensor:
    """One-directional InfoNCE: mean_i CE(s·a_i bᵀ + bias, labels_i); a (N, D), b (M, D), labels (N,).

    The building block of open_clip's ``local_loss`` (local rows against the gathered other side).
    """
    V.check_features("a", a, 2)
    V.check_features("b", b, 2)
    V.check_pair("a", a, "b", b)
    scale = V.as_scalar_tensor("logit_scale", logit_scale, a)
    bias = _bias(logit_bias, a)
    labels = V.check_labels(labels, a.shape[0], b.shape[0], a)
    V.check_finite(a=a, b=b)
    impl = resolve("ce_rows", backend, a.device, a.shape[0] * b.shape[0], a.dtype)
    labels, bad = V.labels_guard(labels, b.shape[0])
    loss = impl(a, b, scale, None, labels)  # the bias cancels in the softmax: see _infonce
    return V.poison(V.plus_zero_bias(loss, bias), bad)


@autocast_aware("image_tokens", "text_tokens")
def oblique_clip_loss(
    image_tokens: torch.Tensor,
    text_tokens: torch.Tensor,
    logit_scale: Scalar = 1.0,
    logit_bias: Optional[Scalar] = None,
    labels: Optional[torch.Tensor] = None,
    backend: str = "auto",
    image_ids: Optional[torch.Tensor] = None,
    text_ids: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """InfoNCE on the oblique-manifold similarity S_ij = Σ_k ⟨x̂_ik, ŷ_jk⟩ ∈ [−K, K] (Sun).

    image_tokens (N, K, d), text_tokens (M, K, d); each of the K tokens is normalised on its own sphere. The
    paper's release (minogame/clip-mtob) uses K = 16 tokens of d = D/K = 32 (the width of one 512-d token) and
    applies no temperature: the range [−K, K] comes from K, so ``logit_scale=1`` (the default) is the paper's
    setup. CLIP's 1/0.07 is not: with K = 16 it stretches the logits to ±229. A tensor scale is learnable (an
    extension). ``image_ids``/``text_ids``: groups of positives, as in :func:`clip_loss`.
    """
    V.check_features("image_tokens", image_tokens, 3)
    V.check_features("text_tokens", text_tokens, 3)
    V.check_pair("image_tokens", image_tokens, "text_tokens", text_tokens)
    n, k, d = image_tokens.shape
    m = text_tokens.shape[0]
    scale = V.as_scalar_tensor("logit_scale", logit_scale, image_tokens)
    bias = _bias(logit_bias, image_tokens)
    ids, labels = _ids_or_labels(image_ids, text_ids, labels, n, m, image_tokens)
    V.check_finite(image_tokens=image_tokens, text_tokens=text_tokens)
    # Flattening is a view; per-token normalisation happens inside the op (tokens=K).
    return _infonce(
        image_tokens.reshape(n, k * d), text_tokens.reshape(m, k * d), scale.expand(n), scale.expand(m),
        bias, labels, True, k, backend, ids,
    )


def _temperature(name, tau, length, like):
    if isinstance(tau, torch.Tensor) and tau.dim() == 1 and tau.numel() == length and length > 1:
        return V.check_vector(name, tau, length, like)
    if isinstance(tau, torch.Tensor) and tau.dim() == 1 and tau.numel() != 1:
        raise ValueError(f"{name} must be a scalar or have shape ({length},), got {tuple(tau.shape)}")
    return V.as_scalar_tensor(name, tau, like).expand(length)


@autocast_aware("image_features", "text_features")
def adaptive_temperature_clip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    tau_image: Scalar,
    tau_text: Optional[Scalar] = None,
    labels: Optional[torch.Tensor] = None,
    logit_bias: Optional[Scalar] = None,
    normalize: bool = False,
    backend: str = "auto",
    image_ids: Optional[torch.Tensor] = None,
    text_ids: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """InfoNCE with a temperature per sample: row i of image→text uses ⟨x_i,y_j⟩/τ_i, row j of text→image
    (column j of S) uses ⟨x_i,y_j⟩/τ'_j; ½(CE + CE).

    tau_image: scalar or (N,); tau_text: scalar or (M,), default ``tau_image``: one τ per pair for both
    directions, which is MM-TS (τ from :func:`mmts_temperature`). Tensors that require grad get dτ.
    ``image_ids``/``text_ids``: groups of positives, as in :func:`clip_loss`.
    """
    _check_image_text(image_features, text_features)
    n, m = image_features.shape[0], text_features.shape[0]
    if tau_text is None:
        if isinstance(tau_image, torch.Tensor) and tau_image.numel() > 1 and n != m:
            raise ValueError(f"tau_text is required when tau_image is per-sample and the batches differ "
                             f"({n} images, {m} texts); pass shape ({m},)")
        tau_text = tau_image
    t_img = _temperature("tau_image", tau_image, n, image_features)
    t_txt = _temperature("tau_text", tau_text, m, image_features)
    bias = _bias(logit_bias, image_features)
    ids, labels = _ids_or_labels(image_ids, text_ids, labels, n, m, image_features)
    V.check_finite(image_features=image_features, text_features=text_features)
    return _infonce(image_features, text_features, 1.0 / t_img, 1.0 / t_txt, bias, labels, normalize, 1, backend,
                    ids)


@autocast_aware("image_features", "text_features")
def max_margin_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    margin: Scalar = 0.2,
    labels: Optional[torch.Tensor] = None,
    hardest: bool = False,
    normalize: bool = True,
    reduction: str = "mean",
    backend: str = "auto",
) -> torch.Tensor:
    """Bidirectional hinge [m_i − S_{i,p(i)} + S_ij]_+ and [m_i − S_{i,p(i)} + S_{i',p(i)}]_+ over negatives j, i'.

    ``margin``: a number, a 0-d tensor, or one per pair (N,) — MM-TS uses m_i = τ_i(t) (:func:`mmts_temperature`);
    the AVION baseline a fixed 0.2. ``reduction="mean"`` (MM-TS, AVION): the mean over all 2N(N−1) terms (for
    the diagonal). Extensions of this package: ``reduction="sum"`` (sum over negatives, mean over pairs:
    2(N−1)× the mean) and ``hardest=True`` (VSE++: only the largest violation per pair and direction).
    """
    _check_image_text(image_features, text_features)
    n = image_features.shape[0]
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' (MM-TS) or 'sum', got {reduction!r}")
    if isinstance(margin, torch.Tensor) and margin.dim() == 1 and margin.numel() == n and n > 1:
        margin = V.check_vector("margin", margin, n, image_features, positive=False)
    elif isinstance(margin, torch.Tensor):  # e.g. a scheduled margin kept on the device: no host read
        if margin.numel() != 1:
            raise ValueError(f"margin must be a number, a one-element tensor or have shape ({n},), "
                             f"got {tuple(margin.shape)}")
        margin = V.as_scalar_tensor("margin", margin, image_features, positive=False)
    else:
        margin = V.check_positive_float("margin", margin, allow_zero=True)
    labels = V.check_labels(labels, n, text_features.shape[0], image_features, diagonal_as_none=True)
    if reduction == "mean" and not hardest and text_features.shape[0] == 1:
        raise ValueError("max_margin_loss with reduction='mean' averages the hinge over the negatives, and with one "
                         "text (M = 1) there are none (the mean would be 0/0 = NaN): use reduction='sum' or "
                         "hardest=True, or a batch with at least 2 texts")
    V.check_finite(image_features=image_features, text_features=text_features)
    impl = resolve("max_margin", backend, image_features.device, n * text_features.shape[0],
                      image_features.dtype)
    labels, bad = V.labels_guard(labels, text_features.shape[0])
    # the fused hinges' [z]_+ tests z > 0, false for NaN: a NaN feature or margin would vanish into a finite loss
    nonfinite = V.nonfinite_flag(image_features, text_features, margin)
    # a margin tensor that requires grad gets its gradient (the number of active hinges over the count)
    return V.poison(impl(image_features, text_features, margin, labels, bool(hardest), bool(normalize), reduction),
                    bad, nonfinite)


def mmts_temperature(
    cluster_sizes: torch.Tensor,
    step,
    total_steps: int,
    c_min: float,
    c_max: float,
    alpha: float = 0.08,
    num_oscillations: int = 5,
    s_min: float = 0.05,
    s_max: float = 0.20,
) -> torch.Tensor:
    """MM-TS per-sample temperature τ_i(t) = (α/2)·cos(2πt/P) + sh(c_i), P = total_steps / num_oscillations,
    sh(c) = (c − c_min)/(c_max − c_min)·(s_max − s_min) + s_min (the authors' code, SergShel/MM-TS).

    cluster_sizes (N,): the dataset-wide size of each sample's cluster (:mod:`fastcontrast.clusters` makes
    them); c_min, c_max: the smallest and largest cluster size of the dataset. Defaults are the paper's.
    Returns (N,) float32 (float64 for float64 sizes), no gradient; use the same τ for both directions
    (:func:`adaptive_temperature_clip_loss`) or as the margin (:func:`max_margin_loss`).
    """
    from .losses.temperature import mmts_temperature as _mmts

    sizes = V.check_cluster_sizes("cluster_sizes", cluster_sizes)
    total_steps = V.check_positive_int("total_steps", total_steps)
    num_oscillations = V.check_positive_int("num_oscillations", num_oscillations)
    if total_steps < num_oscillations:
        raise ValueError(f"total_steps ({total_steps}) must be at least num_oscillations ({num_oscillations}): "
                         "the period total_steps / num_oscillations would be 0")
    V.check_step("step", step, total_steps)
    c_min, c_max = V.check_positive_float("c_min", c_min), V.check_positive_float("c_max", c_max)
    if c_max <= c_min:
        raise ValueError(f"c_max must exceed c_min (the dataset's largest and smallest cluster sizes), got "
                         f"c_min={c_min}, c_max={c_max}")
    alpha = V.check_positive_float("alpha", alpha, allow_zero=True)
    s_min, s_max = V.check_positive_float("s_min", s_min), V.check_positive_float("s_max", s_max)
    if V.debug_enabled():
        lo, hi = float(sizes.min()), float(sizes.max())
        if lo < c_min or hi > c_max:
            raise ValueError(f"cluster_sizes must lie in [c_min, c_max] = [{c_min}, {c_max}], got [{lo}, {hi}]")
    with torch.no_grad():
        return _mmts(sizes, step, total_steps, c_min, c_max, alpha, num_oscillations, s_min, s_max)


@autocast_aware("features")
def density_temperature(
    features: torch.Tensor,
    tau: float,
    tau_min: float,
    tau_max: float,
    k: int = 8,
    backend: str = "auto",
) -> torch.Tensor:
    """Per-sample temperature from local density (MM-TS): dense samples get a higher τ, sparse ones a lower τ.

    density_i = mean cosine similarity to the k nearest neighbours in the batch (same modality); mapped
    monotonically into [tau_min, tau_max] with the batch-mean density at ``tau`` (e.g. a scheduled τ(t)).
    features (N, D) -> (N,) without gradient.
    """
    V.check_features("features", features, 2)
    n = features.shape[0]
    if n < 2:
        raise ValueError(f"features needs at least 2 samples to define neighbours, got {n}")
    k = V.check_positive_int("k", k)
    if k > n - 1:
        raise ValueError(f"k must be at most N - 1 = {n - 1} (neighbours exclude the sample itself), got {k}")
    tau_min, tau, tau_max = (V.check_positive_float(nm, v) for nm, v in
                             (("tau_min", tau_min), ("tau", tau), ("tau_max", tau_max)))
    if not tau_min <= tau <= tau_max:
        raise ValueError(f"need tau_min <= tau <= tau_max, got {tau_min}, {tau}, {tau_max}")
    V.check_finite(features=features)
    impl = resolve("density", backend, features.device, n * n, features.dtype)
    with torch.no_grad():
        return density_to_temperature(impl(features, k), tau, tau_min, tau_max).to(
            features.dtype if features.dtype == torch.float64 else torch.float32)


@autocast_aware("scores")
def sinkhorn(scores: torch.Tensor, epsilon: float = 0.05, n_iters: int = 3, backend: str = "auto") -> torch.Tensor:
    """Sinkhorn–Knopp in log space: scores (N, K) -> Q (N, K), rows sum to 1, columns to N/K. No gradient."""
    V.check_features("scores", scores, 2)
    epsilon = V.check_positive_float("epsilon", epsilon)
    n_iters = V.check_positive_int("n_iters", n_iters)
    V.check_finite(scores=scores)
    impl = resolve("sinkhorn", backend, scores.device, scores.numel(), scores.dtype)
    return impl(scores.detach(), epsilon, n_iters)


def _check_queue(name: str, queue, like: torch.Tensor):
    if queue is None:
        return None
    if not isinstance(queue, torch.Tensor) or queue.dim() != 2:
        raise ValueError(f"{name} must be a 2-D tensor (Q, {like.shape[1]}) of earlier teacher features")
    if queue.shape[1] != like.shape[1]:
        raise ValueError(f"{name} must have shape (Q, {like.shape[1]}) like the features, got {tuple(queue.shape)}")
    if queue.device != like.device:
        raise ValueError(f"{name} is on {queue.device} but the features are on {like.device}")
    if queue.dtype != like.dtype:
        raise TypeError(f"{name} is {queue.dtype} but the features are {like.dtype}; both must have one dtype")
    return queue.detach() if queue.shape[0] else None  # an empty queue (the first steps) adds nothing


def _global_sinkhorn(group) -> bool:
    """Whether one Sinkhorn normalises the batches of ``group``'s ranks together (None: the world)."""
    import torch.distributed as dist

    if group is False or not (dist.is_available() and dist.is_initialized()):
        return False
    return dist.get_world_size(group) > 1


@autocast_aware("image_features", "text_features", "teacher_image_features", "teacher_text_features", "codebook",
                "queue_image", "queue_text")
def codebook_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    teacher_image_features: torch.Tensor,
    teacher_text_features: torch.Tensor,
    codebook: torch.Tensor,
    tau: float = 0.1,
    epsilon: float = 0.05,
    n_iters: int = 3,
    normalize_features: bool = True,
    normalize_codes: bool = True,
    return_stats: bool = False,
    reduction: str = "mean",
    queue_image: Optional[torch.Tensor] = None,
    queue_text: Optional[torch.Tensor] = None,
    sinkhorn_group=None,
    backend: str = "auto",
):
    """CODIS swapped prediction (SwAV's form): ½[−Σ_k Q_txt(k) log P_img(k) − Σ_k Q_img(k) log P_txt(k)], mean over
    the batch (``reduction="sum"`` adds the two directions instead of averaging them).

    Student features (N, D) give P = softmax(⟨ẑ, ĉ_k⟩/τ) over the codebook (K, D); teacher features (N, D) give
    Sinkhorn targets Q (no gradient). ``queue_image``/``queue_text`` (Q, D): earlier batches' teacher features
    that take part in the Sinkhorn normalisation (SwAV's queue; targets are kept for the batch only). Under
    torch.distributed the Sinkhorn normalises over the global batch, its column sums all-reduced (SwAV's
    ``distributed_sinkhorn``): ``sinkhorn_group`` picks the group (default: the world; False: this process only).
    Defaults are SwAV's (τ = 0.1, ε = 0.05, 3 iterations). ``return_stats`` adds code usage and dead codes (a host
    read). Instance-level terms: :func:`momentum_contrastive_loss`, or :class:`CodisLoss` for the whole objective.
    """
    names = ("image_features", "text_features", "teacher_image_features", "teacher_text_features")
    feats = (image_features, text_features, teacher_image_features, teacher_text_features)
    for nm, f in zip(names, feats):
        V.check_features(nm, f, 2)
    for nm, f in zip(names[1:], feats[1:]):
        V.check_pair("image_features", image_features, nm, f, same_batch=True)
    V.check_features("codebook", codebook, 2)
    if codebook.shape[1] != image_features.shape[1]:
        raise ValueError(f"codebook must have shape (K, {image_features.shape[1]}), got {tuple(codebook.shape)}")
    if codebook.device != image_features.device:
        raise ValueError(f"codebook is on {codebook.device} but the features are on {image_features.device}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' (SwAV) or 'sum', got {reduction!r}")
    queue_image = _check_queue("queue_image", queue_image, teacher_image_features)
    queue_text = _check_queue("queue_text", queue_text, teacher_text_features)
    tau = V.check_positive_float("tau", tau)
    epsilon = V.check_positive_float("epsilon", epsilon)
    n_iters = V.check_positive_int("n_iters", n_iters)
    V.check_finite(**dict(zip(names, feats)), codebook=codebook)
    dev = image_features.device
    size = image_features.shape[0] * codebook.shape[0]
    ce = resolve("swapped_prediction", backend, dev, size, image_features.dtype)
    nf, nc = bool(normalize_features), bool(normalize_codes)
    if not _global_sinkhorn(sinkhorn_group):
        sk = resolve("sinkhorn", backend, dev, size, teacher_image_features.dtype)
    else:
        from .distributed import distributed_sinkhorn

        def sk(scores, eps, iters):
            return distributed_sinkhorn(scores, eps, iters, sinkhorn_group)
    n = image_features.shape[0]

    def targets(teacher, queue):
        rows = teacher if queue is None else torch.cat([queue, teacher.detach()])
        return sk(teacher_scores(rows, codebook, nf, nc), epsilon, n_iters)[-n:]

    q_img, q_txt = targets(teacher_image_features, queue_image), targets(teacher_text_features, queue_text)
    loss = ce(image_features, q_txt, codebook, tau, nf, nc) + ce(text_features, q_img, codebook, tau, nf, nc)
    if reduction == "mean":
        loss = loss / 2
    if not return_stats:
        return loss
    usage = torch.bincount(torch.cat([q_img.argmax(1), q_txt.argmax(1)]), minlength=codebook.shape[0])
    return loss, {"code_usage": usage, "dead_codes": int((usage == 0).sum()), "perplexity": _perplexity(usage)}


@autocast_aware("query", "keys", "teacher_query", "queue")
def momentum_contrastive_loss(
    query: torch.Tensor,
    keys: torch.Tensor,
    teacher_query: Optional[torch.Tensor] = None,
    queue: Optional[torch.Tensor] = None,
    logit_scale: Scalar = 1 / 0.07,
    alpha: float = 0.4,
    normalize: bool = True,
    backend: str = "auto",
) -> torch.Tensor:
    """Contrastive loss against a momentum teacher with momentum distillation (ALBEF's ITC, one direction):
    −mean_i Σ_j T_ij log softmax_j(s·⟨q̂_i, k̂_j⟩), k = [keys; queue], T = α·softmax_j(s·⟨t̂_i, k̂_j⟩) + (1−α)·onehot(i).

    query (N, D): student features (gradient); keys (N, D): the teacher's features of the other modality
    (image→text) or of the same one (CODIS's intra-modal term), key i the positive of query i; queue (Q, D):
    earlier teacher keys (extra negatives); teacher_query (N, D): the teacher's features of the query side,
    required when α > 0. ``logit_scale`` s = 1/temperature (ALBEF learns it from 1/0.07). The fused backends never
    build the N×(N+Q) matrix: lse tiled, the soft-target term as V = softmax(s·t̂K̂ᵀ)K̂ in row blocks.
    """
    V.check_features("query", query, 2)
    V.check_features("keys", keys, 2)
    V.check_pair("query", query, "keys", keys, same_batch=True)
    if teacher_query is not None:
        V.check_features("teacher_query", teacher_query, 2)
        V.check_pair("query", query, "teacher_query", teacher_query, same_batch=True)
    queue = _check_queue("queue", queue, keys)
    alpha = V.check_positive_float("alpha", alpha, allow_zero=True)
    if alpha > 1:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    if alpha > 0 and teacher_query is None:
        raise ValueError("teacher_query is required when alpha > 0 (the momentum teacher's soft targets)")
    scale = V.as_scalar_tensor("logit_scale", logit_scale, query)
    V.check_finite(query=query, keys=keys, teacher_query=teacher_query, queue=queue)
    impl = resolve("momentum_contrastive", backend, query.device,
                      query.shape[0] * (keys.shape[0] + (0 if queue is None else queue.shape[0])), query.dtype)
    return impl(query, keys.detach(), None if teacher_query is None else teacher_query.detach(), queue, scale,
                alpha, bool(normalize))


@autocast_aware("image_features", "text_features", "teacher_image_features", "teacher_text_features")
def distill_clip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: Scalar,
    teacher_image_features: torch.Tensor,
    teacher_text_features: torch.Tensor,
    teacher_logit_scale: Scalar,
    backend: str = "auto",
):
    """open_clip's ``DistillClipLoss`` terms: (contrastive, distill) with L = s·XYᵀ, L^T = t·X^T Y^Tᵀ,
    contrastive = ½[CE(L, diag) + CE(Lᵀ, diag)], distill = ½[−mean_i Σ_j softmax(L^T)_ij log softmax(L)_ij + the
    same over columns].

    Student features (N, D) as given (open_clip does not normalise here); teacher features (N, Dt), Dt may differ
    from D; ``logit_scale`` / ``teacher_logit_scale`` are the multipliers. The teacher gets no gradient. The fused
    backends never build an N×N matrix: the distillation term is lse_i − s·⟨x_i, Σ_j P^T_ij y_j⟩ per row.
    """
    _check_image_text(image_features, text_features)
    V.check_features("teacher_image_features", teacher_image_features, 2)
    V.check_features("teacher_text_features", teacher_text_features, 2)
    V.check_pair("teacher_image_features", teacher_image_features, "teacher_text_features", teacher_text_features)
    n = image_features.shape[0]
    if text_features.shape[0] != n:
        raise ValueError(f"distill_clip_loss pairs image i with text i: batches must match, got {n} rows in "
                         f"image_features and {text_features.shape[0]} in text_features")
    for nm, t in (("teacher_image_features", teacher_image_features),
                  ("teacher_text_features", teacher_text_features)):
        if t.shape[0] != n:
            raise ValueError(f"{nm} must have the student's batch ({n} rows), got {t.shape[0]}")
        if t.device != image_features.device:
            raise ValueError(f"{nm} is on {t.device} but the student features are on {image_features.device}")
    scale = V.as_scalar_tensor("logit_scale", logit_scale, image_features)
    t_scale = V.as_scalar_tensor("teacher_logit_scale", teacher_logit_scale, image_features).detach()
    V.check_finite(image_features=image_features, text_features=text_features,
                   teacher_image_features=teacher_image_features, teacher_text_features=teacher_text_features)
    impl = resolve("distill", backend, image_features.device, n * n, image_features.dtype)
    ti, tt = teacher_image_features.detach(), teacher_text_features.detach()
    return impl(image_features, text_features, scale, ti, tt, t_scale, 0, image_features, text_features, ti, tt)


def _perplexity(usage: torch.Tensor) -> float:
    p = usage.double() / usage.sum().clamp(min=1)
    return float(torch.exp(-(p * torch.log(p.clamp(min=1e-12))).sum()))


__all__ = [
    "clip_loss", "siglip_loss", "oblique_clip_loss", "adaptive_temperature_clip_loss", "max_margin_loss",
    "density_temperature", "mmts_temperature", "sinkhorn", "codebook_loss", "momentum_contrastive_loss",
    "cosine_schedule", "distill_clip_loss", "lse_rows", "matryoshka_ce_rows", "matryoshka_clip_loss",
]
