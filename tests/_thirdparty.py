"""Loading the real third-party trainers (open_clip, transformers) beside a CPU-only torch, or skipping.

PyPI's torchvision is a CUDA build whose compiled ops do not load against the CPU torch wheel this project's
CI uses (``operator torchvision::nms does not exist``). open_clip and transformers import only torchvision's
pure-Python parts; :func:`fastcontrast.integrations.ensure_torchvision_importable` (the supported, documented
step that ``fco.patch()`` and ``apply_fastcontrast_to_*()`` take themselves) makes that import work. The tests
that import a trainer *before* calling the integration call it first, through :func:`torchvision_shim`.
"""
from __future__ import annotations

import importlib
import importlib.util
import warnings


def torchvision_shim() -> None:
    """``fastcontrast.integrations.ensure_torchvision_importable()``, its expected notice silenced (idempotent)."""
    from fastcontrast.integrations import ensure_torchvision_importable

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        ensure_torchvision_importable()


def import_open_clip():
    torchvision_shim()
    return importlib.import_module("open_clip")


def missing(*modules: str):
    """The first of ``modules`` that is not installed, or None."""
    for m in modules:
        if importlib.util.find_spec(m) is None:
            return m
    return None
