"""Fused InfoNCE-family kernels against the float64 reference: forward and every gradient, several seeds,
ragged shapes, each dtype with its own tolerance. Triton runs on CUDA, or on the CPU interpreter."""
import pytest
import torch

import fastcontrast as fc
from _ops import backend_params
from fastcontrast.validate import default_cases

from conftest import assert_matches_reference, kernel_device

FAST = ["triton", "cuda", "cpu", "dense"]
CASES = {c.name: c for c in default_cases() if c.op == "infonce"}
SHAPES = [(37, 53, 40), (16, 16, 64), (5, 70, 24), (65, 33, 96)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", list(CASES), ids=str)
@pytest.mark.parametrize("backend", backend_params("infonce", kernel_device(), FAST))
def test_family_matches_reference(backend, case, dtype):
    assert_matches_reference(CASES[case], backend, dtype, kernel_device(), seeds=(0, 1, 2))


@pytest.mark.parametrize("n,m,d", SHAPES, ids=str)
@pytest.mark.parametrize("backend", backend_params("infonce", kernel_device(), FAST))
def test_ragged_shapes(backend, n, m, d):
    for case in default_cases(n=n, m=m, d=d, k=3 if d % 3 == 0 else 2):
        if case.op == "infonce":
            assert_matches_reference(case, backend, torch.float32, kernel_device(), seeds=(3,))


@pytest.mark.parametrize("backend", backend_params("infonce", kernel_device(), FAST))
def test_large_logit_scale_bf16_no_overflow(backend):
    """logit scale 100 with bf16 inputs, normalised and raw (logits in the thousands): finite, matching."""
    dev = kernel_device()
    g = torch.Generator().manual_seed(7)
    for normalize, mag in ((True, 1.0), (False, 4.0)):
        x = (torch.randn(37, 48, generator=g) * mag).to(dev, torch.bfloat16).requires_grad_()
        y = (torch.randn(37, 48, generator=g) * mag).to(dev, torch.bfloat16).requires_grad_()
        s = torch.tensor(100.0, device=dev, requires_grad=True)
        out = fc.clip_loss(x, y, s, normalize=normalize, backend=backend)
        out.backward()
        xr, yr = x.detach().double().cpu().requires_grad_(), y.detach().double().cpu().requires_grad_()
        sr = torch.tensor(100.0, dtype=torch.float64, requires_grad=True)
        ref = fc.clip_loss(xr, yr, sr, normalize=normalize, backend="reference")
        ref.backward()
        for got, want in ((out, ref), (x.grad, xr.grad), (y.grad, yr.grad), (s.grad, sr.grad)):
            assert torch.isfinite(got).all()
            err = float((got.detach().double().cpu() - want.detach()).norm() / want.detach().norm().clamp_min(1e-30))
            assert err < 3e-2, err


def test_labels_repeated_columns_and_unequal_batches():
    """Labels that hit one text column twice, N < M: the text→image term is per positive pair."""
    dev = kernel_device()
    be = "triton" if fc.dispatch.unavailable_reason("infonce", "triton", dev) is None else "reference"
    x, y = torch.randn(6, 32, device=dev), torch.randn(9, 32, device=dev)
    labels = torch.tensor([8, 0, 0, 3, 3, 3], device=dev)
    got = fc.clip_loss(x, y, 3.0, labels=labels, backend=be)
    want = fc.clip_loss(x.double(), y.double(), 3.0, labels=labels, backend="reference")
    assert abs(float(got) - float(want)) < 1e-4 * abs(float(want))


def test_grad_of_learnable_scale_and_bias_reach_parameters():
    dev = kernel_device()
    be = "triton" if fc.dispatch.unavailable_reason("infonce", "triton", dev) is None else "reference"
    t = torch.tensor(2.0, device=dev, requires_grad=True)
    b = torch.tensor(-3.0, device=dev, requires_grad=True)
    x, y = torch.randn(20, 32, device=dev), torch.randn(20, 32, device=dev)
    fc.clip_loss(x, y, t.exp(), b, backend=be).backward()
    t2 = t.detach().double().requires_grad_()
    fc.clip_loss(x.double(), y.double(), t2.exp(), -3.0, backend="reference").backward()
    assert torch.allclose(t.grad.double().cpu(), t2.grad, rtol=1e-4)
    assert abs(float(b.grad)) < 1e-5  # softmax is shift-invariant: the bias gets no gradient from InfoNCE
