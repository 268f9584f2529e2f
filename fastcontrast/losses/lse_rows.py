"""The masked row log-sum-exp (``lse_rows``): one direction of an InfoNCE with hard-negative columns, the
false-negative masks and the hardness penalty of sentence-transformers 6.2.0, on every backend.

    lse_i = log Σ_{j kept} exp(s·S_ij + pen_ij),   S = q kᵀ (cosine when ``normalize``), s = ``logit_scale``,

column j is dropped from row i when

* ``exclude_same`` and G_ij = [row_ids_i == col_ids_j] (the same group: MNRL's query_to_query self-exclusion
  with row_ids = global row index and col_ids = arange, doc_to_doc's same-query documents with col_ids = arange
  tiled over the document blocks; a false-negative mask from group ids), or
* a guide is given and ⟨gq_i, gk_j⟩ > guide_threshold_i (GISTEmbed, Solatorio 2024, arXiv:2402.16829, as
  sentence-transformers' ``GISTEmbedLoss.mask_false_negatives``: the threshold is the guide's positive score
  minus the margin, computed outside in O(N·d)),

but never when j == keep_i (row i's positive). The hardness penalty pen_ij = α·sg(S_ij) is added where (i, j)'s
cell is selected: "same"/"other" by G, "hard"/"inbatch" by ``hard_cols[j]`` (sentence-transformers'
``MultipleNegativesRankingLoss.hardness_mode``: "in_batch_negatives" = {other_inbatch, other_hard} (Lan et al.
2025, eq. 5), "hard_negatives" = {same_hard} (EmbeddingGemma), "all_negatives" = {same_hard, other_inbatch,
other_hard}); sg is a stop-gradient: the gradient flows through s·S only. A row with every column dropped gives
-inf (torch.logsumexp over -inf) and a zero gradient.

Dispatcher op ``lse_rows``: the reference below (materialised, each rule an explicit N×M matrix), ``dense``
(materialised: the kernels' mask rule, ``primitives.lse_masked.block_logits``, on one block, autograd's
gradient) and the fused backends on ``fastcontrast::lse_masked`` (Triton; the PyTorch tiles where the C++/CUDA
kernels of csrc/ lack the masks) or, for a call without masks on csrc's backends, ``fastcontrast::lse_pair``.
"""
from __future__ import annotations

from typing import Iterable, Optional, Union

import torch
from torch import Tensor

from .. import _validation as V
from .._amp import autocast_aware
from ..dispatch import register, register_fused, resolve
from ..primitives import lse_masked as LM
from ..primitives import lse_pair as LP
from ..primitives import tiles as T

CELLS = ("same_inbatch", "same_hard", "other_inbatch", "other_hard")


# ------------------------------------------------------------------------------------------------- checks
def _check_int_vector(name: str, t, length: int, like: Tensor) -> Optional[Tensor]:
    if t is None:
        return None
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be an int64 torch.Tensor of shape ({length},), got {type(t).__name__}")
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor (int64), got {t.dtype}")
    if tuple(t.shape) != (length,):
        raise ValueError(f"{name} must have shape ({length},), got {tuple(t.shape)}")
    if t.device != like.device:
        raise ValueError(f"{name} is on {t.device} but the features are on {like.device}")
    return t.long()


def check_cells(hardness_cells: Iterable[str]) -> frozenset:
    if isinstance(hardness_cells, str) or not isinstance(hardness_cells, Iterable):
        raise TypeError(f"hardness_cells must be a collection of cell names from {CELLS}, got {hardness_cells!r}")
    cells = frozenset(hardness_cells)
    unknown = sorted(c for c in cells if c not in CELLS)
    if unknown:
        raise ValueError(f"hardness_cells must be a subset of {CELLS}, got unknown {unknown}")
    return cells


def check_guide(names, guide_q, guide_k, threshold, n: int, m: int, like: Tensor):
    """(guide_q, guide_k, threshold) all or none; floating (N, Dg), (M, Dg) of one dtype, threshold (N,)."""
    given = [t is not None for t in (guide_q, guide_k, threshold)]
    if any(given) and not all(given):
        missing = [nm for nm, g in zip(names, given) if not g]
        raise ValueError(f"{', '.join(missing)} required: {names[0]}, {names[1]} and {names[2]} go together "
                         "(a guide drops (i, j) where its similarity exceeds row i's threshold)")
    if not all(given):
        return None, None, None
    for nm, t, rows in ((names[0], guide_q, n), (names[1], guide_k, m)):
        V.check_features(nm, t, 2)
        if t.shape[0] != rows:
            raise ValueError(f"{nm} must have {rows} rows, got shape {tuple(t.shape)}")
        if t.device != like.device:
            raise ValueError(f"{nm} is on {t.device} but the features are on {like.device}")
    if guide_q.shape[1] != guide_k.shape[1] or guide_q.dtype != guide_k.dtype:
        raise ValueError(f"{names[0]} {tuple(guide_q.shape)} {guide_q.dtype} and {names[1]} "
                         f"{tuple(guide_k.shape)} {guide_k.dtype} must share their width and dtype")
    threshold = V.check_vector(names[2], threshold, n, like, positive=False)
    return guide_q.detach(), guide_k.detach(), threshold.detach()


def check_args(queries, keys, logit_scale, normalize, keep, row_ids, col_ids, exclude_same, guide_queries,
               guide_keys, guide_threshold, hard_cols, hardness_strength, hardness_cells):
    """The public arguments of :func:`fastcontrast.functional.lse_rows`, checked (each error names its argument)
    and returned normalised: (queries, keys, scale, normalize, keep, row_ids, col_ids, exclude_same, gq, gk, thr,
    hard_cols, strength, cells)."""
    V.check_features("queries", queries, 2)
    V.check_features("keys", keys, 2)
    V.check_pair("queries", queries, "keys", keys)
    n, m = queries.shape[0], keys.shape[0]
    scale = V.as_scalar_tensor("logit_scale", logit_scale, queries, positive=False)
    if not isinstance(normalize, bool):
        raise TypeError(f"normalize must be a bool, got {type(normalize).__name__}")
    if not isinstance(exclude_same, bool):
        raise TypeError(f"exclude_same must be a bool, got {type(exclude_same).__name__}")
    keep = _check_int_vector("keep", keep, n, queries)
    if keep is not None and V.debug_enabled() and not torch.compiler.is_compiling():  # a host read: debug only
        lo, hi = int(keep.min()), int(keep.max())
        if lo < 0 or hi >= m:
            raise ValueError(f"keep must lie in [0, {m}), got values in [{lo}, {hi}]")
    if (row_ids is None) != (col_ids is None):
        raise ValueError(f"{'col_ids' if col_ids is None else 'row_ids'} is required when the other is given "
                         "(row_ids and col_ids define the same-group relation together)")
    row_ids, col_ids = _check_int_vector("row_ids", row_ids, n, queries), _check_int_vector("col_ids", col_ids, m,
                                                                                              queries)
    gq, gk, thr = check_guide(("guide_queries", "guide_keys", "guide_threshold"), guide_queries, guide_keys,
                              guide_threshold, n, m, queries)
    strength = V.check_positive_float("hardness_strength", hardness_strength, allow_zero=True)
    cells = check_cells(hardness_cells)
    if hard_cols is not None:
        if not isinstance(hard_cols, Tensor) or hard_cols.dtype != torch.bool:
            raise TypeError(f"hard_cols must be a bool tensor of shape ({m},), got "
                            f"{getattr(hard_cols, 'dtype', type(hard_cols).__name__)}")
        if tuple(hard_cols.shape) != (m,) or hard_cols.device != queries.device:
            raise ValueError(f"hard_cols must have shape ({m},) on {queries.device}, got {tuple(hard_cols.shape)} "
                             f"on {hard_cols.device}")
        if not cells:
            raise ValueError("hard_cols only selects hardness cells: pass hardness_cells (e.g. {'same_hard'}) with "
                             "it, or leave it None")
    if exclude_same and row_ids is None:
        raise ValueError("exclude_same=True needs row_ids and col_ids (the groups whose other members it drops)")
    if cells and row_ids is None:
        raise ValueError("hardness_cells select cells by group ('same'/'other'): pass row_ids and col_ids")
    if row_ids is not None and not exclude_same and not cells:
        raise ValueError("row_ids/col_ids given but unused: set exclude_same=True (drop same-group columns) or "
                         "hardness_cells (penalise by group)")
    V.check_finite(queries=queries, keys=keys, guide_queries=gq, guide_keys=gk, guide_threshold=thr)
    return (queries, keys, scale, normalize, keep, row_ids, col_ids, exclude_same, gq, gk, thr, hard_cols,
            strength, cells)


def needs(exclude_same, guide_queries, hardness_strength, hardness_cells) -> tuple:
    """What the call needs of the dispatcher (``fastcontrast.dispatch.NEEDS``): ("masks",) when anything is
    dropped or shifted."""
    masked = exclude_same or guide_queries is not None or (hardness_strength > 0 and bool(hardness_cells))
    return ("masks",) if masked else ()


# ----------------------------------------------------------------------------------------------- reference
def lse_rows_reference(queries, keys, logit_scale, normalize=False, keep=None, row_ids=None, col_ids=None,
                       exclude_same=False, guide_queries=None, guide_keys=None, guide_threshold=None,
                       hard_cols=None, hardness_strength=0.0, hardness_cells=()):
    """Readable ground truth: every rule an explicit N×M boolean matrix, torch.logsumexp over the kept logits."""
    acc = T.acc_dtype(queries)
    q, k = queries.to(acc), keys.to(acc)
    if normalize:
        q, k = T.l2_normalize(q), T.l2_normalize(k)
    s = q @ k.T  # N×M, what the fused kernels never hold
    n, m = s.shape
    cols = torch.arange(m, device=s.device)
    is_keep = torch.zeros(n, m, dtype=torch.bool, device=s.device) if keep is None else cols[None, :] == keep[:, None]
    same = torch.zeros(n, m, dtype=torch.bool, device=s.device)
    if row_ids is not None:
        same = row_ids[:, None] == col_ids[None, :]
    drop = torch.zeros(n, m, dtype=torch.bool, device=s.device)
    if exclude_same:
        drop = drop | same
    if guide_queries is not None:
        gacc = T.acc_dtype(guide_queries)
        gq, gk = guide_queries.to(gacc), guide_keys.to(gacc)
        if normalize:
            gq, gk = T.l2_normalize(gq), T.l2_normalize(gk)
        drop = drop | ((gq @ gk.T) > guide_threshold.to(gacc)[:, None])
    drop = drop & ~is_keep
    logits = logit_scale.to(acc) * s
    if hardness_strength > 0 and hardness_cells:
        hard = torch.zeros(m, dtype=torch.bool, device=s.device) if hard_cols is None else hard_cols
        hard = hard[None, :].expand(n, m)
        selected = torch.zeros(n, m, dtype=torch.bool, device=s.device)
        for cell, (in_g, is_hard) in {"same_inbatch": (True, False), "same_hard": (True, True),
                                      "other_inbatch": (False, False), "other_hard": (False, True)}.items():
            if cell in hardness_cells:
                selected = selected | ((same == in_g) & (hard == is_hard))
        logits = logits + hardness_strength * selected.to(acc) * s.detach()  # a value shift: no gradient
    return torch.logsumexp(logits.masked_fill(drop, float("-inf")), dim=1)


# ------------------------------------------------------------------------------------ dense and fused paths
def row_masks(m: int, keep, row_ids, col_ids, exclude_same, gq, gk, thr, normalize, hard_cols, strength, cells,
              acc: torch.dtype, device) -> LM.Masks:
    """The primitive's masks from the public arguments: the hardness cells become two (M,) coefficients,
    α·[cell selected] for same-group and other cells, by each column's hard flag."""
    pen_same = pen_other = None
    if strength > 0 and cells:
        hard = torch.zeros(m, dtype=torch.bool, device=device) if hard_cols is None else hard_cols

        def coef(in_hard: str, in_batch: str) -> Tensor:
            return torch.where(hard, strength * (in_hard in cells), strength * (in_batch in cells)).to(acc)

        pen_same, pen_other = coef("same_hard", "same_inbatch"), coef("other_hard", "other_inbatch")
    use_ids = exclude_same or pen_same is not None
    return LM.Masks(keep=keep, row_ids=row_ids if use_ids else None, col_ids=col_ids if use_ids else None,
                    exclude_same=exclude_same, guide_x=gq, guide_y=gk, guide_normalize=normalize, thr_r=thr,
                    pen_same=pen_same, pen_other=pen_other)


def lse_rows_dense(queries, keys, logit_scale, normalize=False, keep=None, row_ids=None, col_ids=None,
                   exclude_same=False, guide_queries=None, guide_keys=None, guide_threshold=None, hard_cols=None,
                   hardness_strength=0.0, hardness_cells=()):
    """Materialised: the kernels' mask rule (``lse_masked.block_logits``) on all rows at once, autograd."""
    acc = T.acc_dtype(queries)
    n, m = queries.shape[0], keys.shape[0]
    masks = row_masks(m, keep, row_ids, col_ids, exclude_same, guide_queries, guide_keys, guide_threshold,
                      normalize, hard_cols, hardness_strength, hardness_cells, acc, queries.device)
    q = T.l2_normalize(queries.to(acc)) if normalize else queries.to(acc)
    k = T.l2_normalize(keys.to(acc)) if normalize else keys.to(acc)
    gs = None
    if guide_queries is not None:
        gacc = T.acc_dtype(guide_queries)
        gq, gk = guide_queries.to(gacc), guide_keys.to(gacc)
        gs = (T.l2_normalize(gq) @ T.l2_normalize(gk).T) if normalize else gq @ gk.T
    scale = logit_scale.to(acc)
    zr, _ = LM.block_logits(q @ k.T, gs, slice(None), scale.expand(n), scale.expand(m), masks)
    return torch.logsumexp(zr, dim=1)


def lse_rows_fused(queries, keys, logit_scale, normalize=False, keep=None, row_ids=None, col_ids=None,
                   exclude_same=False, guide_queries=None, guide_keys=None, guide_threshold=None, hard_cols=None,
                   hardness_strength=0.0, hardness_cells=(), *, impl):
    """O((N+M)·D): ``fastcontrast::lse_masked`` (rows only) on the Triton kernels or the PyTorch tiles; a call
    without masks on a compiled kernel (triton, cpu, cuda) runs its ``fastcontrast::lse_pair`` and keeps the row
    lse."""
    acc = T.acc_dtype(queries)
    n, m = queries.shape[0], keys.shape[0]
    masks = row_masks(m, keep, row_ids, col_ids, exclude_same, guide_queries, guide_keys, guide_threshold,
                      normalize, hard_cols, hardness_strength, hardness_cells, acc, queries.device)
    scale = logit_scale.to(acc)
    a, c = scale.expand(n), scale.expand(m)
    if impl.kernel != "tiles" and not masks.any:
        zero = torch.zeros((), dtype=acc, device=queries.device)
        lse_r, _ = LP.bound(impl.kernel, impl.backward_kernel)(queries, keys, a, c, zero, normalize, 1)
        return lse_r
    # a masked call on csrc's backends never gets here with their kernels: the dispatcher gave it the tiles
    # (needs=("masks",)); lse_masked refuses any kernel it does not have
    lse_r, _ = LM.bound(impl.kernel, impl.backward_kernel, impl.backend)(queries, keys, a, c, normalize, masks)
    return lse_r


# ------------------------------------------------------------------------- the public function (functional.py)
@autocast_aware("queries", "keys")
def lse_rows(
    queries: Tensor,
    keys: Tensor,
    logit_scale: Union[float, Tensor],
    *,
    normalize: bool = False,
    keep: Optional[Tensor] = None,
    row_ids: Optional[Tensor] = None,
    col_ids: Optional[Tensor] = None,
    exclude_same: bool = False,
    guide_queries: Optional[Tensor] = None,
    guide_keys: Optional[Tensor] = None,
    guide_threshold: Optional[Tensor] = None,
    hard_cols: Optional[Tensor] = None,
    hardness_strength: float = 0.0,
    hardness_cells=(),
    backend: str = "auto",
) -> Tensor:
    """Masked row log-sum-exp: lse_i = log Σ_{j kept} exp(s·S_ij + pen_ij), S = q kᵀ (cosine when ``normalize``),
    with gradients to queries, keys and a tensor ``logit_scale``; O((N+M)·D) memory on the fused backends.

    queries (N, D), keys (M, D) -> (N,) float32 (float64 for float64 inputs). Column j is dropped from row i when
    ``exclude_same`` and row_ids_i == col_ids_j (``row_ids`` (N,), ``col_ids`` (M,) int64: the same group), or
    when ⟨gq_i, gk_j⟩ > guide_threshold_i (``guide_queries`` (N, Dg), ``guide_keys`` (M, Dg), ``guide_threshold``
    (N,): GISTEmbed's false-negative rule; the guides L2-normalised when ``normalize``, no gradient) — but never
    when j == keep_i (``keep`` (N,) int64: row i's positive column). ``hard_cols`` (M,) bool marks explicit
    hard-negative columns; ``hardness_strength`` α adds α·sg(S_ij) to the logit of (i, j) when its cell is in
    ``hardness_cells`` ⊆ {"same_inbatch", "same_hard", "other_inbatch", "other_hard"} ("same": row_ids_i ==
    col_ids_j, "hard": hard_cols[j]); a value shift only (sentence-transformers 6.2.0's hardness_mode). A row
    with every column dropped gives -inf. Math and sources: docs/math.md, fastcontrast/losses/lse_rows.py.
    """
    args = check_args(queries, keys, logit_scale, normalize, keep, row_ids, col_ids, exclude_same, guide_queries,
                      guide_keys, guide_threshold, hard_cols, hardness_strength, hardness_cells)
    n, m = queries.shape[0], keys.shape[0]
    keep, bad = V.labels_guard(args[4], m)  # a keep outside [0, M): NaN, not a silently dropped positive
    args = args[:4] + (keep,) + args[5:]
    impl = resolve("lse_rows", backend, queries.device, n * m, queries.dtype,
                   needs=needs(args[7], args[8], args[12], args[13]))
    # a NaN guide score compares False (nothing dropped): a NaN guide poisons the result instead of vanishing
    return V.poison(impl(*args), bad, V.nonfinite_flag(*args[8:11]))


register("lse_rows", "reference")(lse_rows_reference)
register("lse_rows", "dense")(lse_rows_dense)
# csrc's kernels (cpu, cuda) have no masks: a masked call on those backends runs the PyTorch tiles (dispatch)
register_fused("lse_rows", lse_rows_fused, csrc_lacks=("masks",))
