"""Optional third-party pieces, loaded without their heavy imports."""
from __future__ import annotations

import importlib.util
import os


def open_clip_loss_module():
    """open_clip's ``loss.py`` loaded from the installed open-clip-torch, or None when it is not installed.

    Loaded by path: the package ``__init__`` imports torchvision (absent or broken beside a CPU torch), while
    ``loss.py`` itself needs only torch.
    """
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "loss.py")
    s = importlib.util.spec_from_file_location("_open_clip_loss", path)
    mod = importlib.util.module_from_spec(s)
    s.loader.exec_module(mod)
    return mod
