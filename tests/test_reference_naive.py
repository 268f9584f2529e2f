"""The references agree with naive materialise-everything formulas written here, element by element."""
import math

import pytest
import torch

import fastcontrast as fc
from fastcontrast.losses.oblique_clip_loss import oblique_flat_reference

D = dict(dtype=torch.float64)


def naive_infonce(x, y, a, c, bias, labels):
    """Loops over pairs, exactly SPEC §1 with per-row scale a and per-column scale c."""
    n, m = x.shape[0], y.shape[0]
    s = [[float(x[i] @ y[j]) for j in range(m)] for i in range(n)]
    total = 0.0
    for i in range(n):
        p = int(labels[i])
        row = [a[i] * s[i][j] + bias for j in range(m)]
        col = [c[p] * s[k][p] + bias for k in range(n)]
        lse_r = math.log(sum(math.exp(v) for v in row))
        lse_c = math.log(sum(math.exp(v) for v in col))
        total += 0.5 * ((lse_r - row[p]) + (lse_c - col[i]))
    return total / n


@pytest.mark.parametrize("n,m", [(6, 6), (5, 8)])
def test_clip_matches_naive(n, m):
    x, y = torch.randn(n, 7, **D), torch.randn(m, 7, **D)
    labels = torch.arange(n) if n == m else torch.randint(0, m, (n,))
    got = fc.clip_loss(x, y, 2.5, -0.4, labels=labels, backend="reference")
    want = naive_infonce(x, y, [2.5] * n, [2.5] * m, -0.4, labels)
    assert abs(float(got) - want) < 1e-10


def test_clip_normalize_matches_naive():
    x, y = torch.randn(5, 4, **D) * 3, torch.randn(5, 4, **D) * 0.2
    got = fc.clip_loss(x, y, 10.0, normalize=True, backend="reference")
    xn = x / x.norm(dim=1, keepdim=True)
    yn = y / y.norm(dim=1, keepdim=True)
    assert abs(float(got) - naive_infonce(xn, yn, [10.0] * 5, [10.0] * 5, 0.0, torch.arange(5))) < 1e-10


def test_adaptive_matches_naive():
    x, y = torch.randn(6, 5, **D), torch.randn(6, 5, **D)
    ti, tt = 0.1 + torch.rand(6, **D), 0.1 + torch.rand(6, **D)
    got = fc.adaptive_temperature_clip_loss(x, y, ti, tt, backend="reference")
    want = naive_infonce(x, y, (1 / ti).tolist(), (1 / tt).tolist(), 0.0, torch.arange(6))
    assert abs(float(got) - want) < 1e-10


def test_oblique_matches_naive_and_flat_route():
    n, k, d = 4, 3, 5
    x, y = torch.randn(n, k, d, **D), torch.randn(n, k, d, **D)
    s = [[sum(float(x[i, t] @ y[j, t] / (x[i, t].norm() * y[j, t].norm())) for t in range(k))
          for j in range(n)] for i in range(n)]
    for i in range(n):
        for j in range(n):
            assert -k <= s[i][j] <= k
    naive = 0.0
    for i in range(n):
        row = [1.7 * s[i][j] for j in range(n)]
        col = [1.7 * s[q][i] for q in range(n)]
        naive += 0.5 * (math.log(sum(map(math.exp, row))) - row[i] + math.log(sum(map(math.exp, col))) - col[i])
    naive /= n
    got = fc.oblique_clip_loss(x, y, 1.7, backend="reference")
    assert abs(float(got) - naive) < 1e-10
    assert abs(float(oblique_flat_reference(x, y, 1.7)) - naive) < 1e-10


@pytest.mark.parametrize("hardest", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("per_sample", [False, True])
def test_max_margin_matches_naive(hardest, reduction, per_sample):
    n, m = 5, 7
    x, y = torch.randn(n, 4, **D), torch.randn(m, 4, **D)
    labels = torch.tensor([3, 0, 6, 6, 1])
    mg = [0.1, 0.25, 0.3, 0.05, 0.2] if per_sample else [0.25] * n
    got = fc.max_margin_loss(x, y, torch.tensor(mg, **D) if per_sample else mg[0], labels=labels, hardest=hardest,
                             normalize=False, reduction=reduction, backend="reference")
    s = (x @ y.T).tolist()
    total, terms = 0.0, 0
    for i in range(n):
        p = int(labels[i])
        pos = s[i][p]
        r = [max(0.0, mg[i] - pos + s[i][j]) for j in range(m) if j != p]
        c = [max(0.0, mg[i] - pos + s[k][p]) for k in range(n) if int(labels[k]) != p]
        if hardest:
            total += (max(r) if r else 0.0) + (max(c) if c else 0.0)
            terms += 2
        else:
            total += sum(r) + sum(c)
            terms += len(r) + len(c)
    want = total / terms if reduction == "mean" else total / n
    assert abs(float(got) - want) < 1e-10


def test_codebook_matches_naive():
    n, k, d, tau = 6, 4, 5, 0.3
    zi, zt, ti, tt = (torch.randn(n, d, **D) for _ in range(4))
    c = torch.randn(k, d, **D)
    got = fc.codebook_loss(zi, zt, ti, tt, c, tau=tau, epsilon=0.5, n_iters=4, normalize_features=False,
                           normalize_codes=False, backend="reference")

    def sk(scores):  # textbook (non-log) Sinkhorn, columns then rows
        q = [[math.exp(v / 0.5) for v in row] for row in scores]
        for _ in range(4):
            cs = [sum(q[i][j] for i in range(n)) for j in range(k)]
            q = [[q[i][j] / cs[j] * n / k for j in range(k)] for i in range(n)]
            q = [[v / sum(row) for v in row] for row in q]
        return q

    def ce(z, q):
        tot = 0.0
        for i in range(n):
            lg = [float(z[i] @ c[j]) / tau for j in range(k)]
            lse = math.log(sum(map(math.exp, lg)))
            tot -= sum(q[i][j] * (lg[j] - lse) for j in range(k))
        return tot / n

    want = (ce(zi, sk((tt @ c.T).tolist())) + ce(zt, sk((ti @ c.T).tolist()))) / 2  # SwAV: the mean of the two
    assert abs(float(got) - want) < 1e-9


def test_sinkhorn_marginals():
    scores = torch.randn(37, 11, **D)
    q = fc.sinkhorn(scores, epsilon=0.5, n_iters=200)
    assert torch.allclose(q.sum(1), torch.ones(37, **D), atol=1e-4)
    assert torch.allclose(q.sum(0), torch.full((11,), 37 / 11, **D), atol=1e-4)
    assert (q >= 0).all()


def test_cosine_schedule_endpoints():
    assert fc.cosine_schedule(0, 100, 0.01, 0.1) == pytest.approx(0.1)
    assert fc.cosine_schedule(50, 100, 0.01, 0.1) == pytest.approx(0.01)
    assert fc.cosine_schedule(100, 100, 0.01, 0.1) == pytest.approx(0.1)
    t = fc.cosine_schedule(torch.tensor([25.0]), 100, 0.0, 2.0)
    assert torch.allclose(t, torch.tensor([1.0]))
