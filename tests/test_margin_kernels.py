"""Fused max-margin kernels (sum and hardest negative) against the float64 reference."""
import pytest
import torch

import fastcontrast as fc
from fastcontrast.validate import Case, default_cases

from conftest import assert_matches_reference, backend_param, kernel_device

FAST = ["triton", "cuda", "cpu", "dense"]
CASES = {c.name: c for c in default_cases() if c.op == "max_margin"}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", list(CASES), ids=str)
@pytest.mark.parametrize("backend", [backend_param("max_margin", b) for b in FAST])
def test_margin_matches_reference(backend, case, dtype):
    assert_matches_reference(CASES[case], backend, dtype, kernel_device(), seeds=(0, 1, 2))


@pytest.mark.parametrize("n,m,d", [(16, 16, 64), (65, 33, 96), (3, 40, 20)], ids=str)
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("hardest", [False, True])
@pytest.mark.parametrize("backend", [backend_param("max_margin", b) for b in FAST])
def test_margin_shapes_and_options(backend, n, m, d, normalize, hardest):
    def make(g, dev, dt):
        return {"image_features": torch.randn(n, d, generator=g).to(dev, dt),
                "text_features": torch.randn(m, d, generator=g).to(dev, dt),
                "labels": torch.randint(0, m, (n,), generator=g).to(dev) if n != m else None}

    case = Case("margin", "max_margin", make, lambda backend, **kw: fc.max_margin_loss(
        **kw, margin=0.4 if normalize else 2.0, hardest=hardest, normalize=normalize, backend=backend))
    assert_matches_reference(case, backend, torch.float32, kernel_device(), seeds=(5,))


def test_margin_zero_when_all_separated():
    """Orthogonal one-hot pairs with margin 0.5: every hinge is inactive, loss and grads exactly 0."""
    dev = kernel_device()
    be = "triton" if fc.dispatch.unavailable_reason("max_margin", "triton", dev) is None else "reference"
    x = torch.eye(20, 32, device=dev).requires_grad_()
    loss = fc.max_margin_loss(x, x.detach().clone(), margin=0.5, backend=be)
    loss.backward()
    assert float(loss) == 0.0 and float(x.grad.abs().max()) == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("per_pair", [False, True])
@pytest.mark.parametrize("backend", [backend_param("max_margin", b) for b in FAST])
def test_diagonal_one_sweep_path_matches_reference(backend, dtype, reduction, per_pair):
    """N = M without labels takes the one-sweep kernel pair (both directions at once); ragged N."""
    def make(g, dev, dt):
        n = 45
        return {"image_features": torch.randn(n, 40, generator=g).to(dev, dt),
                "text_features": torch.randn(n, 40, generator=g).to(dev, dt),
                "margin": (0.05 + 0.3 * torch.rand(n, generator=g)).to(dev) if per_pair else 0.3}

    case = Case("margin-diag", "max_margin", make,
                lambda backend, **kw: fc.max_margin_loss(**kw, reduction=reduction, backend=backend))
    assert_matches_reference(case, backend, dtype, kernel_device(), seeds=(0, 1))
