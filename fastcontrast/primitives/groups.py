"""Per-group sums by id, with O((N+M)·D) memory and no host sync: the building block of multiple positives
(UniCL's targets, SigLIP's group positives) on every backend and in the rings.

The ids are sorted, each key's group is the first index of its id in the sorted ids (``searchsorted``; no
``unique``, no host sync), sums and counts are one ``index_add`` each, a query finds its group by one more
``searchsorted``. No N×M mask exists.
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor


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
