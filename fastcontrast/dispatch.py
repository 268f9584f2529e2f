"""The one place that picks a backend, and the implementation object everything below receives.

Every loss module registers its implementations here (``register(op, backend, ...)``); every public function
asks ``resolve(op, backend, device, size, dtype)`` once and gets an :class:`Impl`: which backend runs, which
compute kernel its forward and backward take (decided here, never again below), what it supports, and the
callable. Backends:

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

Kernels (``Impl.kernel``, ``Impl.backward_kernel``): ``triton``, ``cuda``, ``cpu`` (csrc), ``tiles`` (the
blockwise PyTorch implementation of the same tiling: O(N·D) memory, float64-exact), ``dense``, ``reference``.
Two substitutions are made here and nowhere else:

* float64 on a kernel that computes in float32 would come back with float32 accuracy (a loss off in the 8th
  digit, a gradcheck that fails for no visible reason): such an op declares ``float64="tiles"`` (its Triton path
  has PyTorch tiles in float64) or ``float64="reference"`` (the op's reference runs instead);
* under ``torch.use_deterministic_algorithms(True)`` the CUDA extension's backward (atomicAdd of the scale
  gradients, in an order that changes from run to run) gives way to the PyTorch tiles: the same math with
  fixed-order reductions. The Triton kernels are deterministic in every mode.

And one decision by what the call needs: ``resolve(..., needs=("masks",))`` says the call carries what some
kernels cannot compute (``"masks"``: keep/group/guide masks or a hardness penalty inside the log-sum-exp, see
``primitives/lse_masked.py``). An entry registered with ``lacks=("masks",)`` (the C++/CUDA kernels of csrc/ have
no masks) then runs the PyTorch tiles (``Impl.kernel == "tiles"``, forward and backward) for that call, and
its own kernels for every call that does not need them. The kernels below never substitute on their own: told
to run a mask on a kernel without masks, they raise.
"""
from __future__ import annotations

import dataclasses
import inspect
import os
from typing import Callable, Dict, FrozenSet, Iterable, Optional, Tuple

import torch

BACKENDS = ("triton", "cuda", "cpu", "dense", "reference")
FUSED = ("triton", "cuda", "cpu")
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


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run this call; the message says why."""


@dataclasses.dataclass(frozen=True)
class Entry:
    """One registered implementation: the callable and what it declares about itself."""
    fn: Callable
    float64: str  # "native" | "tiles" (its fused path runs PyTorch tiles in float64) | "reference"
    deterministic: bool  # bitwise repeatable run to run (before the deterministic-mode substitution)
    double_backward: bool  # exact second derivatives (create_graph=True); else a clear error
    wants_impl: bool  # fn takes the resolved Impl as its keyword-only ``impl`` argument
    lacks: FrozenSet[str] = frozenset()  # what its kernels cannot do (NEEDS): such calls take the PyTorch tiles


# What a call can need that not every kernel computes (``resolve(..., needs=...)``, ``register(..., lacks=...)``).
NEEDS = ("masks", "prefixes")  # masks: lse_masked; prefixes: Matryoshka's nested prefixes


@dataclasses.dataclass(frozen=True)
class Impl:
    """What :func:`resolve` decided, passed down to the code that runs it.

    ``backend``: the backend that runs; ``kernel`` / ``backward_kernel``: the compute kernels of its forward
    and backward (see the module doc); ``dtypes``: the dtypes it computes in (others are refused by the public
    API's checks); ``deterministic``: bitwise repeatable run to run as resolved; ``double_backward``: exact
    second derivatives (else a clear error under create_graph=True); ``devices``: where it can run."""
    op: str
    backend: str
    kernel: str
    backward_kernel: str
    dtypes: Tuple[torch.dtype, ...]
    deterministic: bool
    double_backward: bool
    devices: Tuple[str, ...]
    fn: Callable = dataclasses.field(repr=False, compare=False)
    wants_impl: bool = dataclasses.field(default=False, repr=False, compare=False)

    def __call__(self, *args, **kwargs):
        if self.wants_impl:
            return self.fn(*args, impl=self, **kwargs)
        return self.fn(*args, **kwargs)


_registry: Dict[Tuple[str, str], Entry] = {}
_cache: Dict[tuple, Impl] = {}

_ALL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_DEVICES = {"triton": ("cuda", "cpu (TRITON_INTERPRET=1)"), "cuda": ("cuda",), "cpu": ("cpu",),
            "dense": ("cpu", "cuda"), "reference": ("cpu", "cuda")}


def _check_needs(name: str, values: Iterable[str]) -> FrozenSet[str]:
    out = frozenset(values)
    unknown = sorted(out - set(NEEDS))
    if unknown:
        raise ValueError(f"{name} must be a subset of {NEEDS}, got unknown {unknown}")
    return out


def register(op: str, backend: str, *, float64: str = "native", deterministic: bool = True,
             double_backward: Optional[bool] = None, lacks: Iterable[str] = ()):
    """Decorator: ``fn`` implements ``op`` on ``backend``. ``float64``: how float64 inputs are served (module doc);
    ``double_backward`` defaults to True on dense/reference (autograd or its rebuild), False on fused backends.
    ``lacks``: what of :data:`NEEDS` this backend's own kernels cannot compute: a call that needs it runs the
    PyTorch tiles instead (module doc). A function with a keyword-only ``impl`` parameter receives the resolved
    :class:`Impl`."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}")
    if float64 not in ("native", "tiles", "reference"):
        raise ValueError(f"float64 must be 'native', 'tiles' or 'reference', got {float64!r}")
    lacks = _check_needs("lacks", lacks)

    def deco(fn):
        params = inspect.signature(fn).parameters
        wants = "impl" in params and params["impl"].kind == inspect.Parameter.KEYWORD_ONLY
        dbl = backend in ("dense", "reference") if double_backward is None else double_backward
        _registry[(op, backend)] = Entry(fn, float64, deterministic, dbl, wants, lacks)
        _cache.clear()
        return fn

    return deco


def register_fused(op: str, fn: Callable, *, backends: Tuple[str, ...] = FUSED, triton_float64: str = "tiles",
                   cuda_float64: str = "native", cuda_atomics: bool = True, csrc_lacks: Iterable[str] = (),
                   triton_lacks: Iterable[str] = ()) -> Callable:
    """``fn`` implements ``op`` on the fused ``backends``. The Triton kernels compute in float32: float64 gets
    ``triton_float64`` ("tiles": the PyTorch tiles in float64; "reference": the op's reference); csrc's CUDA
    kernels ``cuda_float64``; the C++ CPU kernels take float64 natively. ``cuda_atomics``: csrc's CUDA backward
    adds with atomicAdd (not bitwise repeatable; its backward takes the tiles in deterministic mode).
    ``csrc_lacks`` / ``triton_lacks``: what of :data:`NEEDS` csrc's (cuda, cpu) / the Triton kernels cannot
    compute; calls that need it run the PyTorch tiles on those backends."""
    for b in backends:
        f64 = {"triton": triton_float64, "cuda": cuda_float64}.get(b, "native")
        lacks = triton_lacks if b == "triton" else csrc_lacks
        register(op, b, float64=f64, deterministic=not (b == "cuda" and cuda_atomics), lacks=lacks)(fn)
    return fn


def registered(op: Optional[str] = None):
    """{op: backends registered} (every op), or the backends registered for ``op``."""
    if op is not None:
        return tuple(b for b in BACKENDS if (op, b) in _registry)
    ops = sorted({o for o, _ in _registry})
    return {o: registered(o) for o in ops}


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
    from .primitives import triton_support

    if triton_support.IMPORT_ERROR is not None:
        return f"triton is not importable ({triton_support.IMPORT_ERROR})"
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


def _build(op: str, backend: str, f64: bool, deterministic_mode: bool, needs: FrozenSet[str] = frozenset()
           ) -> Impl:
    """The one decision: which kernels run ``op`` on ``backend`` for this dtype class, determinism mode and what
    the call needs."""
    entry = _registry[(op, backend)]
    kernel = backend
    if f64 and entry.float64 == "reference":
        ref = _registry[(op, "reference")]
        return Impl(op, backend, "reference", "reference", _ALL_DTYPES, ref.deterministic, ref.double_backward,
                    _DEVICES[backend], ref.fn, ref.wants_impl)
    if (f64 and entry.float64 == "tiles") or (needs & entry.lacks):
        kernel = "tiles"  # float64 on a float32 kernel, or a call its kernels cannot compute (masks on csrc)
    backward = kernel
    deterministic = entry.deterministic or kernel == "tiles"
    if kernel == "cuda" and deterministic_mode and not deterministic:
        backward, deterministic = "tiles", True
    dtypes = _ALL_DTYPES if entry.float64 != "reference" else _ALL_DTYPES[:3]
    return Impl(op, backend, kernel, backward, dtypes, deterministic, entry.double_backward, _DEVICES[backend],
                entry.fn, entry.wants_impl)


def _impl(op: str, backend: str, dtype: Optional[torch.dtype], needs: FrozenSet[str] = frozenset()) -> Impl:
    f64 = dtype == torch.float64
    det = torch.are_deterministic_algorithms_enabled()
    key = (op, backend, f64, det, needs)
    hit = _cache.get(key)
    if hit is None:
        hit = _cache[key] = _build(op, backend, f64, det, needs)
    return hit


def _auto_backend(op: str, device: torch.device, small: bool) -> str:
    order = ("dense", "reference") if small else _FUSED_ORDER.get(device.type, ("reference",))
    for cand in order:
        if unavailable_reason(op, cand, device) is None:
            return cand
    raise BackendUnavailableError(f"no backend can run {op!r} on {device}")  # reference always registers


def _under_torch_func() -> bool:
    """Inside a torch.func transform (grad, vjp, jacrev, vmap, ...): a host-side flag, no tensor read."""
    level = getattr(getattr(torch._C, "_functorch", None), "maybe_current_level", None)
    return level is not None and level() is not None


def resolve(op: str, backend: str, device: torch.device, size: int = 0,
            dtype: Optional[torch.dtype] = None, needs: Iterable[str] = ()) -> Impl:
    """The :class:`Impl` that runs ``op`` on ``device``; ``size`` = N·M decides ``"auto"``; ``dtype``: the inputs'
    dtype (float64 on a float32-only kernel gets what the op declared: PyTorch tiles or its reference);
    ``needs``: what of :data:`NEEDS` the call carries (a backend whose kernels lack it runs the PyTorch tiles).
    Under torch.func transforms only the reference composes (the other backends' autograd is hand-written):
    ``"auto"`` takes it there and an explicit other backend raises."""
    func = _under_torch_func()
    needs = _check_needs("needs", needs)
    if backend == "auto":
        if func:
            return _impl(op, "reference", dtype)
        small = 0 < size <= _CROSSOVER.get(device.type, 0)
        return _impl(op, _auto_backend(op, device, small), dtype, needs)
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
    return _impl(op, backend, dtype, needs)


def kernel_impl(op: str, kernel: str) -> Impl:
    """``op``'s fused implementation pinned to one compute ``kernel`` (e.g. "tiles", the blockwise PyTorch path
    behind every lse-based fused op), for benchmarks and tests that measure one kernel; the public API never
    calls it (it resolves)."""
    for backend in FUSED:
        entry = _registry.get((op, backend))
        if entry is not None:
            return Impl(op, backend, kernel, kernel, _ALL_DTYPES, entry.deterministic, entry.double_backward,
                        _DEVICES[backend], entry.fn, entry.wants_impl)
    raise ValueError(f"op {op!r} has no fused implementation")


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
