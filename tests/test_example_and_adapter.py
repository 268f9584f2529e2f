"""The example trains on the CPU and its curve matches open_clip's; the open_clip adapter swaps the loss."""
import os
import sys
import types

import pytest
import torch

import fastcontrast as fc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))

import train_clip_synthetic as ex  # noqa: E402


def test_example_trains_and_matches_open_clip():
    out = ex.main(["--steps", "60", "--batch", "64", "--compare-open-clip", "--backend", "reference"])
    ours = out["fastcontrast"]
    assert sum(ours[-10:]) / 10 < 0.7 * sum(ours[:10]) / 10  # it learns (duplicate concepts in a batch floor the loss)
    if "open_clip" not in out:
        pytest.skip("open-clip-torch not installed")
    assert max(abs(a - b) for a, b in zip(ours, out["open_clip"])) < 1e-3


def test_patch_replaces_open_clip_cliploss(monkeypatch):
    from test_open_clip_parity import oc

    if oc is None:
        pytest.skip("open-clip-torch not installed")
    pkg = types.ModuleType("open_clip")
    pkg.ClipLoss = oc.ClipLoss
    pkg.create_loss = lambda: sys.modules["open_clip"].ClipLoss()  # what open_clip_train's factory does
    monkeypatch.setitem(sys.modules, "open_clip", pkg)
    monkeypatch.setitem(sys.modules, "open_clip.loss", oc)
    import fastcontrast.integrations.open_clip as fco

    fco.patch(backend="reference")
    try:
        loss_obj = pkg.create_loss()
        assert isinstance(loss_obj, fc.ClipLoss) and isinstance(oc.ClipLoss(), fc.ClipLoss)
        x, y = torch.randn(8, 16), torch.randn(8, 16)
        assert torch.allclose(loss_obj(x, y, 10.0), fc.clip_loss(x, y, 10.0, backend="reference"))
    finally:
        fco.unpatch()
    assert pkg.ClipLoss is not None and not issubclass(oc.ClipLoss, fc.ClipLoss)
