"""Trainer integrations: ``fastcontrast.integrations.open_clip`` (``patch()``) and
``fastcontrast.integrations.transformers`` (``apply_fastcontrast_to_clip/siglip()``).

:func:`ensure_torchvision_importable` lets both trainers import beside a torch that the installed torchvision's
compiled ops were not built for (e.g. PyPI's CUDA torchvision beside the CPU torch wheel); both integrations call
it themselves, and code that imports open_clip or transformers first can call it first.
"""
from ._torchvision import ensure_torchvision_importable

__all__ = ["ensure_torchvision_importable"]
