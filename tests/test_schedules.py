"""The papers' training schedules against transcriptions of the official lines (audit of 2026-12-02):
ALBEF's α warm-up (Pretrain.py:61-64) and random queue (model_pretrain.py:79-84); SwAV's queue start and use
(main_swav.py:71, 226-231, 294-304), prototype renormalisation (:277-281) and freeze (:83, 324-328); MM-TS float
cluster counts (main_lavila_finetune_mir.py:761) and the published run (avion/README.md:100-105, 130-133)."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fastcontrast as fc


# ------------------------------------------------------------------------------------------------ ALBEF
def official_albef_alpha(config_alpha, epoch, i, len_data_loader):  # Pretrain.py:61-64
    if epoch > 0:
        alpha = config_alpha
    else:
        alpha = config_alpha * min(1, i / len_data_loader)
    return alpha


def official_albef_queue(embed_dim, queue_size):  # model_pretrain.py:79-84 (buffers (D, Q), normalised over D)
    image_queue = torch.randn(embed_dim, queue_size)
    text_queue = torch.randn(embed_dim, queue_size)
    return nn.functional.normalize(image_queue, dim=0), nn.functional.normalize(text_queue, dim=0)


def test_albef_alpha_warmup_equals_official():
    loss = fc.CodisLoss(8, 4, queue_length=16, steps_per_epoch=10)
    for step in range(35):
        assert loss.alpha_at(step) == pytest.approx(official_albef_alpha(0.4, step // 10, step % 10, 10), abs=0)
    assert fc.CodisLoss(8, 4, queue_length=16, steps_per_epoch=10, alpha_warmup=False).alpha_at(0) == 0.4
    assert fc.CodisLoss(8, 4, queue_length=16).alpha_at(0) == 0.4  # no epoch length: the ramp cannot apply


def test_albef_random_queue_equals_official():
    torch.manual_seed(5)
    want_i, want_t = official_albef_queue(8, 32)
    torch.manual_seed(5)
    q_i, q_t = fc.FeatureQueue(32, 8, init="random", gather=False), fc.FeatureQueue(32, 8, init="random", gather=False)
    assert torch.equal(q_i.contents(), want_i.T) and torch.equal(q_t.contents(), want_t.T)
    assert q_i.filled == 32 and q_i.real == 0
    assert fc.FeatureQueue(32, 8).contents().shape == (0, 8)  # the earlier behaviour, init="empty"
    with pytest.raises(ValueError, match="init must be 'empty' or 'random'"):
        fc.FeatureQueue(4, 2, init="zeros")


def test_codis_step0_uses_alpha_0_and_the_random_queue():
    torch.manual_seed(0)
    d, n = 8, 6
    loss = fc.CodisLoss(d, 4, queue_length=16, sinkhorn_queue_length=8, steps_per_epoch=100, backend="reference")
    qi, qt = loss.queue_image.contents().clone(), loss.queue_text.contents().clone()
    x, y, tx, ty = (torch.randn(n, d) for _ in range(4))
    out = loss(x, y, tx, ty)
    s = 1 / torch.tensor(0.07)
    want = 0.5 * (fc.momentum_contrastive_loss(x, ty, tx, qt, s, 0.0, backend="reference")
                  + fc.momentum_contrastive_loss(y, tx, ty, qi, s, 0.0, backend="reference"))
    assert torch.allclose(out["itc"], want, rtol=1e-6)
    assert loss.steps == 1 and loss.alpha_at(50) == pytest.approx(0.2)


# ------------------------------------------------------------------------------------------------- SwAV
def official_swav_queue_use(steps, bs, queue_length, epoch_queue_starts, iters_per_epoch, feats):
    """main_swav.py:226-231 and 294-304 for one crop: which rows take part in each step's Sinkhorn."""
    queue, use_the_queue, used = None, False, []
    for it in range(steps):
        epoch = it // iters_per_epoch
        if it % iters_per_epoch == 0 and queue_length > 0 and epoch >= epoch_queue_starts and queue is None:
            queue = torch.zeros(queue_length, feats.shape[-1], dtype=feats.dtype)
        embedding = feats[it]
        rows = None
        if queue is not None:
            if use_the_queue or not torch.all(queue[-1, :] == 0):
                use_the_queue = True
                rows = queue.clone()
            queue[bs:] = queue[:-bs].clone()
            queue[:bs] = embedding
        used.append(rows)
    return used


def test_swav_queue_start_and_full_rule_equal_official():
    torch.manual_seed(1)
    bs, qlen, per_epoch, start, steps, d = 4, 12, 3, 2, 16, 6
    feats = F.normalize(torch.randn(steps, bs, d, dtype=torch.float64), dim=-1)
    want = official_swav_queue_use(steps, bs, qlen, start, per_epoch, feats)
    loss = fc.CodisLoss(d, 3, queue_length=32, sinkhorn_queue_length=qlen, steps_per_epoch=per_epoch,
                        sinkhorn_queue_start_epoch=start)
    loss.queue_image = fc.FeatureQueue(32, d, dtype=torch.float64, gather=False, init="random")
    for it in range(steps):
        k = loss.sinkhorn_queue_rows() if loss.sinkhorn_queue_started(it) else 0
        got = loss.queue_image.recent(k) if k else None
        if want[it] is None:
            assert got is None, it
        else:  # the Sinkhorn is blind to the queue's row order: compare as sets of rows
            assert got is not None and got.shape == want[it].shape, it
            assert torch.equal(got[torch.argsort(got[:, 0])], want[it][torch.argsort(want[it][:, 0])]), it
        # what CodisLoss.forward does after the loss: enqueue, count rows since the start
        loss.queue_image.enqueue(feats[it])
        if loss.sinkhorn_queue_started(it):
            loss._sk_rows = min(loss.queue_image.length, loss._sk_rows + loss.queue_image.last_added)
    assert any(w is None for w in want) and any(w is not None for w in want)  # both regimes were exercised


def test_codis_forward_applies_the_swav_queue_rule():
    torch.manual_seed(2)
    d, n = 8, 4
    loss = fc.CodisLoss(d, 4, queue_length=16, sinkhorn_queue_length=8, backend="reference")
    seen = []
    orig = loss.codebook_loss.forward

    def spy(*a, queue_image=None, queue_text=None, **kw):
        seen.append(None if queue_image is None else queue_image.shape[0])
        return orig(*a, queue_image=queue_image, queue_text=queue_text, **kw)

    loss.codebook_loss.forward = spy
    for _ in range(4):
        loss(*(torch.randn(n, d, requires_grad=True) for _ in range(2)), torch.randn(n, d), torch.randn(n, d))
    assert seen == [None, None, 8, 8]  # used only once 8 real rows are in (never the random init rows)
    part = fc.CodisLoss(d, 4, queue_length=16, sinkhorn_queue_length=8, sinkhorn_queue_when_full=False,
                        queue_init="empty", backend="reference")
    assert part.sinkhorn_queue_rows() == 0
    part(*(torch.randn(n, d) for _ in range(4)))
    assert part.sinkhorn_queue_rows() == 4  # the earlier behaviour: part-filled queues take part


def official_swav_prototype_step(w, z, q, tau):
    """main_swav.py:277-281 then the forward (a bias-free linear layer, no normalisation) and the loss."""
    with torch.no_grad():
        w.copy_(nn.functional.normalize(w.data.clone(), dim=1, p=2))
    out = z @ w.T
    return -torch.mean(torch.sum(q * F.log_softmax(out / tau, dim=1), dim=1))


def test_prototype_renormalisation_equals_official():
    torch.manual_seed(3)
    k, d, n = 5, 6, 7
    mod = fc.CodebookLoss(k, d, backend="reference")
    with torch.no_grad():
        mod.codebook.mul_(torch.rand(k, 1) * 3 + 0.5)  # what Adam/weight decay would do to the norms
    w = nn.Parameter(mod.codebook.detach().clone())
    zi, zt = (F.normalize(torch.randn(n, d, dtype=torch.float32), dim=1).requires_grad_() for _ in range(2))
    ti, tt = torch.randn(n, d), torch.randn(n, d)
    got = mod(zi, zt, ti, tt)
    got.backward()
    assert torch.allclose(mod.codebook.norm(dim=1), torch.ones(k))  # renormalised in place
    # targets from the renormalised codebook (the same Sinkhorn as the module), then SwAV's swapped loss
    cb = F.normalize(w.detach(), dim=1)
    q_i = fc.sinkhorn(F.normalize(ti, dim=1) @ cb.T, backend="reference")
    q_t = fc.sinkhorn(F.normalize(tt, dim=1) @ cb.T, backend="reference")
    want = 0.5 * (official_swav_prototype_step(w, zi.detach(), q_t, 0.1)
                  + official_swav_prototype_step(w, zt.detach(), q_i, 0.1))
    want.backward()
    assert torch.allclose(got, want, rtol=1e-5)
    assert torch.allclose(mod.codebook.grad, w.grad, rtol=1e-4, atol=1e-6)  # no gradient through a normalisation
    old = fc.CodebookLoss(k, d, backend="reference", renormalize=False)
    with torch.no_grad():
        old.codebook.mul_(2.0)
    old(zi, zt, ti, tt)
    assert torch.allclose(old.codebook.norm(dim=1), torch.full((k,), 2.0))  # the earlier behaviour: never touched


def test_prototype_freeze_equals_official():
    mod = fc.CodebookLoss(3, 4, backend="reference")
    x = torch.randn(5, 4)
    for iteration in range(316):  # SwAV: `if iteration < args.freeze_prototypes_niters: p.grad = None`
        mod.codebook.grad = torch.ones_like(mod.codebook)
        mod.steps = iteration + 1  # as after this iteration's training forward
        mod.freeze_prototypes_()
        assert (mod.codebook.grad is None) == (iteration < 313), iteration
    assert mod.freeze_steps == 313
    mod(x, x, x, x).backward()
    assert not mod.freeze_prototypes_(313) and mod.codebook.grad is not None


# ------------------------------------------------------------------------------------------------ MM-TS
def official_tau(global_step, clusters, alpha, period, cmin, cmax, smin, smax):
    base = alpha / 2 * math.cos(2 * math.pi * global_step / period)
    return base + (clusters - cmin) / (cmax - cmin) * (smax - smin) + smin


def test_mmts_float_cluster_counts_equal_official():
    counts = torch.tensor([3.0, 17.0, 250.0, 400.0])  # main_lavila_finetune_mir.py:761: `.float()`
    for step in (0, 7, 33):
        got = fc.mmts_temperature(counts, step, 100, 3, 400)
        want = official_tau(step, counts.double(), 0.08, int(100 / 5), 3, 400, 0.05, 0.20)
        assert torch.allclose(got.double(), want, rtol=1e-6)
    assert torch.allclose(fc.mmts_temperature(counts, 5, 100, 3, 400),
                          fc.mmts_temperature(counts.long(), 5, 100, 3, 400))


@pytest.mark.parametrize("cls", [fc.MMTSClipLoss, fc.MMTSMaxMarginLoss])
def test_published_run(cls):
    loss = cls.published(total_steps=100, c_min=1.0, c_max=50.0)
    assert (loss.alpha, loss.num_oscillations, loss.s_min, loss.s_max) == (0.2, 5, 0.17, 0.30)
    counts = torch.tensor([1.0, 50.0])
    tau_high = loss.temperatures(counts, step=40)  # period 100/5 = 20: cos(2π·40/20) = 1, +α/2
    assert torch.allclose(tau_high, torch.tensor([0.17 + 0.1, 0.30 + 0.1]))
    tau_low = loss.temperatures(counts, step=50)  # half a period on: −α/2
    assert torch.allclose(tau_low, torch.tensor([0.07, 0.20]))  # margins span [0.07, 0.40], not [0.01, 0.24]
    with pytest.raises(ValueError, match="published"):
        cls.published(alpha=0.1)


def test_schedule_state_survives_state_dict():
    torch.manual_seed(4)
    d = 8
    a = fc.CodisLoss(d, 4, queue_length=16, sinkhorn_queue_length=8, steps_per_epoch=3, backend="reference",
                     sinkhorn_queue_start_epoch=0)
    assert fc.CodisLoss(d, 4, queue_length=16, steps_per_epoch=3).sinkhorn_queue_started(44) is False  # epoch 15
    for _ in range(3):
        a(*(torch.randn(4, d, requires_grad=True) for _ in range(2)), torch.randn(4, d), torch.randn(4, d))
    b = fc.CodisLoss(d, 4, queue_length=16, sinkhorn_queue_length=8, steps_per_epoch=3, backend="reference")
    b.load_state_dict(a.state_dict())
    assert (b.steps, b._sk_rows, b.codebook_loss.steps, b.queue_image.real) == (3, 12, 3, 12)
    assert b.alpha_at(b.steps) == 0.4 and b.sinkhorn_queue_rows() == 8
    assert torch.equal(b.queue_image.contents(), a.queue_image.contents())
