"""Optional compiled extension (csrc/): C++ CPU kernels and, on CUDA builds, CUDA kernels."""
from __future__ import annotations

import glob
import os
from typing import Optional

try:  # built by setup.py when a compiler is present; absent in a pure-Python install
    from . import _C  # type: ignore[attr-defined]

    IMPORT_ERROR: Optional[str] = None
except Exception as e:  # noqa: BLE001 - any failure means "not built", and we say which
    _C = None
    IMPORT_ERROR = f"{type(e).__name__}: {e}"


def _jit_load():
    """FASTCONTRAST_JIT=1: build csrc/ now with torch.utils.cpp_extension.load (a source checkout on a GPU machine
    whose torch differs from the one the wheel was built against)."""
    import torch
    from torch.utils.cpp_extension import load

    src = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "csrc")
    cuda = torch.cuda.is_available() and torch.version.cuda is not None
    # the sources setup.py compiles: every .cpp but the CUDA binding, plus the binding and every .cu with CUDA
    binding = os.path.join(src, "cuda_binding.cpp")
    files = sorted(f for f in glob.glob(os.path.join(src, "*.cpp")) if f != binding)
    cutlass = _cutlass_include() if cuda else None
    flags = ["-DFASTCONTRAST_WITH_CUDA=1"] + (["-DFASTCONTRAST_WITH_CUTE=1"] if cutlass else []) if cuda else []
    if cuda:  # the same rule as setup.py: the CuTe kernels only with the nvidia-cutlass headers
        files += [binding] + sorted(f for f in glob.glob(os.path.join(src, "*.cu")) if cutlass or "_cute" not in f)
    return load(name="fastcontrast_C_jit", sources=files, extra_cflags=["-O3", "-fopenmp"] + flags,
                extra_ldflags=["-fopenmp"], extra_include_paths=[cutlass] if cutlass else [],
                extra_cuda_cflags=["-O3", "--use_fast_math", "--expt-relaxed-constexpr"] + flags, with_cuda=cuda,
                verbose=False)


def _cutlass_include():
    try:
        import cutlass_library
    except Exception:  # noqa: BLE001
        return None
    path = os.path.join(os.path.dirname(cutlass_library.__file__), "source", "include")
    return path if os.path.exists(os.path.join(path, "cute", "tensor.hpp")) else None


if os.environ.get("FASTCONTRAST_JIT", "0") == "1" and (_C is None or not _C.has_cuda()):
    try:
        _C, IMPORT_ERROR = _jit_load(), None
    except Exception as e:  # noqa: BLE001
        IMPORT_ERROR = f"JIT build failed: {type(e).__name__}: {e}"


def cpu_unavailable_reason() -> Optional[str]:
    if _C is None:
        return f"the C++ extension fastcontrast._C is not built ({IMPORT_ERROR}); reinstall with a C++ compiler present"
    return None


def cuda_unavailable_reason() -> Optional[str]:
    if _C is None:
        return f"the C++/CUDA extension fastcontrast._C is not built ({IMPORT_ERROR})"
    if not getattr(_C, "has_cuda", lambda: False)():
        return "fastcontrast._C was built without CUDA kernels (no nvcc or no CUDA build of torch at install time)"
    return None
