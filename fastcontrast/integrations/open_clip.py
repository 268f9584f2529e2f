"""One call to make an open_clip training run use fastcontrast's losses.

    import fastcontrast.integrations.open_clip as fco
    fco.patch()            # before open_clip_train builds its loss (open_clip.create_loss)

``patch`` replaces open_clip's ``ClipLoss``, ``SigLipLoss``, ``CoCaLoss`` and ``DistillClipLoss`` with subclasses
of fastcontrast's fused losses, *everywhere the originals are bound*: ``open_clip.loss``, the ``open_clip``
package, ``open_clip.factory`` (whose ``create_loss`` uses its own ``from .loss import ...`` binding) and any
other loaded module that imported them by name. ``unpatch`` puts every binding back.

The drop-ins follow open_clip's classes, as released (3.3.0) and on its main branch: every constructor argument
of either (``use_horovod`` of 3.3.0, which raises a ValueError when true: fastcontrast uses torch.distributed;
``SigLipLoss(chunk_size=)`` of main, see :class:`FastSigLipLoss`), the same ``forward``, and the helper methods
open_clip's own code and tests call, computing the same values: ``get_ground_truth`` and ``get_logits`` (these
two materialise what they return, for callers that read it; the losses never call them),
``SigLipLoss._loss``/``_chunked_loss`` (fused), ``DistillClipLoss.dist_loss``, and the label cache attributes
(``prev_num_logits``, ``labels``).

``DistillClipLoss`` (``--distill``) needs no N×N logits either: per row its soft-target term is
lse_i − s·⟨x_i, Σ_j P^T_ij y_j⟩, the teacher-softmax-weighted sum of the student's keys computed in row blocks
(:func:`fastcontrast.distill_clip_loss`). One difference on purpose: the teacher gets no gradient (open_clip's
trainer runs it under ``no_grad`` anyway).

open_clip's package imports torchvision; :func:`patch` first calls
:func:`fastcontrast.integrations.ensure_torchvision_importable`, so that a torchvision built for another torch
(PyPI's CUDA torchvision beside the CPU torch wheel) does not stop ``import open_clip``.
"""
from __future__ import annotations

import functools
import sys
from typing import Dict, List, Tuple

import torch
import torch.nn as nn

from .. import ClipLoss as _ClipLoss
from .. import DistillClipLoss as _DistillClipLoss
from .. import SigLipLoss as _SigLipLoss
from .. import siglip_loss as _siglip_loss
from ._torchvision import ensure_torchvision_importable

_patched: List[Tuple[object, str, type]] = []  # (module, attribute, original) for unpatch


class FastClipLoss(_ClipLoss):
    """open_clip's ``ClipLoss`` (3.3.0 and main) on the fused InfoNCE.

    Constructor: open_clip's ``local_loss, gather_with_grad, cache_labels, rank, world_size`` and 3.3.0's
    ``use_horovod``, then fastcontrast's ``backend``, ``normalize``, ``mode`` (:class:`fastcontrast.ClipLoss`).
    ``cache_labels`` caches :meth:`get_ground_truth`'s labels as open_clip does; the loss itself needs none (the
    diagonal is implicit in the fused ops).
    """

    def __init__(self, local_loss: bool = False, gather_with_grad: bool = False, cache_labels: bool = False,
                 rank: int = 0, world_size: int = 1, use_horovod: bool = False, backend: str = "auto",
                 normalize: bool = False, mode: str = "gather"):
        super().__init__(local_loss=local_loss, gather_with_grad=gather_with_grad, cache_labels=cache_labels,
                         rank=rank, world_size=world_size, use_horovod=use_horovod, backend=backend,
                         normalize=normalize, mode=mode)
        self.use_horovod = use_horovod
        self.prev_num_logits = 0  # open_clip's label cache
        self.labels = {}

    def get_ground_truth(self, device, num_logits) -> torch.Tensor:
        """open_clip's helper, its cache included: each row's positive index (offset by rank under local_loss)."""
        if self.prev_num_logits != num_logits or device not in self.labels:
            labels = torch.arange(num_logits, device=device, dtype=torch.long)
            if self.world_size > 1 and self.local_loss:
                labels = labels + num_logits * self.rank
            if self.cache_labels:
                self.labels[device] = labels
                self.prev_num_logits = num_logits
        else:
            labels = self.labels[device]
        return labels


class FastSigLipLoss(_SigLipLoss):
    """open_clip's ``SigLipLoss`` (3.3.0 and main) on the fused sigmoid loss.

    Constructor: open_clip's ``cache_labels, rank, world_size, dist_impl, chunk_size``, then ``backend``.

    ``chunk_size`` (open_clip main; 0 = off) is accepted and validated (an int >= 0) but changes nothing:
    open_clip chunks the image rows so that at most a (chunk_size, N) block of logits exists at a time, instead
    of the (N, N) logits and labels; the fused loss never holds either — it streams over tiles of the text rows,
    forward and backward, whatever ``chunk_size`` says — so there is no block left to bound. The value is
    open_clip's either way (its chunked and unchunked paths agree to rounding, as here).

    ``_loss(image_features, text_features, logit_scale, logit_bias=None, negative_only=False)`` is open_clip's
    per-block term (open_clip's distributed loop and its tests call it): −Σ log σ(z·(s⟨x_i, y_j⟩ + b)) / N_image,
    z = +1 on the diagonal (pairs (k, k), k < min(N_image, N_text), as open_clip's chunked path), −1 elsewhere;
    all −1 with ``negative_only``. Fused, whatever ``chunk_size``; ``_chunked_loss`` is the same.
    ``get_ground_truth``/``get_logits`` are open_clip's helpers and materialise what they return.
    """

    def __init__(self, cache_labels: bool = False, rank: int = 0, world_size: int = 1, dist_impl=None,
                 chunk_size: int = 0, backend: str = "auto"):
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
            raise TypeError(f"chunk_size must be an int (0 = no chunking), got {type(chunk_size).__name__}")
        if chunk_size < 0:
            raise ValueError(f"chunk_size must be >= 0 (0 = no chunking), got {chunk_size}")
        super().__init__(cache_labels=cache_labels, rank=rank, world_size=world_size, dist_impl=dist_impl,
                         backend=backend)
        self.chunk_size = chunk_size
        self.prev_num_logits = 0  # open_clip's (unused) label cache
        self.labels = {}

    def get_ground_truth(self, device, dtype, num_logits, negative_only=False) -> torch.Tensor:
        """open_clip's helper: the (num_logits, num_logits) ±1 targets (all −1 with ``negative_only``)."""
        labels = -torch.ones((num_logits, num_logits), device=device, dtype=dtype)
        if not negative_only:
            labels = 2 * torch.eye(num_logits, device=device, dtype=dtype) + labels
        return labels

    def get_logits(self, image_features, text_features, logit_scale, logit_bias=None) -> torch.Tensor:
        """open_clip's helper: the materialised s·X Yᵀ (+ b), for code that reads it. The loss never builds it."""
        logits = logit_scale * image_features @ text_features.T
        return logits if logit_bias is None else logits + logit_bias

    def _loss(self, image_features, text_features, logit_scale, logit_bias=None, negative_only=False):
        if not isinstance(image_features, torch.Tensor) or not isinstance(text_features, torch.Tensor) \
                or image_features.dim() != 2 or text_features.dim() != 2:
            # the fused loss's own check names the argument
            return _siglip_loss(image_features, text_features, logit_scale, logit_bias, backend=self.backend)
        if negative_only:
            return _siglip_loss(image_features, text_features, logit_scale, logit_bias, negative_only=True,
                                backend=self.backend)
        n, m = image_features.shape[0], text_features.shape[0]
        if n <= m:  # row k's positive is text k
            labels = None if n == m else torch.arange(n, device=image_features.device)
            return _siglip_loss(image_features, text_features, logit_scale, logit_bias, labels=labels,
                                backend=self.backend)
        # more images than texts: rows >= m have no positive (open_clip's chunked path)
        dev = image_features.device
        return _siglip_loss(image_features, text_features, logit_scale, logit_bias, backend=self.backend,
                            image_ids=torch.arange(n, device=dev), text_ids=torch.arange(m, device=dev))

    def _chunked_loss(self, image_features, text_features, logit_scale, logit_bias=None, negative_only=False):
        """open_clip main's chunked path: the same fused value as :meth:`_loss` (no chunk is ever materialised)."""
        return self._loss(image_features, text_features, logit_scale, logit_bias, negative_only)


class FastCoCaLoss(FastClipLoss):
    """open_clip's ``CoCaLoss``: the contrastive term fused, the captioning cross-entropy as open_clip has it."""

    def __init__(self, caption_loss_weight, clip_loss_weight, pad_id=0, local_loss=False, gather_with_grad=False,
                 cache_labels=False, rank=0, world_size=1, use_horovod=False, backend: str = "auto"):
        super().__init__(local_loss=local_loss, gather_with_grad=gather_with_grad, cache_labels=cache_labels,
                         rank=rank, world_size=world_size, use_horovod=use_horovod, backend=backend)
        self.clip_loss_weight = clip_loss_weight
        self.caption_loss_weight = caption_loss_weight
        self.caption_loss = nn.CrossEntropyLoss(ignore_index=pad_id)

    def forward(self, image_features, text_features, logits, labels, logit_scale, output_dict=False):
        if self.clip_loss_weight:
            clip_loss = self.clip_loss_weight * super().forward(image_features, text_features, logit_scale)
        else:
            clip_loss = torch.tensor(0, device=logits.device)
        caption_loss = self.caption_loss(logits.permute(0, 2, 1), labels) * self.caption_loss_weight
        if output_dict:
            return {"contrastive_loss": clip_loss, "caption_loss": caption_loss}
        return clip_loss, caption_loss


class FastDistillClipLoss(FastClipLoss, _DistillClipLoss):
    """open_clip's ``DistillClipLoss`` signature and outputs on the fused InfoNCE and teacher-weighted keys."""

    def dist_loss(self, teacher_logits, student_logits):
        """open_clip's helper on materialised logits: −mean_i Σ_j softmax(teacher)_ij · log_softmax(student)_ij."""
        return -(teacher_logits.softmax(dim=1) * student_logits.log_softmax(dim=1)).sum(dim=1).mean(dim=0)


_REPLACEMENTS = {"ClipLoss": FastClipLoss, "SigLipLoss": FastSigLipLoss, "CoCaLoss": FastCoCaLoss,
                 "DistillClipLoss": FastDistillClipLoss}


def _with_backend(cls: type, backend: str) -> type:
    if backend == "auto":
        return cls

    @functools.wraps(cls.__init__)  # keeps the signature for inspect
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("backend", backend)
        cls.__init__(self, *args, **kwargs)

    return type(cls.__name__, (cls,), {"__init__": __init__, "__module__": cls.__module__})


def patch(backend: str = "auto", losses=("ClipLoss", "SigLipLoss", "CoCaLoss", "DistillClipLoss")
          ) -> Dict[str, type]:
    """Replace the named open_clip loss classes in every loaded module that binds them; returns what was bound.

    Call it before the trainer builds its loss. Calling it twice is harmless; :func:`unpatch` undoes it.
    """
    from .. import BACKENDS

    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {', '.join(BACKENDS)}; got {backend!r}")
    if isinstance(losses, str):
        losses = (losses,)
    unknown = set(losses) - set(_REPLACEMENTS)
    if unknown:
        raise ValueError(f"losses: cannot patch {sorted(unknown)}; expected a subset of {sorted(_REPLACEMENTS)}")
    ensure_torchvision_importable()
    import open_clip.factory  # noqa: F401  (ImportError when open_clip is not installed)
    import open_clip.loss as oc_loss

    originals = {name: getattr(oc_loss, name) for name in losses}
    if any(issubclass(c, (_ClipLoss, _SigLipLoss)) for c in originals.values()):
        unpatch()  # patched before (maybe with another backend): start from open_clip's own classes
        originals = {name: getattr(oc_loss, name) for name in losses}
    new = {name: _with_backend(_REPLACEMENTS[name], backend) for name in losses}
    for mod in list(sys.modules.values()):
        d = getattr(mod, "__dict__", None)
        if not isinstance(d, dict):
            continue
        for attr, value in list(d.items()):
            for name, orig in originals.items():
                if value is orig:
                    _patched.append((mod, attr, orig))
                    setattr(mod, attr, new[name])
    return new


def unpatch() -> None:
    """Restore every binding :func:`patch` replaced."""
    while _patched:
        mod, attr, orig = _patched.pop()
        setattr(mod, attr, orig)


def is_patched() -> bool:
    return bool(_patched)
