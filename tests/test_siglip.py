"""SigLIP sigmoid loss: fused kernel vs reference, gradcheck of the reference, open_clip parity."""
import pytest
import torch
from torch.autograd import gradcheck

import fastcontrast as fc
from _ops import backend_params
from fastcontrast.losses.siglip_loss import siglip_loss_reference
from fastcontrast.validate import Case, default_cases, rel_err

from conftest import assert_matches_reference, backend_param, kernel_device
from test_open_clip_parity import oc

FAST = ["triton", "cuda", "cpu", "dense"]
CASE = next(c for c in default_cases() if c.name == "siglip_loss")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("backend", backend_params("siglip", kernel_device(), FAST))
def test_siglip_matches_reference(backend, dtype):
    assert_matches_reference(CASE, backend, dtype, kernel_device(), seeds=(0, 1, 2))


@pytest.mark.parametrize("negative_only", [False, True])
@pytest.mark.parametrize("backend", backend_params("siglip", kernel_device(), FAST))
def test_siglip_negative_only_and_ragged(backend, negative_only):
    def make(g, dev, dt):
        return {"image_features": torch.randn(33, 70, generator=g).to(dev, dt),
                "text_features": torch.randn(65, 70, generator=g).to(dev, dt),
                "logit_scale": torch.tensor(3.0, device=dev, dtype=torch.float32 if dt != torch.float64 else dt),
                "labels": None if negative_only else torch.randint(0, 65, (33,), generator=g).to(dev)}

    case = Case("sig", "siglip", make, lambda backend, **kw: fc.siglip_loss(
        **kw, logit_bias=-1.0, negative_only=negative_only, backend=backend))
    assert_matches_reference(case, backend, torch.float32, kernel_device(), seeds=(2,))


def test_siglip_reference_gradcheck():
    x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    y = torch.randn(7, 6, dtype=torch.float64, requires_grad=True)
    s = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(-1.0, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([6, 0, 2, 2, 1])
    assert gradcheck(lambda *t: siglip_loss_reference(*t, labels=labels), (x, y, s, b))


@pytest.mark.skipif(oc is None, reason="open-clip-torch is not installed")
@pytest.mark.parametrize("backend", ["reference", backend_param("siglip", "triton")])
def test_siglip_module_matches_open_clip(backend):
    dev = kernel_device() if backend == "triton" else torch.device("cpu")
    g = torch.Generator().manual_seed(3)
    x0 = torch.nn.functional.normalize(torch.randn(24, 32, generator=g), dim=1)
    y0 = torch.nn.functional.normalize(torch.randn(24, 32, generator=g), dim=1)

    def run(mod):
        x, y = x0.clone().to(dev).requires_grad_(), y0.clone().to(dev).requires_grad_()
        t = torch.tensor(2.3, device=dev, requires_grad=True)
        b = torch.tensor(-10.0, device=dev, requires_grad=True)
        loss = mod(x, y, t.exp(), b, output_dict=True)["contrastive_loss"]
        loss.backward()
        return [loss.detach(), x.grad, y.grad, t.grad, b.grad]

    for a, b in zip(run(fc.SigLipLoss(backend=backend)), run(oc.SigLipLoss())):
        assert rel_err(a, b) <= 2e-5, (a, b)  # norm-relative: fp32 with a different summation order


def _siglip_run(backend, dtype, n=37, m=53, d=70, seed=0):
    g = torch.Generator().manual_seed(seed)
    dev = kernel_device()
    x = torch.randn(n, d, generator=g).to(dev, dtype).requires_grad_()
    y = torch.randn(m, d, generator=g).to(dev, dtype).requires_grad_()
    s = torch.tensor(4.0, device=dev, requires_grad=True)
    b = torch.tensor(-3.0, device=dev, requires_grad=True)
    labels = torch.randint(0, m, (n,), generator=g).to(dev)
    loss = fc.siglip_loss(x, y, s, b, labels=labels, backend=backend)
    return [loss.detach()] + list(torch.autograd.grad(loss, (x, y, s, b))), (x, y, s, b, labels)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("backend", [backend_param("siglip", "triton")])
def test_siglip_fused_ragged_every_gradient(backend, dtype):
    """N ≠ M, D = 70 (no multiple of 16): loss and the gradients of x, y, scale and bias vs float64."""
    out, (x, y, s, b, labels) = _siglip_run(backend, dtype)
    leaves = [t.detach().double().requires_grad_() for t in (x, y, s, b)]
    ref = siglip_loss_reference(*leaves, labels=labels)
    want = [ref.detach()] + list(torch.autograd.grad(ref, leaves))
    tol = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}[dtype]
    for name, a, r in zip(("loss", "x", "y", "scale", "bias"), out, want):
        assert torch.isfinite(a).all() and rel_err(a, r) <= tol, (name, rel_err(a, r))


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("backend", [backend_param("siglip", "triton")])
def test_siglip_no_float_atomics_and_bitwise_repeatable(backend, deterministic, atomics):
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        first, _ = _siglip_run(backend, torch.float32)
        second, _ = _siglip_run(backend, torch.float32)
    finally:
        torch.use_deterministic_algorithms(prev)
    assert atomics["n"] == 0  # per-tile partials summed in a fixed order instead
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", [backend_param("siglip", "triton")])
def test_siglip_double_backward_raises(backend):
    _, (x, y, s, b, labels) = _siglip_run(backend, torch.float32)
    loss = fc.siglip_loss(x, y, s, b, labels=labels, backend=backend)
    with pytest.raises(RuntimeError, match="double backward is not supported by backend 'triton' for siglip"):
        torch.autograd.grad(loss, x, create_graph=True)
