"""Codebook family: fused Sinkhorn and cluster-softmax CE against the reference, marginals, and an end-to-end
run where a linear student trained with the loss recovers synthetic clusters."""
import itertools

import pytest
import torch

import fastcontrast as fc
from _ops import backend_params
from fastcontrast import _ext
from fastcontrast.primitives import tiles as _tiles
from fastcontrast.primitives import soft_ce as cbf
from fastcontrast.losses.codebook_loss import swapped_prediction_reference
from fastcontrast.validate import Case, default_cases

from conftest import assert_matches_reference, kernel_device

FAST = ["triton", "cuda", "cpu", "dense"]
CASE = next(c for c in default_cases() if c.name == "codebook_loss")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("backend", backend_params("swapped_prediction", kernel_device(), FAST))
def test_codebook_matches_reference(backend, dtype):
    assert_matches_reference(CASE, backend, dtype, kernel_device(), seeds=(0, 1, 2))


@pytest.mark.parametrize("n,k,d", [(37, 11, 40), (70, 33, 24), (5, 64, 16)], ids=str)
@pytest.mark.parametrize("nf,nc", [(True, True), (True, False), (False, True), (False, False)])
@pytest.mark.parametrize("backend", backend_params("swapped_prediction", kernel_device(), FAST))
def test_codebook_ragged_and_options(backend, n, k, d, nf, nc):
    def make(g, dev, dt):
        f = lambda: torch.randn(n, d, generator=g).to(dev, dt)  # noqa: E731
        return {"image_features": f(), "text_features": f(), "teacher_image_features": f(),
                "teacher_text_features": f(), "codebook": torch.randn(k, d, generator=g).to(dev, dt)}

    case = Case("cb", "swapped_prediction", make, lambda backend, **kw: fc.codebook_loss(
        **kw, tau=0.3, epsilon=0.2 if nf and nc else 2.0, n_iters=4, normalize_features=nf, normalize_codes=nc,
        backend=backend))
    assert_matches_reference(case, backend, torch.float32, kernel_device(), seeds=(4,))


@pytest.mark.parametrize("backend", backend_params("sinkhorn", kernel_device(), FAST + ["reference"]))
@pytest.mark.parametrize("n,k", [(37, 11), (64, 100)], ids=str)
def test_sinkhorn_marginals_and_agreement(backend, n, k):
    dev = kernel_device()
    scores = torch.randn(n, k, device=dev)
    q = fc.sinkhorn(scores, epsilon=0.5, n_iters=300, backend=backend)
    assert torch.isfinite(q).all() and (q >= 0).all()
    assert torch.allclose(q.sum(1), torch.ones(n, device=dev), atol=1e-4)
    assert torch.allclose(q.sum(0), torch.full((k,), n / k, device=dev), atol=1e-4)
    few = fc.sinkhorn(scores, epsilon=0.05, n_iters=3, backend=backend)
    ref = fc.sinkhorn(scores.double(), epsilon=0.05, n_iters=3, backend="reference")
    assert float((few.double() - ref).norm() / ref.norm()) < 1e-5


@pytest.mark.parametrize("backend", backend_params("sinkhorn", kernel_device(), FAST))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_sinkhorn_sharp_and_dead_code(backend, dtype):
    """ε = 0.01 on cosine scores (exponents up to ±100) and one code no sample is near (a dead column)."""
    dev = kernel_device()
    g = torch.Generator().manual_seed(7)
    z = torch.nn.functional.normalize(torch.randn(45, 12, generator=g), dim=1)
    c = torch.nn.functional.normalize(torch.randn(9, 12, generator=g), dim=1)
    scores = z @ c.T
    scores[:, 4] = -1.0  # dead code
    scores = scores.to(dtype)
    q = fc.sinkhorn(scores.to(dev), epsilon=0.01, n_iters=5, backend=backend).cpu()
    ref = fc.sinkhorn(scores.double(), epsilon=0.01, n_iters=5, backend="reference")
    assert torch.isfinite(q).all()
    assert float((q.double() - ref).norm() / ref.norm()) < 1e-4
    assert torch.allclose(q.sum(1).double(), torch.ones(45, dtype=torch.float64), atol=1e-4)


@pytest.mark.parametrize("path", ["extension", "pytorch"])
def test_soft_ce_rows_gradcheck_and_reference(path, monkeypatch):
    """The fused soft-target CE of the CPU backend: float64 gradcheck over several row blocks with a ragged tail,
    through the C++ kernel and through the op's PyTorch blocks (what runs without the extension)."""
    if path == "extension" and _ext._C is None:
        pytest.skip(f"C++ extension not built: {_ext.IMPORT_ERROR}")
    kernel = "cpu" if path == "extension" else "tiles"
    monkeypatch.setattr(_tiles, "BLOCK_BYTES", 8 * 13 * 8)  # 8-row blocks of 13 codes
    g = torch.Generator().manual_seed(5)
    x = torch.randn(21, 6, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randn(13, 6, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.rand(21, 13, generator=g, dtype=torch.float64)
    t[3] = 0.0  # a row with no target mass
    assert torch.autograd.gradcheck(lambda x, y: cbf.soft_ce_rows(x, y, t, 2.5, kernel)[0], (x, y))
    loss = cbf.soft_ce_rows(x, y, t, 2.5, kernel)[0].mean()
    ref = swapped_prediction_reference(x, t, y, 1 / 2.5, normalize_features=False, normalize_codes=False)
    assert torch.allclose(loss, ref, rtol=1e-12)
    torch.library.opcheck(cbf.soft_ce_rows, (x.detach().requires_grad_(), y.detach().requires_grad_(), t, 2.5, kernel))


def _clusters(seed, steps=300, backend="auto"):
    torch.manual_seed(seed)
    k, d_lat, d_in, d_out, n = 4, 8, 24, 16, 128
    centers = torch.randn(k, d_lat) * 3
    map_i, map_t = torch.randn(d_lat, d_in), torch.randn(d_lat, d_in)  # two "modalities" of one latent

    def batch(b):
        c = torch.randint(0, k, (b,))
        lat = centers[c]
        return c, (lat + 0.3 * torch.randn(b, d_lat)) @ map_i, (lat + 0.3 * torch.randn(b, d_lat)) @ map_t

    si, st = torch.nn.Linear(d_in, d_out), torch.nn.Linear(d_in, d_out)
    loss_mod = fc.CodebookLoss(k, d_out, tau=0.1, epsilon=0.05, n_iters=3, backend=backend)
    ti, tt = fc.EMATeacher(si, 0.9), fc.EMATeacher(st, 0.9)
    opt = torch.optim.Adam([*si.parameters(), *st.parameters(), *loss_mod.parameters()], lr=1e-2)
    losses = []
    for _ in range(steps):
        c, xi, xt = batch(n)
        loss = loss_mod(si(xi), st(xt), ti(xi), tt(xt))
        opt.zero_grad()
        loss.backward()
        opt.step()
        ti.update(si)
        tt.update(st)
        losses.append(float(loss.detach()))
    c, xi, xt = batch(1000)
    with torch.no_grad():
        codes = torch.nn.functional.normalize(loss_mod.codebook, dim=-1)
        ai = (torch.nn.functional.normalize(si(xi), dim=-1) @ codes.T).argmax(1)
        at = (torch.nn.functional.normalize(st(xt), dim=-1) @ codes.T).argmax(1)
        _, stats = loss_mod(si(xi), st(xt), ti(xi), tt(xt), return_stats=True)
    acc = max(float((torch.tensor(p)[c] == ai).float().mean()) for p in itertools.permutations(range(k)))
    return acc, float((ai == at).float().mean()), losses, stats


@pytest.mark.parametrize("seed", [0, 1])
def test_end_to_end_student_recovers_clusters(seed):
    acc, agree, losses, stats = _clusters(seed)
    assert acc >= 0.95, acc  # cluster assignment accuracy under the best code↔cluster matching
    assert agree >= 0.95, agree  # image and text of one latent land on the same code
    assert sum(losses[-20:]) / 20 < 0.2 * sum(losses[:20]) / 20
    assert stats["dead_codes"] == 0
