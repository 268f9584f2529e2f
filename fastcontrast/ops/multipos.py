"""Multiple positives per row from group ids (UniCL's soft targets), with O((N+M)·D) memory on every backend.

Images and texts with equal ids are positives. Row i's target is uniform over its positives
P(i) = {j : t_j = u_i} (UniCL, Yang et al. CVPR 2022, eqs. 2-3); each direction is normalised over its own:

    ℓ_i = −(1/|P(i)|) Σ_{j∈P(i)} log softmax_j(a_i S_ij + b) = lse_i − b − a_i·⟨x̂_i, mean_{j∈P(i)} ŷ_j⟩

The target term is linear in S, so it needs only the per-group sums of the other side's features: the ids are
sorted, each key's group is the first index of its id in the sorted ids (``searchsorted``; no ``unique``, no host
sync), sums and counts are one ``index_add`` each, a query finds its group by one more ``searchsorted``. No N×M
mask exists. The lse comes from the backend's own op (``lse_pair`` tiled on triton/cpu/cuda; materialised on
dense/reference).

A row with no positive at all (its id on no row of the other side, e.g. in a ragged batch) has an empty target:
its cross-entropy is 0, and it still counts in the mean over the N (or M) rows, so the mean over ranks of the
local losses equals the loss of the global batch.
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _tiles as T


def group_means(query_ids: Tensor, key_ids: Tensor, keys: Tensor) -> Tuple[Tensor, Tensor]:
    """(mean (Nq, D), has (Nq,) bool): for each query, the mean of the keys whose id equals its id (0 where none).

    query_ids (Nq,), key_ids (M,) integers; keys (M, D), differentiable. O((Nq + M)·D), no host sync."""
    m = key_ids.shape[0]
    sorted_ids, _ = torch.sort(key_ids)
    group = torch.searchsorted(sorted_ids, key_ids)  # first occurrence: one canonical slot per distinct id
    sums = keys.new_zeros(m, keys.shape[1]).index_add(0, group, keys)
    counts = keys.new_zeros(m).index_add(0, group, torch.ones_like(keys[:, 0]))
    slot = torch.searchsorted(sorted_ids, query_ids).clamp_max(m - 1)
    has = sorted_ids[slot] == query_ids
    scale = torch.where(has, 1.0 / counts[slot].clamp_min(1), torch.zeros_like(counts[slot]))
    return sums[slot] * scale[:, None], has


def _hat(t: Tensor, normalize: bool, tokens: int) -> Tensor:
    acc = T.acc_dtype(t)
    return T.apply_tokens(t, T.inv_token_norms(t, tokens)) if normalize else t.to(acc)


def _materialised_lse(xh, yh, a, c, b):
    s = xh @ yh.T
    return torch.logsumexp(a[:, None] * s + b, dim=1), torch.logsumexp(c[None, :] * s + b, dim=0)


def _lse(backend: str, x, y, a, c, b, normalize, tokens, xh, yh):
    if backend in ("triton", "cpu", "cuda"):
        from .infonce.function import lse_pair

        return lse_pair(x, y, a, c, b, normalize, tokens, backend)
    return _materialised_lse(xh, yh, a, c, b)


def infonce_ids(backend: str, x: Tensor, y: Tensor, a: Tensor, c: Tensor, bias, image_ids: Tensor,
                text_ids: Tensor, normalize: bool, tokens: int) -> Tensor:
    """½[mean_i ℓ^{i→t}_i + mean_j ℓ^{t→i}_j] with positives from ids; x (N, D), y (M, D), a (N,), c (M,)."""
    if backend == "reference":
        return infonce_ids_reference(x, y, a, c, bias, image_ids, text_ids, normalize, tokens)
    acc = T.acc_dtype(x)
    b = torch.zeros((), device=x.device, dtype=acc) if bias is None else bias.to(acc)
    a, c = a.to(acc), c.to(acc)
    xh, yh = _hat(x, normalize, tokens), _hat(y, normalize, tokens)
    lse_r, lse_c = _lse(backend, x, y, a, c, b, normalize, tokens, xh, yh)
    y_bar, has_r = group_means(image_ids, text_ids, yh)
    x_bar, has_c = group_means(text_ids, image_ids, xh)
    row = torch.where(has_r, lse_r - b - a * (xh * y_bar).sum(dim=1), torch.zeros_like(lse_r))
    col = torch.where(has_c, lse_c - b - c * (yh * x_bar).sum(dim=1), torch.zeros_like(lse_c))
    return 0.5 * (row.mean() + col.mean())


def ce_rows_ids(backend: str, q: Tensor, k: Tensor, scale: Tensor, bias, q_ids: Tensor, k_ids: Tensor) -> Tensor:
    """One direction: mean_i ℓ_i of rows q (N, D) against keys k (M, D) (open_clip's local_loss form)."""
    acc = T.acc_dtype(q)
    b = torch.zeros((), device=q.device, dtype=acc) if bias is None else bias.to(acc)
    s = scale.to(acc)
    qh, kh = q.to(acc), k.to(acc)
    if backend in ("triton", "cpu", "cuda"):
        from .infonce.function import lse_pair

        lse, _ = lse_pair(q, k, s.expand(q.shape[0]), s.expand(k.shape[0]), b, False, 1, backend)
    else:
        lse = torch.logsumexp(s * qh @ kh.T + b, dim=1)
    k_bar, has = group_means(q_ids, k_ids, kh)
    return torch.where(has, lse - b - s * (qh * k_bar).sum(dim=1), torch.zeros_like(lse)).mean()


def infonce_ids_reference(x, y, a, c, bias, image_ids, text_ids, normalize=False, tokens=1):
    """Readable ground truth: the N×M positive mask, targets normalised per row (and per column), soft CE."""
    acc = T.acc_dtype(x)
    x, y = x.to(acc), y.to(acc)
    if normalize:
        n, m = x.shape[0], y.shape[0]
        x = F.normalize(x.reshape(n, tokens, -1), dim=-1).reshape(n, -1)
        y = F.normalize(y.reshape(m, tokens, -1), dim=-1).reshape(m, -1)
    s = x @ y.T
    b = 0.0 if bias is None else bias.to(acc)
    mask = (image_ids[:, None] == text_ids[None, :]).to(acc)
    t_row = mask / mask.sum(dim=1, keepdim=True).clamp_min(1)
    t_col = mask / mask.sum(dim=0, keepdim=True).clamp_min(1)
    row = -(t_row * torch.log_softmax(a.to(acc)[:, None] * s + b, dim=1)).sum(dim=1)
    col = -(t_col * torch.log_softmax(c.to(acc)[None, :] * s + b, dim=0)).sum(dim=0)
    return 0.5 * (row.mean() + col.mean())


def check_ids(image_ids, text_ids, n: int, m: int, like: Tensor, labels=None):
    """Both or neither; integer (N,) and (M,) on the features' device; not together with labels."""
    if image_ids is None and text_ids is None:
        return None, None
    if image_ids is None or text_ids is None:
        missing = "image_ids" if image_ids is None else "text_ids"
        raise ValueError(f"{missing} is required when the other side's ids are given (pairs with equal ids are "
                         "positives)")
    if labels is not None:
        raise ValueError("pass either labels (one positive per image) or image_ids/text_ids (groups), not both")
    out = []
    for name, ids, length in (("image_ids", image_ids, n), ("text_ids", text_ids, m)):
        if not isinstance(ids, Tensor):
            raise TypeError(f"{name} must be an integer torch.Tensor of shape ({length},), got {type(ids).__name__}")
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise TypeError(f"{name} must be an integer tensor, got {ids.dtype}")
        if ids.shape != (length,):
            raise ValueError(f"{name} must have shape ({length},), got {tuple(ids.shape)}")
        if ids.device != like.device:
            raise ValueError(f"{name} is on {ids.device} but the features are on {like.device}")
        out.append(ids.long())
    return out[0], out[1]
