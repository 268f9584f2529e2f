"""The CLIP-family modules, drop-ins for open_clip's: ``ClipLoss``, ``SigLipLoss``, ``DistillClipLoss`` (same
constructors and ``forward``), and ``ObliqueClipLoss``. Each chooses a mode (one process, open_clip's gathers, the
rings); the modes live in ``fastcontrast.distributed``."""
from __future__ import annotations

import torch
import torch.nn as nn

from .. import distributed as D
from .. import functional as Fn
from ..distributed import gather as DG
from ..distributed.comm import world_of


class ClipLoss(nn.Module):
    """Drop-in for ``open_clip.loss.ClipLoss``: same constructor, same ``forward``, fused backends underneath.

    ``forward(image_features (N, D), text_features (N, D), logit_scale, logit_bias=None, output_dict=False)``
    where ``logit_scale`` is the multiplier (open_clip's model returns ``logit_scale.exp()``). With
    ``world_size > 1`` (torch.distributed initialised) it gathers like open_clip (``local_loss``,
    ``gather_with_grad``), or with ``mode="ring"`` passes blocks around the ranks and never holds the global batch
    (:func:`fastcontrast.distributed.ring_clip_loss`).
    ``image_ids`` (N,), ``text_ids`` (M,) (this package's): pairs with equal ids are positives, each row's target
    uniform over its positives on every rank (UniCL; fastcontrast.clip_loss); the gather modes gather the ids with
    the features, the ring carries each text block's ids with it (global counts from one all-gather of the ids).
    Every call checks that all ranks hold the same local sizes and all or none pass ids: else the same
    ValueError on every rank.
    ``text_negatives`` (K, D), ``false_negative_ids`` ((N,), (N,)), ``guide_image_features`` /
    ``guide_text_features`` / ``guide_text_negatives`` (forward; this package's, see fastcontrast.clip_loss:
    NegCLIP's hard negatives, false negatives by id, GISTEmbed's guide) with ``guide_margin`` and
    ``guide_margin_strategy`` (constructor; used when a guide is passed): one process, or ``mode="ring"`` across
    ranks (each block carries them); the gather mode refuses them.
    """

    def __init__(
        self,
        local_loss: bool = False,
        gather_with_grad: bool = False,
        cache_labels: bool = False,
        rank: int = 0,
        world_size: int = 1,
        use_horovod: bool = False,
        backend: str = "auto",
        normalize: bool = False,
        mode: str = "gather",
        guide_margin: float = 0.0,
        guide_margin_strategy: str = "absolute",
    ):
        super().__init__()
        if use_horovod:
            raise ValueError("use_horovod: horovod is not supported; fastcontrast uses torch.distributed")
        if mode not in ("gather", "ring"):
            raise ValueError(f"mode must be 'gather' or 'ring', got {mode!r}")
        from ..losses.clip_loss_masked import STRATEGIES
        from .._validation import check_positive_float

        self.guide_margin = check_positive_float("guide_margin", guide_margin, allow_zero=True)
        if guide_margin_strategy not in STRATEGIES:
            raise ValueError(f"guide_margin_strategy must be one of {STRATEGIES}, got {guide_margin_strategy!r}")
        self.guide_margin_strategy = guide_margin_strategy
        self.local_loss, self.gather_with_grad, self.cache_labels = local_loss, gather_with_grad, cache_labels
        self.rank, self.world_size = rank, world_size
        self.backend, self.normalize, self.mode = backend, normalize, mode

    def _masked(self, image_features, text_features, logit_scale, logit_bias, image_ids, text_ids, extra):
        """The loss with negatives / false-negative masks / a guide (``extra``: the forward's arguments)."""
        if extra["guide_image_features"] is not None or extra["guide_text_features"] is not None:
            extra = dict(extra, guide_margin=self.guide_margin, guide_margin_strategy=self.guide_margin_strategy)
        if self.world_size > 1 and self.mode == "ring":
            return D.ring_clip_loss(image_features, text_features, logit_scale, logit_bias, self.normalize,
                                    image_ids=image_ids, text_ids=text_ids, backend=self.backend, **extra)
        if self.world_size > 1:
            raise ValueError("text_negatives, false_negative_ids and the guide run in one process or with "
                             "ClipLoss(mode='ring') across ranks; the gather mode does not take them")
        return Fn.clip_loss(image_features, text_features, logit_scale, logit_bias, normalize=self.normalize,
                            backend=self.backend, image_ids=image_ids, text_ids=text_ids, **extra)

    def forward(self, image_features, text_features, logit_scale, logit_bias=None, output_dict: bool = False,
                image_ids=None, text_ids=None, text_negatives=None, false_negative_ids=None,
                guide_image_features=None, guide_text_features=None, guide_text_negatives=None):
        # Pair i <-> i, as open_clip. cache_labels is accepted for signature compatibility: the diagonal is
        # implicit in the fused ops, so there is nothing to cache. image_ids/text_ids (this package's): pairs with
        # equal ids are positives (fastcontrast.clip_loss), gathered with the features under torch.distributed.
        extra = dict(text_negatives=text_negatives, false_negative_ids=false_negative_ids,
                     guide_image_features=guide_image_features, guide_text_features=guide_text_features,
                     guide_text_negatives=guide_text_negatives)
        if any(v is not None for v in extra.values()):
            loss = self._masked(image_features, text_features, logit_scale, logit_bias, image_ids, text_ids, extra)
            return {"contrastive_loss": loss} if output_dict else loss
        if image_ids is not None or text_ids is not None:
            if self.world_size > 1 and self.mode == "ring":  # each text block carries its ids
                loss = D.ring_clip_loss(image_features, text_features, logit_scale, logit_bias, self.normalize,
                                        image_ids=image_ids, text_ids=text_ids, backend=self.backend)
            elif self.world_size > 1:
                loss = DG.clip_gather_ids_loss(image_features, text_features, logit_scale, logit_bias, image_ids,
                                               text_ids, self.local_loss, self.gather_with_grad, self.normalize,
                                               self.backend)
            else:
                loss = Fn.clip_loss(image_features, text_features, logit_scale, logit_bias, normalize=self.normalize,
                                    backend=self.backend, image_ids=image_ids, text_ids=text_ids)
            return {"contrastive_loss": loss} if output_dict else loss
        if isinstance(image_features, torch.Tensor) and isinstance(text_features, torch.Tensor) \
                and image_features.dim() >= 1 and text_features.dim() >= 1 \
                and text_features.shape[0] != image_features.shape[0]:
            raise ValueError(
                f"ClipLoss pairs image i with text i: batches must match, got {image_features.shape[0]} "
                f"images and {text_features.shape[0]} texts (use fastcontrast.clip_loss with labels instead)"
            )
        if self.world_size > 1 and self.mode == "ring":
            loss = D.ring_clip_loss(image_features, text_features, logit_scale, logit_bias, self.normalize,
                                    backend=self.backend)
        elif self.world_size > 1:
            loss = DG.clip_gather_loss(image_features, text_features, logit_scale, logit_bias, self.local_loss,
                                       self.gather_with_grad, self.rank, self.normalize, self.backend)
        else:
            loss = Fn.clip_loss(image_features, text_features, logit_scale, logit_bias,
                                normalize=self.normalize, backend=self.backend)
        return {"contrastive_loss": loss} if output_dict else loss

    def get_ground_truth(self, device, num_logits) -> torch.Tensor:
        """open_clip's helper, for code that calls it: the positive index of each row."""
        labels = torch.arange(num_logits, device=device, dtype=torch.long)
        return labels + num_logits * self.rank if self.world_size > 1 and self.local_loss else labels

    def get_logits(self, image_features, text_features, logit_scale, logit_bias=None):
        """open_clip's helper: the materialised (logits_per_image, logits_per_text), for code that reads them.
        The loss itself never builds them."""
        if self.world_size > 1:
            all_img, all_txt = DG.gather_features(image_features, text_features, self.local_loss,
                                                 self.gather_with_grad)
            if self.local_loss:
                per_image = logit_scale * image_features @ all_txt.T
                per_text = logit_scale * text_features @ all_img.T
            else:
                per_image = logit_scale * all_img @ all_txt.T
                per_text = per_image.T
        else:
            per_image = logit_scale * image_features @ text_features.T
            per_text = per_image.T
        if logit_bias is not None:
            per_image, per_text = per_image + logit_bias, per_text + logit_bias
        return per_image, per_text


class SigLipLoss(nn.Module):
    """Drop-in for ``open_clip.loss.SigLipLoss`` (same constructor and ``forward``), fused on every backend.

    ``forward(image_features (N, D), text_features (N, D), logit_scale, logit_bias, output_dict=False)``:
    −(1/N) Σ_ij log σ(z_ij (s⟨x_i, y_j⟩ + b)), z = +1 on the diagonal, −1 elsewhere; a 0-d loss.
    With ``world_size > 1`` (torch.distributed initialised, ``rank``/``world_size`` those of the default group)
    each rank returns open_clip's local loss: its N images against every rank's texts, positives on its own
    pairs, / N (the mean over ranks is the loss of the concatenated batch), and open_clip's gradients (text
    features get every rank's gradient for them). ``dist_impl`` is open_clip's: "bidir" (default) and "shift"
    pass text blocks neighbour to neighbour (both ways / one way), "reduce" sends each rank's block to all by a
    collective; these hold one block at a time, forward and backward (per-rank memory does not grow with the
    world size), score each with the fused siglip op and overlap the next block's transfer with the current
    block's compute (fastcontrast.distributed.siglip_distributed_loss). "gather" all-gathers the texts.
    This package's ``image_ids`` (N,), ``text_ids`` (N,) and ``weighting`` ("none" | "inverse_count", SigLIP+)
    make every pair with equal ids a positive (fastcontrast.siglip_loss); in every ``dist_impl`` the ids travel
    with their texts, so positives on other ranks count. Every rank checks, every call, that all ranks hold the
    same local sizes (one small all-gather): uneven batches raise the same ValueError on every rank.
    """

    def __init__(self, cache_labels: bool = False, rank: int = 0, world_size: int = 1, dist_impl=None,
                 backend: str = "auto"):
        super().__init__()
        if (dist_impl or "bidir") not in ("bidir", "shift", "reduce", "gather"):
            raise ValueError(f"dist_impl must be one of bidir, shift, reduce, gather; got {dist_impl!r}")
        self.cache_labels, self.rank, self.world_size = cache_labels, rank, world_size
        self.dist_impl, self.backend = dist_impl or "bidir", backend

    def forward(self, image_features, text_features, logit_scale, logit_bias, output_dict: bool = False,
                image_ids=None, text_ids=None, weighting: str = "none"):
        if self.world_size > 1:
            rank, world = world_of(None)
            if (rank, world) != (self.rank, self.world_size):
                raise ValueError(f"SigLipLoss(rank={self.rank}, world_size={self.world_size}) but torch.distributed "
                                 f"has rank {rank} of {world}; pass the default group's rank and world size")
            loss = D.siglip_distributed_loss(image_features, text_features, logit_scale, logit_bias, self.dist_impl,
                                             image_ids, text_ids, weighting, self.backend)
        else:
            loss = Fn.siglip_loss(image_features, text_features, logit_scale, logit_bias, backend=self.backend,
                                  image_ids=image_ids, text_ids=text_ids, weighting=weighting)
        return {"contrastive_loss": loss} if output_dict else loss


class ObliqueClipLoss(nn.Module):
    """InfoNCE on the oblique multi-token similarity; ``forward(image_tokens (N,K,d), text_tokens (N,K,d))``.

    With ``learn_scale=True`` the logit scale is a parameter (stored as its log); otherwise fixed at
    ``logit_scale`` (1.0: the topology provides the range, as in Sun's paper).
    """

    def __init__(self, logit_scale: float = 1.0, learn_scale: bool = False, backend: str = "auto"):
        super().__init__()
        self.backend = backend
        if learn_scale:
            self.log_scale = nn.Parameter(torch.tensor(float(logit_scale)).log())
        else:
            self.register_buffer("log_scale", torch.tensor(float(logit_scale)).log())

    def forward(self, image_tokens, text_tokens, labels=None, output_dict: bool = False, image_ids=None,
                text_ids=None):
        loss = Fn.oblique_clip_loss(image_tokens, text_tokens, self.log_scale.exp(), labels=labels,
                                    backend=self.backend, image_ids=image_ids, text_ids=text_ids)
        return {"contrastive_loss": loss} if output_dict else loss


class DistillClipLoss(ClipLoss):
    """Drop-in for ``open_clip.loss.DistillClipLoss`` (same constructor and ``forward``), fused: no N×N logits.

    ``forward(image_features, text_features, logit_scale, dist_image_features, dist_text_features,
    dist_logit_scale, output_dict=False)`` -> ``(contrastive_loss, distill_loss)`` or the dict of both; the
    ``dist_*`` arguments are the teacher's (features (N, Dt), its scale), which gets no gradient. With
    ``world_size > 1`` it gathers student and teacher like open_clip (``local_loss``, ``gather_with_grad``).
    """

    def forward(self, image_features, text_features, logit_scale, dist_image_features, dist_text_features,
                dist_logit_scale, output_dict: bool = False):
        if self.world_size > 1:
            contrastive, distill = DG.distill_gather_loss(image_features, text_features, logit_scale,
                                                          dist_image_features, dist_text_features, dist_logit_scale,
                                                          self.local_loss, self.gather_with_grad, self.rank,
                                                          self.backend)
        else:
            contrastive, distill = Fn.distill_clip_loss(image_features, text_features, logit_scale,
                                                        dist_image_features, dist_text_features, dist_logit_scale,
                                                        backend=self.backend)
        if output_dict:
            return {"contrastive_loss": contrastive, "distill_loss": distill}
        return contrastive, distill
