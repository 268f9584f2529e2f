"""The gather modes (open_clip's ``ClipLoss``/``DistillClipLoss`` with ``world_size > 1``): all-gather the
features, with or without gradient, then the fused loss on the gathered batch (``local_loss=True``: only this
rank's rows against every rank's columns). Also the rows a ``FeatureQueue`` enqueues from every rank.

Every call first checks, on the host, that all ranks hold the same local sizes and made the same call
(:func:`comm.check_ranks_agree`), so uneven batches raise the same ValueError on every rank.
"""
from __future__ import annotations

from typing import List, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from .. import _validation as V
from .. import functional as Fn
from ..dispatch import resolve
from .comm import all_gather_with_grad, check_equal_local_batches, check_ranks_agree, world_of


def gather_features(image_features: Tensor, text_features: Tensor, local_loss: bool = False,
                    gather_with_grad: bool = False, group=None) -> Tuple[Tensor, Tensor]:
    """open_clip's gather: with grad (:func:`all_gather_with_grad`), or without, keeping the local slice
    differentiable (``local_loss=False``)."""
    rank, world = world_of(group)
    if gather_with_grad:
        return all_gather_with_grad(image_features, group), all_gather_with_grad(text_features, group)
    imgs: List[Tensor] = [torch.zeros_like(image_features) for _ in range(world)]
    txts: List[Tensor] = [torch.zeros_like(text_features) for _ in range(world)]
    dist.all_gather(imgs, image_features.detach(), group=group)
    dist.all_gather(txts, text_features.detach(), group=group)
    if not local_loss:  # keep this rank's slice in the graph, as open_clip does
        imgs[rank], txts[rank] = image_features, text_features
    return torch.cat(imgs), torch.cat(txts)


def clip_gather_loss(image_features: Tensor, text_features: Tensor, logit_scale, logit_bias, local_loss: bool,
                     gather_with_grad: bool, rank: int, normalize: bool, backend: str) -> Tensor:
    """open_clip's distributed ``ClipLoss``: the global-batch loss (``local_loss=False``), or this rank's rows
    against the gathered other side, positives at N·rank + i (``local_loss=True``)."""
    n = image_features.shape[0]
    # every call: a host-side all-gather (comm._host_group); a rank given ids makes the same one
    check_ranks_agree((n, n, image_features.shape[1]), (False, False), None, options="image_ids/text_ids given")
    if normalize:
        image_features, text_features = F.normalize(image_features, dim=-1), F.normalize(text_features, dim=-1)
    all_img, all_txt = gather_features(image_features, text_features, local_loss, gather_with_grad)
    if not local_loss:
        return Fn.clip_loss(all_img, all_txt, logit_scale, logit_bias, backend=backend)
    labels = torch.arange(n, device=image_features.device) + n * rank
    return 0.5 * (Fn.ce_rows(image_features, all_txt, logit_scale, logit_bias, labels, backend)
                  + Fn.ce_rows(text_features, all_img, logit_scale, logit_bias, labels, backend))


def clip_gather_ids_loss(image_features: Tensor, text_features: Tensor, logit_scale, logit_bias, image_ids,
                         text_ids, local_loss: bool, gather_with_grad: bool, normalize: bool, backend: str) -> Tensor:
    """Group ids gathered with the features: positives are found across ranks (local_loss: this rank's rows
    against every rank's keys, each direction's mean over the local rows; the ranks' mean is the global loss
    when local batches are equal)."""
    n, m = image_features.shape[0], text_features.shape[0]
    # the gathers need one local size per side on every rank, and ids on all of them or none
    check_ranks_agree((n, m, image_features.shape[1]), (image_ids is not None, text_ids is not None), None,
                      options="image_ids/text_ids given")
    image_ids, text_ids = V.check_ids(image_ids, text_ids, n, m, image_features)
    if normalize:
        image_features, text_features = F.normalize(image_features, dim=-1), F.normalize(text_features, dim=-1)
    if gather_with_grad:
        all_img, all_txt = all_gather_with_grad(image_features), all_gather_with_grad(text_features)
    else:  # the local slice stays differentiable (open_clip's gather)
        all_img, all_txt = gather_features(image_features, text_features, local_loss, False)
    with torch.no_grad():
        all_iid, all_tid = all_gather_with_grad(image_ids), all_gather_with_grad(text_ids)
    if not local_loss:
        return Fn.clip_loss(all_img, all_txt, logit_scale, logit_bias, backend=backend, image_ids=all_iid,
                            text_ids=all_tid)
    scale = V.as_scalar_tensor("logit_scale", logit_scale, image_features)
    bias = None if logit_bias is None else V.as_scalar_tensor("logit_bias", logit_bias, image_features,
                                                              positive=False)
    impl = resolve("ce_rows_ids", backend, image_features.device, n * all_txt.shape[0], image_features.dtype)
    return 0.5 * (impl(image_features, all_txt, scale, bias, image_ids, all_tid)
                  + impl(text_features, all_img, scale, bias, text_ids, all_iid))


def distill_gather_loss(x: Tensor, y: Tensor, s, tx: Tensor, ty: Tensor, ts, local_loss: bool,
                        gather_with_grad: bool, rank: int, backend: str):
    """open_clip's distributed ``DistillClipLoss``: student and teacher gathered alike; (contrastive, distill)."""
    n = x.shape[0]
    check_equal_local_batches(n)  # every call: a host-side all-gather (comm._host_group)
    all_x, all_y = gather_features(x, y, local_loss, gather_with_grad)
    with torch.no_grad():
        all_tx, all_ty = gather_features(tx.detach(), ty.detach(), True, False)
    s = V.as_scalar_tensor("logit_scale", s, x)
    ts = V.as_scalar_tensor("dist_logit_scale", ts, x).detach()
    impl = resolve("distill", backend, x.device, n * all_y.shape[0], x.dtype)
    if local_loss:  # this rank's rows against the global keys, positives at n·rank + i (open_clip)
        return impl(x, y, s, tx.detach(), ty.detach(), ts, n * rank, all_x, all_y, all_tx, all_ty)
    return impl(all_x, all_y, s, all_tx, all_ty, ts, 0, all_x, all_y, all_tx, all_ty)


def gather_rows(x: Tensor) -> Tensor:
    """Every rank's rows of ``x`` (detached; ALBEF's ``concat_all_gather``), after the equal-size check."""
    check_equal_local_batches(x.shape[0])  # the gather needs one size on every rank: a clear error
    return all_gather_with_grad(x.detach())
