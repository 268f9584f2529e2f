"""Hugging Face transformers: ``CLIPModel`` and ``SiglipModel`` with fastcontrast's fused losses.

    from fastcontrast.integrations.transformers import apply_fastcontrast_to_clip
    apply_fastcontrast_to_clip()                             # every CLIPModel, from now on
    apply_fastcontrast_to_clip(model, materialize_logits=False)   # one model, and no N×N logits at all

(the convention of Liger-Kernel's ``apply_liger_kernel_to_*``). With ``return_loss=True`` the loss is computed
by :func:`fastcontrast.clip_loss` / :func:`fastcontrast.siglip_loss` on the model's normalised embeddings and
its ``logit_scale`` (and ``logit_bias``): the same value and gradients as the model's own loss. Without
``return_loss`` the model's forward runs untouched.

``materialize_logits=True`` (default) keeps every output field: the model's forward still builds
``logits_per_image``/``logits_per_text`` for code that reads them, but the loss's backward no longer goes
through them. ``materialize_logits=False`` calls ``get_image_features``/``get_text_features`` and returns the
output with ``logits_per_image = logits_per_text = None``: nothing N×N exists, forward or backward.

transformers imports torchvision when it is installed; the apply functions first call
:func:`fastcontrast.integrations.ensure_torchvision_importable`, so that a torchvision built for another torch
(PyPI's CUDA torchvision beside the CPU torch wheel) does not stop the import.
"""
from __future__ import annotations

import functools
import types
from typing import Dict, List, Optional, Tuple

import torch

from .. import clip_loss as _clip_loss
from .. import siglip_loss as _siglip_loss
from ._torchvision import ensure_torchvision_importable

_class_patches: Dict[type, object] = {}          # class -> its original forward
_instance_patches: List[torch.nn.Module] = []


def _pooled(out) -> torch.Tensor:
    # transformers >= 5 returns a BaseModelOutputWithPooling (projected pooler_output); 4.x returns the tensor
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _normalise(e: torch.Tensor) -> torch.Tensor:
    return e / e.norm(p=2, dim=-1, keepdim=True)  # exactly the models' own normalisation


def _loss(kind: str, model, image_embeds, text_embeds, backend: str):
    scale = model.logit_scale.to(text_embeds.device).exp()
    if kind == "clip":
        return _clip_loss(image_embeds, text_embeds, scale, backend=backend)
    bias = model.logit_bias.to(text_embeds.device)
    return _siglip_loss(image_embeds, text_embeds, scale, bias, backend=backend)


def _make_forward(kind: str, original, output_cls, materialize_logits: bool, backend: str):
    @functools.wraps(original)
    def forward(self, input_ids=None, pixel_values=None, attention_mask=None, position_ids=None, return_loss=None,
                interpolate_pos_encoding=False, **kwargs):
        if not return_loss:
            return original(self, input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
                            position_ids=position_ids, return_loss=return_loss,
                            interpolate_pos_encoding=interpolate_pos_encoding, **kwargs)
        as_tuple = kwargs.pop("return_dict", True) is False
        if materialize_logits:
            out = original(self, input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
                           position_ids=position_ids, return_loss=False,
                           interpolate_pos_encoding=interpolate_pos_encoding, return_dict=True, **kwargs)
            out.loss = _loss(kind, self, out.image_embeds, out.text_embeds, backend)
        else:
            vision = self.get_image_features(pixel_values=pixel_values,
                                             interpolate_pos_encoding=interpolate_pos_encoding, **kwargs)
            text = self.get_text_features(input_ids=input_ids, attention_mask=attention_mask,
                                          position_ids=position_ids, **kwargs)
            image_embeds, text_embeds = _normalise(_pooled(vision)), _normalise(_pooled(text))
            out = output_cls(loss=_loss(kind, self, image_embeds, text_embeds, backend), logits_per_image=None,
                             logits_per_text=None, text_embeds=text_embeds, image_embeds=image_embeds,
                             text_model_output=None if isinstance(text, torch.Tensor) else text,
                             vision_model_output=None if isinstance(vision, torch.Tensor) else vision)
        return out.to_tuple() if as_tuple else out

    forward._fastcontrast = True
    return forward


def _classes(kind: str) -> Tuple[type, type]:
    ensure_torchvision_importable()  # transformers imports torchvision when it is installed
    if kind == "clip":
        from transformers.models.clip import modeling_clip as m

        return m.CLIPModel, m.CLIPOutput
    from transformers.models.siglip import modeling_siglip as m

    return m.SiglipModel, m.SiglipOutput


def _apply(kind: str, model: Optional[torch.nn.Module], materialize_logits: bool, backend: str) -> None:
    from .. import BACKENDS

    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {', '.join(BACKENDS)}; got {backend!r}")
    cls, output_cls = _classes(kind)
    if model is None:
        original = _class_patches.get(cls, cls.forward)
        _class_patches[cls] = original
        cls.forward = _make_forward(kind, original, output_cls, materialize_logits, backend)
        return
    if not isinstance(model, cls):
        raise TypeError(f"model must be a transformers {cls.__name__}, got {type(model).__name__}")
    original = _class_patches.get(type(model), type(model).forward)
    model.forward = types.MethodType(_make_forward(kind, original, output_cls, materialize_logits, backend), model)
    if model not in _instance_patches:
        _instance_patches.append(model)


def apply_fastcontrast_to_clip(model: Optional[torch.nn.Module] = None, materialize_logits: bool = True,
                               backend: str = "auto") -> None:
    """``CLIPModel(return_loss=True)`` on :func:`fastcontrast.clip_loss`: the class (``model=None``) or one model."""
    _apply("clip", model, materialize_logits, backend)


def apply_fastcontrast_to_siglip(model: Optional[torch.nn.Module] = None, materialize_logits: bool = True,
                                 backend: str = "auto") -> None:
    """``SiglipModel(return_loss=True)`` on :func:`fastcontrast.siglip_loss`: the class or one model."""
    _apply("siglip", model, materialize_logits, backend)


def revert() -> None:
    """Undo every patch of this module: class forwards restored, per-model overrides removed."""
    for cls, original in _class_patches.items():
        cls.forward = original
    _class_patches.clear()
    while _instance_patches:
        m = _instance_patches.pop()
        m.__dict__.pop("forward", None)
