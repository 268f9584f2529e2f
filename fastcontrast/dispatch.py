"""The one place that picks a backend.

Every op registers its implementations here (``register(op, backend)``); every public function asks
``resolve(op, backend, tensor)`` for the callable. ``"auto"`` prefers, on CUDA tensors, triton > cuda >
reference, and on CPU tensors cpu > reference (the Triton interpreter is a test tool, never auto-picked).
An explicit backend that cannot run says why.
"""
from __future__ import annotations

import os
from typing import Callable, Dict, Optional, Tuple

import torch

BACKENDS = ("triton", "cuda", "cpu", "reference")
_AUTO_ORDER = {"cuda": ("triton", "cuda", "reference"), "cpu": ("cpu", "reference")}

_registry: Dict[Tuple[str, str], Callable] = {}


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run this call; the message says why."""


def register(op: str, backend: str):
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}")

    def deco(fn):
        _registry[(op, backend)] = fn
        return fn

    return deco


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _triton_reason(device: torch.device) -> Optional[str]:
    from .ops import _triton_support

    if _triton_support.IMPORT_ERROR is not None:
        return f"triton is not importable ({_triton_support.IMPORT_ERROR})"
    if device.type == "cuda" or (device.type == "cpu" and triton_interpret()):
        return None
    return f"triton kernels need CUDA tensors (got {device.type}; set TRITON_INTERPRET=1 to run them on the CPU interpreter)"


def _ext_reason(device: torch.device, want: str) -> Optional[str]:
    from . import _ext

    if want == "cuda":
        if device.type != "cuda":
            return f"backend 'cuda' needs CUDA tensors, got {device.type}"
        return _ext.cuda_unavailable_reason()
    if device.type != "cpu":
        return f"backend 'cpu' needs CPU tensors, got {device.type}"
    return _ext.cpu_unavailable_reason()


def unavailable_reason(op: str, backend: str, device: torch.device) -> Optional[str]:
    """None when ``backend`` can run ``op`` on ``device``, else a sentence saying why not."""
    if backend not in BACKENDS:
        return f"unknown backend {backend!r}; expected one of {('auto',) + BACKENDS}"
    if backend == "triton":
        reason = _triton_reason(device)
    elif backend in ("cuda", "cpu"):
        reason = _ext_reason(device, backend)
    else:
        reason = None
    if reason is None and (op, backend) not in _registry:
        reason = f"op {op!r} has no {backend!r} implementation yet"
    return reason


def resolve(op: str, backend: str, device: torch.device) -> Tuple[str, Callable]:
    """Return ``(backend_name, implementation)`` for ``op`` on ``device``."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    if backend == "auto":
        for cand in _AUTO_ORDER.get(device.type, ("reference",)):
            if unavailable_reason(op, cand, device) is None:
                return cand, _registry[(op, cand)]
        raise BackendUnavailableError(f"no backend can run {op!r} on {device}")  # reference always registers
    reason = unavailable_reason(op, backend, device)
    if reason is not None:
        if backend not in BACKENDS:
            raise ValueError(f"backend: {reason}")
        raise BackendUnavailableError(f"backend {backend!r} is unavailable for {op!r}: {reason}")
    return backend, _registry[(op, backend)]


def available_backends(op: str, device: torch.device) -> Tuple[str, ...]:
    return tuple(b for b in BACKENDS if unavailable_reason(op, b, device) is None)
