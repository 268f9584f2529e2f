"""One call to make an open_clip training run use fastcontrast's loss.

    import fastcontrast.integrations.open_clip as fco
    fco.patch()            # before open_clip_train builds its loss (create_loss)

``patch`` replaces ``ClipLoss`` in ``open_clip.loss`` and in the ``open_clip`` package namespace with
:class:`fastcontrast.ClipLoss` (same constructor and forward), so ``open_clip.create_loss(args)`` returns the
fused loss for plain CLIP training; CoCa/distillation/SigLIP losses are left as they are. ``unpatch`` restores.
"""
from __future__ import annotations

import sys

from ..modules import ClipLoss

_saved = {}


def patch(backend: str = "auto") -> None:
    if "open_clip.loss" not in sys.modules:
        import open_clip.loss  # noqa: F401  (raises ImportError when open_clip is not installed)

    class FastClipLoss(ClipLoss):
        def __init__(self, *args, **kwargs):
            kwargs.setdefault("backend", backend)
            super().__init__(*args, **kwargs)

    for name in ("open_clip.loss", "open_clip"):
        mod = sys.modules.get(name)
        if mod is not None and hasattr(mod, "ClipLoss"):
            _saved.setdefault(name, mod.ClipLoss)
            mod.ClipLoss = FastClipLoss


def unpatch() -> None:
    for name, cls in _saved.items():
        if name in sys.modules:
            sys.modules[name].ClipLoss = cls
    _saved.clear()
