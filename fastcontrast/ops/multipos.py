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
from ._tiles import l2_normalize


def group_sums(query_ids: Tensor, key_ids: Tensor, keys: Tensor) -> Tuple[Tensor, Tensor]:
    """(sums (Nq, D), counts (Nq,)): for each query, the sum and number of the keys whose id equals its id.

    query_ids (Nq,), key_ids (M,) integers; keys (M, D), differentiable. O((Nq + M)·D), no host sync."""
    m = key_ids.shape[0]
    sorted_ids, _ = torch.sort(key_ids)
    group = torch.searchsorted(sorted_ids, key_ids)  # first occurrence: one canonical slot per distinct id
    sums = keys.new_zeros(m, keys.shape[1]).index_add(0, group, keys)
    counts = keys.new_zeros(m).index_add(0, group, torch.ones_like(keys[:, 0]))
    slot = torch.searchsorted(sorted_ids, query_ids).clamp_max(m - 1)
    has = (sorted_ids[slot] == query_ids).to(keys.dtype)
    return sums[slot] * has[:, None], counts[slot] * has


def group_means(query_ids: Tensor, key_ids: Tensor, keys: Tensor) -> Tuple[Tensor, Tensor]:
    """(mean (Nq, D), has (Nq,) bool): for each query, the mean of the keys whose id equals its id (0 where none)."""
    sums, counts = group_sums(query_ids, key_ids, keys)
    return sums / counts.clamp_min(1)[:, None], counts > 0


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
        x = l2_normalize(x.reshape(n, tokens, -1), dim=-1).reshape(n, -1)
        y = l2_normalize(y.reshape(m, tokens, -1), dim=-1).reshape(m, -1)
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


# ------------------------------------------------------------------------------------------------ SigLIP
# −log σ(z·u) is softplus(u) for a negative and softplus(u) − u for a positive, u = s·S + b, so
#     Σ_neg softplus(u) + Σ_pos w·(softplus(u) − u) = Σ_all softplus(u) + Σ_pos [(w − 1)·softplus(u) − w·u]:
# the all-pairs term is the siglip op with negative_only=True; w = 1 ("none") leaves a linear correction (group
# sums); SigLIP+'s w_ij = ½(1/k_i + 1/k'_j) ("inverse_count") adds a non-linear term over the positive pairs,
# computed here in row blocks with the ids' mask made per block (never N×M), recomputed in backward.


class _PositiveSoftplus(torch.autograd.Function):
    """Σ_{pairs with equal ids} (w_ij − 1)·softplus(s⟨x_i, y_j⟩ + b), w_ij = ½(r_i + c_j); gradients to x, y, s, b."""

    @staticmethod
    def forward(ctx, x, y, s, b, iid, tid, r, c):
        acc = T.acc_dtype(x)
        xa, ya = x.to(acc), y.to(acc)
        total = torch.zeros((), dtype=acc, device=x.device)
        step = T.rows_per_block(x.shape[0], y.shape[0], torch.finfo(acc).bits // 8)
        for i0 in range(0, x.shape[0], step):
            sl = slice(i0, i0 + step)
            u = s * (xa[sl] @ ya.T) + b
            coef = torch.where(iid[sl, None] == tid[None, :], 0.5 * (r[sl, None] + c[None, :]) - 1, 0.0)
            total = total + (coef * F.softplus(u)).sum()
        ctx.save_for_backward(x, y, s, b, iid, tid, r, c)
        return total

    @staticmethod
    def backward(ctx, g):
        x, y, s, b, iid, tid, r, c = ctx.saved_tensors
        acc = T.acc_dtype(x)
        xa, ya = x.to(acc), y.to(acc)
        dx, dy = torch.empty_like(xa), torch.zeros_like(ya)
        ds, db = torch.zeros((), dtype=acc, device=x.device), torch.zeros((), dtype=acc, device=x.device)
        step = T.rows_per_block(x.shape[0], y.shape[0], torch.finfo(acc).bits // 8)
        for i0 in range(0, x.shape[0], step):
            sl = slice(i0, i0 + step)
            sim = xa[sl] @ ya.T
            coef = torch.where(iid[sl, None] == tid[None, :], 0.5 * (r[sl, None] + c[None, :]) - 1, 0.0)
            gu = g * coef * torch.sigmoid(s * sim + b)  # d/du of the block's sum
            dx[sl] = s * (gu @ ya)
            dy += s * (gu.T @ xa[sl])
            ds += (gu * sim).sum()
            db += gu.sum()
        return dx.to(x.dtype), dy.to(y.dtype), ds.to(s.dtype), db.to(b.dtype), None, None, None, None


def siglip_ids(impl, x: Tensor, y: Tensor, scale: Tensor, bias, image_ids: Tensor, text_ids: Tensor,
               weighting: str, count_image_ids=None) -> Tensor:
    """(1/N)[Σ_neg softplus(u_ij) + Σ_pos w_ij·softplus(−u_ij)], u = s⟨x_i, y_j⟩ + b, positives where ids are
    equal; w = 1 ("none") or ½(1/k_i + 1/k'_j) ("inverse_count", SigLIP+). ``impl``: the backend's siglip op.
    ``count_image_ids``: the ids whose images k'_j counts (every rank's, when x holds one rank's rows)."""
    acc = T.acc_dtype(x)
    n = x.shape[0]
    s = scale.to(acc)
    b = torch.zeros((), device=x.device, dtype=acc) if bias is None else bias.to(acc)
    every = impl(x, y, scale, bias, None, True)  # (1/N) Σ_all softplus(u): the op, every pair a negative
    xa, ya = x.to(acc), y.to(acc)
    y_sum, k_row = group_sums(image_ids, text_ids, ya)  # Σ_{j∈P(i)} y_j, k_i
    if weighting == "none":
        return every - (s * (xa * y_sum).sum() + b * k_row.sum()) / n
    x_sum, k_col = group_sums(text_ids, image_ids, xa)
    if count_image_ids is not None:
        _, k_col_all = group_sums(text_ids, count_image_ids, torch.ones_like(count_image_ids, dtype=acc)[:, None])
    else:
        k_col_all = k_col
    r, c = 1.0 / k_row.clamp_min(1), 1.0 / k_col_all.clamp_min(1)
    linear = 0.5 * ((r * (s * (xa * y_sum).sum(dim=1) + b * k_row)).sum()
                    + (c * (s * (ya * x_sum).sum(dim=1) + b * k_col)).sum())
    nonlinear = _PositiveSoftplus.apply(x, y, s, b, image_ids, text_ids, r.detach(), c.detach())
    return every + (nonlinear - linear) / n


def siglip_ids_reference(x, y, scale, bias, image_ids, text_ids, weighting="none"):
    """Materialised: −(1/N) Σ_ij v_ij log σ(z_ij u_ij), z = +1 where ids are equal, v = 1 on negatives and w on
    positives (w = 1, or ½(1/k_i + 1/k'_j) with k the row/column positive counts)."""
    acc = T.acc_dtype(x)
    u = scale.to(acc) * (x.to(acc) @ y.to(acc).T)
    if bias is not None:
        u = u + bias.to(acc)
    pos = image_ids[:, None] == text_ids[None, :]
    z = torch.where(pos, 1.0, -1.0).to(acc)
    v = torch.ones_like(u)
    if weighting == "inverse_count":
        k_r = pos.sum(dim=1, keepdim=True).clamp_min(1).to(acc)
        k_c = pos.sum(dim=0, keepdim=True).clamp_min(1).to(acc)
        v = torch.where(pos, 0.5 * (1 / k_r + 1 / k_c), v)
    return -(v * F.logsigmoid(z * u)).sum() / x.shape[0]
