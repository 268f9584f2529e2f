"""fastcontrast.ClipLoss returns open_clip's numbers and gradients.

open_clip's ``loss.py`` is loaded straight from the installed open-clip-torch (``--no-deps``: its package
``__init__`` needs torchvision, which does not import beside the CPU torch here); the loss module itself needs
only torch. Without open-clip-torch the test skips with that reason; ``.ci/run`` installs it.
"""
import pytest
import torch

import fastcontrast as fc
from fastcontrast._compat import open_clip_loss_module


oc = open_clip_loss_module()
pytestmark = pytest.mark.skipif(oc is None, reason="open-clip-torch is not installed (pip install --no-deps open-clip-torch)")


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("n,d", [(8, 16), (37, 40)])
def test_cliploss_matches_open_clip(seed, with_bias, n, d):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    y0 = torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    t0 = torch.tensor(2.659, dtype=torch.float64)  # log(1/0.07), open_clip's init
    b0 = torch.tensor(-1.3, dtype=torch.float64)

    def run(loss_fn):
        x, y = x0.clone().requires_grad_(), y0.clone().requires_grad_()
        t, b = t0.clone().requires_grad_(), b0.clone().requires_grad_()
        out = loss_fn(x, y, t.exp(), b if with_bias else None, output_dict=True)
        loss = out["contrastive_loss"]
        loss.backward()
        return loss.detach(), x.grad, y.grad, t.grad, b.grad

    want = run(oc.ClipLoss())
    got = run(fc.ClipLoss(backend="reference"))
    for name, a, b in zip(("loss", "dx", "dy", "dlogit_scale", "dbias"), got, want):
        if b is None:
            assert a is None or float(a.abs().max()) == 0.0, name
            continue
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12), f"{name}: {a} vs {b}"


def test_cliploss_signature_matches_open_clip():
    import inspect

    ours = inspect.signature(fc.ClipLoss.__init__).parameters
    theirs = inspect.signature(oc.ClipLoss.__init__).parameters
    assert list(theirs)[: len(theirs)] == list(ours)[: len(theirs)]
    theirs_fwd = list(inspect.signature(oc.ClipLoss.forward).parameters)
    ours_fwd = inspect.signature(fc.ClipLoss.forward).parameters
    assert list(ours_fwd)[: len(theirs_fwd)] == theirs_fwd
    # this package's additions (group ids) come after open_clip's parameters and have defaults
    assert all(p.default is None for p in list(ours_fwd.values())[len(theirs_fwd):])
