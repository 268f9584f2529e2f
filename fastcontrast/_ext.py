"""Optional compiled extension (csrc/): C++ CPU kernels and, on CUDA builds, CUDA kernels."""
from __future__ import annotations

from typing import Optional

try:  # built by setup.py when a compiler is present; absent in a pure-Python install
    from . import _C  # type: ignore[attr-defined]

    IMPORT_ERROR: Optional[str] = None
except Exception as e:  # noqa: BLE001 - any failure means "not built", and we say which
    _C = None
    IMPORT_ERROR = f"{type(e).__name__}: {e}"


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
