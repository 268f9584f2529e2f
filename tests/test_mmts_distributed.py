"""MM-TS across ranks (gloo, 2 and 4 CPU processes) against the authors' DDP code, SergShel/MM-TS @0010879.

The ``official_*`` functions below transcribe avion/avion/losses/losses.py line by line (the non-horovod
branches; "losses.py:N" cites that file):
  gather_features                               :21-66 (torch.distributed branch :49-64)
  MMTSClipLoss._compute_tau / forward           :177-190 / :192-243
  MMTSMaxMarginRankingLoss._compute_tau/forward :358-371 / :373-428 (fix_norm=True)
τ's two parts are test_mmts_official.py's transcriptions of mmts_utils/temperature.py and shift.py. Every
rank's loss and feature gradients must equal the official code's on that rank (fp32, 1e-5 norm-relative) in
each (local_loss, gather_with_grad) mode, and one process on the concatenated batch where the math says so.
One spawn per world size runs every mode; the tests read its results.
"""
import datetime
import os
import sys
import tempfile
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.distributed.nn  # noqa: F401  (the official code imports it, losses.py:9)
import torch.multiprocessing as mp
import torch.nn.functional as F

import fastcontrast as fc
from fastcontrast.validate import rel_err
from test_mmts_official import (official_max_margin, official_mmts_clip, official_shift, official_sim_matrix,
                                official_tau_base)

N_LOCAL, D, D_IN = 5, 12, 7
TOTAL, STEP, CMIN, CMAX = 5000, 1234, 3, 400
ALPHA, NUM_OSC, SMIN, SMAX = 0.08, 5, 0.05, 0.20
PERIOD = int(TOTAL / NUM_OSC)  # number_steps_per_period = int(len(train_loader) * epochs / num_oscillations)
MODES = [(False, True), (False, False), (True, True), (True, False)]  # (local_loss, gather_with_grad)
LOSSES = ("clip", "max_margin")


# ------------------------------------------------------------------------- the official code's DDP branch
def official_gather_features(*feature_tensors, local_loss=False, gather_with_grad=False, rank=0, world_size=1):
    """losses.py:21-66 with use_horovod=False (:49-64)."""
    if gather_with_grad:
        all_features = [torch.cat(torch.distributed.nn.all_gather(f), dim=0) for f in feature_tensors]
    else:
        all_features = []
        for original in feature_tensors:
            buckets = [torch.zeros_like(original) for _ in range(world_size)]
            dist.all_gather(buckets, original)
            if not local_loss:
                buckets[rank] = original
            all_features.append(torch.cat(buckets, dim=0))
    return all_features


def official_compute_tau(global_step, clusters):
    """losses.py:177-190 (= :358-371)."""
    base_tau = official_tau_base(global_step, ALPHA, PERIOD)
    per_sample_shift = official_shift(clusters, CMIN, CMAX, SMIN, SMAX)
    return base_tau + per_sample_shift


def official_mmts_clip_forward(image_features, text_features, global_step, clusters, local_loss, gather_with_grad,
                               rank, world_size):
    """losses.py:192-243, world_size > 1 (cache_labels=False)."""
    all_image_features, all_text_features, all_clusters = official_gather_features(
        image_features, text_features, clusters, local_loss=local_loss, gather_with_grad=gather_with_grad,
        rank=rank, world_size=world_size)
    if local_loss:
        tau = official_compute_tau(global_step, clusters)
        logit_scale = (1.0 / tau).unsqueeze(1)
        logits_per_image = logit_scale * (image_features @ all_text_features.T)
        logits_per_text = logit_scale * (text_features @ all_image_features.T)
    else:
        tau = official_compute_tau(global_step, all_clusters)
        logit_scale = (1.0 / tau).unsqueeze(1)
        logits_per_image = logit_scale * (all_image_features @ all_text_features.T)
        logits_per_text = logit_scale * (all_text_features @ all_image_features.T)
    num_logits = logits_per_image.shape[0]
    labels = torch.arange(num_logits, dtype=torch.long)
    if world_size > 1 and local_loss:
        labels = labels + num_logits * rank
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


def official_mmts_max_margin_forward(image_features, text_features, global_step, clusters, local_loss,
                                     gather_with_grad, rank, world_size):
    """losses.py:373-428 with fix_norm=True."""
    all_image_features, all_text_features, all_clusters = official_gather_features(
        image_features, text_features, clusters, local_loss=local_loss, gather_with_grad=gather_with_grad,
        rank=rank, world_size=world_size)
    x = official_sim_matrix(all_text_features, all_image_features)
    n = x.size()[0]
    x1 = torch.diag(x)
    x1 = x1.unsqueeze(1)
    x1 = x1.expand(n, n)
    x1 = x1.contiguous().view(-1, 1)
    x1 = torch.cat((x1, x1), 0)
    x2 = x.view(-1, 1)
    x3 = x.transpose(0, 1).contiguous().view(-1, 1)
    x2 = torch.cat((x2, x3), 0)
    per_sample_margin = official_compute_tau(global_step, all_clusters)
    per_sample_margin_expanded = per_sample_margin.repeat_interleave(n)
    per_sample_margin_expanded = torch.cat([per_sample_margin_expanded, per_sample_margin_expanded], 0).unsqueeze(1)
    keep = torch.ones(x.shape) - torch.eye(x.shape[0])
    keep1 = keep.view(-1, 1)
    keep2 = keep.transpose(0, 1).contiguous().view(-1, 1)
    keep_idx = torch.nonzero(torch.cat((keep1, keep2), 0).flatten()).flatten()
    x1_ = torch.index_select(x1, dim=0, index=keep_idx)
    x2_ = torch.index_select(x2, dim=0, index=keep_idx)
    per_sample_margin_ = torch.index_select(per_sample_margin_expanded, dim=0, index=keep_idx)
    max_margin = F.relu(per_sample_margin_ - (x1_ - x2_))
    return max_margin.mean()


OFFICIAL = {"clip": official_mmts_clip_forward, "max_margin": official_mmts_max_margin_forward}
OURS = {"clip": fc.MMTSClipLoss, "max_margin": fc.MMTSMaxMarginLoss}


# -------------------------------------------------------------------------------------------------- data
def _data(world, loss):
    g = torch.Generator().manual_seed(7 if loss == "clip" else 8)
    x = F.normalize(torch.randn(world * N_LOCAL, D, generator=g, dtype=torch.float64), dim=1)
    y = F.normalize(torch.randn(world * N_LOCAL, D, generator=g, dtype=torch.float64), dim=1)
    if loss == "max_margin":  # unnormalised: the loss normalises (fix_norm)
        x, y = 3.0 * x, 0.5 * y
    # float counts, as the official loop passes them (main_lavila_finetune_mir.py:761)
    sizes = torch.randint(CMIN, CMAX + 1, (world * N_LOCAL,), generator=g).float()
    return x.float(), y.float(), sizes


def _encoder_data(world):
    g = torch.Generator().manual_seed(9)
    return (torch.randn(world * N_LOCAL, D_IN, generator=g), torch.randn(world * N_LOCAL, D_IN, generator=g),
            torch.randint(CMIN, CMAX + 1, (world * N_LOCAL,), generator=g).float(),
            torch.randn(D, D_IN, generator=g) / D_IN ** 0.5, torch.randn(D, D_IN, generator=g) / D_IN ** 0.5)


class TwoTower(torch.nn.Module):
    def __init__(self, wi, wt):
        super().__init__()
        self.i, self.t = torch.nn.Linear(D_IN, D, bias=False), torch.nn.Linear(D_IN, D, bias=False)
        with torch.no_grad():
            self.i.weight.copy_(wi)
            self.t.weight.copy_(wt)

    def forward(self, images, texts, normalize):
        xi, xt = self.i(images), self.t(texts)
        return (F.normalize(xi, dim=1), F.normalize(xt, dim=1)) if normalize else (xi, xt)


def _leaves(*ts):
    return [t.detach().clone().requires_grad_() for t in ts]


# ------------------------------------------------------------------------------------------------- worker
def _worker(rank, world, init_file, out_dir):
    os.environ.pop("TRITON_INTERPRET", None)  # children use the PyTorch/C++ paths: fast enough for the CPU
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))  # a lost peer is an error, not a hang
    res = {}
    try:
        sl = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)
        for loss in LOSSES:
            x_all, y_all, sizes_all = _data(world, loss)
            sizes = sizes_all[sl]
            for local, with_grad in MODES:
                key = (loss, local, with_grad)
                kw = dict(local_loss=local, gather_with_grad=with_grad, rank=rank, world_size=world)
                x, y = _leaves(x_all[sl], y_all[sl])
                with warnings.catch_warnings():  # torch.distributed.nn's all_gather warns it is deprecated
                    warnings.simplefilter("ignore")
                    want = OFFICIAL[loss](x, y, STEP, sizes, local, with_grad, rank, world)
                if not want.requires_grad:  # the official max-margin with local_loss and no gather grad
                    res[key] = dict(official_loss=want.detach(), official_has_grad=False)
                    try:
                        OURS[loss](TOTAL, CMIN, CMAX, **kw)
                    except ValueError as e:
                        res[key]["error"] = str(e)
                    continue
                want.backward()
                res[key] = dict(official_loss=want.detach(), official_dx=x.grad, official_dy=y.grad)
                module = OURS[loss](TOTAL, CMIN, CMAX, **kw)
                with warnings.catch_warnings(record=True) as seen:
                    warnings.simplefilter("always")
                    for how in ("cluster_sizes", "tau"):
                        x, y = _leaves(x_all[sl], y_all[sl])
                        if how == "tau":  # the official τ of this rank's samples, gathered by the module
                            got = module(x, y, tau=official_compute_tau(STEP, sizes))
                        else:
                            got = module(x, y, step=STEP, cluster_sizes=sizes)
                        got.backward()
                        res[key].update({f"{how}_loss": got.detach(), f"{how}_dx": x.grad, f"{how}_dy": y.grad})
                res[key]["warnings"] = [str(w.message) for w in seen]
        # DDP over a two-tower linear encoder, the global batch's loss (the authors' run: gather_with_grad)
        ii, tt, sizes_all, wi, wt = _encoder_data(world)
        for loss in LOSSES:
            for name, fn in (("ours", None), ("official", OFFICIAL[loss])):
                model = TwoTower(wi, wt)
                ddp = torch.nn.parallel.DistributedDataParallel(model)
                xi, xt = ddp(ii[sl], tt[sl], normalize=loss == "clip")
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    if fn is None:
                        out = OURS[loss](TOTAL, CMIN, CMAX, gather_with_grad=True, rank=rank, world_size=world)(
                            xi, xt, step=STEP, cluster_sizes=sizes_all[sl])
                    else:
                        out = fn(xi, xt, STEP, sizes_all[sl], False, True, rank, world)
                out.backward()  # DDP all-reduces and averages the parameter gradients
                grads = [p.grad.clone() for p in model.parameters()]
                res[("ddp", loss, name)] = dict(loss=out.detach(), grads=grads)
        # one τ for every pair (this package's extension): a number, a 0-d tensor and the vector agree
        x_all, y_all, _ = _data(world, "clip")
        m = fc.MMTSClipLoss(gather_with_grad=True, rank=rank, world_size=world)
        res["scalar_tau"] = [m(*_leaves(x_all[sl], y_all[sl]), tau=t).detach()
                             for t in (0.1, torch.tensor(0.1), torch.full((N_LOCAL,), 0.1))]
        # rank/world_size that disagree with the process group: an error on this rank, before any collective
        try:
            fc.MMTSClipLoss(TOTAL, CMIN, CMAX, rank=0, world_size=world + 1)(
                *_leaves(x_all[sl], y_all[sl]), step=STEP, cluster_sizes=sizes_all[sl])
        except ValueError as e:
            res["mismatch_error"] = str(e)
        torch.save(res, os.path.join(out_dir, f"r{rank}.pt"))
    finally:
        dist.barrier()  # no rank tears down gloo while a peer's send is still in flight
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skip interpreter-exit destructors racing gloo's threads (see test_distributed.py)


@pytest.fixture(scope="module", params=[2, 4], ids=["world2", "world4"])
def run(request):
    world = request.param
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_worker, args=(world, os.path.join(d, "init"), d), nprocs=world, join=True)
        return world, [torch.load(os.path.join(d, f"r{r}.pt")) for r in range(world)]


def _one_process(world, loss):
    """The official single-process loss (test_mmts_official.py) on the concatenated batch, float64."""
    x_all, y_all, sizes_all = _data(world, loss)
    x, y = _leaves(x_all.double(), y_all.double())
    tau = official_compute_tau(STEP, sizes_all).double()
    out = official_mmts_clip(x, y, tau) if loss == "clip" else official_max_margin(x, y, tau)
    out.backward()
    return out.detach(), x.grad, y.grad


# -------------------------------------------------------------------------------------------------- tests
TRAINED = [(lo, m) for lo in LOSSES for m in MODES if not (lo == "max_margin" and m == (True, False))]


@pytest.mark.parametrize("loss,mode", TRAINED, ids=[f"{lo}-local{m[0]:d}-grad{m[1]:d}" for lo, m in TRAINED])
def test_equals_the_official_ddp_branch(run, loss, mode):
    world, results = run
    for r, res in enumerate(results):
        got = res[(loss, *mode)]
        assert not [w for w in got["warnings"] if "deprecated" in w], got["warnings"]
        for how in ("cluster_sizes", "tau"):
            for k in ("loss", "dx", "dy"):
                assert torch.isfinite(got[f"{how}_{k}"]).all()
                err = rel_err(got[f"{how}_{k}"], got[f"official_{k}"])
                assert err <= 1e-5, (world, r, how, k, err)


@pytest.mark.parametrize("loss,mode", TRAINED, ids=[f"{lo}-local{m[0]:d}-grad{m[1]:d}" for lo, m in TRAINED])
def test_equals_one_process_on_the_concatenated_batch(run, loss, mode):
    world, results = run
    local, with_grad = mode
    want, dx, dy = _one_process(world, loss)
    losses = torch.stack([res[(loss, *mode)]["cluster_sizes_loss"] for res in results])
    if local and loss == "clip":  # each rank its rows' terms: their mean is the global loss
        assert rel_err(losses.double().mean(), want) <= 1e-5
    else:  # the global loss on every rank
        for r in range(world):
            assert rel_err(losses[r], want) <= 1e-5, r
    if local and not with_grad:
        return  # only the rows' own terms reach the local features: no one-process counterpart
    factor = world if with_grad else 1  # gathered with grad: every rank's ∂L/∂x summed into the local slice
    for r, res in enumerate(results):
        sl = slice(r * N_LOCAL, (r + 1) * N_LOCAL)
        assert rel_err(res[(loss, *mode)]["cluster_sizes_dx"], factor * dx[sl]) <= 1e-5, r
        assert rel_err(res[(loss, *mode)]["cluster_sizes_dy"], factor * dy[sl]) <= 1e-5, r


def test_max_margin_local_loss_without_gather_grad_is_refused(run):
    """The official loss there has no gradient at all (every gathered slice detached): refused, clearly."""
    world, results = run
    for res in results:
        got = res[("max_margin", True, False)]
        assert got["official_has_grad"] is False
        assert "local_loss=True with gather_with_grad=False" in got["error"]


@pytest.mark.parametrize("loss", LOSSES)
def test_ddp_encoder_gradients_equal_official_and_the_full_batch(run, loss):
    world, results = run
    ii, tt, sizes_all, wi, wt = _encoder_data(world)
    wi, wt = _leaves(wi.double(), wt.double())
    xi, xt = ii.double() @ wi.T, tt.double() @ wt.T
    tau = official_compute_tau(STEP, sizes_all).double()
    if loss == "clip":
        full = official_mmts_clip(F.normalize(xi, dim=1), F.normalize(xt, dim=1), tau)
    else:
        full = official_max_margin(xi, xt, tau)
    full.backward()
    for r, res in enumerate(results):
        ours, official = res[("ddp", loss, "ours")], res[("ddp", loss, "official")]
        assert rel_err(ours["loss"], official["loss"]) <= 1e-5 and rel_err(ours["loss"], full) <= 1e-5
        for g, go, gf in zip(ours["grads"], official["grads"], (wi.grad, wt.grad)):
            assert rel_err(g, go) <= 1e-5, r
            assert rel_err(g, gf) <= 1e-5, r  # DDP's average of the world× feature gradients: ∂L/∂θ


def test_one_tau_for_every_pair(run):
    world, results = run
    x_all, y_all, _ = _data(world, "clip")
    want = official_mmts_clip(x_all.double(), y_all.double(), torch.full((world * N_LOCAL,), 0.1, dtype=torch.float64))
    for res in results:
        for got in res["scalar_tau"]:
            assert rel_err(got, want) <= 1e-5


def test_rank_and_world_size_must_match_the_process_group(run):
    world, results = run
    for res in results:
        assert f"world_size={world + 1} disagree with torch.distributed" in res["mismatch_error"]


def test_constructor_checks_and_published_defaults():
    with pytest.raises(ValueError, match=r"rank must lie in \[0, world_size\) = \[0, 2\), got 2"):
        fc.MMTSClipLoss(rank=2, world_size=2)
    with pytest.raises(ValueError, match="world_size must be >= 1, got 0"):
        fc.MMTSMaxMarginLoss(world_size=0)
    with pytest.raises(ValueError, match="local_loss=True with gather_with_grad=False"):
        fc.MMTSMaxMarginLoss(local_loss=True, world_size=2, rank=1)
    m = fc.MMTSMaxMarginLoss.published(100, 1, 10, rank=1, world_size=4)
    assert m.gather_with_grad and not m.local_loss and (m.rank, m.world_size) == (1, 4)
    assert not fc.MMTSClipLoss.published(100, 1, 10, gather_with_grad=False).gather_with_grad
    # the constructor defaults are the official classes' (losses.py:145-146, 334-335)
    c = fc.MMTSClipLoss()
    assert (c.local_loss, c.gather_with_grad, c.rank, c.world_size) == (False, False, 0, 1)
