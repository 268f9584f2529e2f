"""O(N) memory of the tiled path, and torch.compile of a training step without graph breaks."""
import pytest
import torch

import fastcontrast as fc
from fastcontrast.primitives import tiles as _tiles
from fastcontrast.dispatch import kernel_impl
from fastcontrast.primitives import lse_pair as fn

from fastcontrast.tools.memtrack import PeakMemory


def _step(loss_fn, n, d=32):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, d, generator=g).requires_grad_()
    y = torch.randn(n, d, generator=g).requires_grad_()
    s = torch.tensor(10.0, requires_grad=True)
    with PeakMemory() as pm:
        loss = loss_fn(x, y, s)
        loss.backward()
    return pm


def _fused_torch_tiles(x, y, s):
    # the blockwise PyTorch tiling behind the custom op (what runs where Triton cannot)
    n = x.shape[0]
    return kernel_impl("infonce", "tiles")(x, y, s.expand(n), s.expand(n), None, torch.arange(n), True, 1)


def _reference(x, y, s):
    return fc.clip_loss(x, y, s, normalize=True, backend="reference")


@pytest.fixture
def small_blocks(monkeypatch):
    # 64 rows per block at these sizes, so the tiling (not a single block) is what gets measured
    monkeypatch.setattr(_tiles, "rows_per_block", lambda *a: 64)


def test_tracker_sees_inside_the_custom_op(monkeypatch):
    """With one block of all rows the tiled path does build N×N: the tracker must see it (so it can fail)."""
    monkeypatch.setattr(_tiles, "rows_per_block", lambda *a: 10**9)
    assert _step(_fused_torch_tiles, 512).largest >= 512 * 512 * 4


def test_tiled_path_extra_memory_is_linear_in_n(small_blocks):
    sizes = (256, 1024, 2048)
    tiled = [_step(_fused_torch_tiles, n).peak for n in sizes]
    ref = [_step(_reference, n).peak for n in sizes]
    # doubling N doubles the tiled path's extra memory (O(N)); the reference quadruples (O(N²))
    assert tiled[2] / tiled[1] < 2.3, tiled
    assert ref[2] / ref[1] > 3.5, ref
    # and at N = 2048 the tiled path never created anything the size of the N×N logits
    pm = _step(_fused_torch_tiles, 2048)
    assert pm.largest < 2048 * 2048 * 4 / 8, pm.largest
    assert tiled[2] < ref[2] / 8, (tiled, ref)


def test_blockwise_custom_op_gradcheck(small_blocks):
    """The op's own autograd (PyTorch tiles behind it, float64, normalisation with 2 tokens)."""
    x = torch.randn(70, 6, dtype=torch.float64, requires_grad=True)
    y = torch.randn(67, 6, dtype=torch.float64, requires_grad=True)
    a = (torch.rand(70, dtype=torch.float64) + 0.5).requires_grad_()
    c = (torch.rand(67, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    for normalize, tokens in ((False, 1), (True, 2)):
        assert torch.autograd.gradcheck(lambda *t: fn.lse_pair(*t, normalize, tokens, "tiles", "tiles"), (x, y, a, c, b))


def test_torch_compile_fullgraph_training_step():
    """torch.compile(fullgraph=True) of a CLIP loss through the custom op: a graph break would raise."""
    torch._dynamo.reset()
    model = torch.nn.Linear(16, 16)
    log_scale = torch.nn.Parameter(torch.tensor(2.0))

    def step(img, txt):
        loss = fc.clip_loss(model(img), model(txt), log_scale.exp(), normalize=True, backend="triton"
                            if fc.dispatch.unavailable_reason("infonce", "triton", img.device) is None else "reference")
        return loss

    img, txt = torch.randn(24, 16), torch.randn(24, 16)
    # forward compiled as one graph (AOTAutograd traces the op's registered backward into the joint graph)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss_c = compiled(img, txt)
    loss_c.backward()
    grads_c = [p.grad.clone() for p in (*model.parameters(), log_scale)]
    for p in (*model.parameters(), log_scale):
        p.grad = None
    loss_e = fc.clip_loss(model(img), model(txt), log_scale.exp(), normalize=True, backend="reference")
    loss_e.backward()
    assert torch.allclose(loss_c, loss_e, rtol=1e-5)
    for gc, p in zip(grads_c, (*model.parameters(), log_scale)):
        assert torch.allclose(gc, p.grad, rtol=1e-4, atol=1e-6)


def test_custom_op_is_registered_with_fake_impl():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x, y = torch.empty(10, 8), torch.empty(7, 8)
        a, c, b = torch.empty(10), torch.empty(7), torch.empty(())
        r, col = torch.ops.fastcontrast.lse_pair(x, y, a, c, b, False, 1, "tiles", "tiles")
    assert r.shape == (10,) and col.shape == (7,)
