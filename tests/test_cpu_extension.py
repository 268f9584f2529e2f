"""The C++ CPU kernels (csrc/, backend="cpu"): gradcheck in float64 through the extension, O(N) memory.

Forward/backward agreement with the reference over dtypes and ragged shapes runs in test_infonce_kernels.py
(the "cpu" backend parameter). Skipped with the dispatcher's reason when the extension is not built.
"""
import pytest
import torch

import fastcontrast as fc
from fastcontrast import _ext
from fastcontrast.tools.memtrack import PeakMemory
from fastcontrast.primitives import tiles as _tiles
from fastcontrast.primitives import lse_pair as fn

pytestmark = pytest.mark.skipif(_ext._C is None, reason=f"C++ extension not built: {_ext.IMPORT_ERROR}")


@pytest.mark.parametrize("normalize,tokens", [(False, 1), (True, 1), (True, 2)])
def test_gradcheck_through_extension(normalize, tokens, monkeypatch):
    monkeypatch.setattr(_tiles, "BLOCK_BYTES", 8 * 9 * 8)  # 9-row blocks: several blocks and a ragged tail
    x = torch.randn(23, 6, dtype=torch.float64, requires_grad=True)
    y = torch.randn(17, 6, dtype=torch.float64, requires_grad=True)
    a = (torch.rand(23, dtype=torch.float64) + 0.5).requires_grad_()
    c = (torch.rand(17, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: fn.lse_pair(*t, normalize, tokens, "cpu", "cpu"), (x, y, a, c, b))


def test_public_loss_gradcheck_cpu_backend():
    x = torch.randn(9, 5, dtype=torch.float64, requires_grad=True)
    y = torch.randn(9, 5, dtype=torch.float64, requires_grad=True)
    s = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, y, s: fc.clip_loss(x, y, s, normalize=True, backend="cpu"), (x, y, s))


def test_auto_picks_cpu_kernels_for_cpu_tensors():
    name = fc.dispatch.resolve("infonce", "auto", torch.device("cpu")).backend
    assert name == "cpu"


def _peak(n, monkeypatch, backend):
    monkeypatch.setattr(_tiles, "BLOCK_BYTES", 64 * n * 4)  # 64-row blocks
    x = torch.randn(n, 32).requires_grad_()
    y = torch.randn(n, 32).requires_grad_()
    with PeakMemory() as pm:
        fc.clip_loss(x, y, 10.0, normalize=True, backend=backend).backward()
    return pm


def test_extension_extra_memory_is_linear(monkeypatch):
    small, big = _peak(1024, monkeypatch, "cpu"), _peak(2048, monkeypatch, "cpu")
    ref = _peak(2048, monkeypatch, "reference")
    assert big.peak / small.peak < 2.3, (small.peak, big.peak)
    assert big.largest < 2048 * 2048 * 4 / 8
    assert big.peak < ref.peak / 8, (big.peak, ref.peak)
