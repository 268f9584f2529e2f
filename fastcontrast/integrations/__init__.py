"""Trainer integrations: ``fastcontrast.integrations.open_clip`` (``patch()``),
``fastcontrast.integrations.transformers`` (``apply_fastcontrast_to_clip/siglip()``) and
``fastcontrast.integrations.sentence_transformers`` (``patch()``: MNRL, cached MNRL, GIST, Matryoshka).

:func:`ensure_torchvision_importable` lets both trainers import beside a torch that the installed torchvision's
compiled ops were not built for (e.g. PyPI's CUDA torchvision beside the CPU torch wheel); both integrations call
it themselves, and code that imports open_clip or transformers first can call it first.
"""
from . import sentence_transformers  # imports the package itself only in patch()
from ._torchvision import ensure_torchvision_importable

__all__ = ["ensure_torchvision_importable", "sentence_transformers"]
