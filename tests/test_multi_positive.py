"""Multiple positives from group ids (UniCL) on every backend: vs a naive float64 loop written from the paper's
equations (row i's target uniform over P(i) = {j : text_id_j = image_id_i}, each direction normalised over its
own positives; rows without a positive contribute 0 and count in the mean), ragged M ≠ N, forward and every
gradient; no N×M buffer, no host sync, torch.compile, autocast, and 2 gloo ranks equal one process."""
import datetime
import os
import sys
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastcontrast as fc
from _ops import backend_params
from conftest import kernel_device
from fastcontrast.tools.memtrack import HostSyncs, PeakMemory
from fastcontrast.primitives import tiles as _tiles
from fastcontrast.losses.clip_loss_reference import infonce_ids_reference
from fastcontrast.primitives import groups as MP
from fastcontrast.dispatch import kernel_impl

BACKENDS = backend_params("infonce", kernel_device(), ("triton", "cpu", "cuda", "dense", "reference"))


def naive(x, y, a, c, b, image_ids, text_ids, normalize=True, tokens=1):
    """UniCL eqs. 2-3 as loops over rows, on the materialised float64 logits."""
    x, y = x.double(), y.double()
    if normalize:
        x = torch.nn.functional.normalize(x.reshape(x.shape[0], tokens, -1), dim=-1).reshape(x.shape[0], -1)
        y = torch.nn.functional.normalize(y.reshape(y.shape[0], tokens, -1), dim=-1).reshape(y.shape[0], -1)
    s = x @ y.T
    n, m = s.shape
    total_i, total_t = 0.0, 0.0
    for i in range(n):
        pos = [j for j in range(m) if int(text_ids[j]) == int(image_ids[i])]
        if pos:
            logp = torch.log_softmax(a[i] * s[i] + b, dim=0)
            total_i = total_i - sum(logp[j] for j in pos) / len(pos)
    for j in range(m):
        pos = [i for i in range(n) if int(image_ids[i]) == int(text_ids[j])]
        if pos:
            logp = torch.log_softmax(c[j] * s[:, j] + b, dim=0)
            total_t = total_t - sum(logp[i] for i in pos) / len(pos)
    return 0.5 * (total_i / n + total_t / m)


def _case(n, m, d, groups, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64).to(dtype)
    y = torch.randn(m, d, generator=g, dtype=torch.float64).to(dtype)
    # ids drawn from more groups than either side covers: some rows have no positive at all
    return x, y, torch.randint(0, groups, (n,), generator=g), torch.randint(0, groups, (m,), generator=g)


def _grads(loss_fn, *leaves):
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    loss = loss_fn(*leaves)
    loss.backward()
    return [loss.detach()] + [t.grad for t in leaves]


def _assert_close(got, want, rtol, atol):
    for k, (a, b) in enumerate(zip(got, want)):
        assert torch.isfinite(a).all(), k
        assert torch.allclose(a.double(), b.double(), rtol=rtol, atol=atol), (k, (a.double() - b.double()).abs().max())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n,m,groups", [(13, 9, 7), (20, 20, 5), (7, 31, 12)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_clip_loss_ids_equal_naive(backend, n, m, groups, with_bias):
    for seed in (0, 1):
        x, y, iid, tid = _case(n, m, 8, groups, seed)
        s0, b0 = torch.tensor(4.0, dtype=torch.float64), torch.tensor(-1.5, dtype=torch.float64)
        bias = (lambda b: b) if with_bias else (lambda b: None)  # noqa: E731
        got = _grads(lambda x, y, s, b: fc.clip_loss(x, y, s, bias(b), normalize=True, backend=backend,
                                                     image_ids=iid, text_ids=tid), x, y, s0, b0)
        want = _grads(lambda x, y, s, b: naive(x, y, s.expand(n), s.expand(m), b if with_bias else 0.0, iid, tid),
                      x, y, s0, b0)
        if not with_bias:
            got, want = got[:4], want[:4]
        _assert_close(got, want, 1e-9, 1e-11)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_and_no_normalize(backend):
    x, y, iid, tid = _case(33, 21, 16, 9, 4, torch.float32)
    got = _grads(lambda x, y, s: fc.clip_loss(x, y, s, backend=backend, image_ids=iid, text_ids=tid),
                 x, y, torch.tensor(0.7))
    want = _grads(lambda x, y, s: naive(x, y, s.expand(33), s.expand(21), 0.0, iid, tid, normalize=False),
                  x.double(), y.double(), torch.tensor(0.7, dtype=torch.float64))
    _assert_close(got, want, 1e-4, 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_adaptive_and_oblique_with_ids(backend):
    x, y, iid, tid = _case(11, 14, 12, 6, 5)
    ti = torch.rand(11, dtype=torch.float64) * 0.2 + 0.05
    tt = torch.rand(14, dtype=torch.float64) * 0.2 + 0.05
    got = _grads(lambda x, y, ti, tt: fc.adaptive_temperature_clip_loss(
        x, y, ti, tt, normalize=True, backend=backend, image_ids=iid, text_ids=tid), x, y, ti, tt)
    want = _grads(lambda x, y, ti, tt: naive(x, y, 1 / ti, 1 / tt, 0.0, iid, tid), x, y, ti, tt)
    _assert_close(got, want, 1e-9, 1e-11)
    xo, yo = x.reshape(11, 3, 4), y.reshape(14, 3, 4)
    got = _grads(lambda x, y: fc.oblique_clip_loss(x, y, 2.0, backend=backend, image_ids=iid, text_ids=tid), xo, yo)
    want = _grads(lambda x, y: naive(x.reshape(11, 12), y.reshape(14, 12), torch.full((11,), 2.0),
                                     torch.full((14,), 2.0), 0.0, iid, tid, tokens=3).reshape(()), xo, yo)
    _assert_close(got, want, 1e-9, 1e-11)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unique_ids_equal_the_plain_loss(backend):
    x, y, _, _ = _case(17, 17, 8, 1, 6)
    perm = torch.randperm(17, generator=torch.Generator().manual_seed(0))
    ids = torch.arange(17) * 3 + 100  # any unique values
    got = fc.clip_loss(x, y, 5.0, 0.3, normalize=True, backend=backend, image_ids=ids, text_ids=ids)
    want = fc.clip_loss(x, y, 5.0, 0.3, normalize=True, backend="reference")
    assert torch.allclose(got, want, rtol=1e-10)
    # a permuted pairing: text perm[i] is image i's positive
    tid = torch.empty_like(ids)
    tid[perm] = ids
    got = fc.clip_loss(x, y, 5.0, normalize=True, backend=backend, image_ids=ids, text_ids=tid)
    assert torch.allclose(got, fc.clip_loss(x, y, 5.0, normalize=True, labels=perm, backend="reference"), rtol=1e-10)


def test_group_means_against_a_mask():
    g = torch.Generator().manual_seed(3)
    keys = torch.randn(15, 4, generator=g, dtype=torch.float64)
    kid, qid = torch.randint(-3, 5, (15,), generator=g), torch.randint(-4, 7, (10,), generator=g)
    mean, has = MP.group_means(qid, kid, keys)
    mask = (qid[:, None] == kid[None, :]).double()
    assert torch.equal(has, mask.sum(1) > 0)
    assert torch.allclose(mean, mask @ keys / mask.sum(1, keepdim=True).clamp_min(1))


def test_bad_ids_name_the_argument():
    x, y, iid, tid = _case(6, 5, 4, 3, 0, torch.float32)
    with pytest.raises(ValueError, match="text_ids"):
        fc.clip_loss(x, y, 2.0, image_ids=iid)
    with pytest.raises(ValueError, match="image_ids"):
        fc.clip_loss(x, y, 2.0, text_ids=tid)
    with pytest.raises(ValueError, match=r"text_ids must have shape \(5,\)"):
        fc.clip_loss(x, y, 2.0, image_ids=iid, text_ids=tid[:4])
    with pytest.raises(TypeError, match="image_ids must be an integer"):
        fc.clip_loss(x, y, 2.0, image_ids=iid.float(), text_ids=tid)
    with pytest.raises(ValueError, match="not both"):
        fc.clip_loss(x, y, 2.0, labels=torch.zeros(6, dtype=torch.long), image_ids=iid, text_ids=tid)


def _step(n, fused=True):
    x, y, iid, tid = _case(n, n, 32, n // 2, n, torch.float32)
    x.requires_grad_(), y.requires_grad_()
    with PeakMemory() as pm:
        if fused:  # the tiles behind every fused backend (the PyTorch blocks of fastcontrast::lse_pair)
            loss = kernel_impl("infonce_ids", "tiles")(x, y, torch.tensor(5.0).expand(n),
                                                       torch.tensor(5.0).expand(n), None, iid, tid, True, 1)
        else:
            loss = infonce_ids_reference(x, y, torch.tensor(5.0).expand(n), torch.tensor(5.0).expand(n), None,
                                         iid, tid, True, 1)
        loss.backward()
    return pm


def test_extra_memory_is_linear_in_n(monkeypatch):
    monkeypatch.setattr(_tiles, "rows_per_block", lambda *a: 64)
    sizes = (256, 1024, 2048)
    tiled = [_step(n).peak for n in sizes]
    ref = [_step(n, fused=False).peak for n in sizes]
    assert tiled[2] / tiled[1] < 2.3, tiled
    assert ref[2] / ref[1] > 3.5, ref  # the probe sees an N×M mask when there is one
    assert _step(2048).largest < 2048 * 2048 * 4 / 8
    assert tiled[2] < ref[2] / 8


def test_no_host_sync():
    x, y, iid, tid = _case(40, 30, 8, 10, 2, torch.float32)
    x.requires_grad_()
    backend = "cpu" if fc.dispatch.unavailable_reason("infonce", "cpu", x.device) is None else "reference"
    with HostSyncs() as hs:
        fc.clip_loss(x, y, 3.0, normalize=True, backend=backend, image_ids=iid, text_ids=tid).backward()
    assert hs.syncs == []


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    x, y, iid, tid = _case(24, 18, 16, 8, 7, torch.float32)
    backend = "triton" if fc.dispatch.unavailable_reason("infonce", "triton", x.device) is None else "cpu"

    def step(a, b, s):
        return fc.clip_loss(a, b, s, normalize=True, backend=backend, image_ids=iid, text_ids=tid)

    got = _grads(torch.compile(step, fullgraph=True, backend="aot_eager"), x, y, torch.tensor(4.0))
    want = _grads(step, x, y, torch.tensor(4.0))
    _assert_close(got, want, 1e-5, 1e-6)


def test_autocast_bf16():
    x, y, iid, tid = _case(20, 16, 16, 6, 8, torch.float32)
    want = fc.clip_loss(x, y, 3.0, normalize=True, backend="reference", image_ids=iid, text_ids=tid)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fc.clip_loss(x.bfloat16(), y.bfloat16(), 3.0, normalize=True, image_ids=iid, text_ids=tid)
    assert got.dtype == torch.float32 and torch.allclose(got, want, rtol=2e-2)


# ------------------------------------------------------------------------------------------------ 2 ranks
N_LOCAL, M_LOCAL = 5, 4


def _global(world):
    return _case(world * N_LOCAL, world * M_LOCAL, 6, 7, 99)


def _worker(rank, world, init_file, out_dir, local_loss, gather_with_grad, mode="gather"):
    os.environ.pop("TRITON_INTERPRET", None)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        x, y, iid, tid = _global(world)
        si, st = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL), slice(rank * M_LOCAL, (rank + 1) * M_LOCAL)
        loss_obj = fc.ClipLoss(local_loss=local_loss, gather_with_grad=gather_with_grad, rank=rank, world_size=world,
                               normalize=True, mode=mode)
        out = _grads(lambda x, y, s: loss_obj(x, y, s, image_ids=iid[si], text_ids=tid[st]), x[si], y[st],
                     torch.tensor(3.0, dtype=torch.float64))
        torch.save(out, os.path.join(out_dir, f"r{rank}.pt"))
    finally:
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@pytest.mark.parametrize("local_loss,gather_with_grad,mode", [(False, False, "gather"), (False, True, "gather"),
                                                               (True, True, "gather"), (False, False, "ring")])
def test_two_ranks_equal_one_process(local_loss, gather_with_grad, mode):
    # mode="ring" carries each text block's ids around the ring (more cases: tests/test_ring_ids.py)
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_worker, args=(2, os.path.join(d, "init"), d, local_loss, gather_with_grad, mode), nprocs=2,
                 join=True)
        res = [torch.load(os.path.join(d, f"r{r}.pt")) for r in range(2)]
    x, y, iid, tid = _global(2)
    n, m = x.shape[0], y.shape[0]
    want = _grads(lambda x, y, s: naive(x, y, s.expand(n), s.expand(m), 0.0, iid, tid), x, y,
                  torch.tensor(3.0, dtype=torch.float64))
    loss = sum(r[0] for r in res) / 2 if local_loss else res[0][0]
    assert torch.allclose(loss, want[0], rtol=1e-10)
    # DDP averages the ranks' gradients; with local_loss=False each rank holds the global loss, its local slice
    # of the gradient is (a share of) the global one: compare the rank-summed gradients to one process's
    # (the ring's convention is gather_with_grad's: each rank's features get world × the global gradient)
    scale = 0.5 if local_loss or gather_with_grad or mode == "ring" else 1.0
    dx = torch.cat([r[1] for r in res]) * scale
    dy = torch.cat([r[2] for r in res]) * scale
    assert torch.allclose(dx, want[1], rtol=1e-8, atol=1e-10), (dx - want[1]).abs().max()
    assert torch.allclose(dy, want[2], rtol=1e-8, atol=1e-10)


def test_modules_take_ids():
    x, y, iid, tid = _case(9, 6, 12, 4, 11)
    want = naive(x, y, torch.full((9,), 3.0), torch.full((6,), 3.0), 0.0, iid, tid)
    got = fc.ClipLoss(normalize=True)(x, y, 3.0, image_ids=iid, text_ids=tid, output_dict=True)["contrastive_loss"]
    assert torch.allclose(got, want, rtol=1e-10)
    got = fc.ObliqueClipLoss(logit_scale=3.0)(x.reshape(9, 3, 4), y.reshape(6, 3, 4), image_ids=iid, text_ids=tid)
    want = naive(x, y, torch.full((9,), 3.0), torch.full((6,), 3.0), 0.0, iid, tid, tokens=3)
    assert torch.allclose(got.double(), want, rtol=1e-6)
