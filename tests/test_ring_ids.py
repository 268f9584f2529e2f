"""ClipLoss(mode="ring") with image_ids/text_ids (multiple positives, UniCL) across 2 and 4 gloo CPU processes.

* the ring equals one process on the concatenated batch (``clip_loss`` with ids, the materialised float64
  reference): loss on every rank, features' gradients (world × the global one, the ring's convention), logit
  scale and bias (averaged over ranks), float64 to 1e-9, fp32 to 1e-5, bf16 to 1e-2, ragged (M ≠ N per rank)
  and even; the ids include rows whose positives all live on other ranks and rows with no positive anywhere;
* it equals ClipLoss's gather mode with ids (``gather_with_grad=True``: the same per-rank gradients);
* with globally unique ids it equals the plain ring;
* the transfers still overlap the block computes, and per-rank peak memory does not grow with the world size;
* uneven local batches, ids on one rank only, and text_ids missing on one rank raise the same ValueError on
  every rank (ring and gather).

One spawn per world size runs every case, so the module stays well under a minute on two loaded cores.
"""

import pytest
import torch

import fastcontrast as fc
from fastcontrast.validate import rel_err

from _gloo import run_ranks

N_LOCAL, M_LOCAL, D = 5, 4, 8  # ragged per rank
E_LOCAL = 6  # the even case: N = M per rank
MEM_N, MEM_D = 96, 32
T0, B0 = 1.6, -0.7  # log logit scale (the module gets its exp), logit bias


def _ids(world, n, m, seed):
    """Random ids with duplicates across ranks, plus two planted cases: image 0 of rank 0 shares its id only with
    texts of the last rank, and the last image has an id no text has (a row with no positive)."""
    g = torch.Generator().manual_seed(seed)
    iid = torch.randint(0, 2 * world + 1, (world * n,), generator=g)
    tid = torch.randint(0, 2 * world + 3, (world * m,), generator=g)
    iid[0] = 1000
    tid[(world - 1) * m:(world - 1) * m + 2] = 1000
    iid[-1] = 2000
    return iid, tid


def _data(world, n, m, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(world * n, D, generator=g, dtype=torch.float64).to(dtype)
    y = torch.randn(world * m, D, generator=g, dtype=torch.float64).to(dtype)
    return (x, y) + _ids(world, n, m, seed + 1)


CASES = {  # name: (n per rank, m per rank, dtype, seed)
    "ragged64": (N_LOCAL, M_LOCAL, torch.float64, 0),
    "even64": (E_LOCAL, E_LOCAL, torch.float64, 1),
    "even32": (E_LOCAL, E_LOCAL, torch.float32, 2),
    "ragged_bf16": (N_LOCAL, M_LOCAL, torch.bfloat16, 4),
}
TOL = {torch.float64: 1e-9, torch.float32: 1e-5, torch.bfloat16: 1e-2}  # bf16: the gradients' rounding


def _grads(fn, x, y):
    x, y = x.clone().requires_grad_(), y.clone().requires_grad_()
    t = torch.tensor(T0, dtype=x.dtype, requires_grad=True)
    b = torch.tensor(B0, dtype=x.dtype, requires_grad=True)
    loss = fn(x, y, t.exp(), b)
    loss.backward()
    return dict(loss=loss.detach(), dx=x.grad, dy=y.grad, dt=t.grad, db=b.grad)


def _error(fn):
    try:
        fn()
        return "no error"
    except ValueError as e:
        return str(e)


def _cases(rank, world):
    from fastcontrast import distributed as Dm
    from fastcontrast.tools.memtrack import PeakMemory
    from test_siglip_ring import _Log

    out = {}
    ring = fc.ClipLoss(rank=rank, world_size=world, mode="ring", normalize=True)
    gather = fc.ClipLoss(rank=rank, world_size=world, gather_with_grad=True, normalize=True)
    for name, (n, m, dtype, seed) in CASES.items():
        x, y, iid, tid = _data(world, n, m, seed, dtype)
        si, st = slice(rank * n, (rank + 1) * n), slice(rank * m, (rank + 1) * m)
        ids = dict(image_ids=iid[si], text_ids=tid[st])
        with _Log(Dm) as log:
            out[name] = _grads(lambda a, b_, s, bias: ring(a, b_, s, bias, **ids), x[si], y[st])
        out[name + "_events"] = log.events
        out[name + "_gather"] = _grads(lambda a, b_, s, bias: gather(a, b_, s, bias, **ids), x[si], y[st])
    # globally unique ids: the plain ring's loss
    x, y, _, _ = _data(world, E_LOCAL, E_LOCAL, 3)
    sl = slice(rank * E_LOCAL, (rank + 1) * E_LOCAL)
    uniq = torch.arange(world * E_LOCAL)[sl]
    out["unique"] = _grads(lambda a, b_, s, bias: ring(a, b_, s, bias, image_ids=uniq, text_ids=uniq), x[sl], y[sl])
    out["plain"] = _grads(lambda a, b_, s, bias: ring(a, b_, s, bias), x[sl], y[sl])
    # the bias cancels in the softmax: a huge one changes nothing (no digits lost, no overflow), NaN stays NaN
    xf, yf, idf = x[sl].float(), y[sl].float(), dict(image_ids=uniq // 2, text_ids=uniq // 3)
    out["no_bias"] = _grads(lambda a, b_, s, bias: ring(a, b_, s, **idf), xf, yf)
    out["big_bias"] = _grads(lambda a, b_, s, bias: ring(a, b_, s, bias * 0 + 1e30, **idf), xf, yf)
    out["nan_bias"] = ring(xf, yf, 10.0, torch.tensor(float("nan")), **idf).detach()
    xs, ys = x[sl].float(), y[sl].float()
    n_here = E_LOCAL - 1 if rank == 0 else E_LOCAL
    for mode, loss in (("ring", ring), ("gather", gather)):
        out[f"uneven_{mode}"] = _error(lambda: loss(xs[:n_here], ys, 10.0, image_ids=uniq[:n_here], text_ids=uniq))
        one = dict(image_ids=uniq, text_ids=uniq) if rank == 0 else {}
        out[f"one_rank_{mode}"] = _error(lambda: loss(xs, ys, 10.0, **one))
        half = dict(image_ids=uniq) if rank == world - 1 else dict(image_ids=uniq, text_ids=uniq)
        out[f"half_ids_{mode}"] = _error(lambda: loss(xs, ys, 10.0, **half))  # one rank forgot text_ids
    # per-rank peak memory of one forward + backward, at the same local batch for every world size
    g = torch.Generator().manual_seed(100 + rank)
    xm = torch.randn(MEM_N, MEM_D, generator=g).requires_grad_()
    ym = torch.randn(MEM_N, MEM_D, generator=g).requires_grad_()
    im = torch.randint(0, 3 * world, (MEM_N,), generator=g)
    tm = torch.randint(0, 3 * world, (MEM_N,), generator=g)
    ids = dict(image_ids=im, text_ids=tm)
    for key, loss_fn, kw in (("ring", ring, ids), ("plain", ring, {}), ("gather", gather, ids)):
        loss_fn(xm, ym, 10.0, **kw).backward()  # warm-up: lazy imports and caches outside the measurement
        xm.grad = ym.grad = None
        with PeakMemory() as pm:
            loss_fn(xm, ym, 10.0, **kw).backward()
        out[f"peak_{key}"] = pm.peak
        xm.grad = ym.grad = None
    return out


_RESULTS = {}


def _results(world):
    if world not in _RESULTS:
        _RESULTS[world] = run_ranks(_cases, world)
    return _RESULTS[world]


def _assert_global(results, want, key, world, tol):
    """Every rank returns the global loss; world × the features' gradients and the mean scale/bias gradient."""
    for r, res in enumerate(results):
        assert rel_err(res[key]["loss"], want["loss"]) <= tol, (key, r, res[key]["loss"], want["loss"])
    for g in ("dx", "dy"):
        got = torch.cat([r[key][g] for r in results]) / world
        assert rel_err(got, want[g]) <= tol, (key, g, rel_err(got, want[g]))
    got = sum(r[key]["dt"] for r in results) / world
    assert rel_err(got, want["dt"]) <= tol, (key, "dt", rel_err(got, want["dt"]))
    got = sum(r[key]["db"] for r in results) / world  # the bias cancels in the softmax: both are ~0
    assert torch.isfinite(got) and abs(float(got - want["db"])) <= tol, (key, "db", got, want["db"])


def test_planted_ids_cover_the_cases():
    """The data has what the tests claim: a row whose positives are all on another rank, one with none."""
    for world in (2, 4):
        for n, m, _, seed in CASES.values():
            iid, tid = _data(world, n, m, seed)[2:]
            own = tid[:m]
            assert int(iid[0]) not in own.tolist() and int(iid[0]) in tid.tolist()
            assert int(iid[-1]) not in tid.tolist()
            assert any(int(t) not in iid.tolist() for t in tid)  # a text with no positive, too


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("name", list(CASES))
def test_ring_ids_equal_one_process(world, name):
    n, m, dtype, seed = CASES[name]
    x, y, iid, tid = _data(world, n, m, seed)  # the float64 reference on the same (rounded) inputs
    if dtype != torch.float64:
        x, y = x.to(dtype).double(), y.to(dtype).double()
    want = _grads(lambda a, b, s, bias: fc.clip_loss(a, b, s, bias, normalize=True, backend="reference",
                                                     image_ids=iid, text_ids=tid), x, y)
    _assert_global(_results(world), want, name, world, TOL[dtype])


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("name", list(CASES))
def test_ring_ids_equal_gather_mode(world, name):
    dtype = CASES[name][2]  # bf16: two roundings apart (the gather normalises in bf16, the ring in fp32)
    tol = TOL[dtype] * (2 if dtype == torch.bfloat16 else 1)
    results = _results(world)
    for r, res in enumerate(results):  # gather_with_grad: each rank's features get world × the global gradient
        for k in ("loss", "dx", "dy"):
            assert rel_err(res[name][k], res[name + "_gather"][k]) <= tol, (r, name, k)
    # the scale: the gather gives every rank the global gradient, the ring a share (DDP's mean is the same)
    ring_dt = sum(res[name]["dt"] for res in results) / world
    gather_dt = sum(res[name + "_gather"]["dt"] for res in results) / world
    assert rel_err(ring_dt, gather_dt) <= tol, (name, ring_dt, gather_dt)


@pytest.mark.parametrize("world", [2, 4])
def test_unique_ids_equal_the_plain_ring(world):
    for r, res in enumerate(_results(world)):
        for k in ("loss", "dx", "dy", "dt"):
            assert rel_err(res["unique"][k], res["plain"][k]) <= 1e-9, (r, k)


@pytest.mark.parametrize("world", [2, 4])
def test_transfers_overlap_the_block_compute(world):
    from test_siglip_ring import _overlapped

    for res in _results(world):
        for name in CASES:
            ev = res[name + "_events"]
            assert ev.count("compute") == 2 * world, ev  # one lse pass per block, forward and backward
            assert _overlapped(ev) >= 2 * world, ev


@pytest.mark.parametrize("world", [2, 4])
def test_uneven_batches_and_ids_on_one_rank_raise_on_every_rank(world):
    for res in _results(world):
        for mode in ("ring", "gather"):
            assert "local batches differ across ranks" in res[f"uneven_{mode}"], res[f"uneven_{mode}"]
            for key in (f"one_rank_{mode}", f"half_ids_{mode}"):
                assert "different options" in res[key] and "image_ids/text_ids given" in res[key], (key, res[key])


def test_ring_memory_flat_in_world_size():
    peaks = {(k, w): max(r["peak_" + k] for r in _results(w)) for k in ("ring", "plain", "gather") for w in (2, 4)}
    assert peaks["ring", 4] <= 1.2 * peaks["ring", 2], peaks
    # what the ids add over the plain ring (ids and targets travelling, group sums) does not grow with W either
    extra = {w: peaks["ring", w] - peaks["plain", w] for w in (2, 4)}
    assert extra[4] <= 1.2 * extra[2], (extra, peaks)
    assert peaks["gather", 4] >= 1.5 * peaks["gather", 2], peaks  # the control: the all-gather's memory grows


@pytest.mark.parametrize("world", [2, 4])
def test_bias_cancels(world):
    for res in _results(world):
        for k in ("loss", "dx", "dy", "dt"):
            assert rel_err(res["big_bias"][k], res["no_bias"][k]) <= 1e-6, k
        assert float(res["big_bias"]["db"]) == 0.0
        assert torch.isnan(res["nan_bias"])
