"""Fused Matryoshka (issue 27, point 3): ``matryoshka_ce_rows`` and ``matryoshka_clip_loss`` on every backend against
the float64 reference (the separate losses at each prefix), the reference against fastcontrast's own per-prefix
losses and a naive sentence-transformers-style loop, gradcheck, memory linear in N, the bad inputs, the double
backward's error. The GEMM-unit count is in tests/test_unit_count.py.

Shapes cross the Triton interpreter's 32-wide tiles: N = 37 and M = 53 rows (two row and two column tiles), D = 70
features (three K-chunks) with dims whose ends fall inside a chunk (45, 13, 5), on a chunk boundary (32) and short
of D (61: the last 9 features take no part).
"""
import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck

import fastcontrast as fc
from _ops import backend_params
from conftest import kernel_device
from fastcontrast.dispatch import BackendUnavailableError, kernel_impl
from fastcontrast.primitives import tiles as T
from fastcontrast.tools.memtrack import HostSyncs, PeakMemory

N, M, D = 37, 53, 70
DIMS = (61, 45, 32, 13, 5)
WEIGHTS = (1.0, 0.5, 2.0, 0.25, 1.5)
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float64: 1e-10}
OPS = {"ce_rows": ("matryoshka_ce_rows", fc.matryoshka_ce_rows), "clip": ("matryoshka_clip", fc.matryoshka_clip_loss)}


def _inputs(seed, n=N, m=M, d=D, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * scale
    y = torch.randn(m, d, generator=g, dtype=torch.float64) * scale
    return x, y, torch.randint(0, m, (n,), generator=g)


def _call(kind, x, y, s, labels, dims=DIMS, weights=WEIGHTS, normalize=True, backend="auto"):
    fn = OPS[kind][1]
    if kind == "ce_rows":
        return fn(x, y, s, labels=labels, dims=dims, weights=weights, normalize=normalize, backend=backend)
    return fn(x, y, s, dims=dims, weights=weights, normalize=normalize, labels=labels, backend=backend)


def _rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _run(kind, backend, dtype, x, y, labels, normalize, device="cpu", tiles=False):
    """(loss, [dx, dy, ds, dw]) with the features in ``dtype`` (a tensor scale and tensor weights, both learnable)."""
    sdt = torch.float64 if dtype == torch.float64 else torch.float32
    xs, ys = (t.to(device=device, dtype=dtype).requires_grad_() for t in (x, y))
    s = torch.tensor(4.0, dtype=sdt, device=device, requires_grad=True)
    w = torch.tensor(WEIGHTS, dtype=sdt, device=device, requires_grad=True)
    lab = labels.to(device)
    if tiles:  # the PyTorch tiles behind the Triton backend, in any dtype (the dispatcher gives them float64)
        loss = kernel_impl(OPS[kind][0], "tiles")(xs, ys, s, lab, DIMS, w, normalize)
    else:
        loss = _call(kind, xs, ys, s, lab, weights=w, normalize=normalize, backend=backend)
    return loss, list(torch.autograd.grad(loss, (xs, ys, s, w)))


def _check(kind, backend, dtype, normalize, device="cpu", tiles=False, seeds=(0, 1)):
    for seed in seeds:
        x, y, labels = _inputs(seed, m=M if kind == "ce_rows" else N)
        x, y = x.to(dtype).double(), y.to(dtype).double()  # the reference sees the same rounded inputs
        ref, rgrads = _run(kind, "reference", torch.float64, x, y, labels, normalize)
        out, grads = _run(kind, backend, dtype, x, y, labels, normalize, device, tiles)
        assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        errs = [_rel(out, ref)] + [_rel(a, b) for a, b in zip(grads, rgrads)]
        assert max(errs) <= TOL[dtype], (kind, backend, dtype, normalize, seed, ["%.1e" % e for e in errs])
        assert grads[0].dtype == dtype and grads[0][:, DIMS[0]:].abs().max() == 0  # past d_1: no gradient


def _kind_backends():
    """(kind, backend) for every backend the op has (and "auto"), skipped with the dispatcher's reason here."""
    out = []
    for kind in sorted(OPS):
        for p in backend_params(OPS[kind][0], kernel_device(), extra=("auto",)):
            out.append(pytest.param(kind, p.values[0], id=f"{kind}-{p.values[0]}", marks=p.marks))
    return out


@pytest.mark.parametrize("normalize", [True, False], ids=["cosine", "dot"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=["fp32", "bf16", "fp64"])
@pytest.mark.parametrize("kind,backend", _kind_backends())
def test_every_backend_matches_the_float64_reference(kind, backend, dtype, normalize):
    _check(kind, backend, dtype, normalize, kernel_device() if backend == "triton" else "cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", sorted(OPS))
def test_tiles_match_the_reference_over_several_slabs(kind, dtype, monkeypatch):
    """The PyTorch tiles (the CPU form of the fused algorithm) with row blocks and slabs of 8 rows: 5 of them."""
    monkeypatch.setattr(T, "rows_per_block", lambda *a: 8)
    for normalize in (True, False):
        _check(kind, "tiles", dtype, normalize, tiles=True, seeds=(2,))


@pytest.mark.parametrize("kind", sorted(OPS))
def test_triton_over_several_slabs(kind, monkeypatch):
    monkeypatch.setattr(T, "rows_per_block", lambda *a: 32)  # two slabs, the second ragged
    dev = kernel_device()
    if fc.dispatch.unavailable_reason(OPS[kind][0], "triton", dev) is not None:
        pytest.skip("no Triton here")
    _check(kind, "triton", torch.float32, True, dev, seeds=(3,))


@pytest.mark.parametrize("kind", sorted(OPS))
def test_triton_with_16_aligned_dims(kind):
    """Prefix ends that are multiples of 16 (64, 48, 16 of D = 70): the kernels read the band ends in units of 16
    (GRAIN = 16, aligned loads on a GPU); the 16-wide bands are narrower than the interpreter's 32-wide K-chunk."""
    dev = kernel_device()
    if fc.dispatch.unavailable_reason(OPS[kind][0], "triton", dev) is not None:
        pytest.skip("no Triton here")
    x, y, labels = _inputs(12, m=M if kind == "ce_rows" else N)
    s, dims, w = torch.tensor(4.0, dtype=torch.float64), (64, 48, 16), (1.0, 2.0, 0.5)
    ref = _call(kind, x, y, s, labels, dims=dims, weights=w, backend="reference")
    xs, ys = x.float().to(dev).requires_grad_(), y.float().to(dev).requires_grad_()
    out = _call(kind, xs, ys, s.float().to(dev), labels.to(dev), dims=dims, weights=w, backend="triton")
    xr, yr = x.clone().requires_grad_(), y.clone().requires_grad_()
    rg = torch.autograd.grad(_call(kind, xr, yr, s, labels, dims=dims, weights=w, backend="reference"), (xr, yr))
    g = torch.autograd.grad(out, (xs, ys))
    assert max([_rel(out.cpu(), ref)] + [_rel(a.cpu(), b) for a, b in zip(g, rg)]) <= 1e-5


# ------------------------------------------------------------------------------------------------ the definition
def _naive(kind, x, y, s, labels, dims, weights, normalize):
    """sentence-transformers' MatryoshkaLoss around (symmetric) MNRL, written out: truncate, normalise, score."""
    total = 0.0
    for d, w in zip(dims, weights):
        a, b = x[:, :d], y[:, :d]
        if normalize:
            a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
        logits = s * a @ b.T
        loss = F.cross_entropy(logits, labels)
        if kind == "clip":
            loss = 0.5 * (loss + (torch.logsumexp(logits, dim=0)[labels] - logits[torch.arange(len(labels)),
                                                                                  labels]).mean())
        total = total + w * loss
    return total


@pytest.mark.parametrize("normalize", [True, False], ids=["cosine", "dot"])
@pytest.mark.parametrize("kind", sorted(OPS))
def test_equals_the_weighted_sum_of_the_separate_losses(kind, normalize):
    """float64, 1e-10: every backend equals Σ_p w_p · (the loss at prefix p), written out naively and through
    fastcontrast's own per-prefix losses (ce_rows / clip_loss on the truncated features)."""
    x, y, labels = _inputs(4, m=M if kind == "ce_rows" else N)
    s = torch.tensor(6.0, dtype=torch.float64)
    naive = _naive(kind, x, y, s, labels, DIMS, WEIGHTS, normalize)
    own = 0.0
    for d, w in zip(DIMS, WEIGHTS):
        a, b = (F.normalize(t[:, :d], dim=-1) if normalize else t[:, :d] for t in (x, y))
        per = (fc.functional.ce_rows(a, b, s, labels=labels, backend="reference") if kind == "ce_rows" else
               fc.clip_loss(a, b, s, labels=labels, backend="reference"))
        own = own + w * per
    for backend in ("reference", "dense", "triton", "auto"):
        got = _call(kind, x, y, s, labels, normalize=normalize, backend=backend)
        assert abs(float(got - naive)) <= 1e-10 * abs(float(naive)), (backend, float(got), float(naive))
        assert abs(float(got - own)) <= 1e-10 * abs(float(own)), (backend, float(got), float(own))


def test_one_dim_is_the_plain_loss_and_the_default_labels_are_the_mnrl_layout():
    """dims = (D,): ce_rows / clip_loss with normalize; labels None: query i's positive is key i (M ≥ N: the
    positives first, hard negatives after)."""
    x, y, _ = _inputs(5, n=9, m=20, d=12)
    s = torch.tensor(3.0, dtype=torch.float64)
    plain = fc.functional.ce_rows(F.normalize(x), F.normalize(y), s, labels=torch.arange(9), backend="reference")
    for backend in ("reference", "dense", "triton"):
        got = fc.matryoshka_ce_rows(x, y, s, dims=(12,), backend=backend)
        torch.testing.assert_close(got, plain, rtol=1e-12, atol=0)
        sq = fc.matryoshka_clip_loss(x, y[:9], s, dims=(12,), backend=backend)
        torch.testing.assert_close(sq, fc.clip_loss(x, y[:9], s, normalize=True, backend="reference"), rtol=1e-12,
                                   atol=0)


@pytest.mark.parametrize("kind", sorted(OPS))
def test_weight_gradient_is_the_prefix_loss(kind):
    """dL/dw_p = the loss at prefix p, on the fused path too (the weights multiply the per-prefix losses)."""
    x, y, labels = _inputs(6, m=M if kind == "ce_rows" else N)
    s = torch.tensor(5.0, dtype=torch.float64)
    w = torch.tensor(WEIGHTS, dtype=torch.float64, requires_grad=True)
    dw, = torch.autograd.grad(_call(kind, x, y, s, labels, weights=w, backend="triton"), w)
    for p, d in enumerate(DIMS):
        one = _call(kind, x, y, s, labels, dims=(d,), weights=(1.0,), backend="reference")
        assert abs(float(dw[p] - one)) <= 1e-12 * float(one)


@pytest.mark.parametrize("normalize", [True, False], ids=["cosine", "dot"])
@pytest.mark.parametrize("backend", ["reference", "dense"])
@pytest.mark.parametrize("kind", sorted(OPS))
def test_gradcheck(kind, backend, normalize):
    x, y, labels = _inputs(7, n=5, m=7 if kind == "ce_rows" else 5, d=6)
    inputs = (x.requires_grad_(), y.requires_grad_(), torch.tensor(2.5, dtype=torch.float64, requires_grad=True),
              torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64, requires_grad=True))
    assert gradcheck(lambda a, b, s, w: _call(kind, a, b, s, labels, dims=(6, 4, 1), weights=w, normalize=normalize,
                                              backend=backend), inputs)


# ------------------------------------------------------------------------------------------------ memory, syncs
def _peak(kind, n, fused):
    x, y, labels = _inputs(8, n=n, m=n, d=32)
    x, y = x.float().requires_grad_(), y.float().requires_grad_()
    s, w = torch.tensor(5.0), torch.tensor(WEIGHTS[:4])
    dims = (32, 16, 8, 4)
    with PeakMemory() as pm:
        if fused:
            loss = kernel_impl(OPS[kind][0], "tiles")(x, y, s, labels, dims, w, True)
        else:
            loss = _call(kind, x, y, s, labels, dims=dims, weights=w, backend="dense")
        loss.backward()
    return pm


@pytest.mark.parametrize("kind", sorted(OPS))
def test_extra_memory_is_linear_in_n(kind, monkeypatch):
    monkeypatch.setattr(T, "rows_per_block", lambda *a: 64)
    sizes = (256, 1024, 2048)
    tiled = [_peak(kind, n, True).peak for n in sizes]
    dense = [_peak(kind, n, False).peak for n in sizes]
    assert tiled[2] / tiled[1] < 2.3, tiled  # O(N·D) plus P slabs of 64×N: linear in N
    assert dense[2] / dense[1] > 3.5, dense  # the probe sees the materialised N×M prefixes
    assert _peak(kind, 2048, True).largest <= 4 * 64 * 2048 * 4  # no N×M tensor: the P = 4 slabs of 64 rows
    assert tiled[2] < dense[2] / 8


@pytest.mark.parametrize("kind", sorted(OPS))
def test_no_host_sync(kind):
    x, y, labels = _inputs(9, m=M if kind == "ce_rows" else N)
    x, y = x.float().requires_grad_(), y.float().requires_grad_()
    with HostSyncs() as hs:
        loss = kernel_impl(OPS[kind][0], "tiles")(x, y, torch.tensor(4.0), labels, DIMS, torch.tensor(WEIGHTS), True)
        loss.backward()
    assert hs.syncs == []


# ------------------------------------------------------------------------------------------------ bad inputs
X, Y = torch.randn(4, 8), torch.randn(6, 8)


@pytest.mark.parametrize("kwargs,err,match", [
    (dict(dims=None), ValueError, r"dims is required: the nested embedding sizes, strictly decreasing"),
    (dict(dims=()), ValueError, "dims must hold at least one embedding size"),
    (dict(dims=8), TypeError, "dims must be a sequence of ints"),
    (dict(dims=torch.tensor([8, 4])), TypeError, "dims must be a sequence of ints"),
    (dict(dims=(8, 4.0)), TypeError, r"dims\[1\] must be an int, got float"),
    (dict(dims=(8, True)), TypeError, r"dims\[1\] must be an int, got bool"),
    (dict(dims=(9, 4)), ValueError, r"dims\[0\] = 9 must lie in \[1, 8\] \(the features' dimension D = 8\)"),
    (dict(dims=(8, 0)), ValueError, r"dims\[1\] = 0 must lie in \[1, 8\]"),
    (dict(dims=(4, 8)), ValueError, r"dims must be strictly decreasing \(largest first.*got \[4, 8\]"),
    (dict(dims=(8, 4, 4)), ValueError, "dims must be strictly decreasing"),
    (dict(dims=(8, 4), weights=(1.0,)), ValueError, "weights has 1 entries but dims has 2: give one weight per dim"),
    (dict(dims=(8, 4), weights=(1.0, float("nan"))), ValueError, r"weights\[1\] must be finite"),
    (dict(dims=(8, 4), weights=(1.0, "a")), TypeError, r"weights\[1\] must be a number"),
    (dict(dims=(8, 4), weights=1.0), TypeError, "weights must be a sequence of numbers or a tensor of shape"),
    (dict(dims=(8, 4), weights=torch.ones(3)), ValueError, r"weights must have shape \(2,\): one weight per dim"),
    (dict(dims=(8, 4), weights=torch.ones(2, dtype=torch.long)), TypeError, "weights must be a floating tensor"),
    (dict(dims=(8, 4), normalize=1), TypeError, "normalize must be a bool, got int"),
    (dict(dims=(8, 4), backend="gpu"), ValueError, "backend: unknown backend 'gpu'"),
])
@pytest.mark.parametrize("kind", sorted(OPS))
def test_bad_arguments_raise_naming_them(kind, kwargs, err, match):
    y = Y if kind == "ce_rows" else Y[:4]
    with pytest.raises(err, match=match):
        OPS[kind][1](X, y, 2.0, **kwargs)


def test_bad_features_scale_and_labels():
    with pytest.raises(ValueError, match=r"labels are required when keys has fewer rows than queries \(3 < 4\)"):
        fc.matryoshka_ce_rows(X, Y[:3], 2.0, dims=(8,))
    with pytest.raises(ValueError, match=r"labels must have shape \(4,\)"):
        fc.matryoshka_ce_rows(X, Y, 2.0, labels=torch.zeros(3, dtype=torch.long), dims=(8,))
    with pytest.raises(ValueError, match="labels are required when the two batches differ"):
        fc.matryoshka_clip_loss(X, Y, 2.0, dims=(8,))
    with pytest.raises(ValueError, match="queries has per-sample shape"):
        fc.matryoshka_ce_rows(X, torch.randn(6, 7), 2.0, dims=(7,))
    with pytest.raises(ValueError, match="logit_scale must be > 0"):
        fc.matryoshka_ce_rows(X, Y, -1.0, dims=(8,))
    with pytest.raises(TypeError, match="image_features must be a floating tensor"):
        fc.matryoshka_clip_loss(X.long(), Y, 2.0, dims=(8,))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 6\)"), fc.debug():
        fc.matryoshka_ce_rows(X, Y, 2.0, labels=torch.tensor([0, 1, 2, 6]), dims=(8,))
    out = fc.matryoshka_ce_rows(X.requires_grad_(), Y, 2.0, labels=torch.tensor([0, 1, 2, 6]), dims=(8, 2))
    assert torch.isnan(out) and torch.isnan(torch.autograd.grad(out, X)[0]).all()  # no host sync: NaN, not a number


@pytest.mark.parametrize("kind", sorted(OPS))
def test_csrc_backends_run_the_tiles(kind):
    """csrc has no Matryoshka kernels: backend "cpu" (and CPU "auto" above the crossover) runs the O((N+M)·D)
    PyTorch tiles, decided by the dispatcher ("prefixes"), never the materialised reference; "cuda" needs CUDA."""
    from fastcontrast.dispatch import crossover, resolve

    op = OPS[kind][0]
    if fc.dispatch.unavailable_reason(op, "cpu", torch.device("cpu")) is None:
        assert resolve(op, "cpu", torch.device("cpu"), needs=("prefixes",)).kernel == "tiles"
        big = crossover("cpu") + 1
        assert resolve(op, "auto", torch.device("cpu"), big, needs=("prefixes",)).kernel == "tiles"
    y = Y if kind == "ce_rows" else Y[:4]
    with pytest.raises(BackendUnavailableError, match=r"backend 'cuda' is unavailable for .*CUDA tensors"):
        OPS[kind][1](X, y, 2.0, dims=(8, 4), backend="cuda")


@pytest.mark.parametrize("backend", ["triton", "tiles"])
@pytest.mark.parametrize("kind", sorted(OPS))
def test_fused_backward_refuses_create_graph(kind, backend):
    x, y, labels = _inputs(10, n=6, m=8 if kind == "ce_rows" else 6, d=8)
    dt = torch.float64 if backend == "tiles" else torch.float32  # float64 on the Triton backend: the tiles
    x, y, s = x.to(dt).requires_grad_(), y.to(dt).requires_grad_(), torch.tensor(2.0, dtype=dt, requires_grad=True)
    loss = _call(kind, x, y, s, labels, dims=(8, 3), weights=(1.0, 1.0), backend="triton")
    first = torch.autograd.grad(loss, (x, y, s), retain_graph=True)  # first order: unaffected
    assert all(torch.isfinite(t).all() for t in first)
    # the error names the backend the call asked for (triton), whichever kernel ran (float64: the tiles)
    with pytest.raises(RuntimeError, match=r"^fastcontrast: double backward is not supported by backend "
                                           r"'triton' for the fused Matryoshka .*use backend='reference'"):
        torch.autograd.grad(loss, (x, y, s), create_graph=True)


def test_compiles_without_graph_break():
    """torch.compile(fullgraph=True) traces the fused op through its fake (the schema's list of prefix ends
    included); the compiled gradients are eager's."""
    x, y, labels = _inputs(11, n=9, m=12, d=16)
    x, y = x.requires_grad_(), y.requires_grad_()
    s = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)

    def f(x, y, s):
        return (fc.matryoshka_ce_rows(x, y, s, labels=labels, dims=(16, 8, 3), backend="triton")
                + fc.matryoshka_clip_loss(x, y[:9], s, dims=(16, 5), backend="triton"))

    torch._dynamo.reset()
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    for a, b in zip(torch.autograd.grad(compiled(x, y, s), (x, y, s)), torch.autograd.grad(f(x, y, s), (x, y, s))):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
