"""Loading the real third-party trainers (open_clip, transformers) beside a CPU-only torch, or skipping.

PyPI's torchvision is a CUDA build whose compiled ops do not load against the CPU torch wheel this project's
CI uses (``operator torchvision::nms does not exist``). open_clip and transformers import only torchvision's
pure-Python parts (transforms, datasets), so declaring the two op schemas that its import registers fake
kernels for lets it load; calling those ops would still fail, and nothing here calls them.
"""
from __future__ import annotations

import importlib
import importlib.util

import torch

_shimmed = False


def torchvision_shim() -> None:
    """Declare ``torchvision::nms``/``qnms`` when torchvision's own C++ ops are missing (idempotent)."""
    global _shimmed
    if _shimmed or importlib.util.find_spec("torchvision") is None:
        return
    try:
        torch._C._dispatch_find_schema_or_throw("torchvision::nms", "")
    except RuntimeError:
        lib = torch.library.Library("torchvision", "DEF")
        lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        lib.define("qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor")
        torchvision_shim._lib = lib  # keep the registration alive
    _shimmed = True


def import_open_clip():
    torchvision_shim()
    return importlib.import_module("open_clip")


def missing(*modules: str):
    """The first of ``modules`` that is not installed, or None."""
    for m in modules:
        if importlib.util.find_spec(m) is None:
            return m
    return None
