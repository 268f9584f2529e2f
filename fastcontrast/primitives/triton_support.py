"""Whether Triton imports here; kernels modules import ``triton`` only through this."""
from __future__ import annotations

from typing import Optional

try:
    import triton  # noqa: F401
    import triton.language as tl  # noqa: F401

    IMPORT_ERROR: Optional[str] = None
except Exception as e:  # noqa: BLE001
    triton = None
    tl = None
    IMPORT_ERROR = f"{type(e).__name__}: {e}"
