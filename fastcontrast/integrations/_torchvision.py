"""Importing torchvision when its compiled ops do not match the installed torch.

open_clip and transformers import torchvision for its pure-Python parts (transforms, datasets, model
definitions). A torchvision whose C++ extension was built for another torch (PyPI's x86_64 torchvision is a
CUDA build; beside the CPU torch wheel its ``_C`` library does not load) still loads those parts, except that
``import torchvision`` stops at ``RuntimeError: operator torchvision::nms does not exist``: its
``_meta_registrations`` registers fake kernels for ``nms``/``qnms`` without checking that the ops exist.

:func:`ensure_torchvision_importable` handles exactly that case: it declares the schemas of those two ops
(no kernel; ``torchvision.ops.nms`` raises torchvision's own "Couldn't load custom C++ ops", as every other
torchvision op already does there) and imports torchvision again, with a warning saying so. A torchvision whose
ops load, or none at all, is left alone. ``fastcontrast.integrations.open_clip.patch()`` and
``fastcontrast.integrations.transformers.apply_fastcontrast_to_*()`` call it before importing their trainer.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
import warnings
from typing import Optional

import torch

_declared: Optional[object] = None  # the torch.library.Library holding the declared schemas (kept alive)
_SCHEMAS = ("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
            "qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor")


def _has_schema(name: str) -> bool:
    try:
        torch._C._dispatch_find_schema_or_throw(name, "")
        return True
    except RuntimeError:
        return False


def ensure_torchvision_importable() -> Optional[str]:
    """Make ``import torchvision`` work beside a torch its compiled ops were not built for; idempotent.

    Returns None when torchvision is not installed, ``"ops"`` when it imports with its C++ ops,
    ``"no-ops"`` when its ops do not load and only its pure-Python parts are usable (the two schemas above
    were declared, with a ``RuntimeWarning`` the first time). Any other import error is raised unchanged.
    """
    global _declared
    if "torchvision" not in sys.modules and importlib.util.find_spec("torchvision") is None:
        return None
    try:
        importlib.import_module("torchvision")
    except RuntimeError as e:
        ext = sys.modules.get("torchvision.extension")
        if "torchvision::" not in str(e) or ext is None or ext._has_ops():
            raise
        for name in ("torchvision::nms", "torchvision::qnms"):
            if _has_schema(name):  # declared by someone else, yet the import failed: not the case handled here
                raise
        lib = torch.library.Library("torchvision", "DEF")
        for schema in _SCHEMAS:
            lib.define(schema)
        _declared = lib
        for mod in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[mod]  # the failed import's half-initialised modules
        tv = importlib.import_module("torchvision")
        warnings.warn(
            f"torchvision {getattr(tv, '__version__', '?')}'s compiled ops do not load beside torch "
            f"{torch.__version__} (a build for another torch); fastcontrast declared torchvision::nms/qnms without "
            "kernels so that its pure-Python parts (transforms, datasets) import; torchvision.ops raise "
            "'Couldn't load custom C++ ops'. Install the torchvision built for this torch to have them.",
            RuntimeWarning, stacklevel=2)
    from torchvision.extension import _has_ops

    return "ops" if _has_ops() else "no-ops"
