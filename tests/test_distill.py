"""DistillClipLoss: equal to open_clip 3.3.0's (both outputs, gradients of the student and its scale; the teacher
untouched) on every backend, O(N·D) extra memory on the fused path, torch.compile, and 2 gloo ranks."""
import functools

import pytest
import torch

import fastcontrast as fc
from _gloo import run_ranks
from _ops import backend_params
from conftest import kernel_device
from fastcontrast.tools.memtrack import PeakMemory
from fastcontrast.primitives import tiles as _tiles
from fastcontrast.losses import distill_clip_loss as dmod
from fastcontrast.primitives import weighted_keys as WK
from fastcontrast.primitives import lse_pair as fn
from test_open_clip_parity import oc  # open_clip's loss.py loaded from the installed package, or None

needs_oc = pytest.mark.skipif(oc is None, reason="open_clip is not installed")
BACKENDS = backend_params("distill", kernel_device(), ("triton", "cpu", "cuda", "dense", "reference"))


def _inputs(n, d, dt, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    mk = lambda k: torch.randn(n, k, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    return mk(d), mk(d), mk(dt), mk(dt)


def _run(loss_obj, x, y, tx, ty, s=3.0, ts=7.0, weight=1.7):
    leaves = [t.clone().requires_grad_() for t in (x, y, tx, ty)]
    scale = torch.tensor(s, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32, requires_grad=True)
    out = loss_obj(leaves[0], leaves[1], scale, leaves[2], leaves[3], torch.tensor(ts, dtype=scale.dtype),
                   output_dict=True)
    assert set(out) == {"contrastive_loss", "distill_loss"}
    (out["contrastive_loss"] + weight * out["distill_loss"]).backward()
    return dict(c=out["contrastive_loss"].detach(), d=out["distill_loss"].detach(), dx=leaves[0].grad,
                dy=leaves[1].grad, ds=scale.grad, dtx=leaves[2].grad, dty=leaves[3].grad)


def _close(got, want, rtol, atol):
    for k in ("c", "d", "dx", "dy", "ds"):
        assert torch.isfinite(got[k]).all(), k
        assert torch.allclose(got[k].double(), want[k].double(), rtol=rtol, atol=atol), \
            (k, (got[k].double() - want[k].double()).abs().max().item())


@needs_oc
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n,d,dt", [(37, 8, 5), (5, 16, 16), (130, 12, 7)])
def test_equals_open_clip_float64(backend, n, d, dt):
    for seed in (0, 1):
        x, y, tx, ty = _inputs(n, d, dt, torch.float64, seed)
        want = _run(oc.DistillClipLoss(), x, y, tx, ty)
        got = _run(fc.DistillClipLoss(backend=backend), x, y, tx, ty)
        _close(got, want, 1e-10, 1e-12)
        assert got["dtx"] is None and got["dty"] is None  # the teacher gets no gradient


@needs_oc
@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_and_tuple_output(backend):
    x, y, tx, ty = _inputs(45, 16, 10, torch.float32, 3)
    want = _run(oc.DistillClipLoss(), x.double(), y.double(), tx.double(), ty.double())
    got = _run(fc.DistillClipLoss(backend=backend), x, y, tx, ty)
    _close(got, want, 1e-4, 1e-5)
    c, d = fc.DistillClipLoss(backend=backend)(x, y, 3.0, tx, ty, 7.0)
    assert torch.allclose(c.double(), want["c"], rtol=1e-4) and torch.allclose(d.double(), want["d"], rtol=1e-4)


def test_teacher_weighted_keys_gradcheck(monkeypatch):
    monkeypatch.setattr(_tiles, "rows_per_block", lambda *a: 8)  # several row blocks
    g = torch.Generator().manual_seed(0)
    tq, tk = torch.randn(19, 4, generator=g, dtype=torch.float64), torch.randn(23, 4, generator=g, dtype=torch.float64)
    vals = torch.randn(23, 6, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.tensor(1.3, dtype=torch.float64)
    v, _ = WK.teacher_weighted_keys(tq, tk, t, vals)
    assert torch.allclose(v, torch.softmax(t * tq @ tk.T, dim=1) @ vals)
    assert torch.autograd.gradcheck(lambda w: WK.teacher_weighted_keys(tq, tk, t, w)[0], (vals,))


def test_bad_inputs_name_the_argument():
    x, y, tx, ty = _inputs(6, 8, 4, torch.float32, 0)
    with pytest.raises(ValueError, match="teacher_text_features"):
        fc.distill_clip_loss(x, y, 2.0, tx, ty[:5], 3.0)
    with pytest.raises(ValueError, match="teacher_image_features"):
        fc.distill_clip_loss(x, y, 2.0, tx[:, :3], ty, 3.0)
    with pytest.raises(ValueError, match="batches must match"):
        fc.distill_clip_loss(x, y[:5], 2.0, tx, ty, 3.0)
    with pytest.raises(TypeError, match="teacher_logit_scale"):
        fc.distill_clip_loss(x, y, 2.0, tx, ty, "3")


def _distill_step(loss_fn, n, d=32):
    g = torch.Generator().manual_seed(n)
    x, y = torch.randn(n, d, generator=g).requires_grad_(), torch.randn(n, d, generator=g).requires_grad_()
    tx, ty = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    s = torch.tensor(5.0, requires_grad=True)
    with PeakMemory() as pm:
        c, dl = loss_fn(x, y, s, tx, ty)
        (c + dl).backward()
    return pm


def test_fused_extra_memory_is_linear_in_n(monkeypatch):
    monkeypatch.setattr(_tiles, "rows_per_block", lambda *a: 64)

    def fused(x, y, s, tx, ty):
        return dmod.distill_fused(x, y, s, tx, ty, torch.tensor(4.0), 0, x, y, tx, ty, fn.bound("tiles", "tiles"))

    def ref(x, y, s, tx, ty):
        return fc.distill_clip_loss(x, y, s, tx, ty, 4.0, backend="reference")

    sizes = (256, 1024, 2048)
    tiled = [_distill_step(fused, n).peak for n in sizes]
    dense = [_distill_step(ref, n).peak for n in sizes]
    assert tiled[2] / tiled[1] < 2.3, tiled  # O(N)
    assert dense[2] / dense[1] > 3.5, dense  # the materialised formula: O(N²), so the probe can fail
    assert _distill_step(fused, 2048).largest < 2048 * 2048 * 4 / 8
    assert tiled[2] < dense[2] / 8, (tiled, dense)


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    x, y, tx, ty = _inputs(24, 16, 8, torch.float32, 5)
    backend = "triton" if fc.dispatch.unavailable_reason("distill", "triton", x.device) is None else "cpu"

    def step(a, b, s):
        c, d = fc.distill_clip_loss(a, b, s, tx, ty, 6.0, backend=backend)
        return c + 2 * d

    leaves = [t.clone().requires_grad_() for t in (x, y)]
    s = torch.tensor(4.0, requires_grad=True)
    torch.compile(step, fullgraph=True, backend="aot_eager")(*leaves, s).backward()
    leaves2 = [t.clone().requires_grad_() for t in (x, y)]
    s2 = torch.tensor(4.0, requires_grad=True)
    step(*leaves2, s2).backward()
    for a, b in zip((*leaves, s), (*leaves2, s2)):
        assert torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-6)


def test_autocast_returns_float32():
    x, y, tx, ty = _inputs(20, 16, 8, torch.float32, 6)
    want = fc.distill_clip_loss(x, y, 3.0, tx, ty, 5.0, backend="reference")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fc.distill_clip_loss(x.bfloat16(), y.bfloat16(), 3.0, tx.bfloat16(), ty.bfloat16(), 5.0,
                                   backend="cpu" if fc.dispatch.unavailable_reason("distill", "cpu", x.device)
                                   is None else "reference")
    for a, b in zip(got, want):
        assert a.dtype == torch.float32 and torch.allclose(a, b, rtol=3e-2)


# ------------------------------------------------------------------------------------------------ 2 ranks
N_LOCAL, D, DT = 6, 8, 5


def _global(world):
    g = torch.Generator().manual_seed(42)
    return [torch.randn(world * N_LOCAL, k, generator=g, dtype=torch.float64) for k in (D, D, DT, DT)]


def _distill_ranks(local_loss, gather_with_grad, rank, world):
    """One gloo rank (tests/_gloo.py): ours and open_clip's DistillClipLoss on this rank's slice of the batch."""
    from test_open_clip_parity import oc as oc_loss

    sl = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)
    x, y, tx, ty = (t[sl] for t in _global(world))
    kw = dict(local_loss=local_loss, gather_with_grad=gather_with_grad, rank=rank, world_size=world)
    res = {"ours": _run(fc.DistillClipLoss(backend="cpu" if fc.dispatch.unavailable_reason(
        "distill", "cpu", x.device) is None else "reference", **kw), x, y, tx, ty)}
    if oc_loss is not None:
        res["theirs"] = _run(oc_loss.DistillClipLoss(**kw), x, y, tx, ty)
    return res


@needs_oc
@pytest.mark.parametrize("local_loss,gather_with_grad", [(False, False), (True, True)])
def test_two_ranks_equal_open_clip(local_loss, gather_with_grad):
    results = run_ranks(functools.partial(_distill_ranks, local_loss, gather_with_grad), 2)
    for r in results:
        _close(r["ours"], r["theirs"], 1e-9, 1e-11)
    if not local_loss:  # every rank computes the global batch's loss: equal to one process on it
        x, y, tx, ty = _global(2)
        one = _run(fc.DistillClipLoss(backend="reference"), x, y, tx, ty)
        assert torch.allclose(results[0]["ours"]["c"], one["c"]) and torch.allclose(results[1]["ours"]["d"], one["d"])
