"""MM-TS as its authors' code computes it (SergShel/MM-TS @0010879), on every backend.

The ``official_*`` functions below are line-by-line transcriptions of that code (single process):
  avion/mmts_utils/temperature.py  compute_tau_base
  avion/mmts_utils/shift.py        compute_cluster_based_shift
  avion/avion/losses/losses.py     MMTSClipLoss.forward, MMTSMaxMarginRankingLoss.forward (fix_norm=True),
                                   MaxMarginRankingLoss.forward (the AVION baseline, margin 0.2), sim_matrix
Everything is compared in float64 on the backends that compute in float64, in float32 on Triton.
"""
import pytest
import torch
import torch.nn.functional as F

import fastcontrast as fc
from _ops import backend_params
from conftest import kernel_device
from fastcontrast.clusters import ClusterIndex, from_labels, kmeans
from fastcontrast.validate import rel_err


# ------------------------------------------------------------------------------------ official transcriptions
def official_tau_base(global_step, alpha, number_steps_per_period):
    global_step = torch.tensor(global_step, dtype=torch.float32)
    number_steps_per_period = torch.tensor(number_steps_per_period, dtype=torch.float32)
    return 0.5 * (alpha * (1.0 + torch.cos(2.0 * torch.pi * global_step / number_steps_per_period)) - alpha)


def official_shift(clusters, min_cluster_size, max_cluster_size, min_shift, max_shift):
    return (clusters - min_cluster_size) / (max_cluster_size - min_cluster_size) * (max_shift - min_shift) + min_shift


def official_tau(global_step, clusters, alpha, period, cmin, cmax, smin, smax):
    return official_tau_base(global_step, alpha, period) + official_shift(clusters, cmin, cmax, smin, smax)


def official_mmts_clip(image_features, text_features, tau):
    logit_scale = (1.0 / tau).unsqueeze(1)
    logits_per_image = logit_scale * (image_features @ text_features.T)
    logits_per_text = logit_scale * (text_features @ image_features.T)
    labels = torch.arange(logits_per_image.shape[0])
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


def official_sim_matrix(a, b, eps=1e-8):
    a_n, b_n = a.norm(dim=1)[:, None], b.norm(dim=1)[:, None]
    a_norm = a / torch.max(a_n, eps * torch.ones_like(a_n))
    b_norm = b / torch.max(b_n, eps * torch.ones_like(b_n))
    return torch.mm(a_norm, b_norm.transpose(0, 1))


def official_max_margin(image_features, text_features, per_sample_margin):
    """MMTSMaxMarginRankingLoss.forward with fix_norm=True; a float margin gives MaxMarginRankingLoss."""
    x = official_sim_matrix(text_features, image_features)
    n = x.size()[0]
    x1 = torch.diag(x).unsqueeze(1).expand(n, n).contiguous().view(-1, 1)
    x1 = torch.cat((x1, x1), 0)
    x2 = x.view(-1, 1)
    x3 = x.transpose(0, 1).contiguous().view(-1, 1)
    x2 = torch.cat((x2, x3), 0)
    if isinstance(per_sample_margin, torch.Tensor):
        m = per_sample_margin.repeat_interleave(n)
        m = torch.cat([m, m], 0).unsqueeze(1)
    else:
        m = per_sample_margin
    keep = torch.ones(x.shape, dtype=x.dtype) - torch.eye(x.shape[0], dtype=x.dtype)
    keep1 = keep.view(-1, 1)
    keep2 = keep.transpose(0, 1).contiguous().view(-1, 1)
    keep_idx = torch.nonzero(torch.cat((keep1, keep2), 0).flatten()).flatten()
    x1_ = torch.index_select(x1, dim=0, index=keep_idx)
    x2_ = torch.index_select(x2, dim=0, index=keep_idx)
    if isinstance(m, torch.Tensor):
        m = torch.index_select(m, dim=0, index=keep_idx)
    return F.relu(m - (x1_ - x2_)).mean()


# ----------------------------------------------------------------------------------------------------- tests
ALPHA, NUM_OSC, SMIN, SMAX = 0.08, 5, 0.05, 0.20
BACKENDS = ["reference", "dense", "cpu", "triton"]


def _setup(n, d, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    txt = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    sizes = torch.randint(3, 400, (n,), generator=g)
    return img, txt, sizes


def _dtype(backend):
    return torch.float32 if backend == "triton" else torch.float64


def _tol(dtype):
    return 1e-10 if dtype == torch.float64 else 2e-5


@pytest.mark.parametrize("step", [0, 37, 250, 999, 1000])
def test_temperature_equals_official(step):
    total, cmin, cmax = 1000, 2, 500
    sizes = torch.tensor([2, 3, 17, 250, 499, 500])
    got = fc.mmts_temperature(sizes, step, total, cmin, cmax)
    want = official_tau(step, sizes, ALPHA, int(total / NUM_OSC), cmin, cmax, SMIN, SMAX)
    assert got.dtype == want.dtype == torch.float32 and torch.allclose(got, want, rtol=1e-6, atol=0)
    assert got.min() >= 0.05 - 0.04 - 1e-7 and got.max() <= 0.20 + 0.04 + 1e-7


def _module_equals_official(module_cls, official_loss, backend, n, d, seed, scale_in=1.0, scale_txt=1.0):
    img, txt, sizes = _setup(n, d, seed, torch.float64)
    img, txt = img * scale_in, txt * scale_txt
    total, step, cmin, cmax = 5000, 1234, 3, 400
    tau = official_tau(step, sizes, ALPHA, int(total / NUM_OSC), cmin, cmax, SMIN, SMAX)
    want_leaves = [t.clone().requires_grad_() for t in (img, txt)]
    want = official_loss(*want_leaves, tau)
    want.backward()
    dt = _dtype(backend)
    dev = kernel_device() if backend == "triton" else torch.device("cpu")
    leaves = [t.to(dev, dt).requires_grad_() for t in (img, txt)]
    module = module_cls(total_steps=total, c_min=cmin, c_max=cmax, backend=backend)
    loss = module(*leaves, step=step, tau=tau.to(dev))  # the official τ: the loss alone is compared
    loss.backward()
    tol = _tol(dt)
    assert rel_err(loss, want) <= tol
    for a, b in zip(leaves, want_leaves):
        assert rel_err(a.grad, b.grad) <= tol
    # τ from the cluster sizes: differs from the official τ by its float32 rounding only
    assert rel_err(module(*leaves, step=step, cluster_sizes=sizes.to(dev)), want) <= max(tol, 1e-6)


@pytest.mark.parametrize("backend", backend_params("infonce", kernel_device(), BACKENDS))
@pytest.mark.parametrize("n,d,seed", [(7, 12, 0), (33, 40, 1), (64, 8, 2)])
def test_mmts_clip_loss_equals_official(backend, n, d, seed):
    _module_equals_official(fc.MMTSClipLoss, official_mmts_clip, backend, n, d, seed)


@pytest.mark.parametrize("backend", backend_params("max_margin", kernel_device(), BACKENDS))
@pytest.mark.parametrize("n,d,seed", [(7, 12, 0), (33, 40, 1)])
def test_mmts_max_margin_equals_official(backend, n, d, seed):
    # unnormalised inputs: the official loss normalises (fix_norm)
    _module_equals_official(fc.MMTSMaxMarginLoss, official_max_margin, backend, n, d, seed, 3.0, 0.5)


@pytest.mark.parametrize("backend", backend_params("max_margin", kernel_device(), BACKENDS))
def test_baseline_max_margin_equals_official_and_sum_is_2n_minus_2_times(backend):
    img, txt, _ = _setup(16, 24, 3, torch.float64)
    dt = _dtype(backend)
    dev = kernel_device() if backend == "triton" else torch.device("cpu")
    x, y = img.to(dev, dt), txt.to(dev, dt)
    want = official_max_margin(img, txt, 0.2)
    got = fc.MaxMarginLoss(backend=backend)(x, y)
    assert rel_err(got, want) <= _tol(dt)
    summed = fc.max_margin_loss(x, y, 0.2, reduction="sum", backend=backend)
    assert rel_err(summed, 2 * (16 - 1) * want) <= _tol(dt)


@pytest.mark.parametrize("backend", backend_params("max_margin", kernel_device(), BACKENDS))
def test_per_sample_margin_with_labels_matches_reference(backend):
    """Rectangular batches with labels (several images share a text): fused mean reduction = reference."""
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(11, 16, generator=g), torch.randn(7, 16, generator=g)
    labels = torch.randint(0, 7, (11,), generator=g)
    m = 0.05 + 0.2 * torch.rand(11, generator=g)
    dev = kernel_device() if backend == "triton" else torch.device("cpu")
    want = fc.max_margin_loss(x.double(), y.double(), m.double(), labels=labels, backend="reference")
    got = fc.max_margin_loss(x.to(dev), y.to(dev), m.to(dev), labels=labels.to(dev), backend=backend)
    assert rel_err(got, want) <= 2e-5


def test_module_takes_a_tau_vector_and_total_steps_in_forward():
    img, txt, sizes = _setup(9, 8, 4, torch.float64)
    tau = fc.mmts_temperature(sizes, 10, 100, 3, 400)
    a = fc.MMTSClipLoss(c_min=3, c_max=400)(img, txt, step=10, cluster_sizes=sizes, total_steps=100)
    b = fc.MMTSClipLoss()(img, txt, tau=tau)
    assert torch.allclose(a, b) and torch.allclose(b, official_mmts_clip(img, txt, tau))


def test_mmts_bad_inputs():
    sizes = torch.tensor([3, 4, 5])
    with pytest.raises(TypeError, match="cluster_sizes must hold positive numbers"):
        fc.mmts_temperature(sizes > 3, 0, 100, 1, 10)
    with pytest.raises(ValueError, match=r"cluster_sizes must have shape \(N,\)"):
        fc.mmts_temperature(sizes[None], 0, 100, 1, 10)
    with fc.debug():
        with pytest.raises(ValueError, match="cluster_sizes must hold positive numbers"):
            fc.mmts_temperature(torch.tensor([3, 0, 5]), 0, 100, 1, 10)
    with pytest.raises(ValueError, match=r"step must lie in \[0, total_steps\] = \[0, 100\]"):
        fc.mmts_temperature(sizes, 101, 100, 1, 10)
    with pytest.raises(ValueError, match="c_max must exceed c_min"):
        fc.mmts_temperature(sizes, 0, 100, 5, 5)
    with pytest.raises(ValueError, match="total_steps .* must be at least num_oscillations"):
        fc.mmts_temperature(sizes, 0, 3, 1, 10)
    x = torch.randn(3, 8)
    with pytest.raises(ValueError, match=r"tau_image must have shape \(3,\)|tau_image must be a scalar or have shape"):
        fc.adaptive_temperature_clip_loss(x, x, torch.full((4,), 0.1))
    with pytest.raises(ValueError, match=r"margin must be a number, a one-element tensor or have shape \(3,\)"):
        fc.max_margin_loss(x, x, torch.full((4,), 0.1))
    with pytest.raises(ValueError, match="reduction must be 'mean'"):
        fc.max_margin_loss(x, x, 0.2, reduction="none")
    with pytest.raises(ValueError, match="c_min and c_max .* are required"):
        fc.MMTSClipLoss(total_steps=10)(x, x, 0, cluster_sizes=sizes)
    with pytest.raises(ValueError, match="either cluster_sizes or tau"):
        fc.MMTSClipLoss(total_steps=10, c_min=1, c_max=9)(x, x, 0, cluster_sizes=sizes, tau=torch.full((3,), .1))


# ----------------------------------------------------------------------------------------------- clustering
def test_kmeans_recovers_separated_clusters_in_batches(tmp_path):
    g = torch.Generator().manual_seed(1)
    centres = torch.randn(6, 16, generator=g) * 8
    truth = torch.randint(0, 6, (5000,), generator=g)
    emb = centres[truth] + torch.randn(5000, 16, generator=g)
    idx = kmeans(emb, 6, batch_size=700, seed=0)
    # each found cluster is exactly one true cluster (a permutation), whatever the batch size
    pairs = torch.unique(torch.stack([idx.ids, truth]), dim=1)
    assert pairs.shape[1] == 6
    assert torch.equal(idx.ids, kmeans(emb, 6, batch_size=100_000, seed=0).ids)
    assert int(idx.sizes.sum()) == 5000 and torch.equal(idx.sizes_of(), idx.sizes[idx.ids])
    assert sorted(idx.sizes.tolist()) == sorted(torch.bincount(truth).tolist())
    idx.save(tmp_path / "c.pt")
    back = ClusterIndex.load(tmp_path / "c.pt")
    assert torch.equal(back.ids, idx.ids) and (back.c_min, back.c_max) == (idx.c_min, idx.c_max)


def test_cluster_sizes_from_labels_feed_the_temperature():
    labels = torch.tensor([0, 0, 0, 1, 2, 2])
    idx = from_labels(labels)
    assert idx.sizes.tolist() == [3, 1, 2] and (idx.c_min, idx.c_max) == (1, 3)
    sizes = idx.sizes_of(torch.tensor([0, 3, 4]))
    tau = fc.mmts_temperature(sizes, 0, 100, idx.c_min, idx.c_max)
    assert torch.allclose(tau, torch.tensor([0.20, 0.05, 0.125]) + 0.04)  # τ_base(0) = α/2
    with pytest.raises(ValueError, match="labels must be >= 0"):
        from_labels(torch.tensor([0, -1]))
    with pytest.raises(ValueError, match="n_clusters .* must not exceed"):
        kmeans(torch.randn(3, 2), 4)
