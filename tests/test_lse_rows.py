"""The masked row log-sum-exp ``fastcontrast.lse_rows`` (issue 27, point 2) on every backend: forward and every
gradient against the float64 reference on fresh ragged inputs, for each mask (keep, same-group exclusion, guide
threshold, the three hardness modes, all at once); the reference against loops written from the rules and
gradchecked; sentence-transformers 6.2.0's MultipleNegativesRankingLoss (every direction, both partition modes,
every hardness mode) and GISTEmbedLoss (both margin strategies) composed from it; a dropped column carrying a huge
logit; rows with nothing left; NaN; memory without an N×M buffer; no host sync; the dispatcher's choice of kernel;
clear errors."""
import math

import pytest
import torch

import fastcontrast as fc
from _ops import assert_linear_memory, backend_params
from conftest import kernel_device
from fastcontrast.dispatch import kernel_impl, resolve
from fastcontrast.primitives import lse_masked as LM
from fastcontrast.primitives import tiles as _tiles
from fastcontrast.tools.memtrack import HostSyncs, PeakMemory

DEV = kernel_device()
BACKENDS = backend_params("lse_rows", DEV, extra=("auto",))
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-2}
IN_BATCH, HARD, ALL = ({"other_inbatch", "other_hard"}, {"same_hard"},
                       {"same_hard", "other_inbatch", "other_hard"})  # sentence-transformers' hardness_mode values


def _untied_thresholds(gq, gk, normalize, g):
    """A threshold per row in the middle of the widest gap between its guide scores: no score within rounding
    of it, so every backend drops the same entries."""
    gq, gk = gq.double(), gk.double()
    if normalize:
        gq, gk = torch.nn.functional.normalize(gq, dim=1), torch.nn.functional.normalize(gk, dim=1)
    srt = (gq @ gk.T).sort(dim=1).values
    m = srt.shape[1]
    lo, hi = m // 4, 3 * m // 4  # a gap in the middle half: some entries dropped, some kept
    gaps = srt[:, lo + 1:hi + 1] - srt[:, lo:hi]
    at = gaps.argmax(dim=1) + lo
    rows = torch.arange(srt.shape[0])
    return 0.5 * (srt[rows, at] + srt[rows, at + 1])


def make(config, seed, dtype=torch.float64, n=13, m=21, d=8, dg=5, normalize=True, device=DEV):
    """(leaves {queries, keys, logit_scale}, other keyword arguments) of one mask configuration."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n, d, generator=g, dtype=torch.float64).to(device, dtype)
    k = torch.randn(m, d, generator=g, dtype=torch.float64).to(device, dtype)
    s = torch.tensor(3.0 + seed, dtype=torch.float64 if dtype == torch.float64 else torch.float32, device=device)
    keep = torch.randint(0, m, (n,), generator=g).to(device)
    row_ids = torch.randint(0, 4, (n,), generator=g).to(device)
    col_ids = torch.randint(0, 4, (m,), generator=g).to(device)
    hard = (torch.rand(m, generator=g) < 0.4).to(device)
    gq = torch.randn(n, dg, generator=g, dtype=torch.float64).to(device, dtype)
    gk = torch.randn(m, dg, generator=g, dtype=torch.float64).to(device, dtype)
    guide = dict(guide_queries=gq, guide_keys=gk,
                 guide_threshold=_untied_thresholds(gq, gk, normalize, g).to(device, s.dtype))
    ids = dict(row_ids=row_ids, col_ids=col_ids)
    kw = {"plain": {}, "keep": dict(keep=keep), "exclude": dict(keep=keep, exclude_same=True, **ids),
          "guide": dict(keep=keep, **guide),
          "in_batch_negatives": dict(hard_cols=hard, hardness_strength=9.0, hardness_cells=IN_BATCH, **ids),
          "hard_negatives": dict(hard_cols=hard, hardness_strength=5.0, hardness_cells=HARD, **ids),
          "all_negatives": dict(hard_cols=hard, hardness_strength=2.0, hardness_cells=ALL, **ids),
          "drops": dict(keep=keep, exclude_same=True, **ids, **guide),
          "everything": dict(keep=keep, exclude_same=True, hard_cols=hard, hardness_strength=3.0,
                             hardness_cells=ALL | {"same_inbatch"}, **ids, **guide)}[config]
    return {"queries": q, "keys": k, "logit_scale": s}, dict(kw, normalize=normalize)


CONFIGS = ("plain", "keep", "exclude", "guide", "in_batch_negatives", "hard_negatives", "all_negatives", "drops",
           "everything")


def run(backend, leaves, kw, weights):
    """(lse, d/dqueries, d/dkeys, d/dlogit_scale) of Σ w_i lse_i."""
    leaves = {k: v.detach().clone().requires_grad_() for k, v in leaves.items()}
    out = fc.lse_rows(**leaves, **kw, backend=backend)
    grads = torch.autograd.grad((out * weights.to(out.dtype)).sum(), list(leaves.values()))
    return (out.detach(),) + grads


def rel(a, b):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    assert torch.isfinite(a).all(), "non-finite value"
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _as64(kw):
    return {k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in kw.items()}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_against_the_float64_reference(backend, config, dtype):
    for seed in (0, 1):
        leaves, kw = make(config, seed, dtype)
        w = torch.rand(leaves["queries"].shape[0], generator=torch.Generator().manual_seed(seed)).to(DEV) + 0.5
        got = run(backend, leaves, kw, w)
        want = run("reference", {k: v.double() for k, v in leaves.items()}, _as64(kw), w.double())
        errs = [rel(a, b) for a, b in zip(got, want)]
        assert max(errs) <= TOL[dtype], (config, seed, errs)
        assert got[0].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("config", ["plain", "exclude", "everything"])
def test_bf16_against_the_float64_reference(backend, config):
    leaves, kw = make(config, 3, torch.bfloat16, n=19, m=35, d=40)
    w = torch.ones(19, device=DEV)
    got = run(backend, leaves, kw, w)
    want = run("reference", {k: v.double() for k, v in leaves.items()}, _as64(kw), w.double())
    errs = [rel(a, b) for a, b in zip(got, want)]
    assert max(errs) <= TOL[torch.bfloat16], (config, errs)


def naive(q, k, s, normalize, keep, row_ids, col_ids, exclude_same, gq, gk, thr, hard_cols, alpha, cells):
    """The rules read literally, one (i, j) at a time, in float64."""
    q, k = q.double(), k.double()
    if normalize:
        q, k = torch.nn.functional.normalize(q, dim=1), torch.nn.functional.normalize(k, dim=1)
        if gq is not None:
            gq, gk = torch.nn.functional.normalize(gq.double(), dim=1), torch.nn.functional.normalize(gk.double(),
                                                                                                      dim=1)
    out = []
    for i in range(q.shape[0]):
        terms = []
        for j in range(k.shape[0]):
            sij = q[i] @ k[j]
            same = row_ids is not None and int(row_ids[i]) == int(col_ids[j])
            dropped = (exclude_same and same) or (gq is not None and float(gq[i].double() @ gk[j].double()) >
                                                  float(thr[i]))
            if keep is not None and int(keep[i]) == j:
                dropped = False
            if dropped:
                continue
            cell = ("same_" if same else "other_") + ("hard" if hard_cols is not None and bool(hard_cols[j])
                                                      else "inbatch")
            terms.append(s * sij + (alpha * sij.detach() if cell in cells else 0.0))
        out.append(torch.logsumexp(torch.stack(terms), 0) if terms else torch.tensor(-math.inf, dtype=q.dtype))
    return torch.stack(out)


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("normalize", [True, False])
def test_reference_equals_the_rules_read_literally(config, normalize):
    leaves, kw = make(config, 5, torch.float64, n=6, m=9, normalize=normalize, device="cpu")
    got = fc.lse_rows(**leaves, **kw, backend="reference")
    want = naive(leaves["queries"], leaves["keys"], leaves["logit_scale"], normalize, kw.get("keep"),
                 kw.get("row_ids"), kw.get("col_ids"), kw.get("exclude_same", False), kw.get("guide_queries"),
                 kw.get("guide_keys"), kw.get("guide_threshold"), kw.get("hard_cols"),
                 kw.get("hardness_strength", 0.0), kw.get("hardness_cells", ()))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["reference", "dense"])
def test_gradcheck_float64(backend):
    """Every dropping rule (the hardness penalty is a stop-gradient on purpose: finite differences see α·S move,
    the gradient must not; test_hardness_is_a_value_shift_only checks that one)."""
    leaves, kw = make("drops", 7, torch.float64, n=5, m=7, d=4, device="cpu")
    names = list(leaves)

    def f(*t):
        return fc.lse_rows(**dict(zip(names, t)), **kw, backend=backend)

    assert torch.autograd.gradcheck(f, tuple(v.clone().requires_grad_() for v in leaves.values()))


# ---------------------------------------------------------------- sentence-transformers 6.2.0, composed from it
def mnrl_transcribed(queries, docs, scale, directions, partition_mode, hardness_mode, alpha):
    """sentence_transformers/sentence_transformer/losses/multiple_negatives_ranking.py (6.2.0),
    compute_loss_from_embeddings without gathering (offset 0), cos_sim, materialised."""
    n = queries.shape[0]
    cos = lambda a, b: torch.nn.functional.normalize(a, dim=1) @ torch.nn.functional.normalize(b, dim=1).T  # noqa
    docs_all, docs_pos = torch.cat(docs), docs[0]
    rows = torch.arange(n)
    sims = {"query_to_doc": cos(queries, docs_all)}
    if "query_to_query" in directions:
        sims["query_to_query"] = cos(queries, queries)
        sims["query_to_query"][rows, rows] = -torch.inf
    if "doc_to_query" in directions:
        sims["doc_to_query"] = cos(queries, docs_pos).T
    if "doc_to_doc" in directions:
        sims["doc_to_doc"] = cos(docs_all, docs_pos).T
        sims["doc_to_doc"].masked_fill_(torch.eye(n).repeat(1, len(docs)).bool(), -torch.inf)
    pen = None
    if hardness_mode is not None and alpha > 0:
        pen = alpha * sims["query_to_doc"].detach()
        own = torch.eye(n, dtype=torch.bool).repeat(1, len(docs))
        if hardness_mode == "hard_negatives":
            excl = ~own
            excl[:, :n] = True
        elif hardness_mode == "in_batch_negatives":
            excl = own
        else:
            excl = own.clone()
            excl[:, n:] = False
        pen[excl] = 0.0
    sims = {key: v * scale for key, v in sims.items()}
    if pen is not None:
        sims["query_to_doc"] = sims["query_to_doc"] + pen
    pos = sims["query_to_doc"][rows, rows]
    if partition_mode == "joint":
        log_z = torch.logsumexp(torch.cat(list(sims.values()), dim=1), dim=1)
    else:
        log_z = sum(torch.logsumexp(v, dim=1) for v in sims.values()) / len(sims)
    return -(pos - log_z).mean()


MODE_CELLS = {None: (), "in_batch_negatives": IN_BATCH, "hard_negatives": HARD, "all_negatives": ALL}


def mnrl_from_lse_rows(queries, docs, scale, directions, partition_mode, hardness_mode, alpha, backend):
    n = queries.shape[0]
    docs_all, docs_pos = torch.cat(docs), docs[0]
    own = torch.arange(n).repeat(len(docs))  # column j of docs_all belongs to query j mod N
    cells = MODE_CELLS[hardness_mode]
    hard = dict(row_ids=torch.arange(n), col_ids=own, hard_cols=torch.arange(len(own)) >= n,
                hardness_strength=alpha, hardness_cells=cells) if cells else {}
    lse = {"query_to_doc": fc.lse_rows(queries, docs_all, scale, normalize=True, backend=backend, **hard)}
    if "query_to_query" in directions:
        lse["query_to_query"] = fc.lse_rows(queries, queries, scale, normalize=True, row_ids=torch.arange(n),
                                            col_ids=torch.arange(n), exclude_same=True, backend=backend)
    if "doc_to_query" in directions:
        lse["doc_to_query"] = fc.lse_rows(docs_pos, queries, scale, normalize=True, backend=backend)
    if "doc_to_doc" in directions:
        lse["doc_to_doc"] = fc.lse_rows(docs_pos, docs_all, scale, normalize=True, row_ids=torch.arange(n),
                                        col_ids=own, exclude_same=True, backend=backend)
    stacked = torch.stack(list(lse.values()))
    log_z = torch.logsumexp(stacked, 0) if partition_mode == "joint" else stacked.mean(0)
    pos = scale * (torch.nn.functional.normalize(queries, dim=1) * torch.nn.functional.normalize(docs_pos, dim=1)
                   ).sum(1)
    return -(pos - log_z).mean()


MNRL_CASES = [
    (("query_to_doc",), "joint", None, 0.0),
    (("query_to_doc",), "joint", "in_batch_negatives", 9.0),
    (("query_to_doc",), "joint", "hard_negatives", 5.0),
    (("query_to_doc",), "joint", "all_negatives", 3.0),
    (("query_to_doc", "doc_to_query"), "per_direction", "hard_negatives", 5.0),
    (("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"), "joint", "all_negatives", 2.0),
    (("query_to_doc", "query_to_query", "doc_to_doc"), "joint", None, 0.0),
]


@pytest.mark.parametrize("backend", backend_params("lse_rows", "cpu", ("reference", "dense", "cpu")))
@pytest.mark.parametrize("case", MNRL_CASES, ids=lambda c: "-".join(map(str, c[:3])).replace("query", "q"))
def test_multiple_negatives_ranking_loss_composes(backend, case):
    directions, partition, mode, alpha = case
    g = torch.Generator().manual_seed(11)
    n, d = 6, 8
    q = torch.randn(n, d, generator=g, dtype=torch.float64, requires_grad=True)
    docs = [torch.randn(n, d, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    # sentence-transformers' scale is a float: with a tensor scale its -inf entries (the self-excluded
    # query_to_query diagonal) times the scale would give it a NaN gradient (-inf · 0)
    want = mnrl_transcribed(q, docs, 20.0, directions, partition, mode, alpha)
    got = mnrl_from_lse_rows(q, docs, torch.tensor(20.0, dtype=torch.float64), directions, partition, mode, alpha,
                             backend)
    gw = torch.autograd.grad(want, [q, *docs])
    gg = torch.autograd.grad(got, [q, *docs])
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    for a, b in zip(gg, gw):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def gist_transcribed(anchor, positive, negative, ga, gp, gn, temperature, margin, strategy):
    """sentence_transformers/sentence_transformer/losses/gist_embed.py (6.2.0), forward without gathering, with
    contrast_anchors and contrast_positives (the defaults) and a negative column."""
    cos = lambda a, b: torch.nn.functional.cosine_similarity(a.unsqueeze(1), b.unsqueeze(0), dim=-1)  # noqa
    guided_sim = cos(ga, gp).diagonal().view(-1, 1)

    def mask(guided, sim, positive_mask=None):
        if strategy == "absolute":
            m = guided > (guided_sim - margin)
        else:
            m = guided > (guided_sim - guided_sim.abs() * margin)
        if positive_mask is not None:
            m = m & ~positive_mask
        sim[m] = -torch.inf
        return sim

    n = anchor.shape[0]
    scores = [mask(cos(ga, gp), cos(anchor, positive), torch.eye(n, dtype=torch.bool)),
              mask(cos(ga, ga), cos(anchor, anchor)), mask(cos(gp, gp), cos(positive, positive)),
              mask(cos(ga, gn), cos(anchor, negative))]
    return torch.nn.functional.cross_entropy(torch.cat(scores, dim=1) / temperature, torch.arange(n))


def gist_from_lse_rows(anchor, positive, negative, ga, gp, gn, temperature, margin, strategy, backend):
    unit = lambda t: torch.nn.functional.normalize(t, dim=1)  # noqa
    gpos = (unit(ga) * unit(gp)).sum(1)  # the guide's positive score: O(N·d)
    thr = gpos - margin if strategy == "absolute" else gpos - gpos.abs() * margin
    s = 1.0 / temperature
    n = anchor.shape[0]
    blocks = [fc.lse_rows(anchor, positive, s, normalize=True, keep=torch.arange(n), guide_queries=ga,
                          guide_keys=gp, guide_threshold=thr, backend=backend),
              fc.lse_rows(anchor, anchor, s, normalize=True, guide_queries=ga, guide_keys=ga, guide_threshold=thr,
                          backend=backend),
              fc.lse_rows(positive, positive, s, normalize=True, guide_queries=gp, guide_keys=gp,
                          guide_threshold=thr, backend=backend),
              fc.lse_rows(anchor, negative, s, normalize=True, guide_queries=ga, guide_keys=gn, guide_threshold=thr,
                          backend=backend)]
    pos = s * (unit(anchor) * unit(positive)).sum(1)
    return (torch.logsumexp(torch.stack(blocks), 0) - pos).mean()


@pytest.mark.parametrize("backend", backend_params("lse_rows", "cpu", ("reference", "dense", "cpu")))
@pytest.mark.parametrize("strategy,margin", [("absolute", 0.1), ("relative", 0.3)])
def test_gist_embed_loss_composes(backend, strategy, margin):
    g = torch.Generator().manual_seed(12)
    n, d, dg = 7, 8, 6
    a, p, neg = (torch.randn(n, d, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    base = torch.randn(n, dg, generator=g, dtype=torch.float64)  # a guide that finds some pairs alike
    ga, gp, gn = (base + 0.8 * torch.randn(n, dg, generator=g, dtype=torch.float64) for _ in range(3))
    want = gist_transcribed(a, p, neg, ga, gp, gn, 0.05, margin, strategy)
    got = gist_from_lse_rows(a, p, neg, ga, gp, gn, 0.05, margin, strategy, backend)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    for x, y in zip(torch.autograd.grad(got, [a, p, neg]), torch.autograd.grad(want, [a, p, neg])):
        torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-11)


# ------------------------------------------------------------------------------------ masks are honoured
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rule", ["exclude_same", "guide"])
def test_a_dropped_column_with_a_huge_logit_is_dropped(backend, rule):
    """Column 0 equals 50 × query 0 (logit 50·s·|q|²): an ignored mask makes lse_0 huge."""
    g = torch.Generator().manual_seed(4)
    q = torch.randn(5, 6, generator=g).to(DEV)
    k = torch.randn(9, 6, generator=g).to(DEV)
    k[0] = 50 * q[0]
    keep = torch.tensor([3, 1, 2, 3, 4], device=DEV)
    if rule == "exclude_same":
        kw = dict(row_ids=torch.arange(5, device=DEV), col_ids=torch.tensor([0, 9, 9, 9, 9, 9, 9, 9, 9],
                                                                            device=DEV), exclude_same=True)
    else:  # the guide sees column 0 as row 0's duplicate (score 1 > 0.9) and nothing else
        gk = torch.eye(9, 6, device=DEV)
        kw = dict(guide_queries=torch.eye(5, 6, device=DEV), guide_keys=gk,
                  guide_threshold=torch.full((5,), 0.9, device=DEV))
    got = fc.lse_rows(q, k, 2.0, keep=keep, **kw, backend=backend)
    want = torch.logsumexp(2.0 * q.double() @ k[1:].double().T, dim=1)
    assert float(got[0]) < 100  # ignored: 2·50·|q_0|² ≈ 600
    torch.testing.assert_close(got[0].double().cpu(), want[0].cpu(), rtol=1e-5, atol=1e-5)
    # the kept column is never dropped: keep_0 = 0 restores it
    keep[0] = 0
    assert float(fc.lse_rows(q, k, 2.0, keep=keep, **kw, backend=backend)[0]) > 100


@pytest.mark.parametrize("backend", BACKENDS)
def test_hardness_is_a_value_shift_only(backend):
    """pen = α·sg(S): the lse moves, the gradient is softmax(s·S + pen)·s, not ·(s + α)."""
    leaves, kw = make("all_negatives", 2, torch.float64)
    w = torch.ones(13, device=DEV, dtype=torch.float64)
    got = run(backend, leaves, kw, w)
    plain = run(backend, leaves, {"normalize": True}, w)
    assert rel(got[0], plain[0]) > 1e-2  # the penalty changes the value
    want = run("reference", leaves, kw, w)
    for a, b in zip(got, want):
        assert rel(a, b) < 1e-9


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_row_with_nothing_left_is_minus_inf_with_zero_gradient(backend):
    q = torch.randn(4, 5, dtype=torch.float64, device=DEV, requires_grad=True)
    k = torch.randn(6, 5, dtype=torch.float64, device=DEV, requires_grad=True)
    row_ids = torch.tensor([0, 1, 2, 3], device=DEV)
    col_ids = torch.tensor([0, 0, 0, 0, 0, 0], device=DEV)  # row 0 shares a group with every column
    out = fc.lse_rows(q, k, 2.0, row_ids=row_ids, col_ids=col_ids, exclude_same=True, backend=backend)
    assert out[0] == -math.inf and torch.isfinite(out[1:]).all()
    gq, gk = torch.autograd.grad(out[1:].sum(), (q, k))
    assert torch.isfinite(gq).all() and torch.isfinite(gk).all() and float(gq[0].abs().sum()) == 0.0
    ref = fc.lse_rows(q, k, 2.0, row_ids=row_ids, col_ids=col_ids, exclude_same=True, backend="reference")
    torch.testing.assert_close(out[1:], ref[1:])


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_never_passes(backend):
    leaves, kw = make("everything", 0, torch.float32)
    leaves["queries"][2, 1] = float("nan")
    out = fc.lse_rows(**leaves, **kw, backend=backend)
    assert torch.isnan(out[2])
    leaves, kw = make("guide", 0, torch.float32)
    kw["guide_keys"] = kw["guide_keys"].clone()
    kw["guide_keys"][3, 0] = float("nan")  # would compare False (nothing dropped): poisons every row instead
    assert torch.isnan(fc.lse_rows(**leaves, **kw, backend=backend)).all()
    with fc.debug(), pytest.raises(ValueError, match=r"guide_keys contains non-finite values"):
        fc.lse_rows(**leaves, **kw, backend=backend)
    leaves, kw = make("exclude", 0, torch.float32)
    kw["keep"] = kw["keep"].clone()
    kw["keep"][1] = 21  # outside [0, M): every output NaN, not a silently dropped positive
    assert torch.isnan(fc.lse_rows(**leaves, **kw, backend=backend)).all()
    with fc.debug(), pytest.raises(ValueError, match=r"keep must lie in \[0, 21\)"):
        fc.lse_rows(**leaves, **kw, backend=backend)


# ------------------------------------------------------------------------------- memory, syncs, dispatch
def _peak(n, fused):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(n, 16, generator=g).requires_grad_()
    k = torch.randn(n, 16, generator=g).requires_grad_()
    args = (q, k, torch.tensor(4.0), True, torch.arange(n), torch.arange(n) % 7, torch.arange(n) % 5, True,
            torch.randn(n, 4, generator=g), torch.randn(n, 4, generator=g), torch.zeros(n), torch.arange(n) >= n // 2,
            3.0, ALL)
    with PeakMemory() as pm:
        if fused:  # the tiles behind every fused backend without masks in its kernels
            out = kernel_impl("lse_rows", "tiles")(*args)
        else:
            out = fc.lse_rows(*args[:3], normalize=True, keep=args[4], row_ids=args[5], col_ids=args[6],
                              exclude_same=True, guide_queries=args[8], guide_keys=args[9],
                              guide_threshold=args[10], hard_cols=args[11], hardness_strength=3.0,
                              hardness_cells=ALL, backend="reference")
        out.sum().backward()
    return pm


def test_extra_memory_is_linear_in_n(monkeypatch):
    monkeypatch.setattr(_tiles, "rows_per_block", lambda *a: 64)
    tiled, ref = assert_linear_memory(_peak, largest=2048 * 2048 * 4 / 8)  # no N×M buffer, not even a boolean one
    assert tiled[2].peak < ref[2].peak / 8


def test_no_host_sync():
    leaves, kw = make("everything", 1, torch.float32, device="cpu")
    backend = "cpu" if fc.dispatch.unavailable_reason("lse_rows", "cpu", torch.device("cpu")) is None else "triton"
    leaves = {k: v.requires_grad_() for k, v in leaves.items()}
    with HostSyncs() as hs:
        fc.lse_rows(**leaves, **kw, backend=backend).sum().backward()
    assert hs.syncs == [], hs.syncs


def test_the_dispatcher_gives_masked_calls_the_tiles_on_csrc_backends():
    cpu = torch.device("cpu")
    for backend in ("cpu", "cuda"):
        if fc.dispatch.unavailable_reason("lse_rows", backend, cpu if backend == "cpu" else torch.device("cuda")):
            continue
        dev = cpu if backend == "cpu" else torch.device("cuda")
        assert resolve("lse_rows", backend, dev, 100, torch.float32).kernel == backend
        masked = resolve("lse_rows", backend, dev, 100, torch.float32, needs=("masks",))
        assert (masked.kernel, masked.backward_kernel) == ("tiles", "tiles")
        # an op without masks keeps its kernels whatever the call says it needs: nothing there lacks them
        assert resolve("infonce", backend, dev, 100, torch.float32).kernel == backend
    with pytest.raises(ValueError, match=r"needs must be a subset of \('masks', 'prefixes'\), got unknown"):
        resolve("lse_rows", "reference", cpu, 100, torch.float32, needs=("bias",))
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match="csrc"):  # no silent fallback below the dispatcher
        LM.bound("cpu", "cpu")(x, x, torch.ones(3), torch.ones(3), False, LM.Masks())


@pytest.mark.parametrize("backend", BACKENDS)
def test_double_backward_exact_or_clear_error(backend):
    leaves, kw = make("everything", 0, torch.float64 if backend in ("reference", "dense", "auto") else torch.float32,
                      n=4, m=6, d=3)
    leaves = {k: v.requires_grad_() for k, v in leaves.items()}
    out = fc.lse_rows(**leaves, **kw, backend=backend).sum()
    if backend in ("reference", "dense", "auto"):
        gq, = torch.autograd.grad(out, leaves["queries"], create_graph=True)
        gq.pow(2).sum().backward()  # exact: autograd's own graph
        assert torch.isfinite(leaves["keys"].grad).all()
        return
    with pytest.raises(RuntimeError, match=rf"fastcontrast: double backward is not supported by backend .* "
                                           r"fastcontrast::lse_(masked|pair)"):
        torch.autograd.grad(out, leaves["queries"], create_graph=True)


# ------------------------------------------------------------------------------------------ bad inputs
def _bad_cases():
    q, k = torch.randn(4, 3), torch.randn(5, 3)
    ids = dict(row_ids=torch.arange(4), col_ids=torch.arange(5))
    guide = dict(guide_queries=torch.randn(4, 2), guide_keys=torch.randn(5, 2), guide_threshold=torch.zeros(4))
    return [
        (dict(queries=q, keys=torch.randn(5, 2)), ValueError, "queries has per-sample shape .* but keys has"),
        (dict(keep=torch.zeros(3, dtype=torch.long)), ValueError, r"keep must have shape \(4,\)"),
        (dict(keep=torch.zeros(4)), TypeError, "keep must be an integer tensor"),
        (dict(row_ids=torch.arange(4)), ValueError, "col_ids is required"),
        (dict(row_ids=torch.arange(4), col_ids=torch.arange(5).float(), exclude_same=True), TypeError,
         "col_ids must be an integer tensor"),
        (dict(row_ids=torch.arange(4), col_ids=torch.arange(4), exclude_same=True), ValueError,
         r"col_ids must have shape \(5,\)"),
        (dict(exclude_same=True), ValueError, "exclude_same=True needs row_ids and col_ids"),
        (dict(**ids), ValueError, "row_ids/col_ids given but unused"),
        (dict(guide_queries=guide["guide_queries"], guide_keys=guide["guide_keys"]), ValueError,
         "guide_threshold required"),
        (dict(guide, guide_keys=torch.randn(5, 3)), ValueError, "must share their width"),
        (dict(guide, guide_threshold=torch.zeros(5)), ValueError, r"guide_threshold must have shape \(4,\)"),
        (dict(guide, guide_keys=torch.randn(4, 2)), ValueError, "guide_keys must have 5 rows"),
        (dict(hard_cols=torch.zeros(5, dtype=torch.bool)), ValueError, "hard_cols only selects hardness cells"),
        (dict(hard_cols=torch.zeros(5), hardness_cells={"same_hard"}, **ids), TypeError, "hard_cols must be a bool"),
        (dict(hardness_cells={"same_hard"}, hardness_strength=1.0), ValueError,
         "hardness_cells select cells by group"),
        (dict(hardness_cells={"hard"}, **ids), ValueError, "hardness_cells must be a subset"),
        (dict(hardness_cells="same_hard", **ids), TypeError, "hardness_cells must be a collection"),
        (dict(hardness_strength=-1.0), ValueError, "hardness_strength must be >= 0"),
        (dict(logit_scale="2"), TypeError, "logit_scale must be a float"),
        (dict(normalize=1), TypeError, "normalize must be a bool"),
    ]


@pytest.mark.parametrize("kw,exc,match", _bad_cases(), ids=lambda v: v if isinstance(v, str) else None)
def test_bad_inputs_name_the_argument(kw, exc, match):
    args = dict(queries=torch.randn(4, 3), keys=torch.randn(5, 3), logit_scale=2.0)
    args.update(kw)
    with pytest.raises(exc, match=match):
        fc.lse_rows(**args)


# ------------------------------------------------------------------------- the primitive's two kernels
def _primitive_case(seed, n, m, n_stat, n_id, dtype, guide_dtype):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 12, generator=g).to(DEV, dtype)
    y = torch.randn(m, 12, generator=g).to(DEV, dtype)
    a = (1 + torch.rand(n, generator=g)).to(DEV)
    c = (1 + torch.rand(m, generator=g)).to(DEV)
    gx, gy = torch.randn(n, 7, generator=g).to(DEV, guide_dtype), torch.randn(m, 7, generator=g).to(DEV, guide_dtype)
    masks = LM.Masks(keep=torch.randint(-1, m, (n,), generator=g).to(DEV),
                     row_ids=torch.randint(0, 3, (n,), generator=g).to(DEV),
                     col_ids=torch.randint(0, 3, (n_id,), generator=g).to(DEV), exclude_same=True, guide_x=gx,
                     guide_y=gy, guide_normalize=True, thr_r=_untied_thresholds(gx, gy, True, g).float().to(DEV),
                     thr_c=(_untied_thresholds(gy[:n_stat], gx, True, g).float().to(DEV) if n_stat else None),
                     pen_same=torch.rand(m, generator=g).to(DEV), pen_other=torch.rand(m, generator=g).to(DEV),
                     n_stat=n_stat)
    return x, y, a, c, masks


@pytest.mark.parametrize("dtype,guide_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                               (torch.bfloat16, torch.bfloat16)], ids=["fp32", "bf16+fp32guide",
                                                                                      "bf16"])
@pytest.mark.parametrize("n,m,n_stat,n_id", [(13, 21, 0, 21), (37, 150, 140, 100), (70, 45, 45, 30)],
                         ids=["rows", "split+cols", "cols"])
def test_triton_kernels_equal_the_tiles(dtype, guide_dtype, n, m, n_stat, n_id):
    """fastcontrast::lse_masked on the Triton kernels (the interpreter on a CPU) against its PyTorch tiles on the
    same inputs: row and column statistics, a column split of the forward grid (M = 150: 5 column tiles of 32 on
    the interpreter's 4 SMs), columns without ids, rows without a kept column (keep = -1), an fp32 guide beside
    16-bit features, and every gradient."""
    if fc.dispatch.unavailable_reason("lse_rows", "triton", DEV) is not None:
        pytest.skip("triton cannot run here")
    x, y, a, c, masks = _primitive_case(0, n, m, n_stat, n_id, dtype, guide_dtype)
    res = {}
    for kernel in ("triton", "tiles"):
        leaves = [t.detach().clone().requires_grad_() for t in (x, y, a, c)]
        lr, lc = LM.bound(kernel, kernel)(*leaves, True, masks)
        w_r = torch.linspace(0.5, 1.5, n, device=DEV)
        w_c = torch.linspace(1.5, 0.5, n_stat, device=DEV)
        loss = (lr * w_r).sum() + (torch.where(torch.isfinite(lc), lc, 0.0) * w_c).sum()
        res[kernel] = (lr, lc) + torch.autograd.grad(loss, leaves)
    for what, got, want in zip(("lse_r", "lse_c", "dx", "dy", "da", "dc"), res["triton"], res["tiles"]):
        assert torch.equal(torch.isinf(got), torch.isinf(want)), what
        fin = torch.isfinite(want)
        err = rel(got[fin], want[fin]) if fin.any() else 0.0
        assert err < (1e-5 if dtype == torch.float32 else 1e-2), (what, err)
