"""MM-TS on the global batch under ``torch.distributed``, as the authors' code gathers (SergShel/MM-TS @0010879,
avion/avion/losses/losses.py; line numbers below are that file's).

* ``gather_features`` (:21-66) gathers every tensor it is given the same way: with ``gather_with_grad`` through
  ``torch.distributed.nn.all_gather`` (gradients summed over ranks); without, a plain ``all_gather`` with this
  rank's slice put back in the graph unless ``local_loss``.
* ``MMTSClipLoss.forward`` (:195-218) gathers the cluster sizes with the features. ``local_loss=False``: τ from
  the gathered sizes, ½[CE(X_g Y_gᵀ/τ_g) + CE(Y_g X_gᵀ/τ_g)] on the global batch (every rank computes the same
  number); ``local_loss=True``: τ from this rank's sizes, this rank's rows against the gathered other side,
  positives at n·rank + i.
* ``MMTSMaxMarginRankingLoss.forward`` (:379-428) always scores the gathered batch with margins from the
  gathered sizes; ``local_loss`` only changes the gather (and with ``gather_with_grad=False`` it keeps no slice in
  the graph: the official loss then has no gradient, which :func:`mmts_max_margin_loss` refuses).

τ is a function of each sample's cluster size alone, so gathering τ equals computing it from the gathered sizes;
the modules gather τ (one float per sample), in the same mode as the features when τ carries a gradient.
"""
from __future__ import annotations

from typing import List

import torch
import torch.distributed as dist
from torch import Tensor

from .. import functional as Fn
from .comm import all_gather_with_grad
from .gather import gather_features


def gather_as_official(t: Tensor, local_loss: bool, gather_with_grad: bool, group=None) -> Tensor:
    """One tensor through the official ``gather_features`` (losses.py:49-64): every rank's ``t`` along dim 0."""
    if gather_with_grad:
        return all_gather_with_grad(t, group)
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    buckets: List[Tensor] = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(buckets, t.detach().contiguous(), group=group)
    if not local_loss:  # the official code puts the original back (losses.py:61-62): its slice keeps the graph
        buckets[rank] = t
    return torch.cat(buckets)


def _gather_tau(tau: Tensor, local_loss: bool, gather_with_grad: bool, group) -> Tensor:
    if tau.requires_grad:  # a learnable τ follows the features' gradient convention
        return gather_as_official(tau, local_loss, gather_with_grad, group)
    with torch.no_grad():
        return gather_as_official(tau, True, False, group)


def mmts_clip_loss(image_features: Tensor, text_features: Tensor, tau: Tensor, rank: int, local_loss: bool,
                   gather_with_grad: bool, normalize: bool = False, backend: str = "auto", group=None) -> Tensor:
    """The official ``MMTSClipLoss`` DDP branch (losses.py:195-218) on this rank's (n, D) pairs and τ (n,).

    ``local_loss=False``: the global-batch loss (equal on every rank); ``True``: this rank's rows against the
    gathered keys, ½[CE(X Y_gᵀ/τ, n·rank + i) + CE(Y X_gᵀ/τ, n·rank + i)]. The equal-batch check is the
    caller's (the modules run it once per new local size).
    """
    if normalize:  # before the gather, as ClipLoss(normalize=True): the gathered rows are the normalised ones
        image_features = torch.nn.functional.normalize(image_features, dim=-1)
        text_features = torch.nn.functional.normalize(text_features, dim=-1)
    all_img, all_txt = gather_features(image_features, text_features, local_loss, gather_with_grad, group)
    if not local_loss:
        all_tau = _gather_tau(tau, local_loss, gather_with_grad, group)
        return Fn.adaptive_temperature_clip_loss(all_img, all_txt, all_tau, all_tau, backend=backend)
    n = image_features.shape[0]
    labels = torch.arange(n, device=image_features.device) + n * rank
    # a per-row 1/τ_i on ⟨x_i, y_j⟩ is the scale 1 on ⟨x_i/τ_i, y_j⟩: ce_rows takes one scalar scale, so the
    # queries carry τ (exact in real arithmetic; in bf16/fp16 the scaled rows round once, like the inputs did)
    inv = (1.0 / tau.to(torch.float32 if image_features.dtype != torch.float64 else torch.float64))[:, None]
    q_img = (image_features * inv).to(image_features.dtype)
    q_txt = (text_features * inv).to(text_features.dtype)
    return 0.5 * (Fn.ce_rows(q_img, all_txt, 1.0, None, labels, backend)
                  + Fn.ce_rows(q_txt, all_img, 1.0, None, labels, backend))


def mmts_max_margin_loss(image_features: Tensor, text_features: Tensor, margin: Tensor, local_loss: bool,
                         gather_with_grad: bool, backend: str = "auto", group=None) -> Tensor:
    """The official ``MMTSMaxMarginRankingLoss`` (losses.py:379-428, fix_norm): the hinge on the gathered
    batch with margins m (n,) gathered too; the same global value on every rank."""
    if local_loss and not gather_with_grad:
        raise ValueError(
            "local_loss=True with gather_with_grad=False: the official MMTSMaxMarginRankingLoss then gathers "
            "every feature without gradient and keeps no local slice (losses.py:55-64), so its loss trains "
            "nothing; use gather_with_grad=True (the authors' runs) or local_loss=False")
    all_img, all_txt = gather_features(image_features, text_features, local_loss, gather_with_grad, group)
    all_m = _gather_tau(margin, local_loss, gather_with_grad, group)
    return Fn.max_margin_loss(all_img, all_txt, all_m, normalize=True, backend=backend)
