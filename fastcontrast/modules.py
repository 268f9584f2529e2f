"""``nn.Module`` wrappers: one per loss family; ``ClipLoss`` matches open_clip's constructor and ``forward``."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from . import _validation as V
from . import functional as Fn
from .ops.codebook.reference import EMATeacher  # noqa: F401  (re-exported)


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
    ):
        super().__init__()
        if use_horovod:
            raise ValueError("use_horovod: horovod is not supported; fastcontrast uses torch.distributed")
        if mode not in ("gather", "ring"):
            raise ValueError(f"mode must be 'gather' or 'ring', got {mode!r}")
        self.local_loss, self.gather_with_grad, self.cache_labels = local_loss, gather_with_grad, cache_labels
        self.rank, self.world_size = rank, world_size
        self.backend, self.normalize, self.mode = backend, normalize, mode

    def forward(self, image_features, text_features, logit_scale, logit_bias=None, output_dict: bool = False,
                image_ids=None, text_ids=None):
        # Pair i <-> i, as open_clip. cache_labels is accepted for signature compatibility: the diagonal is
        # implicit in the fused ops, so there is nothing to cache. image_ids/text_ids (this package's): pairs with
        # equal ids are positives (fastcontrast.clip_loss), gathered with the features under torch.distributed.
        if image_ids is not None or text_ids is not None:
            if self.world_size > 1:
                loss = self._distributed_ids(image_features, text_features, logit_scale, logit_bias, image_ids,
                                             text_ids)
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
        if self.world_size > 1:
            loss = self._distributed(image_features, text_features, logit_scale, logit_bias)
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
        from . import distributed as D

        if self.world_size > 1:
            all_img, all_txt = D.gather_features(image_features, text_features, self.local_loss,
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

    def _distributed_ids(self, image_features, text_features, logit_scale, logit_bias, image_ids, text_ids):
        """Group ids gathered with the features: positives are found across ranks (local_loss: this rank's rows
        against every rank's keys, each direction's mean over the local rows; the ranks' mean is the global loss
        when local batches are equal)."""
        from . import distributed as D
        from .dispatch import resolve
        from .ops import multipos as MP

        if self.mode == "ring":  # each text block carries its ids; counts from one all-gather of the ids
            return D.ring_clip_loss(image_features, text_features, logit_scale, logit_bias, self.normalize,
                                    image_ids=image_ids, text_ids=text_ids)
        n, m = image_features.shape[0], text_features.shape[0]
        # the gathers need one local size per side on every rank, and ids on all of them or none
        D._check_ranks_agree((n, m, image_features.shape[1]), (image_ids is not None, text_ids is not None), None,
                             options="image_ids/text_ids given")
        image_ids, text_ids = MP.check_ids(image_ids, text_ids, n, m, image_features)
        if self.normalize:
            image_features = torch.nn.functional.normalize(image_features, dim=-1)
            text_features = torch.nn.functional.normalize(text_features, dim=-1)
        if self.gather_with_grad:
            all_img, all_txt = D.all_gather_with_grad(image_features), D.all_gather_with_grad(text_features)
        else:  # the local slice stays differentiable (open_clip's gather)
            all_img, all_txt = D.gather_features(image_features, text_features, self.local_loss, False)
        with torch.no_grad():
            all_iid, all_tid = D.all_gather_with_grad(image_ids), D.all_gather_with_grad(text_ids)
        if not self.local_loss:
            return Fn.clip_loss(all_img, all_txt, logit_scale, logit_bias, backend=self.backend, image_ids=all_iid,
                                text_ids=all_tid)
        scale = V.as_scalar_tensor("logit_scale", logit_scale, image_features)
        bias = None if logit_bias is None else V.as_scalar_tensor("logit_bias", logit_bias, image_features,
                                                                  positive=False)
        name, _ = resolve("ce_rows", self.backend, image_features.device, n * all_txt.shape[0])
        return 0.5 * (MP.ce_rows_ids(name, image_features, all_txt, scale, bias, image_ids, all_tid)
                      + MP.ce_rows_ids(name, text_features, all_img, scale, bias, text_ids, all_iid))

    def _distributed(self, image_features, text_features, logit_scale, logit_bias):
        from . import distributed as D

        if self.mode == "ring":
            return D.ring_clip_loss(image_features, text_features, logit_scale, logit_bias, self.normalize)
        n = image_features.shape[0]
        # every call: a host-side all-gather (distributed._host_group); a rank given ids makes the same one
        D._check_ranks_agree((n, n, image_features.shape[1]), (False, False), None,
                             options="image_ids/text_ids given")
        if self.normalize:
            image_features = torch.nn.functional.normalize(image_features, dim=-1)
            text_features = torch.nn.functional.normalize(text_features, dim=-1)
        all_img, all_txt = D.gather_features(image_features, text_features, self.local_loss, self.gather_with_grad)
        if not self.local_loss:
            return Fn.clip_loss(all_img, all_txt, logit_scale, logit_bias, backend=self.backend)
        labels = torch.arange(n, device=image_features.device) + n * self.rank
        return 0.5 * (Fn.ce_rows(image_features, all_txt, logit_scale, logit_bias, labels, self.backend)
                      + Fn.ce_rows(text_features, all_img, logit_scale, logit_bias, labels, self.backend))


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
            from . import distributed as D

            rank, world = D._world(None)
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


class _MMTS(nn.Module):
    """The schedule state shared by the MM-TS losses: τ_i(t) = (α/2)·cos(2πt/P) + sh(c_i); with
    ``world_size > 1`` the official code's gather of features and τ (:mod:`fastcontrast.ops.adaptive.distributed`)."""

    def __init__(self, total_steps: Optional[int] = None, c_min: Optional[float] = None,
                 c_max: Optional[float] = None, alpha: float = 0.08, num_oscillations: int = 5, s_min: float = 0.05,
                 s_max: float = 0.20, backend: str = "auto", *, local_loss: bool = False,
                 gather_with_grad: bool = False, rank: int = 0, world_size: int = 1):
        super().__init__()
        self.total_steps, self.c_min, self.c_max = total_steps, c_min, c_max
        self.alpha, self.num_oscillations, self.s_min, self.s_max = alpha, num_oscillations, s_min, s_max
        self.backend = backend
        if total_steps is not None and c_min is not None and c_max is not None:  # fail now, not at step 0
            Fn.mmts_temperature(torch.full((1,), float(c_min)), 0, total_steps, c_min, c_max, alpha,
                                num_oscillations, s_min, s_max)
        self.world_size = V.check_positive_int("world_size", world_size)
        self.rank = V.check_positive_int("rank", rank, minimum=0)
        if self.rank >= self.world_size:
            raise ValueError(f"rank must lie in [0, world_size) = [0, {self.world_size}), got {self.rank}")
        self.local_loss, self.gather_with_grad = bool(local_loss), bool(gather_with_grad)

    # the schedule's configuration, c_min/c_max derived from the data: it travels with the state_dict (not the
    # rank/world arguments, which belong to the process that loads it)
    _SCHEDULE = ("total_steps", "c_min", "c_max", "alpha", "num_oscillations", "s_min", "s_max")

    def get_extra_state(self):
        return {k: getattr(self, k) for k in self._SCHEDULE}

    def set_extra_state(self, state):
        """A module built without total_steps/c_min/c_max takes the checkpoint's; one built with another
        schedule refuses it (its τ would silently differ from the run that wrote the checkpoint)."""
        clash = [f"{k}={getattr(self, k)} but the checkpoint has {k}={state[k]}" for k in self._SCHEDULE
                 if k in state and getattr(self, k) is not None and state[k] is not None
                 and getattr(self, k) != state[k]]
        if clash:
            raise ValueError(f"{type(self).__name__}: the checkpoint's MM-TS schedule differs: {'; '.join(clash)}")
        for k in self._SCHEDULE:
            if getattr(self, k) is None and state.get(k) is not None:
                setattr(self, k, state[k])

    # The published MM-TS run (SergShel/MM-TS avion/README.md:100-105, the fine-tuning command; the README's
    # argument table :130-133 gives the same values as the defaults of every --loss-type); the argparse defaults
    # (0.08, [0.05, 0.20]) are this class's constructor defaults. That run (4 ranks, torchrun) gathers with
    # gradient: main_lavila_finetune_mir.py:124-130 sets --gather-with-grad by default and passes it to the
    # loss (:590-595); the loss classes' own constructor default is False (losses.py:145-146, 334-335).
    PUBLISHED = {"alpha": 0.2, "num_oscillations": 5, "s_min": 0.17, "s_max": 0.30}

    @classmethod
    def published(cls, total_steps: Optional[int] = None, c_min: Optional[float] = None,
                  c_max: Optional[float] = None, **kwargs):
        """The loss with the published run's schedule: α = 0.2, 5 oscillations, shifts in [0.17, 0.30]
        (avion/README.md:100-105, 130-133), and its ``gather_with_grad=True`` (the training script's default;
        matters with ``world_size > 1``). Other constructor arguments pass through."""
        clash = set(kwargs) & set(cls.PUBLISHED)
        if clash:
            raise ValueError(f"published() fixes {sorted(clash)}; construct the class directly to change them")
        kwargs.setdefault("gather_with_grad", True)
        return cls(total_steps, c_min, c_max, **cls.PUBLISHED, **kwargs)

    def temperatures(self, cluster_sizes=None, step=0, total_steps=None, tau=None) -> torch.Tensor:
        """τ (N,): the given ``tau``, or MM-TS's from ``cluster_sizes`` at ``step``."""
        if tau is not None:
            if cluster_sizes is not None:
                raise ValueError("pass either cluster_sizes or tau, not both")
            return tau
        if cluster_sizes is None:
            raise ValueError("cluster_sizes is required (each sample's dataset-wide cluster size), or pass tau")
        total = total_steps if total_steps is not None else self.total_steps
        if total is None:
            raise ValueError("total_steps is required: give it to the constructor or to forward")
        if self.c_min is None or self.c_max is None:
            raise ValueError("c_min and c_max (the dataset's smallest and largest cluster sizes, e.g. "
                             "ClusterIndex.c_min/.c_max) are required to use cluster_sizes")
        return Fn.mmts_temperature(cluster_sizes, step, total, self.c_min, self.c_max, self.alpha,
                                   self.num_oscillations, self.s_min, self.s_max)

    def _distributed_tau(self, image_features, text_features, t, name) -> torch.Tensor:
        """Checks on this rank first (a bad input fails where it is, before any collective), then that every
        rank holds the same local batch (every call, on the host: distributed._host_group). Returns τ (n,)."""
        import torch.distributed as dist

        from . import distributed as D

        V.check_features("image_features", image_features, 2)
        V.check_features("text_features", text_features, 2)
        V.check_pair("image_features", image_features, "text_features", text_features, same_batch=True)
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(f"world_size={self.world_size} needs torch.distributed: call "
                               "dist.init_process_group first")
        if (dist.get_world_size(), dist.get_rank()) != (self.world_size, self.rank):
            raise ValueError(f"rank={self.rank}, world_size={self.world_size} disagree with torch.distributed "
                             f"(rank {dist.get_rank()} of {dist.get_world_size()})")
        n = image_features.shape[0]
        if not isinstance(t, torch.Tensor) or t.dim() == 0 or t.numel() == 1 and n != 1:  # one τ for all pairs
            t = V.as_scalar_tensor(name, t, image_features).expand(n).contiguous()
        t = V.check_vector(name, t, n, image_features)  # cluster_sizes: one per local pair, on the features' device
        D.check_equal_local_batches(n)  # every call: a host-side all-gather (distributed._host_group)
        return t


class MMTSClipLoss(_MMTS):
    """MM-TS InfoNCE (the authors' ``MMTSClipLoss``): ½[CE(X Yᵀ/τ_i) + CE(Y Xᵀ/τ_i)], τ_i(t) per pair.

    ``forward(image_features (N, D), text_features (N, D), step, cluster_sizes=None, total_steps=None,
    tau=None)``; cluster_sizes (N,) are the samples' dataset-wide cluster sizes (:mod:`fastcontrast.clusters`),
    c_min/c_max the dataset's smallest and largest cluster; or pass ``tau`` (N,) directly. Features are used as
    given (the official code feeds normalised embeddings); ``normalize=True`` normalises inside.
    Defaults are the paper's: α = 0.08, 5 oscillations per run, shifts in [0.05, 0.20].

    Under torch.distributed (``world_size > 1``, ``rank``) as the official code (losses.py:195-218), N being the
    local batch, equal on every rank: ``local_loss=False`` gathers features and τ and returns the global-batch
    loss on every rank (one process's loss on the concatenated batch); ``local_loss=True`` this rank's rows
    against the gathered other side with this rank's τ, positives at N·rank + i (the ranks' mean is the global
    loss). ``gather_with_grad`` as open_clip: True sums every rank's gradient into the local features (each gets
    world_size × ∂L/∂x, DDP's averaging then yields ∂L/∂θ; the authors' runs); False (the constructor default,
    as the official class's) keeps only the local slice in the graph.
    """

    def __init__(self, total_steps: Optional[int] = None, c_min: Optional[float] = None,
                 c_max: Optional[float] = None, alpha: float = 0.08,
                 num_oscillations: int = 5, s_min: float = 0.05, s_max: float = 0.20, normalize: bool = False,
                 backend: str = "auto", *, local_loss: bool = False, gather_with_grad: bool = False, rank: int = 0,
                 world_size: int = 1):
        super().__init__(total_steps, c_min, c_max, alpha, num_oscillations, s_min, s_max, backend,
                         local_loss=local_loss, gather_with_grad=gather_with_grad, rank=rank, world_size=world_size)
        self.normalize = normalize

    def forward(self, image_features, text_features, step=0, cluster_sizes=None, total_steps=None, tau=None,
                output_dict: bool = False):
        t = self.temperatures(cluster_sizes, step, total_steps, tau)
        if self.world_size > 1:
            from .ops.adaptive import distributed as AD

            t = self._distributed_tau(image_features, text_features, t, "tau" if tau is not None else "cluster_sizes")
            loss = AD.mmts_clip_loss(image_features, text_features, t, self.rank, self.local_loss,
                                     self.gather_with_grad, self.normalize, self.backend)
        else:
            loss = Fn.adaptive_temperature_clip_loss(image_features, text_features, t, t, normalize=self.normalize,
                                                     backend=self.backend)
        return {"contrastive_loss": loss} if output_dict else loss


class MMTSMaxMarginLoss(_MMTS):
    """MM-TS max-margin (the authors' ``MMTSMaxMarginRankingLoss``): margin m_i = τ_i(t), hinge in both
    directions over all negatives, mean over the 2N(N−1) terms; features normalised (``fix_norm``).

    ``forward(image_features, text_features, step, cluster_sizes=None, total_steps=None, tau=None)``. Under
    torch.distributed (``world_size > 1``, ``rank``) as the official code (losses.py:379-428): features and
    margins gathered, the hinge over the global batch on every rank (one process's loss on the concatenated
    batch), ``local_loss`` changing only the gather; ``gather_with_grad`` as in :class:`MMTSClipLoss`.
    ``local_loss=True`` with ``gather_with_grad=False`` is refused: the official loss has no gradient there.
    """

    def __init__(self, total_steps: Optional[int] = None, c_min: Optional[float] = None,
                 c_max: Optional[float] = None, alpha: float = 0.08, num_oscillations: int = 5, s_min: float = 0.05,
                 s_max: float = 0.20, backend: str = "auto", *, local_loss: bool = False,
                 gather_with_grad: bool = False, rank: int = 0, world_size: int = 1):
        super().__init__(total_steps, c_min, c_max, alpha, num_oscillations, s_min, s_max, backend,
                         local_loss=local_loss, gather_with_grad=gather_with_grad, rank=rank, world_size=world_size)
        if self.world_size > 1 and self.local_loss and not self.gather_with_grad:
            raise ValueError(
                "local_loss=True with gather_with_grad=False: the official MMTSMaxMarginRankingLoss then gathers "
                "every feature without gradient and keeps no local slice (losses.py:55-64), so its loss trains "
                "nothing; use gather_with_grad=True (the authors' runs) or local_loss=False")

    def forward(self, image_features, text_features, step=0, cluster_sizes=None, total_steps=None, tau=None,
                output_dict: bool = False):
        m = self.temperatures(cluster_sizes, step, total_steps, tau)
        if self.world_size > 1:
            from .ops.adaptive import distributed as AD

            m = self._distributed_tau(image_features, text_features, m, "tau" if tau is not None else "cluster_sizes")
            loss = AD.mmts_max_margin_loss(image_features, text_features, m, self.local_loss,
                                           self.gather_with_grad, self.backend)
        else:
            loss = Fn.max_margin_loss(image_features, text_features, m, normalize=True, backend=self.backend)
        return {"margin_loss": loss} if output_dict else loss


class DensityTemperatureClipLoss(nn.Module):
    """This package's extension (not MM-TS): InfoNCE with a per-sample τ from the in-batch k-NN density.

    τ(step) follows :func:`cosine_schedule` between ``tau_min`` and ``tau_max`` with period
    total_steps / num_oscillations; with ``per_sample=True`` each side's τ_i comes from
    :func:`density_temperature` around τ(step) (a statistic of the current batch, no gradient). MM-TS itself
    uses dataset-wide cluster sizes: :class:`MMTSClipLoss`.
    """

    def __init__(self, total_steps: int, tau_min=0.01, tau_max=0.1, num_oscillations=5, per_sample=True, k=8,
                 normalize=True, backend="auto"):
        super().__init__()
        if not 0 < tau_min <= tau_max:
            raise ValueError(f"need 0 < tau_min <= tau_max, got {tau_min}, {tau_max}")
        total_steps = V.check_positive_int("total_steps", total_steps)
        num_oscillations = V.check_positive_int("num_oscillations", num_oscillations)
        self.tau_min, self.tau_max = float(tau_min), float(tau_max)
        self.period = max(1, total_steps // num_oscillations)
        self.per_sample, self.k, self.normalize, self.backend = per_sample, int(k), normalize, backend

    def temperatures(self, image_features, text_features, step):
        tau = Fn.cosine_schedule(float(step), self.period, self.tau_min, self.tau_max)
        if not self.per_sample:
            return tau, tau
        k_i = min(self.k, image_features.shape[0] - 1)
        k_t = min(self.k, text_features.shape[0] - 1)
        t_img = Fn.density_temperature(image_features, tau, self.tau_min, self.tau_max, k=k_i, backend=self.backend)
        t_txt = Fn.density_temperature(text_features, tau, self.tau_min, self.tau_max, k=k_t, backend=self.backend)
        return t_img, t_txt

    def forward(self, image_features, text_features, step=0, labels=None, output_dict: bool = False):
        t_img, t_txt = self.temperatures(image_features, text_features, step)
        loss = Fn.adaptive_temperature_clip_loss(image_features, text_features, t_img, t_txt, labels=labels,
                                                 normalize=self.normalize, backend=self.backend)
        return {"contrastive_loss": loss} if output_dict else loss


class MaxMarginLoss(nn.Module):
    """Max-margin ranking loss with a fixed margin (the AVION baseline of MM-TS: 0.2, mean over all terms).

    ``hardest=True`` (VSE++) and ``reduction="sum"`` are this package's extensions. A scheduled margin:
    ``fastcontrast.max_margin_loss(x, y, margin=cosine_schedule(...))``.
    """

    def __init__(self, margin=0.2, hardest=False, normalize=True, reduction="mean", backend="auto"):
        super().__init__()
        self.margin, self.hardest, self.normalize = margin, hardest, normalize
        self.reduction, self.backend = reduction, backend

    def forward(self, image_features, text_features, labels=None, output_dict: bool = False):
        loss = Fn.max_margin_loss(image_features, text_features, self.margin, labels=labels, hardest=self.hardest,
                                  normalize=self.normalize, reduction=self.reduction, backend=self.backend)
        return {"margin_loss": loss} if output_dict else loss


class CodebookLoss(nn.Module):
    """CODIS's codebook term: a learnable codebook (K, D) and the swapped prediction against Sinkhorn targets of
    the teacher features (SwAV's form and defaults: τ = 0.1, ε = 0.05, 3 iterations, directions averaged).

    Prototypes as SwAV trains them (``renormalize=True``, the default): at the start of each training forward the
    parameter is renormalised in place without gradient and then used as is (main_swav.py:277-281), so no
    gradient flows through a normalisation and its norm cannot drift under Adam/weight decay;
    ``freeze_prototypes_(step)``, called by the loop after ``backward``, drops the codebook's gradient for the
    first ``freeze_steps`` = 313 iterations (main_swav.py:83, 324-328). ``renormalize=False``: the earlier
    behaviour, ``F.normalize`` inside the loss with its gradient (``normalize_codes``), never renormalised.
    """

    def __init__(self, num_codes: int, dim: int, tau=0.1, epsilon=0.05, n_iters=3, normalize_features=True,
                 normalize_codes=True, reduction="mean", backend="auto", renormalize: bool = True,
                 freeze_steps: int = 313):
        super().__init__()
        self.codebook = nn.Parameter(torch.nn.functional.normalize(torch.randn(num_codes, dim), dim=-1))
        self.tau, self.epsilon, self.n_iters, self.reduction = tau, epsilon, n_iters, reduction
        self.normalize_features, self.normalize_codes, self.backend = normalize_features, normalize_codes, backend
        self.renormalize = bool(renormalize)
        self.freeze_steps = V.check_positive_int("freeze_steps", freeze_steps, minimum=0)
        self.steps = 0  # training forwards so far (host state: no device read)

    def get_extra_state(self):
        return {"steps": self.steps}

    def set_extra_state(self, state):
        self.steps = int(state.get("steps", 0))

    @torch.no_grad()
    def renormalize_(self) -> None:
        """SwAV's per-iteration step: codebook ← codebook / ‖codebook‖ row-wise, in place, no gradient."""
        self.codebook.copy_(torch.nn.functional.normalize(self.codebook, dim=1, p=2))

    def freeze_prototypes_(self, step: Optional[int] = None) -> bool:
        """Drop the codebook's gradient (``grad = None``: the optimizer skips it) while ``step`` (default: the
        iteration of the last training forward) is below ``freeze_steps``; returns whether it did."""
        step = self.steps - 1 if step is None else int(step)
        if step < self.freeze_steps:
            self.codebook.grad = None
            return True
        return False

    def forward(self, image_features, text_features, teacher_image_features, teacher_text_features,
                return_stats: bool = False, queue_image=None, queue_text=None):
        if self.training and torch.is_grad_enabled():
            self.steps += 1
            if self.renormalize:
                self.renormalize_()
        return Fn.codebook_loss(
            image_features, text_features, teacher_image_features, teacher_text_features,
            self.codebook.to(image_features.dtype), self.tau, self.epsilon, self.n_iters,
            self.normalize_features, self.normalize_codes and not self.renormalize, return_stats=return_stats,
            reduction=self.reduction, queue_image=queue_image, queue_text=queue_text, backend=self.backend,
        )


class FeatureQueue(nn.Module):
    """The last ``length`` rows of (teacher) features, a ring buffer: ALBEF's memory queue and SwAV's queue.

    ``enqueue(x)`` stores ``x`` (detached; under torch.distributed with ``gather=True``, every rank's rows, as
    ALBEF's ``concat_all_gather``); ``contents()`` the rows held; ``recent(k)`` the k newest. ``init="random"``
    starts full of random unit vectors as ALBEF's queue (model_pretrain.py:79-84, the same draw: randn(D, Q)
    normalised over D); ``init="empty"`` holds nothing until rows arrive. ``real`` counts the enqueued rows
    (at most ``length``), which the SwAV queue rule reads. The write position is host state: no device read.
    """

    def __init__(self, length: int, dim: int, dtype: torch.dtype = torch.float32, gather: bool = True,
                 init: str = "empty"):
        super().__init__()
        self.length = V.check_positive_int("length", length)
        dim = V.check_positive_int("dim", dim)
        if init not in ("empty", "random"):
            raise ValueError(f"init must be 'empty' or 'random' (ALBEF's random unit vectors), got {init!r}")
        if init == "random":
            buf = torch.nn.functional.normalize(torch.randn(dim, self.length), dim=0).T.contiguous().to(dtype)
        else:
            buf = torch.zeros(self.length, dim, dtype=dtype)
        self.register_buffer("buffer", buf)
        self.ptr, self.filled, self.real, self.gather = 0, self.length if init == "random" else 0, 0, gather

    def get_extra_state(self):
        return {"ptr": self.ptr, "filled": self.filled, "real": self.real}

    def set_extra_state(self, state):
        self.ptr, self.filled = int(state["ptr"]), int(state["filled"])
        self.real = int(state.get("real", self.filled))

    def contents(self) -> torch.Tensor:
        return self.buffer if self.filled == self.length else self.buffer[: self.filled]

    def recent(self, k: int) -> torch.Tensor:
        """The ``min(k, filled)`` newest rows."""
        k = min(k, self.filled)
        idx = (self.ptr - k + torch.arange(k, device=self.buffer.device)) % self.length
        return self.buffer[idx]

    @torch.no_grad()
    def enqueue(self, x: torch.Tensor) -> None:
        V.check_features("x", x, 2)
        if x.shape[1] != self.buffer.shape[1]:
            raise ValueError(f"x must have shape (B, {self.buffer.shape[1]}) (the queue's width), got {tuple(x.shape)}")
        if x.dtype != self.buffer.dtype or x.device != self.buffer.device:
            raise TypeError(f"x is {x.dtype} on {x.device} but the queue holds {self.buffer.dtype} on "
                            f"{self.buffer.device}")
        import torch.distributed as dist

        x = x.detach()
        if self.gather and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            from .distributed import all_gather_with_grad, check_equal_local_batches

            check_equal_local_batches(x.shape[0])  # the gather needs one size on every rank: a clear error
            x = all_gather_with_grad(x)  # no gradient flows here: enqueue runs under no_grad
        x = x[-self.length:]
        b = x.shape[0]
        idx = (self.ptr + torch.arange(b, device=x.device)) % self.length
        self.buffer[idx] = x
        self.ptr = (self.ptr + b) % self.length
        self.filled = min(self.length, self.filled + b)
        self.real = min(self.length, self.real + b)
        self.last_added = b  # rows written by this call (every rank's under gather)


class CodisLoss(nn.Module):
    """CODIS's objective on SwAV's and ALBEF's definitions (CODIS itself has no public code):

    * codebook: swapped prediction of the students against Sinkhorn targets of the momentum teachers, the
      Sinkhorn over [queue; batch] (SwAV: ``sinkhorn_queue_length`` newest rows) and, under torch.distributed,
      over the global batch;
    * ``itc``: student image vs teacher text keys [batch; queue] and the reverse, with ALBEF's
      momentum-distillation soft targets (α), averaged;
    * ``intra``: student vs the teacher of the same modality, the same form (CODIS's intra-modal
      student–teacher term; its exact weighting is not published: ``intra_weight``).

    ``forward(image, text, teacher_image, teacher_text)`` -> dict with ``loss`` (the weighted sum) and each term;
    then it enqueues the teacher features (ALBEF enqueues after the loss). The temperature of the instance terms
    is learnable from 0.07, clamped to [0.001, 0.5] (ALBEF). Defaults: τ = 0.1, ε = 0.05, 3 iterations (SwAV);
    α = 0.4, queue 65 536 (ALBEF); Sinkhorn queue 3 840 (SwAV's ImageNet setting).

    Schedules, by default the papers' (docs/math.md cites each line): the ITC queues start as random unit vectors
    (ALBEF, ``queue_init="random"``; ``"empty"``: nothing until rows arrive); with ``steps_per_epoch`` given, α
    ramps as α·min(1, step/steps_per_epoch) through epoch 0 (ALBEF Pretrain.py:61-64; ``alpha_warmup=False``
    keeps it fixed) and the Sinkhorn queue starts at epoch ``sinkhorn_queue_start_epoch`` = 15 (SwAV's
    ``epoch_queue_starts``); it takes part only once it holds ``sinkhorn_queue_length`` rows enqueued since then
    (SwAV main_swav.py:296; ``sinkhorn_queue_when_full=False``: part-filled queues too). Without
    ``steps_per_epoch`` the epoch-based rules cannot apply: α is fixed and the start is step 0. The codebook's
    prototypes follow SwAV (:class:`CodebookLoss`; call ``codebook_loss.freeze_prototypes_()`` after backward).
    ``step`` (forward) overrides the internal count of training forwards.
    """

    def __init__(self, dim: int, num_codes: int, queue_length: int = 65536, sinkhorn_queue_length: int = 3840,
                 tau: float = 0.1, epsilon: float = 0.05, n_iters: int = 3, alpha: float = 0.4, temp: float = 0.07,
                 codebook_weight: float = 1.0, itc_weight: float = 1.0, intra_weight: float = 1.0,
                 backend: str = "auto", steps_per_epoch: Optional[int] = None, alpha_warmup: bool = True,
                 queue_init: str = "random", sinkhorn_queue_start_epoch: int = 15,
                 sinkhorn_queue_when_full: bool = True, renormalize_prototypes: bool = True,
                 freeze_prototypes_steps: int = 313):
        super().__init__()
        self.codebook_loss = CodebookLoss(num_codes, dim, tau, epsilon, n_iters, backend=backend,
                                          renormalize=renormalize_prototypes, freeze_steps=freeze_prototypes_steps)
        self.temp = nn.Parameter(torch.tensor(float(temp)))
        self.queue_image = FeatureQueue(queue_length, dim, init=queue_init)
        self.queue_text = FeatureQueue(queue_length, dim, init=queue_init)
        self.sinkhorn_queue_length = int(sinkhorn_queue_length)
        self.alpha, self.backend = float(alpha), backend
        self.weights = {"codebook": codebook_weight, "itc": itc_weight, "intra": intra_weight}
        self.steps_per_epoch = None if steps_per_epoch is None else V.check_positive_int("steps_per_epoch",
                                                                                         steps_per_epoch)
        self.alpha_warmup, self.sinkhorn_queue_when_full = bool(alpha_warmup), bool(sinkhorn_queue_when_full)
        self.sinkhorn_queue_start_epoch = V.check_positive_int("sinkhorn_queue_start_epoch",
                                                               sinkhorn_queue_start_epoch, minimum=0)
        self.steps = 0  # training forwards so far; _sk_rows: rows enqueued since the Sinkhorn queue started
        self._sk_rows = 0

    def get_extra_state(self):
        return {"steps": self.steps, "sk_rows": self._sk_rows}

    def set_extra_state(self, state):
        self.steps, self._sk_rows = int(state.get("steps", 0)), int(state.get("sk_rows", 0))

    def alpha_at(self, step: int) -> float:
        """ALBEF's α at iteration ``step``: α·min(1, step/steps_per_epoch) in epoch 0, α after (Pretrain.py:61-64)."""
        if not self.alpha_warmup or self.steps_per_epoch is None or step >= self.steps_per_epoch:
            return self.alpha
        return self.alpha * min(1.0, step / self.steps_per_epoch)

    def sinkhorn_queue_started(self, step: int) -> bool:
        start = 0 if self.steps_per_epoch is None else self.sinkhorn_queue_start_epoch * self.steps_per_epoch
        return step >= start

    def sinkhorn_queue_rows(self) -> int:
        """How many of the newest queue rows take part in the Sinkhorn now (0: none)."""
        k = min(self.sinkhorn_queue_length, self._sk_rows)
        if self.sinkhorn_queue_when_full and k < self.sinkhorn_queue_length:
            return 0
        return k

    def _contrast(self, query, keys, teacher_query, queue, alpha):
        return Fn.momentum_contrastive_loss(query, keys, teacher_query, queue.to(keys.dtype), 1.0 / self.temp,
                                            alpha, backend=self.backend)

    def forward(self, image_features, text_features, teacher_image_features, teacher_text_features,
                step: Optional[int] = None):
        import torch.distributed as dist

        training = self.training and torch.is_grad_enabled()
        if step is None:
            step = self.steps
        if training:
            self.steps = int(step) + 1
        alpha = self.alpha_at(int(step))
        with torch.no_grad():
            self.temp.clamp_(0.001, 0.5)
        ti, tt = teacher_image_features.detach(), teacher_text_features.detach()
        qi, qt = self.queue_image.contents(), self.queue_text.contents()
        # the gathered queue is the same on every rank: in a global Sinkhorn it counts once (rank 0 adds it)
        first = not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
        k = self.sinkhorn_queue_rows() if first else 0
        sk_i = self.queue_image.recent(k).to(ti.dtype) if k else None
        sk_t = self.queue_text.recent(k).to(tt.dtype) if k else None
        out = {
            "codebook": self.codebook_loss(image_features, text_features, ti, tt, queue_image=sk_i, queue_text=sk_t),
            "itc": 0.5 * (self._contrast(image_features, tt, ti, qt, alpha)
                          + self._contrast(text_features, ti, tt, qi, alpha)),
            "intra": 0.5 * (self._contrast(image_features, ti, ti, qi, alpha)
                            + self._contrast(text_features, tt, tt, qt, alpha)),
        }
        out["loss"] = sum(self.weights[k] * v for k, v in out.items())
        self.queue_image.enqueue(torch.nn.functional.normalize(ti.to(self.queue_image.buffer.dtype), dim=-1))
        self.queue_text.enqueue(torch.nn.functional.normalize(tt.to(self.queue_text.buffer.dtype), dim=-1))
        if self.sinkhorn_queue_started(int(step)):
            self._sk_rows = min(self.queue_image.length, self._sk_rows + self.queue_image.last_added)
        return out


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
            contrastive, distill = self._distributed_distill(image_features, text_features, logit_scale,
                                                             dist_image_features, dist_text_features,
                                                             dist_logit_scale)
        else:
            contrastive, distill = Fn.distill_clip_loss(image_features, text_features, logit_scale,
                                                        dist_image_features, dist_text_features, dist_logit_scale,
                                                        backend=self.backend)
        if output_dict:
            return {"contrastive_loss": contrastive, "distill_loss": distill}
        return contrastive, distill

    def _distributed_distill(self, x, y, s, tx, ty, ts):
        from . import distributed as D
        from .dispatch import resolve

        n = x.shape[0]
        D.check_equal_local_batches(n)  # every call: a host-side all-gather (distributed._host_group)
        all_x, all_y = D.gather_features(x, y, self.local_loss, self.gather_with_grad)
        with torch.no_grad():
            all_tx, all_ty = D.gather_features(tx.detach(), ty.detach(), True, False)
        s = V.as_scalar_tensor("logit_scale", s, x)
        ts = V.as_scalar_tensor("dist_logit_scale", ts, x).detach()
        _, impl = resolve("distill", self.backend, x.device, n * all_y.shape[0])
        if self.local_loss:  # this rank's rows against the global keys, positives at n·rank + i (open_clip)
            return impl(x, y, s, tx.detach(), ty.detach(), ts, n * self.rank, all_x, all_y, all_tx, all_ty)
        return impl(all_x, all_y, s, all_tx, all_ty, ts, 0, all_x, all_y, all_tx, all_ty)
