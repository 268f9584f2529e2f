"""Fused max-margin kernels (sum and hardest negative) against the float64 reference."""
import pytest
import torch

import fastcontrast as fc
from _ops import backend_params
from fastcontrast.validate import Case, default_cases, rel_err

from conftest import assert_matches_reference, backend_param, kernel_device

FAST = ["triton", "cuda", "cpu", "dense"]
CASES = {c.name: c for c in default_cases() if c.op == "max_margin"}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", list(CASES), ids=str)
@pytest.mark.parametrize("backend", backend_params("max_margin", kernel_device(), FAST))
def test_margin_matches_reference(backend, case, dtype):
    assert_matches_reference(CASES[case], backend, dtype, kernel_device(), seeds=(0, 1, 2))


@pytest.mark.parametrize("n,m,d", [(16, 16, 64), (65, 33, 96), (3, 40, 20)], ids=str)
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("hardest", [False, True])
@pytest.mark.parametrize("backend", backend_params("max_margin", kernel_device(), FAST))
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
@pytest.mark.parametrize("backend", backend_params("max_margin", kernel_device(), FAST))
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


def _margin_run(backend, dtype, n, m, d, hardest, labelled, seed=0):
    g = torch.Generator().manual_seed(seed)
    dev = kernel_device()
    x = torch.randn(n, d, generator=g).to(dev, dtype).requires_grad_()
    y = torch.randn(m, d, generator=g).to(dev, dtype).requires_grad_()
    marg = (0.1 + 0.4 * torch.rand(n, generator=g)).to(dev)  # a schedule: the API passes it detached
    labels = torch.randint(0, m, (n,), generator=g).to(dev) if labelled else None
    loss = fc.max_margin_loss(x, y, marg, labels=labels, hardest=hardest, backend=backend)
    return [loss.detach()] + list(torch.autograd.grad(loss, (x, y))), (x, y, marg, labels)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("kind", ["diagonal", "hardest", "hardest_labelled"])
@pytest.mark.parametrize("backend", [backend_param("max_margin", "triton")])
def test_fused_hinges_ragged_every_gradient(backend, kind, dtype):
    """The 3-unit diagonal and the 1-unit hardest paths, D = 70, N ≠ M where labelled: loss and the gradients of
    both features (through the offsets o_i = m_i − S_ii too) with a per-pair margin vs float64."""
    from fastcontrast.losses.max_margin_loss import max_margin_loss_reference as ref_fn

    n, m = (37, 53) if kind == "hardest_labelled" else (45, 45)
    out, (x, y, marg, labels) = _margin_run(backend, dtype, n, m, 70, kind != "diagonal", kind == "hardest_labelled")
    leaves = [t.detach().double().requires_grad_() for t in (x, y)]
    ref = ref_fn(leaves[0], leaves[1], marg.double(), labels=labels, hardest=kind != "diagonal")
    want = [ref.detach()] + list(torch.autograd.grad(ref, leaves))
    tol = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}[dtype]
    for name, a, r in zip(("loss", "x", "y"), out, want):
        assert torch.isfinite(a).all() and rel_err(a, r) <= tol, (name, rel_err(a, r))


@pytest.mark.parametrize("kind", ["diagonal", "hardest"])
@pytest.mark.parametrize("backend", [backend_param("max_margin", "triton")])
def test_fused_hinges_deterministic_and_no_double_backward(backend, kind):
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        first, _ = _margin_run(backend, torch.float32, 45, 45, 40, kind == "hardest", False)
        second, (x, y, marg, _) = _margin_run(backend, torch.float32, 45, 45, 40, kind == "hardest", False)
    finally:
        torch.use_deterministic_algorithms(prev)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    loss = fc.max_margin_loss(x, y, marg, hardest=kind == "hardest", backend=backend)
    with pytest.raises(RuntimeError, match="double backward is not supported by backend 'triton' for max_margin"):
        torch.autograd.grad(loss, x, create_graph=True)
