"""SigLipLoss across ranks for every open_clip ``dist_impl`` (gloo, 2 and 4 CPU processes), and the CLIP ring.

* each ``dist_impl`` equals one process on the concatenated batch (the mean of the ranks' losses; features get
  world × the global gradient, scale and bias average to it) and open_clip 3.3.0's SigLipLoss with the same
  ``dist_impl`` on each rank (loss and every gradient);
* group ids (``weighting`` "none" and "inverse_count") in every ``dist_impl`` equal the single-process ids loss;
* uneven local batches raise the same ValueError on every rank (nobody is left waiting);
* the ring posts each step's transfer before the block compute and waits after it (forward and backward), and
  the CLIP ring with that overlap still equals the single-process loss;
* per-rank peak memory of ``dist_impl="bidir"`` at world size 4 is within 1.2× of world size 2 at the same local
  batch (while ``"gather"``, the control, grows).

One spawn per world size runs every case, so the module stays well under a minute on two loaded cores.
"""
import datetime
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastcontrast as fc
from fastcontrast.validate import rel_err

from _gloo import run_ranks

N_LOCAL, D = 6, 16
ID_N, ID_M = 4, 5  # ragged per rank with ids: 4 images, 5 texts
MEM_N, MEM_D = 96, 32
IMPLS = ("bidir", "shift", "reduce", "gather")
T0, B0 = 2.3, -5.0  # log logit scale (open_clip passes its exp), logit bias


def _data(world, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.normalize(torch.randn(world * N_LOCAL, D, generator=g, dtype=torch.float64), dim=1)
    y = torch.nn.functional.normalize(torch.randn(world * N_LOCAL, D, generator=g, dtype=torch.float64), dim=1)
    return x.float(), y.float()


def _id_data(world, seed=3):
    """float64 features; ids with duplicates across ranks, and ids found on one side only (rows with no positive)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.normalize(torch.randn(world * ID_N, D, generator=g, dtype=torch.float64), dim=1)
    y = torch.nn.functional.normalize(torch.randn(world * ID_M, D, generator=g, dtype=torch.float64), dim=1)
    iid = torch.randint(0, 2 * world + 1, (world * ID_N,), generator=g)
    tid = torch.randint(0, 2 * world + 3, (world * ID_M,), generator=g)
    return x, y, iid, tid


def _grads(fn, x, y):
    x, y = x.clone().requires_grad_(), y.clone().requires_grad_()
    t = torch.tensor(T0, dtype=x.dtype, device=x.device, requires_grad=True)
    b = torch.tensor(B0, dtype=x.dtype, device=x.device, requires_grad=True)
    loss = fn(x, y, t.exp(), b)
    loss.backward()
    return dict(loss=loss.detach(), dx=x.grad, dy=y.grad, dt=t.grad, db=b.grad)


class _Log:
    """Records transfers started (``comm.launch``: P2P batches, broadcasts, reduces) and waited, and block computes
    (the SigLIP block, the CLIP ring's per-block lse forward and backward), to check their order: the overlap of
    each transfer with the compute that follows it."""

    def __init__(self, D):
        from fastcontrast.distributed import clip_ring, comm, siglip

        self.events, self.modules = [], (clip_ring, comm, siglip)
        self.saved = (comm.launch, siglip._siglip_block, clip_ring.resolve, comm.Pending.wait)

    def __enter__(self):
        clip_ring, comm, siglip = self.modules
        launch, block, resolve, wait = self.saved
        ev = self.events

        def logged(name, f):
            def g(*a, **k):
                ev.append(name)
                return f(*a, **k)
            return g

        class Lse:  # the ring's resolved lse, its forward and backward logged as block computes
            def __init__(self, lse):
                self.lse = lse

            def __call__(self, *a, **k):
                ev.append("compute")
                return self.lse(*a, **k)

            def backward(self, *a, **k):
                ev.append("compute")
                return self.lse.backward(*a, **k)

        def w(pending):
            if pending.reqs:
                ev.append("wait")
            return wait(pending)

        comm.launch = logged("post", launch)
        siglip._siglip_block = logged("compute", block)
        clip_ring.resolve = lambda *a, **k: (lambda impl: (lambda: Lse(impl())))(resolve(*a, **k))
        comm.Pending.wait = w
        return self

    def __exit__(self, *exc):
        clip_ring, comm, siglip = self.modules
        comm.launch, siglip._siglip_block, clip_ring.resolve, comm.Pending.wait = self.saved


def _cases(rank, world, oc):
    from fastcontrast import distributed as Dm
    from fastcontrast.tools.memtrack import PeakMemory

    out = {}
    x_all, y_all = _data(world)
    sl = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)
    for impl in IMPLS:
        out[impl] = _grads(lambda x, y, s, b: fc.SigLipLoss(rank=rank, world_size=world, dist_impl=impl)(x, y, s, b),
                           x_all[sl], y_all[sl])
        if oc is not None:
            out["oc_" + impl] = _grads(
                lambda x, y, s, b: oc.SigLipLoss(rank=rank, world_size=world, dist_impl=impl)(x, y, s, b),
                x_all[sl], y_all[sl])
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 features from an autocast region, loss in fp32
        loss = fc.SigLipLoss(rank=rank, world_size=world)(x_all[sl].bfloat16(), y_all[sl].bfloat16(),
                                                          torch.tensor(T0).exp(), torch.tensor(B0))
    out["autocast"] = loss.detach()
    # group ids, ragged per rank, in every dist_impl
    x, y, iid, tid = _id_data(world)
    si, st = slice(rank * ID_N, (rank + 1) * ID_N), slice(rank * ID_M, (rank + 1) * ID_M)
    for impl in IMPLS:
        for weighting in ("none", "inverse_count"):
            loss = fc.SigLipLoss(rank=rank, world_size=world, dist_impl=impl)
            out[f"ids_{impl}_{weighting}"] = _grads(
                lambda a, b_, s, bias: loss(a, b_, s, bias, image_ids=iid[si], text_ids=tid[st], weighting=weighting),
                x[si], y[st])
    # uneven local batches: rank 0 holds one pair fewer
    n_here = N_LOCAL - 1 if rank == 0 else N_LOCAL
    xu, yu = x_all[sl][:n_here], y_all[sl][:n_here]
    for impl in IMPLS:
        try:
            fc.SigLipLoss(rank=rank, world_size=world, dist_impl=impl)(xu, yu, 10.0, -5.0)
            out[f"uneven_{impl}"] = "no error"
        except ValueError as e:
            out[f"uneven_{impl}"] = str(e)
    try:
        fc.SigLipLoss(rank=rank, world_size=world)(xu, yu, 10.0, -5.0, image_ids=torch.arange(n_here),
                                                   text_ids=torch.arange(n_here))
        out["uneven_ids"] = "no error"
    except ValueError as e:
        out["uneven_ids"] = str(e)
    try:  # a rank that is not torch.distributed's is named, before any collective
        fc.SigLipLoss(rank=(rank + 1) % world, world_size=world)(x_all[sl], y_all[sl], 10.0, -5.0)
        out["wrong_rank"] = "no error"
    except ValueError as e:
        out["wrong_rank"] = str(e)
    try:  # ids on one rank only: the blocks would not match; every rank says so
        ids = dict(image_ids=torch.arange(N_LOCAL), text_ids=torch.arange(N_LOCAL)) if rank == 0 else {}
        fc.SigLipLoss(rank=rank, world_size=world)(x_all[sl], y_all[sl], 10.0, -5.0, **ids)
        out["ids_on_one_rank"] = "no error"
    except ValueError as e:
        out["ids_on_one_rank"] = str(e)
    try:  # image_ids alone on one rank: the agreement check comes before the ids are validated
        ids = dict(image_ids=torch.arange(N_LOCAL)) if rank == 0 else {}
        fc.SigLipLoss(rank=rank, world_size=world)(x_all[sl], y_all[sl], 10.0, -5.0, **ids)
        out["image_ids_on_one_rank"] = "no error"
    except ValueError as e:
        out["image_ids_on_one_rank"] = str(e)
    # double backward: the rings raise (their backward is hand-written); a gather's is exact
    for name, fn in (("siglip", lambda a, b: fc.SigLipLoss(rank=rank, world_size=world)(a, b, 10.0, -5.0)),
                     ("clip", lambda a, b: fc.ClipLoss(rank=rank, world_size=world, mode="ring")(a, b, 10.0))):
        a = x_all[sl].clone().requires_grad_()
        try:
            torch.autograd.grad(fn(a, y_all[sl]), a, create_graph=True)
            out[f"double_backward_{name}_ring"] = "no error"
        except RuntimeError as e:
            out[f"double_backward_{name}_ring"] = str(e)
    t = x_all[sl].double().clone().requires_grad_()
    from fastcontrast.distributed import all_gather_with_grad

    g, = torch.autograd.grad(all_gather_with_grad(t).pow(3).sum(), t, create_graph=True)  # world·3t²
    h, = torch.autograd.grad(g.sum(), t)  # world·6t: the second backward crosses the ranks again
    out["gather_second_derivative"] = (g.detach(), h, t.detach())
    loss = fc.SigLipLoss(rank=rank, world_size=world)  # equal sizes first, then one rank's size changes
    loss(x_all[sl], y_all[sl], 10.0, -5.0)
    try:
        loss(xu, yu, 10.0, -5.0)
        out["uneven_after_equal_step"] = "no error"
    except ValueError as e:
        out["uneven_after_equal_step"] = str(e)
    try:
        fc.ClipLoss(rank=rank, world_size=world, mode="ring")(xu, yu, 10.0)
        out["uneven_clip_ring"] = "no error"
    except ValueError as e:
        out["uneven_clip_ring"] = str(e)
    # the CLIP ring (overlapped) and the order of its transfers and computes
    with _Log(Dm) as log:
        out["clip_ring"] = _grads(lambda a, b_, s, bias: fc.ClipLoss(rank=rank, world_size=world, mode="ring")(a, b_, s),
                                  x_all[sl], y_all[sl])
    out["clip_ring_events"] = log.events
    for impl in ("bidir", "shift", "reduce"):
        with _Log(Dm) as log:
            _grads(lambda a, b_, s, bias: fc.SigLipLoss(rank=rank, world_size=world, dist_impl=impl)(a, b_, s, bias),
                   x_all[sl], y_all[sl])
        out[f"events_{impl}"] = log.events
    # per-rank peak memory of one forward + backward, at the same local batch for every world size
    g = torch.Generator().manual_seed(100 + rank)
    xm = torch.randn(MEM_N, MEM_D, generator=g).requires_grad_()
    ym = torch.randn(MEM_N, MEM_D, generator=g).requires_grad_()
    for impl in ("gather", "bidir", "shift"):
        loss_fn = fc.SigLipLoss(rank=rank, world_size=world, dist_impl=impl)
        loss_fn(xm, ym, 10.0, -5.0).backward()  # warm-up: lazy imports and caches outside the measurement
        xm.grad = ym.grad = None
        with PeakMemory() as pm:
            loss_fn(xm, ym, 10.0, -5.0).backward()
        out[f"peak_{impl}"] = pm.peak
        xm.grad = ym.grad = None
    return out


def _rank_cases(rank, world):
    from fastcontrast._compat import open_clip_loss_module

    return _cases(rank, world, open_clip_loss_module())


_RESULTS = {}


def _results(world):
    if world not in _RESULTS:
        _RESULTS[world] = run_ranks(_rank_cases, world)
    return _RESULTS[world]


def _single(world):
    x_all, y_all = _data(world)
    return _grads(lambda x, y, s, b: fc.siglip_loss(x, y, s, b, backend="reference"), x_all.double(), y_all.double())


def _assert_global(results, want, key, world, tol):
    """DDP's view: the mean of the ranks' losses and scale/bias gradients, and world × the features' gradients."""
    assert rel_err(sum(r[key]["loss"] for r in results) / world, want["loss"]) <= tol, key
    for g in ("dx", "dy"):
        got = torch.cat([r[key][g] for r in results]) / world
        assert rel_err(got, want[g]) <= tol, (key, g, rel_err(got, want[g]))
    for g in ("dt", "db"):
        got = sum(r[key][g] for r in results) / world
        assert rel_err(got, want[g]) <= tol, (key, g, rel_err(got, want[g]))


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("impl", IMPLS)
def test_each_dist_impl_equals_one_process(world, impl):
    _assert_global(_results(world), _single(world), impl, world, 1e-5)


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("impl", IMPLS)
def test_each_dist_impl_equals_open_clip(world, impl):
    results = _results(world)
    if "oc_" + impl not in results[0]:
        pytest.skip("open-clip-torch is not installed; equality with one process is still tested")
    for r, res in enumerate(results):
        for k in ("loss", "dx", "dy", "dt", "db"):
            err = rel_err(res[impl][k], res["oc_" + impl][k])
            assert err <= 1e-5, (r, impl, k, err)


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("weighting", ["none", "inverse_count"])
def test_ids_equal_one_process(world, impl, weighting):
    x, y, iid, tid = _id_data(world)
    want = _grads(lambda a, b, s, bias: fc.siglip_loss(a, b, s, bias, image_ids=iid, text_ids=tid,
                                                       weighting=weighting, backend="reference"), x, y)
    _assert_global(_results(world), want, f"ids_{impl}_{weighting}", world, 1e-9)


@pytest.mark.parametrize("world", [2, 4])
def test_autocast_bf16_features(world):
    for res in _results(world):
        assert res["autocast"].dtype == torch.float32
        assert rel_err(res["autocast"], res["bidir"]["loss"]) <= 1e-2  # bf16 rounding of the features only


@pytest.mark.parametrize("world", [2, 4])
def test_uneven_local_batches_raise_on_every_rank(world):
    for res in _results(world):
        for key in [f"uneven_{i}" for i in IMPLS] + ["uneven_ids", "uneven_after_equal_step", "uneven_clip_ring"]:
            assert "local batches differ across ranks" in res[key], (key, res[key])
        assert "different options" in res["ids_on_one_rank"], res["ids_on_one_rank"]
        assert "different options" in res["image_ids_on_one_rank"], res["image_ids_on_one_rank"]
        assert "SigLipLoss(rank=" in res["wrong_rank"] and "torch.distributed has rank" in res["wrong_rank"]


@pytest.mark.parametrize("world", [2, 4])
def test_clip_ring_with_overlap_equals_one_process(world):
    results = _results(world)
    x_all, y_all = _data(world)
    want = _grads(lambda x, y, s, b: fc.clip_loss(x, y, s, backend="reference"), x_all.double(), y_all.double())
    for r, res in enumerate(results):  # every rank returns the global loss
        assert rel_err(res["clip_ring"]["loss"], want["loss"]) <= 1e-5, r
    for g in ("dx", "dy"):
        got = torch.cat([res["clip_ring"][g] for res in results]) / world
        assert rel_err(got, want[g]) <= 1e-5, g
    assert rel_err(sum(res["clip_ring"]["dt"] for res in results) / world, want["dt"]) <= 1e-5


def _overlapped(events):
    """The number of block computes that run while a started transfer is not yet waited."""
    steps, in_flight = 0, 0
    for e in events:
        in_flight += {"post": 1, "wait": -1}.get(e, 0)
        assert in_flight >= 0, events
        steps += e == "compute" and in_flight > 0
    assert in_flight == 0, events  # everything started is waited
    return steps


@pytest.mark.parametrize("world", [2, 4])
def test_transfers_overlap_the_block_compute(world):
    for res in _results(world):
        # CLIP: every step, forward and backward, computes with the next block or the last statistics in flight
        assert _overlapped(res["clip_ring_events"]) >= 2 * world, res["clip_ring_events"]
        for impl in ("bidir", "shift", "reduce"):
            ev = res[f"events_{impl}"]
            # forward: the own block and W−1 others, backward: W−1 others and the own block (with its gradient's
            # last hop in flight); only the last block of a direction has nothing left to move beside it
            assert ev.count("compute") >= 2 * world, (impl, ev)
            assert _overlapped(ev) >= 2 * (world - 1), (impl, ev)


def test_ring_memory_flat_in_world_size():
    peaks = {(impl, w): max(r["peak_" + impl] for r in _results(w)) for impl in ("bidir", "shift", "gather")
             for w in (2, 4)}
    for impl in ("bidir", "shift"):
        assert peaks[impl, 4] <= 1.2 * peaks[impl, 2], peaks
    assert peaks["gather", 4] >= 1.5 * peaks["gather", 2], peaks  # the control: the all-gather's memory grows


@pytest.mark.skipif(not (torch.cuda.is_available() and torch.cuda.device_count() >= 2 and dist.is_nccl_available()),
                    reason="the NCCL side-stream path needs 2 CUDA devices and NCCL; CI and dev machines are CPU-only")
def test_nccl_side_stream_equals_gloo():
    world = 2
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_nccl_worker, args=(world, os.path.join(d, "init"), d), nprocs=world, join=True)
        res = [torch.load(os.path.join(d, f"r{r}.pt")) for r in range(world)]
    want = _single(world)
    for impl in ("bidir", "shift", "reduce"):
        _assert_global(res, want, impl, world, 1e-4)  # TF32/cuBLAS order: a looser fp32 bound than the CPU's


def _nccl_worker(rank, world, init_file, out_dir):
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=90))
    try:
        x_all, y_all = _data(world)
        sl = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)
        out = {}
        for impl in ("bidir", "shift", "reduce"):
            r = _grads(lambda x, y, s, b: fc.SigLipLoss(rank=rank, world_size=world, dist_impl=impl)(x, y, s, b),
                       x_all[sl].cuda(), y_all[sl].cuda())
            out[impl] = {k: v.cpu() for k, v in r.items()}
        torch.save(out, os.path.join(out_dir, f"r{rank}.pt"))
    finally:
        dist.barrier()
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 4])
def test_double_backward_rings_raise_and_gather_is_exact(world):
    for res in _results(world):
        for name in ("siglip", "clip"):
            msg = res[f"double_backward_{name}_ring"]
            assert "double backward is not supported" in msg and "dist_impl='gather'" in msg, msg
        g, h, t = res["gather_second_derivative"]
        assert rel_err(g, world * 3 * t ** 2) <= 1e-12
        assert rel_err(h, world * 6 * t) <= 1e-12
