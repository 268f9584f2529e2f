"""The one place that picks a backend.

Every op registers its implementations here (``register(op, backend)``); every public function asks
``resolve(op, backend, device, size)`` for the callable. Backends:

* ``triton``: fused Triton kernels (CUDA; the CPU only through the Triton interpreter, a test tool);
* ``cuda``, ``cpu``: the fused kernels of the compiled extension (csrc/);
* ``dense``: the materialised path (one GEMM, softmax statistics on N×M, a hand-written backward): the fastest
  below a few thousand rows, O(N·M) memory;
* ``reference``: readable autograd PyTorch, the ground truth (also materialised).

``"auto"`` is size-aware: when the pairwise size N·M is at most ``crossover(device)`` it takes ``dense`` (or the
reference where an op has no dense path), above it the fused kernels: triton > cuda > reference on CUDA,
cpu > reference on the CPU. The crossovers are measured (benchmarks/RESULTS.md says where and with which
command) and can be set with :func:`set_crossover` or ``FASTCONTRAST_CROSSOVER_CPU`` / ``_CUDA`` (elements).
An explicit backend that cannot run says why.
"""
from __future__ import annotations

import os
from typing import Callable, Dict, Optional, Tuple

import torch

BACKENDS = ("triton", "cuda", "cpu", "dense", "reference")
_FUSED_ORDER = {"cuda": ("triton", "cuda", "reference"), "cpu": ("cpu", "reference")}

# Pairwise size N·M at or below which "auto" takes the materialised path.
# CPU: measured on the 2-core CI machine (benchmarks/overhead_and_crossover.py, clip fwd+bwd, d = 512, float32;
# RESULTS.md "Size-aware auto"): the dense path is faster than the C++ kernel at every size measured, 64 to
# 16384 (0.41x to 0.84x of its time), but holds three N×M float32 buffers: 768 MiB at N = 8192, 3 GiB at 16384.
# So the switch is set by memory: dense up to 8192², the O(N)-memory kernel above. CUDA: no GPU has measured the
# dense path yet; 4096² is the size at which the fused Triton kernel lost to torch.compile's materialised
# reference on an H100 (3.06 vs 2.12 ms, bf16, d = 768), where the N×N float32 logits take 64 MiB. Rerun the
# benchmark with benchmarks/gpu_session.sh to replace it.
_CROSSOVER = {
    "cpu": int(os.environ.get("FASTCONTRAST_CROSSOVER_CPU", 8192 * 8192)),
    "cuda": int(os.environ.get("FASTCONTRAST_CROSSOVER_CUDA", 4096 * 4096)),
}

_registry: Dict[Tuple[str, str], Callable] = {}
_auto_cache: Dict[Tuple[str, str, bool, bool], Tuple[str, Callable]] = {}

# Kernels that compute in float32 whatever they are given: float64 inputs would come back with float32 accuracy
# (a loss off in the 8th digit, a gradcheck that fails for no visible reason). For float64 these backends run
# the op's float64 reference instead (materialised: float64 is for checks and small problems), as the Triton
# InfoNCE family (infonce, ce_rows, momentum_contrastive, swapped_prediction, distill) runs its float64 PyTorch
# tiles. The CUDA extension's other kernels refuse float64 with an error of their own (csrc/cuda_binding.cpp).
_FLOAT32_ONLY = {("siglip", "triton"), ("max_margin", "triton"), ("sinkhorn", "triton"), ("sinkhorn", "cuda")}


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run this call; the message says why."""


def register(op: str, backend: str):
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}")

    def deco(fn):
        _registry[(op, backend)] = fn
        _auto_cache.clear()
        return fn

    return deco


def crossover(device_type: str) -> int:
    """The pairwise size N·M up to which ``"auto"`` takes the materialised path on ``device_type``."""
    return _CROSSOVER.get(device_type, 0)


def set_crossover(device_type: str, elements: int) -> None:
    """Set the size-aware ``"auto"`` threshold (N·M elements) for ``"cpu"`` or ``"cuda"``; 0 always fuses."""
    if device_type not in _CROSSOVER:
        raise ValueError(f"device_type must be 'cpu' or 'cuda', got {device_type!r}")
    if isinstance(elements, bool) or not isinstance(elements, int) or elements < 0:
        raise ValueError(f"elements must be an int >= 0, got {elements!r}")
    _CROSSOVER[device_type] = elements


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
        reason = f"op {op!r} has no {backend!r} implementation"
    return reason


def _impl(op: str, backend: str, f64: bool) -> Callable:
    if f64 and (op, backend) in _FLOAT32_ONLY:
        return _registry[(op, "reference")]
    return _registry[(op, backend)]


def _auto(op: str, device: torch.device, small: bool, f64: bool = False) -> Tuple[str, Callable]:
    key = (op, device.type, small, f64)
    hit = _auto_cache.get(key)
    if hit is not None:
        return hit
    order = ("dense", "reference") if small else _FUSED_ORDER.get(device.type, ("reference",))
    for cand in order:
        if unavailable_reason(op, cand, device) is None:
            _auto_cache[key] = (cand, _impl(op, cand, f64))
            return _auto_cache[key]
    raise BackendUnavailableError(f"no backend can run {op!r} on {device}")  # reference always registers


def _under_torch_func() -> bool:
    """Inside a torch.func transform (grad, vjp, jacrev, vmap, ...): a host-side flag, no tensor read."""
    level = getattr(getattr(torch._C, "_functorch", None), "maybe_current_level", None)
    return level is not None and level() is not None


def resolve(op: str, backend: str, device: torch.device, size: int = 0,
            dtype: Optional[torch.dtype] = None) -> Tuple[str, Callable]:
    """``(backend_name, implementation)`` for ``op`` on ``device``; ``size`` = N·M decides ``"auto"``;
    ``dtype``: the inputs' dtype; float64 on a float32-only kernel gets the op's float64 reference.
    Under torch.func transforms only the reference composes (the other backends' autograd is hand-written):
    ``"auto"`` takes it there and an explicit other backend raises."""
    func = _under_torch_func()
    if backend == "auto":
        if func:
            return "reference", _impl(op, "reference", dtype == torch.float64)
        return _auto(op, device, 0 < size <= _CROSSOVER.get(device.type, 0), dtype == torch.float64)
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    if func and backend in BACKENDS and backend != "reference":
        raise BackendUnavailableError(
            f"backend {backend!r} is unavailable for {op!r} under torch.func transforms (grad, vmap, jacrev, ...): "
            "its autograd is a hand-written Function or a fused kernel that does not compose with them; use "
            "backend='reference' (or 'auto', which takes it under torch.func)")
    reason = unavailable_reason(op, backend, device)
    if reason is not None:
        if backend not in BACKENDS:
            raise ValueError(f"backend: {reason}")
        raise BackendUnavailableError(f"backend {backend!r} is unavailable for {op!r}: {reason}")
    return backend, _impl(op, backend, dtype == torch.float64)


def _visible_devices():
    return [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])


def available_backends(op: Optional[str] = None, device=None):
    """The backends that can run ``op`` on ``device``. With no arguments: {op: {device: (backends...)}} for every
    registered op on every device this process can see (the CPU, and CUDA when present)."""
    if op is None:
        ops = sorted({o for o, _ in _registry})
        devices = [torch.device(device)] if device is not None else _visible_devices()
        return {o: {str(d): available_backends(o, d) for d in devices} for o in ops}
    if device is None:
        return {str(d): available_backends(op, d) for d in _visible_devices()}
    device = torch.device(device)
    return tuple(b for b in BACKENDS if unavailable_reason(op, b, device) is None)
