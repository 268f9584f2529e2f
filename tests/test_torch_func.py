"""torch.func transforms (grad, vmap over per-sample weights): every public loss composes with them through
"auto" (which takes the reference under a transform: the only backend whose autograd is PyTorch's own) and gives
autograd's gradients; an explicit fused or dense backend raises a BackendUnavailableError saying why, never a
crash inside a hand-written Function."""
import pytest
import torch

import fastcontrast as fc
from _ops import existing_backends
from fastcontrast.dispatch import BackendUnavailableError
from test_double_backward import CASES, _device, case_params


@pytest.mark.parametrize("name", list(CASES))
def test_torch_func_grad_through_auto_equals_autograd(name):
    op, make = CASES[name]
    loss, inputs = make(torch.Generator().manual_seed(1), torch.float64, torch.device("cpu"))
    argnums = tuple(range(len(inputs)))
    got = torch.func.grad(lambda *t: loss("auto", *t), argnums=argnums)(*inputs)
    leaves = tuple(t.detach().requires_grad_() for t in inputs)
    want = torch.autograd.grad(loss("reference", *leaves), leaves, allow_unused=True)
    for i, (a, b) in enumerate(zip(got, want)):
        b = torch.zeros_like(a) if b is None else b
        assert torch.isfinite(a).all(), (name, i)
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=f"{name}: input {i}")


@pytest.mark.parametrize("name,backend", case_params(lambda op: tuple(b for b in existing_backends(op) if b != "reference")))
def test_torch_func_with_an_explicit_other_backend_raises_clearly(name, backend):
    op, make = CASES[name]
    loss, inputs = make(torch.Generator().manual_seed(2), torch.float32, _device(backend))
    with pytest.raises(BackendUnavailableError, match=rf"backend '{backend}' is unavailable for .* under torch.func"):
        torch.func.grad(lambda t: loss(backend, t, *inputs[1:]))(inputs[0])


def test_vmap_of_grad_per_sample_scales():
    """A batch of temperatures at once (vmap over grad): each equals its own autograd gradient."""
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(6, 5, generator=g, dtype=torch.float64), torch.randn(6, 5, generator=g, dtype=torch.float64)
    scales = torch.tensor([1.0, 5.0, 20.0], dtype=torch.float64)
    gx = torch.func.vmap(torch.func.grad(lambda a, s: fc.clip_loss(a, y, s, normalize=True)), in_dims=(None, 0))(
        x, scales)
    for k, s in enumerate(scales):
        xs = x.clone().requires_grad_()
        want, = torch.autograd.grad(fc.clip_loss(xs, y, s, normalize=True, backend="reference"), xs)
        torch.testing.assert_close(gx[k], want, rtol=1e-10, atol=1e-12)


def test_outside_a_transform_auto_is_unchanged():
    """The switch reads the transform state only: a plain call still takes the dense path at this size."""
    from fastcontrast.dispatch import resolve

    assert resolve("infonce", "auto", torch.device("cpu"), 64).backend == "dense"
