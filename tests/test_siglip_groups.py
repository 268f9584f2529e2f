"""SigLIP with group ids: every pair with equal ids a positive, optionally SigLIP+'s 1/k weighting, against a
naive float64 loop over pairs written from the definition, and against a transcription of siglip-kernel
0.1.2's SigLIP+ formula; ragged M ≠ N, forward and every gradient, every backend; O(N·D) memory of the
positive terms, no host sync, and 2 gloo ranks equal one process on the concatenated batch."""
import datetime
import math
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
from fastcontrast.losses import siglip_loss as MP

BACKENDS = backend_params("siglip", kernel_device(), ("triton", "cpu", "cuda", "dense", "reference"))
TOL = {"triton": 2e-5}  # the Triton siglip op accumulates in float32 whatever the input


def naive(x, y, s, b, iid, tid, weighting):
    """−(1/N) Σ_ij v_ij log σ(z_ij (s⟨x_i, y_j⟩ + b)), one pair at a time."""
    n, m = x.shape[0], y.shape[0]
    k_row = [sum(int(tid[j]) == int(iid[i]) for j in range(m)) for i in range(n)]
    k_col = [sum(int(iid[i]) == int(tid[j]) for i in range(n)) for j in range(m)]
    total = 0.0
    for i in range(n):
        for j in range(m):
            u = s * torch.dot(x[i], y[j]) + b
            if int(iid[i]) == int(tid[j]):
                v = 1.0 if weighting == "none" else 0.5 * (1 / k_row[i] + 1 / k_col[j])
                total = total - v * torch.nn.functional.logsigmoid(u)
            else:
                total = total - torch.nn.functional.logsigmoid(-u)
    return total / n


def siglip_kernel_plus(x, y, s, b, img_gid, txt_gid):
    """siglip-kernel 0.1.2 fused_siglip_plus.py (soft weighting, symmetric: α = β = ½): Σ_ij v_ij·BCE(S_ij, y_ij)
    / (N·M), y = [gid equal], v = α/k_i + β/k'_j on positives and 1 elsewhere; BCE(s, y) = max(s, 0) − s·y +
    log(1 + e^{−|s|}); k from bincounts of the group ids (_group_inverse_counts)."""
    n, m = x.shape[0], y.shape[0]
    uniq, inv = torch.unique(torch.cat([img_gid, txt_gid]), return_inverse=True)
    inv_i, inv_t = inv[:n], inv[n:]
    txt_per_group = torch.bincount(inv_t, minlength=len(uniq))
    img_per_group = torch.bincount(inv_i, minlength=len(uniq))
    ikr = 1.0 / txt_per_group[inv_i].clamp_min(1).double()
    ikc = 1.0 / img_per_group[inv_t].clamp_min(1).double()
    sc = (x @ y.T) * s + b
    pos = inv_i[:, None] == inv_t[None, :]
    yy = pos.double()
    v = torch.where(pos, 0.5 * ikr[:, None] + 0.5 * ikc[None, :], torch.ones_like(sc))
    loss = v * (torch.clamp(sc, min=0) - sc * yy + torch.log(1 + torch.exp(-sc.abs())))
    return loss.sum() / (n * m)


def _case(n, m, d, groups, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    y = torch.nn.functional.normalize(torch.randn(m, d, generator=g, dtype=torch.float64), dim=1)
    return x, y, torch.randint(0, groups, (n,), generator=g), torch.randint(0, groups, (m,), generator=g)


def _grads(fn, *leaves):
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    out = fn(*leaves)
    out.backward()
    return [out.detach()] + [t.grad for t in leaves]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("weighting", ["none", "inverse_count"])
@pytest.mark.parametrize("n,m,groups", [(11, 7, 6), (9, 9, 3), (6, 15, 10)])
def test_equals_naive(backend, weighting, n, m, groups):
    tol = TOL.get(backend, 1e-9)
    x, y, iid, tid = _case(n, m, 8, groups, n + m)
    s0, b0 = torch.tensor(6.0, dtype=torch.float64), torch.tensor(-3.0, dtype=torch.float64)
    got = _grads(lambda x, y, s, b: fc.siglip_loss(x, y, s, b, backend=backend, image_ids=iid, text_ids=tid,
                                                   weighting=weighting), x, y, s0, b0)
    want = _grads(lambda x, y, s, b: naive(x, y, s, b, iid, tid, weighting), x, y, s0, b0)
    for a, w in zip(got, want):
        assert torch.isfinite(a).all()
        assert torch.allclose(a.double(), w, rtol=tol, atol=tol * 1e-2), (a - w).abs().max()


def test_inverse_count_is_siglip_kernel_plus_times_m():
    x, y, iid, tid = _case(10, 14, 8, 5, 3)
    for backend in ("reference",) + (("triton",) if fc.dispatch.unavailable_reason("siglip", "triton", x.device)
                                     is None else ()):
        got = fc.siglip_loss(x, y, 5.0, -2.0, backend=backend, image_ids=iid, text_ids=tid, weighting="inverse_count")
        # siglip-kernel divides by N·M; fastcontrast sums over pairs / N like open_clip's SigLipLoss
        want = siglip_kernel_plus(x, y, 5.0, -2.0, iid, tid) * y.shape[0]
        assert torch.allclose(got.double(), want, rtol=TOL.get(backend, 1e-10)), backend


@pytest.mark.parametrize("backend", BACKENDS)
def test_unique_ids_equal_plain_siglip(backend):
    x, y, _, _ = _case(12, 12, 8, 1, 4)
    ids = torch.arange(12) + 7
    plain = fc.siglip_loss(x, y, 4.0, -1.0, backend="reference")
    for w in ("none", "inverse_count"):
        got = fc.siglip_loss(x, y, 4.0, -1.0, backend=backend, image_ids=ids, text_ids=ids, weighting=w)
        assert torch.allclose(got.double(), plain.double(), rtol=TOL.get(backend, 1e-10)), w


def test_bad_arguments():
    x, y, iid, tid = _case(5, 4, 8, 3, 0)
    with pytest.raises(ValueError, match="weighting must be 'none' or 'inverse_count'"):
        fc.siglip_loss(x, y, 1.0, image_ids=iid, text_ids=tid, weighting="1/k")
    with pytest.raises(ValueError, match="needs image_ids and text_ids"):
        fc.siglip_loss(x, y[:5] if y.shape[0] >= 5 else x, 1.0, weighting="inverse_count")
    with pytest.raises(ValueError, match="negative_only"):
        fc.siglip_loss(x, y, 1.0, negative_only=True, image_ids=iid, text_ids=tid)
    with pytest.raises(ValueError, match="text_ids is required"):
        fc.siglip_loss(x, y, 1.0, image_ids=iid)


def _corr_step(n, weighting, fused=True):
    x, y, iid, tid = _case(n, n, 32, n // 2, n)
    x, y = x.float().requires_grad_(), y.float().requires_grad_()
    s, b = torch.tensor(5.0), torch.tensor(-2.0)
    with PeakMemory() as pm:
        if fused:  # the positive terms alone (the all-pairs op is measured by its own tests)
            loss = MP.siglip_ids(lambda *a: torch.zeros(()), x, y, s, b, iid, tid, weighting)
        else:
            loss = MP.siglip_ids_reference(x, y, s, b, iid, tid, weighting)
        loss.backward()
    return pm


@pytest.mark.parametrize("weighting", ["none", "inverse_count"])
def test_positive_terms_memory_is_linear(monkeypatch, weighting):
    monkeypatch.setattr(_tiles, "rows_per_block", lambda *a: 64)
    sizes = (256, 1024, 2048)
    fused = [_corr_step(n, weighting).peak for n in sizes]
    ref = [_corr_step(n, weighting, fused=False).peak for n in sizes]
    assert fused[2] / fused[1] < 2.3, fused
    assert ref[2] / ref[1] > 3.5, ref
    assert _corr_step(2048, weighting).largest < 2048 * 2048 * 4 / 8


def test_no_host_sync():
    x, y, iid, tid = _case(20, 16, 8, 6, 1)
    x = x.float().requires_grad_()
    with HostSyncs() as hs:
        MP.siglip_ids(lambda *a: torch.zeros(()), x, y.float(), torch.tensor(3.0), torch.tensor(-1.0), iid, tid,
                      "inverse_count").backward()
    assert hs.syncs == []


# ------------------------------------------------------------------------------------------------ 2 ranks
N_LOCAL, M_LOCAL = 4, 5


def _global(world):
    return _case(world * N_LOCAL, world * M_LOCAL, 6, 5, 77)


def _worker(rank, world, init_file, out_dir, weighting):
    os.environ.pop("TRITON_INTERPRET", None)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        x, y, iid, tid = _global(world)
        si, st = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL), slice(rank * M_LOCAL, (rank + 1) * M_LOCAL)
        loss_obj = fc.SigLipLoss(rank=rank, world_size=world, backend="reference")
        out = _grads(lambda x, y: loss_obj(x, y, 4.0, -2.0, image_ids=iid[si], text_ids=tid[st],
                                           weighting=weighting), x[si], y[st])
        torch.save(out, os.path.join(out_dir, f"r{rank}.pt"))
    finally:
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@pytest.mark.parametrize("weighting", ["none", "inverse_count"])
def test_two_ranks_equal_one_process(weighting):
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_worker, args=(2, os.path.join(d, "init"), d, weighting), nprocs=2, join=True)
        res = [torch.load(os.path.join(d, f"r{r}.pt")) for r in range(2)]
    x, y, iid, tid = _global(2)
    want = _grads(lambda x, y: naive(x, y, 4.0, -2.0, iid, tid, weighting), x, y)
    assert torch.allclose(sum(r[0] for r in res) / 2, want[0], rtol=1e-10)  # DDP's mean over ranks
    assert torch.allclose(torch.cat([r[1] for r in res]) / 2, want[1], rtol=1e-8, atol=1e-10)
    assert torch.allclose(torch.cat([r[2] for r in res]) / 2, want[2], rtol=1e-8, atol=1e-10)


def test_torch_compile_fullgraph_and_autocast():
    torch._dynamo.reset()
    x, y, iid, tid = _case(14, 10, 8, 5, 9)
    x, y = x.float(), y.float()

    from fastcontrast.losses.siglip_loss import siglip_loss_reference

    def step(a, b, s):  # the positive terms composed on an all-pairs op (compiling that op is its own tests')
        return MP.siglip_ids(siglip_loss_reference, a, b, s, torch.tensor(-1.0), iid, tid, "inverse_count")

    got = _grads(torch.compile(step, fullgraph=True, backend="aot_eager"), x, y, torch.tensor(3.0))
    want = _grads(step, x, y, torch.tensor(3.0))
    for a, b in zip(got, want):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fc.siglip_loss(x.bfloat16(), y.bfloat16(), 3.0, -1.0, image_ids=iid, text_ids=tid,
                             weighting="inverse_count")
    assert out.dtype == torch.float32 and torch.allclose(out, want[0], rtol=2e-2)
