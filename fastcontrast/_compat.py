"""Versions checked at import, and optional third-party pieces loaded without their heavy imports."""
from __future__ import annotations

import importlib.util
import os
import sys
import warnings
from typing import List, Optional, Tuple

# The ranges pyproject.toml declares, and what checks each end (keep the two in step):
#   Python 3.11 (CI) .. 3.12 (the GPU image);  torch 2.11 (the GPU image) .. 2.13 (CI);  Triton 3.6.0 (the GPU
#   image; CI: the static report and the GPU session's dry run) .. 3.9 (CI: the tests);  numpy 2.3.5 (CI, beside
#   Triton 3.6.0) .. 2.4 (CI) / 2.5 (the GPU image).
MIN_PYTHON = (3, 11)
MIN_TORCH = (2, 11)
NEED_TORCH = (2, 4)  # torch.library.custom_op: older torch cannot even define the fused ops
MIN_TRITON = (3, 6)
MIN_NUMPY = (2, 3)


class VersionWarning(UserWarning):
    """A dependency's version lies outside the range fastcontrast is tested with."""


def _parse(v: str) -> Tuple[int, ...]:
    out: List[int] = []
    for part in v.split("+")[0].split("."):
        digits = "".join(c for c in part if c.isdigit()) if part[:1].isdigit() else ""
        if not digits:
            break
        out.append(int(digits))
    return tuple(out)


def _dist_version(name: str) -> Optional[str]:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:  # noqa: BLE001 - not installed (or no metadata)
        return None


def version_problems(python=None, torch=None, triton=None, numpy=None, interpret=None) -> Tuple[List[str], List[str]]:
    """(errors, warnings) for these versions (default: the running ones): an error where the package cannot work
    (torch without ``torch.library.custom_op``), a warning outside the tested range, and one where Triton's
    interpreter (TRITON_INTERPRET=1) is known to fail every kernel (Triton < 3.7 with numpy >= 2.4:
    "InterpreterError: only 0-dimensional arrays can be converted to Python scalars")."""
    py = python or ".".join(map(str, sys.version_info[:3]))
    if torch is None:
        import torch as _t

        torch = _t.__version__
    triton = triton if triton is not None else _dist_version("triton")
    numpy = numpy if numpy is not None else _dist_version("numpy")
    interpret = (os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")) if interpret is None else interpret
    errors, warns = [], []
    tested = "tested: torch 2.11-2.13, Triton 3.6-3.9, numpy 2.3-2.5, Python 3.11-3.12"
    if _parse(py) < MIN_PYTHON:
        warns.append(f"Python {py} is older than 3.11, the oldest fastcontrast is tested with ({tested})")
    if _parse(torch) < NEED_TORCH:
        errors.append(f"fastcontrast needs torch >= 2.4 (torch.library.custom_op defines its fused ops); this is "
                      f"torch {torch} ({tested}): pip install 'torch>=2.11'")
    elif _parse(torch) < MIN_TORCH:
        warns.append(f"torch {torch} is older than 2.11, the oldest fastcontrast is tested with ({tested})")
    if triton and _parse(triton) < MIN_TRITON:
        warns.append(f"Triton {triton} is older than 3.6, the oldest fastcontrast's kernels are compiled and checked "
                     f"with ({tested}); backend='triton' may fail to compile")
    if numpy and _parse(numpy) < MIN_NUMPY:
        warns.append(f"numpy {numpy} is older than 2.3, the oldest fastcontrast is tested with ({tested})")
    if interpret and triton and numpy and _parse(triton) < (3, 7) and _parse(numpy) >= (2, 4):
        warns.append(f"TRITON_INTERPRET=1 with Triton {triton} and numpy {numpy}: this Triton's interpreter fails "
                     "every kernel with numpy >= 2.4 (InterpreterError: only 0-dimensional arrays can be converted "
                     "to Python scalars); use numpy < 2.4 (2.3.5 is tested) or Triton >= 3.7")
    return errors, warns


def check_versions() -> None:
    """At import: ImportError where fastcontrast cannot work, a VersionWarning outside the tested ranges."""
    errors, warns = version_problems()
    if errors:
        raise ImportError("; ".join(errors))
    for w in warns:
        warnings.warn(w, VersionWarning, stacklevel=3)


def open_clip_loss_module():
    """open_clip's ``loss.py`` loaded from the installed open-clip-torch, or None when it is not installed.

    Loaded by path: the package ``__init__`` imports torchvision (absent or broken beside a CPU torch), while
    ``loss.py`` itself needs only torch.
    """
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        return None
    name = "_fastcontrast_open_clip_loss"
    if name in sys.modules:
        return sys.modules[name]
    path = os.path.join(list(spec.submodule_search_locations)[0], "loss.py")
    s = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(s)
    sys.modules[name] = mod  # importable by name: torch.compile's tracer looks modules up there
    try:
        s.loader.exec_module(mod)
    except BaseException:
        del sys.modules[name]
        raise
    return mod
