"""One call to make an open_clip training run use fastcontrast's losses.

    import fastcontrast.integrations.open_clip as fco
    fco.patch()            # before open_clip_train builds its loss (open_clip.create_loss)

``patch`` replaces open_clip's ``ClipLoss``, ``SigLipLoss``, ``CoCaLoss`` and ``DistillClipLoss`` with subclasses
of fastcontrast's fused losses (same constructors, same ``forward``), *everywhere the originals are bound*:
``open_clip.loss``, the ``open_clip`` package, ``open_clip.factory`` (whose ``create_loss`` uses its own
``from .loss import ...`` binding) and any other loaded module that imported them by name. ``unpatch`` puts
every binding back.

``DistillClipLoss`` (``--distill``) needs no N×N logits either: per row its soft-target term is
lse_i − s·⟨x_i, Σ_j P^T_ij y_j⟩, the teacher-softmax-weighted sum of the student's keys computed in row blocks
(:mod:`fastcontrast.ops.infonce.distill`). One difference on purpose: the teacher gets no gradient (open_clip's
trainer runs it under ``no_grad`` anyway).
"""
from __future__ import annotations

import sys
from typing import Dict, List, Tuple

import torch
import torch.nn as nn

from .. import modules as M

_patched: List[Tuple[object, str, type]] = []  # (module, attribute, original) for unpatch


class FastClipLoss(M.ClipLoss):
    """open_clip's ``ClipLoss`` signature on the fused InfoNCE."""


class FastSigLipLoss(M.SigLipLoss):
    """open_clip's ``SigLipLoss`` signature on the fused sigmoid loss."""


class FastCoCaLoss(M.ClipLoss):
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


class FastDistillClipLoss(M.DistillClipLoss):
    """open_clip's ``DistillClipLoss`` signature and outputs on the fused InfoNCE and teacher-weighted keys."""


_REPLACEMENTS = {"ClipLoss": FastClipLoss, "SigLipLoss": FastSigLipLoss, "CoCaLoss": FastCoCaLoss,
                 "DistillClipLoss": FastDistillClipLoss}


def _with_backend(cls: type, backend: str) -> type:
    if backend == "auto":
        return cls

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("backend", backend)
        cls.__init__(self, *args, **kwargs)

    return type(cls.__name__, (cls,), {"__init__": __init__, "__module__": cls.__module__})


def patch(backend: str = "auto", losses=("ClipLoss", "SigLipLoss", "CoCaLoss", "DistillClipLoss")
          ) -> Dict[str, type]:
    """Replace the named open_clip loss classes in every loaded module that binds them; returns what was bound.

    Call it before the trainer builds its loss. Calling it twice is harmless; :func:`unpatch` undoes it.
    """
    unknown = set(losses) - set(_REPLACEMENTS)
    if unknown:
        raise ValueError(f"losses: cannot patch {sorted(unknown)}; expected a subset of {sorted(_REPLACEMENTS)}")
    import open_clip.factory  # noqa: F401  (ImportError when open_clip is not installed)
    import open_clip.loss as oc_loss

    originals = {name: getattr(oc_loss, name) for name in losses}
    if any(issubclass(c, (M.ClipLoss, M.SigLipLoss)) for c in originals.values()):
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
