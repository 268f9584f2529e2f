"""clip_loss with hard-negative texts (NegCLIP), false-negative ids and a guide (GISTEmbed's rule), on every
backend (issue 27, point 2): loops written from the papers' rules in float64 against the reference; every backend
against the float64 reference (fp64 1e-10, fp32 1e-5, bf16 1e-2; forward and every gradient, negatives included);
negatives in the image→text softmax only; a masked column with a huge logit; unique ids = the plain loss; GEMM
units; memory without an N×M buffer; no host sync; double backward; clear errors; ClipLoss; and the CLIP ring
across 2 gloo ranks equal to one process on the concatenated batch."""
import math

import pytest
import torch

import fastcontrast as fc
from _gloo import run_ranks
from _ops import assert_linear_memory, backend_params
from conftest import INTERPRET, kernel_device
from fastcontrast.dispatch import kernel_impl
from fastcontrast.primitives import tiles as _tiles
from fastcontrast.tools.memtrack import HostSyncs, MatmulFlops, PeakMemory

DEV = kernel_device()
BACKENDS = backend_params("infonce_masked", DEV, extra=("auto",))
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-2}


def _unit(t):
    return torch.nn.functional.normalize(t.double(), dim=1)


def make(config, seed, dtype=torch.float64, n=11, m=11, k=5, d=8, dg=6, labels=False, device=DEV):
    """(leaves: the differentiable inputs, other keyword arguments) of one configuration."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(device, dtype)

    x, y, neg = r(n, d), r(m, d), r(k, d)
    scale = torch.tensor(4.0 + seed, dtype=torch.float64 if dtype == torch.float64 else torch.float32,
                         device=device)
    base = torch.randn(max(n, m), dg, generator=g, dtype=torch.float64)  # a guide that finds some pairs alike
    gx = (base[:n] + 0.7 * torch.randn(n, dg, generator=g, dtype=torch.float64)).to(device, dtype)
    gy = (base[:m] + 0.7 * torch.randn(m, dg, generator=g, dtype=torch.float64)).to(device, dtype)
    gn = (base[:k] + 0.7 * torch.randn(k, dg, generator=g, dtype=torch.float64)).to(device, dtype)
    fn = (torch.randint(0, 3, (n,), generator=g).to(device), torch.randint(0, 3, (m,), generator=g).to(device))
    kw = {}
    if labels:
        kw["labels"] = torch.randint(0, m, (n,), generator=g).to(device)
    leaves = {"image_features": x, "text_features": y, "logit_scale": scale}
    if config in ("negatives", "everything"):
        leaves["text_negatives"] = neg
    if config in ("false_negatives", "everything"):
        kw["false_negative_ids"] = fn
    if config in ("guide", "guide_relative", "everything"):
        kw.update(guide_image_features=gx, guide_text_features=gy, guide_margin=0.1)
        if config == "guide_relative":
            kw.update(guide_margin=0.3, guide_margin_strategy="relative")
        if config == "everything":
            kw["guide_text_negatives"] = gn
    return leaves, dict(kw, normalize=True)


CONFIGS = ("negatives", "false_negatives", "guide", "guide_relative", "everything")


def naive(x, y, s, labels, neg, fn, gx, gy, gn, margin, strategy):
    """The rules read literally: NegCLIP's negatives in the image→text softmax only; a same-id text (fn) or a
    guide score above the positive's minus the margin (GISTEmbed) drops a candidate; the positive never."""
    x, y = _unit(x), _unit(y)
    keys = y if neg is None else torch.cat([y, _unit(neg)])
    n, m = x.shape[0], y.shape[0]
    p = list(range(n)) if labels is None else [int(v) for v in labels]
    gkeys = None if gx is None else (_unit(gy) if gn is None else torch.cat([_unit(gy), _unit(gn)]))
    thr = (lambda v: v - margin) if strategy == "absolute" else (lambda v: v - abs(v) * margin)

    def gscore(i, j):
        return float(_unit(gx)[i] @ gkeys[j])

    total = 0.0
    for i in range(n):
        row = []
        for j in range(keys.shape[0]):
            dropped = j != p[i] and ((fn is not None and j < m and int(fn[0][i]) == int(fn[1][j])) or
                                     (gx is not None and gscore(i, j) > thr(gscore(i, p[i]))))
            if not dropped:
                row.append(s * (x[i] @ keys[j]))
        col = []
        j = p[i]
        pos_rows = [r for r in range(n) if p[r] == j]
        col_thr = max(gscore(r, j) for r in pos_rows) if gx is not None else None
        for r in range(n):
            dropped = p[r] != j and ((fn is not None and int(fn[0][r]) == int(fn[1][j])) or
                                     (gx is not None and gscore(r, j) > thr(col_thr)))
            if not dropped:
                col.append(s * (x[r] @ y[j]))
        pos = s * (x[i] @ y[j])
        total = total + (torch.logsumexp(torch.stack(row), 0) - pos) + (torch.logsumexp(torch.stack(col), 0) - pos)
    return total / (2 * n)


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("labels", [False, True], ids=["diagonal", "labels"])
def test_reference_equals_the_rules_read_literally(config, labels):
    leaves, kw = make(config, 3, n=7, m=7 if not labels else 9, k=3, labels=labels, device="cpu")
    got = fc.clip_loss(**leaves, **kw, backend="reference")
    want = naive(leaves["image_features"], leaves["text_features"], leaves["logit_scale"], kw.get("labels"),
                 leaves.get("text_negatives"), kw.get("false_negative_ids"), kw.get("guide_image_features"),
                 kw.get("guide_text_features"), kw.get("guide_text_negatives"), kw.get("guide_margin", 0.0),
                 kw.get("guide_margin_strategy", "absolute"))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def run(backend, leaves, kw):
    leaves = {k: v.detach().clone().requires_grad_() for k, v in leaves.items()}
    loss = fc.clip_loss(**leaves, **kw, backend=backend)
    return (loss.detach(),) + torch.autograd.grad(loss, list(leaves.values()))


def rel(a, b):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    assert torch.isfinite(a).all(), "non-finite value"
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _as64(kw):
    out = {}
    for k, v in kw.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            v = v.double()
        out[k] = v
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("dtype,labels", [(torch.float64, False), (torch.float32, False), (torch.float32, True)],
                         ids=["fp64", "fp32", "fp32-labels"])
def test_against_the_float64_reference(backend, config, dtype, labels):
    for seed in (0, 1):
        leaves, kw = make(config, seed, dtype, m=11 if not labels else 17, labels=labels)
        got = run(backend, leaves, kw)
        want = run("reference", {k: v.double() for k, v in leaves.items()}, _as64(kw))
        errs = [rel(a, b) for a, b in zip(got, want)]
        assert max(errs) <= TOL[dtype], (config, seed, errs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("config", ["negatives", "everything"])
def test_bf16_against_the_float64_reference(backend, config):
    leaves, kw = make(config, 2, torch.bfloat16, n=19, m=19, k=9, d=40)
    got = run(backend, leaves, kw)
    want = run("reference", {k: v.double() for k, v in leaves.items()}, _as64(kw))
    errs = [rel(a, b) for a, b in zip(got, want)]
    assert max(errs) <= TOL[torch.bfloat16], (config, errs)


# ---------------------------------------------------------------------------------------- the rules hold
@pytest.mark.parametrize("backend", BACKENDS)
def test_negatives_enter_the_image_to_text_softmax_only(backend):
    """A negative 50·x̂_0 dominates row 0's image→text denominator and changes nothing in text→image."""
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(6, 4, generator=g).to(DEV), torch.randn(6, 4, generator=g).to(DEV)
    x = torch.nn.functional.normalize(x, dim=1)
    y = torch.nn.functional.normalize(y, dim=1)
    neg = torch.cat([50 * x[:1], torch.randn(2, 4, generator=g).to(DEV)])
    s = 3.0
    got = fc.clip_loss(x, y, s, text_negatives=neg, backend=backend)
    logits = s * x.double() @ torch.cat([y, neg]).double().T
    rows = torch.logsumexp(logits, 1) - logits.diagonal()
    cols = torch.logsumexp(logits[:, :6], 0) - logits.diagonal()
    assert float(rows[0]) > 100  # the negative counts in row 0 ...
    torch.testing.assert_close(got.double().cpu(), (0.5 * (rows.mean() + cols.mean())).cpu(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rule", ["false_negative_ids", "guide"])
def test_a_dropped_text_with_a_huge_logit_is_dropped(backend, rule):
    """Images and texts near the basis vectors e_i (pair i: logit ≈ 3), text 1 = 50·e_0: logit 150 with image 0
    and ≈ 0 with the others. The rule drops it from row 0 and image 0 from column 1, or the loss is huge."""
    g = torch.Generator().manual_seed(6)
    x = (torch.eye(5, 6) + 0.05 * torch.randn(5, 6, generator=g)).to(DEV)
    y = (torch.eye(5, 6) + 0.05 * torch.randn(5, 6, generator=g)).to(DEV)
    y[1] = 50 * torch.eye(5, 6)[0].to(DEV)
    if rule == "false_negative_ids":
        kw = dict(false_negative_ids=(torch.tensor([7, 1, 2, 3, 4], device=DEV),
                                      torch.tensor([8, 7, 9, 9, 9], device=DEV)))
    else:  # guide: image 0 and text 1 identical for the guide (cosine 1 > its positive's 0 − 0.1)
        gx, gy = torch.eye(5, 6, device=DEV), torch.eye(5, 6, device=DEV)
        gy[1] = gx[0]
        kw = dict(guide_image_features=gx, guide_text_features=gy, guide_margin=0.1)
    got = fc.clip_loss(x, y, 3.0, backend=backend, **kw)
    assert float(got) < 5, float(got)  # ignored: row 0 and column 1 add ≈ 2·150/10
    assert float(fc.clip_loss(x, y, 3.0, backend=backend)) > 20  # what the rule removes
    ref = fc.clip_loss(x.double().cpu(), y.double().cpu(), 3.0, backend="reference",
                       **{k: (tuple(t.cpu() for t in v) if isinstance(v, tuple) else
                              v.double().cpu() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()})
    torch.testing.assert_close(got.double().cpu(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unique_false_negative_ids_equal_the_plain_loss(backend):
    leaves, kw = make("negatives", 4, torch.float64, labels=True, m=13)
    leaves.pop("text_negatives")
    ids = (torch.arange(11, device=DEV), torch.arange(13, device=DEV) + 100)  # no shared id: nothing dropped
    got = fc.clip_loss(**leaves, **kw, false_negative_ids=ids, backend=backend)
    torch.testing.assert_close(got, fc.clip_loss(**leaves, **kw, backend="reference"), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_never_passes(backend):
    leaves, kw = make("everything", 0, torch.float32)
    kw["guide_text_features"] = kw["guide_text_features"].clone()
    kw["guide_text_features"][2, 1] = float("nan")  # compares False (nothing dropped): poisons instead
    assert torch.isnan(fc.clip_loss(**leaves, **kw, backend=backend))
    leaves, kw = make("negatives", 0, torch.float32)
    leaves["text_negatives"] = leaves["text_negatives"].clone()
    leaves["text_negatives"][0, 0] = float("nan")
    assert torch.isnan(fc.clip_loss(**leaves, **kw, backend=backend))
    leaves, kw = make("false_negatives", 0, torch.float32, labels=True, m=13)
    kw["labels"] = kw["labels"].clone()
    kw["labels"][0] = 13
    assert torch.isnan(fc.clip_loss(**leaves, **kw, backend=backend))


# ----------------------------------------------------------------------------------- cost and memory
@pytest.fixture
def dot_flops(monkeypatch):
    import triton.runtime.interpreter as I

    count = {"flops": 0}
    orig = I.InterpreterBuilder.create_dot

    def create_dot(self, a, b, d, *rest):
        count["flops"] += 2 * a.data.shape[-2] * a.data.shape[-1] * b.data.shape[-1]
        return orig(self, a, b, d, *rest)

    monkeypatch.setattr(I.InterpreterBuilder, "create_dot", create_dot)
    return count


@pytest.mark.skipif(not INTERPRET or torch.cuda.is_available(), reason="counts tl.dot in the Triton interpreter")
@pytest.mark.parametrize("guide", [False, True])
def test_four_gemm_units_plus_the_guide(dot_flops, guide):
    """One sweep for both directions' masked statistics, one recompute, two slab GEMMs: 4 units of 2·N·(M+K)·D;
    the guide's Dg adds 2·N·(M+K)·Dg in the sweep and in the recompute."""
    if fc.dispatch.unavailable_reason("infonce_masked", "triton", DEV) is not None:
        pytest.skip("triton cannot run here")
    n, m, k, d, dg = 64, 64, 32, 64, 32  # multiples of the interpreter's 32-wide tiles
    g = torch.Generator().manual_seed(0)
    x, y, neg = (torch.randn(r, d, generator=g).requires_grad_() for r in (n, m, k))
    kw = dict(false_negative_ids=(torch.randint(0, 9, (n,), generator=g), torch.randint(0, 9, (m,), generator=g)))
    if guide:
        kw.update(guide_image_features=torch.randn(n, dg, generator=g),
                  guide_text_features=torch.randn(m, dg, generator=g),
                  guide_text_negatives=torch.randn(k, dg, generator=g))
    with MatmulFlops() as mm:
        fc.clip_loss(x, y, 5.0, text_negatives=neg, backend="triton", **kw).backward()
    unit = 2 * n * (m + k) * d
    total = (dot_flops["flops"] + mm.flops) / unit
    assert total == pytest.approx(4.0 + (2 * dg / d if guide else 0.0)), (total, dot_flops["flops"] / unit)


def _peak(n, fused):
    g = torch.Generator().manual_seed(0)
    x, y, neg = (torch.randn(r, 16, generator=g).requires_grad_() for r in (n, n, n // 2))
    fn = (torch.arange(n) % 7, torch.arange(n) % 5)
    guide = (torch.randn(n, 4, generator=g), torch.randn(n, 4, generator=g), torch.randn(n // 2, 4, generator=g))
    scale = torch.tensor(4.0)
    with PeakMemory() as pm:
        impl = kernel_impl("infonce_masked", "tiles") if fused else (
            lambda *a: fc.clip_loss(a[0], a[1], a[2], normalize=True, text_negatives=a[5], false_negative_ids=a[6],
                                    guide_image_features=a[7][0], guide_text_features=a[7][1],
                                    guide_text_negatives=a[7][2], guide_margin=0.1, backend="reference"))
        impl(x, y, scale, None, True, neg, fn, guide, 0.1, "absolute").backward()
    return pm


def test_extra_memory_is_linear_in_n(monkeypatch):
    monkeypatch.setattr(_tiles, "rows_per_block", lambda *a: 64)
    tiled, ref = assert_linear_memory(_peak, largest=2048 * 3072 * 4 / 8)  # no N×(M+K) buffer, not even a bool
    assert tiled[2].peak < ref[2].peak / 8


def test_no_host_sync():
    leaves, kw = make("everything", 1, torch.float32, labels=True, m=13, device="cpu")
    backend = "cpu" if fc.dispatch.unavailable_reason("infonce_masked", "cpu", torch.device("cpu")) is None \
        else "triton"
    leaves = {k: v.requires_grad_() for k, v in leaves.items()}
    with HostSyncs() as hs:
        fc.clip_loss(**leaves, **kw, backend=backend).backward()
    assert hs.syncs == [], hs.syncs


@pytest.mark.parametrize("backend", BACKENDS)
def test_double_backward_exact_or_clear_error(backend):
    exact = backend in ("reference", "dense", "auto")
    leaves, kw = make("everything", 0, torch.float64 if exact else torch.float32, n=4, m=4, k=2, d=3)
    if exact:
        names = list(leaves)
        assert torch.autograd.gradgradcheck(lambda *t: fc.clip_loss(**dict(zip(names, t)), **kw, backend=backend),
                                            tuple(v.clone().requires_grad_() for v in leaves.values()),
                                            fast_mode=True)
        return
    leaves = {k: v.requires_grad_() for k, v in leaves.items()}
    with pytest.raises(RuntimeError, match=r"^fastcontrast: double backward is not supported by backend .* "
                                           r"fastcontrast::lse_masked.*use backend='reference'"):
        torch.autograd.grad(fc.clip_loss(**leaves, **kw, backend=backend), leaves["image_features"],
                            create_graph=True)


# ------------------------------------------------------------------------------------------ bad inputs
def _bad():
    x, y = torch.randn(4, 3), torch.randn(4, 3)
    gx, gy = torch.randn(4, 2), torch.randn(4, 2)
    ids = (torch.arange(4), torch.arange(4))
    return [
        (dict(text_negatives=torch.randn(2, 5)), ValueError, "text_features has per-sample shape .* text_negatives"),
        (dict(text_negatives=torch.randn(2, 3).double()), TypeError, "text_negatives is torch.float64"),
        (dict(false_negative_ids=torch.arange(4)), TypeError, "false_negative_ids must be a pair"),
        (dict(false_negative_ids=(torch.arange(4), torch.arange(3))), ValueError, r"text_ids must have shape \(4,\)"),
        (dict(false_negative_ids=(torch.arange(4).float(), torch.arange(4))), TypeError,
         "image_ids must be an integer tensor"),
        (dict(false_negative_ids=ids, image_ids=torch.arange(4), text_ids=torch.arange(4)), ValueError,
         "not combined with image_ids/text_ids"),
        (dict(guide_image_features=gx), ValueError, "guide_text_features is required"),
        (dict(guide_image_features=gx, guide_text_features=torch.randn(3, 2)), ValueError,
         r"guide_text_features must have 4 rows"),
        (dict(guide_image_features=gx, guide_text_features=torch.randn(4, 5)), ValueError,
         "guide_image_features has per-sample shape"),
        (dict(guide_image_features=gx, guide_text_features=gy, text_negatives=torch.randn(2, 3)), ValueError,
         "guide_text_negatives is required with text_negatives and a guide"),
        (dict(guide_image_features=gx, guide_text_features=gy, guide_text_negatives=torch.randn(2, 2)), ValueError,
         "guide_text_negatives given without text_negatives"),
        (dict(guide_image_features=gx, guide_text_features=gy, text_negatives=torch.randn(2, 3),
              guide_text_negatives=torch.randn(3, 2)), ValueError, r"guide_text_negatives must have 2 rows"),
        (dict(guide_margin=0.2), ValueError, "guide_margin/guide_margin_strategy set without a guide"),
        (dict(guide_image_features=gx, guide_text_features=gy, guide_margin=-0.1), ValueError,
         "guide_margin must be >= 0"),
        (dict(guide_image_features=gx, guide_text_features=gy, guide_margin_strategy="max"), ValueError,
         "guide_margin_strategy must be one of"),
        (dict(text_negatives=torch.randn(2, 3), labels=torch.arange(3)), ValueError, r"labels must have shape \(4,\)"),
    ]


@pytest.mark.parametrize("kw,exc,match", _bad(), ids=lambda v: v if isinstance(v, str) else None)
def test_bad_inputs_name_the_argument(kw, exc, match):
    with pytest.raises(exc, match=match):
        fc.clip_loss(torch.randn(4, 3), torch.randn(4, 3), 2.0, **kw)


def test_clip_loss_module_takes_them_and_the_gather_mode_refuses():
    leaves, kw = make("everything", 1, torch.float32, device="cpu")
    loss = fc.ClipLoss(normalize=True, guide_margin=0.1)
    got = loss(leaves["image_features"], leaves["text_features"], leaves["logit_scale"],
               text_negatives=leaves["text_negatives"], false_negative_ids=kw["false_negative_ids"],
               guide_image_features=kw["guide_image_features"], guide_text_features=kw["guide_text_features"],
               guide_text_negatives=kw["guide_text_negatives"])
    torch.testing.assert_close(got, fc.clip_loss(**leaves, **kw, backend="reference"), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="guide_margin must be >= 0"):
        fc.ClipLoss(guide_margin=-1.0)
    gather = fc.ClipLoss(world_size=2)
    with pytest.raises(ValueError, match="the gather mode does not take them"):
        gather(leaves["image_features"], leaves["text_features"], 2.0, text_negatives=leaves["text_negatives"])


# --------------------------------------------------------------------------------------------- the ring
N_L, K_L = 5, 3


def _global(world, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    x, y, neg = r(world * N_L, 6), r(world * N_L, 6), r(world * K_L, 6)
    base = torch.randn(world * N_L, 4, generator=g, dtype=torch.float64)
    gx = (base + 0.7 * torch.randn(world * N_L, 4, generator=g, dtype=torch.float64)).to(dtype)
    gy = (base + 0.7 * torch.randn(world * N_L, 4, generator=g, dtype=torch.float64)).to(dtype)
    gn = r(world * K_L, 4)
    fn = (torch.randint(0, 4, (world * N_L,), generator=g), torch.randint(0, 4, (world * N_L,), generator=g))
    return x, y, neg, gx, gy, gn, fn


def _ring_cases(rank, world):
    from fastcontrast import distributed as Dm

    out = {}
    for dtype in (torch.float64, torch.float32):
        x, y, neg, gx, gy, gn, fn = _global(world, dtype)
        sl, sk = slice(rank * N_L, (rank + 1) * N_L), slice(rank * K_L, (rank + 1) * K_L)
        for backend in ("cpu", "reference"):
            if fc.dispatch.unavailable_reason("lse_masked", backend, torch.device("cpu")) is not None:
                continue
            leaves = [t[s].clone().requires_grad_() for t, s in ((x, sl), (y, sl), (neg, sk))]
            t = torch.tensor(1.2, dtype=dtype, requires_grad=True)
            loss = Dm.ring_clip_loss(leaves[0], leaves[1], t.exp(), normalize=True, text_negatives=leaves[2],
                                     false_negative_ids=(fn[0][sl], fn[1][sl]), guide_image_features=gx[sl],
                                     guide_text_features=gy[sl], guide_text_negatives=gn[sk], guide_margin=0.1,
                                     backend=backend)
            loss.backward()
            out[(dtype, backend)] = dict(loss=loss.detach(), dx=leaves[0].grad, dy=leaves[1].grad,
                                         dn=leaves[2].grad, dt=t.grad)
    return out


def test_the_ring_equals_one_process_on_the_concatenated_batch():
    world = 2
    res = run_ranks(_ring_cases, world)
    for dtype in (torch.float64, torch.float32):
        x, y, neg, gx, gy, gn, fn = _global(world, dtype)
        leaves = [t.double().clone().requires_grad_() for t in (x, y, neg)]
        t = torch.tensor(1.2, dtype=torch.float64, requires_grad=True)
        loss = fc.clip_loss(leaves[0], leaves[1], t.exp(), normalize=True, text_negatives=leaves[2],
                            false_negative_ids=fn, guide_image_features=gx.double(), guide_text_features=gy.double(),
                            guide_text_negatives=gn.double(), guide_margin=0.1, backend="reference")
        loss.backward()
        tol = 1e-9 if dtype == torch.float64 else 1e-5
        for (dt, backend), _ in res[0].items():
            if dt != dtype:
                continue
            for rank in range(world):
                got = res[rank][(dt, backend)]
                sl, sk = slice(rank * N_L, (rank + 1) * N_L), slice(rank * K_L, (rank + 1) * K_L)
                assert rel(got["loss"], loss) < tol, (dt, backend, rank)
                # the ring's convention (open_clip's gather_with_grad): world × the global gradient per rank
                for name, want in (("dx", leaves[0].grad[sl]), ("dy", leaves[1].grad[sl]), ("dn", leaves[2].grad[sk])):
                    assert rel(got[name], world * want) < tol, (dt, backend, rank, name)
                assert rel(sum(r[(dt, backend)]["dt"] for r in res) / world, t.grad) < tol, (dt, backend)
    assert math.isfinite(float(res[0][(torch.float64, "reference")]["loss"]))
