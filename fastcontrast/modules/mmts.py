"""The MM-TS modules (per-sample temperature and margin schedules, as the authors' code computes them):
``MMTSClipLoss``, ``MMTSMaxMarginLoss``; the AVION baseline ``MaxMarginLoss``; and this package's
``DensityTemperatureClipLoss``. Under torch.distributed the MM-TS gathers are ``fastcontrast.distributed.mmts``."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from .. import _validation as V
from .. import functional as Fn
from ..distributed import mmts as AD
from ..distributed.comm import check_equal_local_batches


class _MMTS(nn.Module):
    """The schedule state shared by the MM-TS losses: τ_i(t) = (α/2)·cos(2πt/P) + sh(c_i); with
    ``world_size > 1`` the official code's gather of features and τ (:mod:`fastcontrast.distributed.mmts`)."""

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
        check_equal_local_batches(n)  # every call: a host-side all-gather (distributed.comm._host_group)
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
