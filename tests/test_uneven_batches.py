"""Ranks with different local batch sizes (gloo, 2 CPU processes): every distributed mode either fails with the
same clear ValueError on every rank, or, where uneven batches are well defined (the global Sinkhorn), computes
the global result. Nothing may hang: gloo's timeout turns a lost peer into an error, and the parent kills a
run that outlives its deadline, so a hang fails the test, not CI.

Rank 0 holds N − 1 pairs, rank 1 N. One spawn runs every mode in turn (each fails at the size check, which every
rank reaches, so the group stays in step for the next); each case's result is written as soon as it is known.
"""
import datetime
import os
import sys
import tempfile
import time
import traceback
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import fastcontrast as fc
from fastcontrast.validate import rel_err

N, D, K = 6, 8, 4
WORLD = 2
DEADLINE_S = 150  # the whole spawn on a loaded 2-core machine takes ~10 s
GLOO_TIMEOUT_S = 30
MISMATCH = "local batches differ across ranks"

GATHER_MODES = [(False, True), (True, True), (False, False), (True, False)]  # (local_loss, gather_with_grad)
CASES = (
    [f"clip:local{lo:d}:grad{gr:d}" for lo, gr in GATHER_MODES]
    + ["clip_ids:local0:grad1", "clip_ids:local1:grad0", "ring", "ring_after_equal_step"]
    + [f"distill:local{lo:d}:grad{gr:d}" for lo, gr in [(False, True), (True, False)]]
    + [f"mmts_clip:local{lo:d}:grad{gr:d}" for lo, gr in GATHER_MODES]
    + [f"mmts_max_margin:local{lo:d}:grad{gr:d}" for lo, gr in [(False, True), (True, True), (False, False)]]
    + ["host_group", "sinkhorn", "codebook"]
)


def _features(rank, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(WORLD * N, D, generator=g), dim=1)
    y = F.normalize(torch.randn(WORLD * N, D, generator=g), dim=1)
    start = 0 if rank == 0 else N - 1  # rank 0: rows [0, N−1), rank 1: rows [N−1, 2N−1)
    n = N - 1 if rank == 0 else N
    return x, y, slice(start, start + n)


def _flag(case, key):
    return f"{key}1" in case.split(":")


def _run_case(case, rank):
    """Returns what the case computed (no error), or raises what it raised."""
    x_all, y_all, sl = _features(rank)
    x, y = x_all[sl].clone().requires_grad_(), y_all[sl].clone().requires_grad_()
    n = x.shape[0]
    name = case.split(":")[0]
    local, with_grad = _flag(case, "local"), _flag(case, "grad")
    kw = dict(local_loss=local, gather_with_grad=with_grad, rank=rank, world_size=WORLD)
    scale = torch.tensor(10.0)
    if name == "clip":
        return fc.ClipLoss(**kw)(x, y, scale)
    if name == "clip_ids":
        ids = torch.arange(n) // 2
        return fc.ClipLoss(**kw)(x, y, scale, image_ids=ids, text_ids=ids)
    if name == "ring":
        return fc.ClipLoss(rank=rank, world_size=WORLD, mode="ring")(x, y, scale)
    if name == "ring_after_equal_step":  # the ring checks every call: a later uneven step fails too
        loss = fc.ClipLoss(rank=rank, world_size=WORLD, mode="ring")
        loss(x_all[rank * N:(rank + 1) * N], y_all[rank * N:(rank + 1) * N], scale)
        return loss(x, y, scale)
    if name == "distill":
        return fc.DistillClipLoss(**kw)(x, y, scale, x.detach() * 2, y.detach() * 2, torch.tensor(5.0))
    if name in ("mmts_clip", "mmts_max_margin"):
        cls = fc.MMTSClipLoss if name == "mmts_clip" else fc.MMTSMaxMarginLoss
        return cls(100, 1, 50, **kw)(x, y, step=3, cluster_sizes=torch.arange(1, n + 1))
    if name == "sinkhorn":  # rows stay local, K column sums are all-reduced: uneven rows are well defined
        from fastcontrast.distributed import distributed_sinkhorn

        codes = torch.randn(K, D, generator=torch.Generator().manual_seed(3))
        return distributed_sinkhorn(x.detach() @ codes.T, 0.05, 3)
    if name == "codebook":
        codes = torch.randn(K, D, generator=torch.Generator().manual_seed(3))
        return fc.codebook_loss(x, y, x.detach() * 2, y.detach() * 2, codes)
    if name.endswith("after_equal_step"):
        module = (fc.ClipLoss(**kw) if name.startswith("clip") else
                  fc.MMTSClipLoss(100, 1, 50, gather_with_grad=True, rank=rank, world_size=WORLD))
        args = (scale,) if name.startswith("clip") else ()
        call = (lambda a, b: module(a, b, *args)) if name.startswith("clip") else \
            (lambda a, b: module(a, b, step=3, cluster_sizes=torch.arange(1, a.shape[0] + 1)))
        call(x_all[rank * N:(rank + 1) * N], y_all[rank * N:(rank + 1) * N])  # both ranks N: checked, cached
        if rank == 0:  # rank 0 now N − 1 (new: it checks), rank 1 still N (cached: it does not)
            return call(x, y)
        return call(x_all[N:2 * N], y_all[N:2 * N])
    if name == "host_group":  # an NCCL job: the check runs on a gloo side group made once, not on NCCL
        from fastcontrast.distributed import comm as Dm

        real = dist.get_backend
        Dm.dist.get_backend = lambda group=None: "nccl" if group is None else real(group)
        try:
            Dm.check_equal_local_batches(N)  # equal: passes, and makes the side group
            Dm.check_equal_local_batches(N)
            (made,) = Dm._HOST_GROUPS.values()
            assert real(made) == "gloo", Dm._HOST_GROUPS
            return Dm.check_equal_local_batches(n)  # uneven: the same ValueError on both ranks
        finally:
            Dm.dist.get_backend = real
    if name == "feature_queue":  # ALBEF's concat_all_gather of the teacher features (CodisLoss's queues)
        q = fc.FeatureQueue(16, D)
        q.enqueue(x.detach())
        return q.contents()
    raise AssertionError(case)


def _worker(rank, init_file, out_dir, cases):
    os.environ.pop("TRITON_INTERPRET", None)  # the PyTorch/C++ paths: fast on the CPU
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=GLOO_TIMEOUT_S))
    try:
        for case in cases:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    out = _run_case(case, rank)
                res = {"value": out.detach()}
            except ValueError as e:
                res = {"error": str(e)}
            except Exception as e:  # not the clear error: recorded, then the run stops (the group may be broken)
                res = {"other": f"{type(e).__name__}: {e}\n{traceback.format_exc()}"}
            torch.save(res, os.path.join(out_dir, f"{case.replace(':', '_')}.r{rank}.pt"))
            if "other" in res:
                break
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)  # no barrier: after a broken collective it could wait on a dead peer


def _spawn(cases):
    """{case: [rank 0's result, rank 1's]} for each case whose results came back; a run past the deadline is
    killed and reported."""
    with tempfile.TemporaryDirectory() as d:
        ctx = mp.spawn(_worker, args=(os.path.join(d, "init"), d, cases), nprocs=WORLD, join=False)
        start = time.monotonic()
        crashed = None
        try:
            while not ctx.join(timeout=1):
                if time.monotonic() - start > DEADLINE_S:
                    for p in ctx.processes:
                        p.kill()
                    pytest.fail(f"the run of {cases} outlived {DEADLINE_S} s: a hang")
        except mp.ProcessExitedException as e:  # a rank died (gloo aborts on a size mismatch it sees)
            crashed = str(e)
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
        out = {}
        for case in cases:
            files = [os.path.join(d, f"{case.replace(':', '_')}.r{r}.pt") for r in range(WORLD)]
            if all(os.path.exists(f) for f in files):
                out[case] = [torch.load(f) for f in files]
        return out, crashed


@pytest.fixture(scope="module")
def results():
    out, crashed = _spawn(CASES)
    assert crashed is None, crashed
    return out


def _assert_same_clear_error(res, case):
    assert res is not None, f"{case}: no result came back"
    for r, got in enumerate(res):
        assert "error" in got, (case, r, got)
        assert MISMATCH in got["error"], (case, r, got)
    assert res[0]["error"] == res[1]["error"], case  # the same message on every rank


@pytest.mark.parametrize("case", [c for c in CASES if not c.startswith(("sinkhorn", "codebook"))])
def test_uneven_batches_fail_with_the_same_clear_error_on_every_rank(results, case):
    _assert_same_clear_error(results.get(case), case)


def test_distributed_sinkhorn_on_uneven_rows_is_the_global_sinkhorn(results):
    """SwAV's distributed_sinkhorn assumes equal batches (B = n·world); ours all-reduces the global count, so
    uneven rows get the Sinkhorn of their concatenation: no error is needed, and none hangs."""
    res = results["sinkhorn"]
    x_all, _, _ = _features(0)
    codes = torch.randn(K, D, generator=torch.Generator().manual_seed(3))
    want = fc.sinkhorn(x_all[:2 * N - 1] @ codes.T, 0.05, 3, backend="reference")
    got = torch.cat([res[0]["value"], res[1]["value"]])
    assert rel_err(got, want) <= 1e-5
    assert "value" in results["codebook"][0] and "value" in results["codebook"][1]
    assert all(torch.isfinite(r["value"]).all() for r in results["codebook"])


def test_feature_queue_uneven_fails_clearly():
    out, crashed = _spawn(["feature_queue"])
    assert crashed is None, crashed
    _assert_same_clear_error(out.get("feature_queue"), "feature_queue")


@pytest.mark.parametrize("case", ["clip_after_equal_step", "mmts_clip_after_equal_step"])
def test_a_size_change_on_one_rank_after_a_checked_step_fails_clearly(case):
    out, crashed = _spawn([case])
    assert crashed is None, crashed
    _assert_same_clear_error(out.get(case), case)
