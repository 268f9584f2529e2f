"""The example trains on the CPU and its curve matches open_clip's (the open_clip patch is tested against the real
package and trainer in test_open_clip_integration.py)."""
import os
import sys

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
