"""CODIS on SwAV's and ALBEF's definitions (CODIS has no public code), on every backend.

The ``swav_*`` and ``albef_*`` functions are transcriptions of the official code:
  facebookresearch/swav @06b1b7c main_swav.py: distributed_sinkhorn (world size 1), the queue in train(), the loss
  salesforce/ALBEF @b9727e4 models/model_pretrain.py: ALBEF.forward (ITA with momentum distillation),
                            _dequeue_and_enqueue
"""
import pytest
import torch
import torch.nn.functional as F

import fastcontrast as fc
from _ops import backend_params
from conftest import kernel_device
from fastcontrast.validate import rel_err

BACKENDS = ["reference", "dense", "cpu", "triton"]


# ------------------------------------------------------------------------------------ official transcriptions
def swav_sinkhorn(out, epsilon=0.05, iters=3, world_size=1):
    Q = torch.exp(out / epsilon).t()
    B = Q.shape[1] * world_size
    K = Q.shape[0]
    sum_Q = torch.sum(Q)
    Q /= sum_Q
    for it in range(iters):
        sum_of_rows = torch.sum(Q, dim=1, keepdim=True)
        Q /= sum_of_rows
        Q /= K
        Q /= torch.sum(Q, dim=0, keepdim=True)
        Q /= B
    Q *= B
    return Q.t()


def swav_swapped_loss(student_a, student_b, teacher_a, teacher_b, prototypes, queue_a=None, queue_b=None,
                      temperature=0.1):
    """Two 'crops' (the image and the text side), each assigning for the other, as main_swav.py's train()."""
    protos = F.normalize(prototypes, dim=1)  # SwAV normalises the prototype weights before every step
    output = torch.cat([F.normalize(student_a, dim=1), F.normalize(student_b, dim=1)]) @ protos.T
    bs = student_a.shape[0]
    loss = 0
    for crop_id, (teacher, queue) in enumerate(((teacher_a, queue_a), (teacher_b, queue_b))):
        with torch.no_grad():
            out = F.normalize(teacher, dim=1) @ protos.T
            if queue is not None:
                out = torch.cat((torch.mm(F.normalize(queue, dim=1), protos.t()), out))
            q = swav_sinkhorn(out)[-bs:]
        v = 1 - crop_id
        x = output[bs * v: bs * (v + 1)] / temperature
        loss -= torch.mean(torch.sum(q * F.log_softmax(x, dim=1), dim=1))
    return loss / 2


def albef_ita(image_feat, text_feat, image_feat_m, text_feat_m, image_queue, text_queue, temp, alpha):
    """ALBEF.forward's ITA with queues given as (D, Q), features normalised as ALBEF does."""
    image_feat, text_feat = F.normalize(image_feat, dim=-1), F.normalize(text_feat, dim=-1)
    with torch.no_grad():
        image_feat_m, text_feat_m = F.normalize(image_feat_m, dim=-1), F.normalize(text_feat_m, dim=-1)
        image_feat_all = torch.cat([image_feat_m.t(), image_queue.clone().detach()], dim=1)
        text_feat_all = torch.cat([text_feat_m.t(), text_queue.clone().detach()], dim=1)
        sim_i2t_m = image_feat_m @ text_feat_all / temp
        sim_t2i_m = text_feat_m @ image_feat_all / temp
        sim_targets = torch.zeros(sim_i2t_m.size(), dtype=sim_i2t_m.dtype)
        sim_targets.fill_diagonal_(1)
        sim_i2t_targets = alpha * F.softmax(sim_i2t_m, dim=1) + (1 - alpha) * sim_targets
        sim_t2i_targets = alpha * F.softmax(sim_t2i_m, dim=1) + (1 - alpha) * sim_targets
    sim_i2t = image_feat @ text_feat_all / temp
    sim_t2i = text_feat @ image_feat_all / temp
    loss_i2t = -torch.sum(F.log_softmax(sim_i2t, dim=1) * sim_i2t_targets, dim=1).mean()
    loss_t2i = -torch.sum(F.log_softmax(sim_t2i, dim=1) * sim_t2i_targets, dim=1).mean()
    return (loss_i2t + loss_t2i) / 2


# ----------------------------------------------------------------------------------------------------- helpers
def _dev_dtype(backend):
    if backend == "triton":
        return kernel_device(), torch.float32, 2e-5
    return torch.device("cpu"), torch.float64, 1e-9


def _rand(g, *shape):
    return torch.randn(*shape, generator=g, dtype=torch.float64)


# ------------------------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("backend", backend_params("sinkhorn", kernel_device(), BACKENDS))
@pytest.mark.parametrize("n,k", [(24, 7), (5, 16)])
def test_sinkhorn_equals_swav(backend, n, k):
    out = F.normalize(_rand(torch.Generator().manual_seed(n), n, k), dim=1)
    dev, dt, tol = _dev_dtype(backend)
    got = fc.sinkhorn(out.to(dev, dt), 0.05, 3, backend=backend)
    assert rel_err(got, swav_sinkhorn(out.clone())) <= max(tol, 1e-6)


@pytest.mark.parametrize("backend", backend_params("swapped_prediction", kernel_device(), BACKENDS))
@pytest.mark.parametrize("with_queue", [False, True])
def test_swapped_prediction_with_queue_equals_swav(backend, with_queue):
    g = torch.Generator().manual_seed(3)
    n, d, k, qlen = 12, 16, 9, 30
    si, st, ti, tt, protos = _rand(g, n, d), _rand(g, n, d), _rand(g, n, d), _rand(g, n, d), _rand(g, k, d)
    qi, qt = (_rand(g, qlen, d), _rand(g, qlen, d)) if with_queue else (None, None)
    leaves = [t.clone().requires_grad_() for t in (si, st, protos)]
    want = swav_swapped_loss(leaves[0], leaves[1], ti, tt, leaves[2], qi, qt)
    want.backward()
    dev, dt, tol = _dev_dtype(backend)
    mine = [t.to(dev, dt).requires_grad_() for t in (si, st, protos)]
    conv = (lambda t: None if t is None else t.to(dev, dt))
    got = fc.codebook_loss(mine[0], mine[1], ti.to(dev, dt), tt.to(dev, dt), mine[2], queue_image=conv(qi),
                           queue_text=conv(qt), backend=backend)
    got.backward()
    assert rel_err(got, want) <= max(tol, 1e-6)
    for a, b in zip(mine[:2], leaves[:2]):  # the students' gradients (SwAV's prototype update is a projection)
        assert rel_err(a.grad, b.grad) <= max(tol, 1e-5)
    summed = fc.codebook_loss(mine[0], mine[1], ti.to(dev, dt), tt.to(dev, dt), mine[2], reduction="sum",
                              queue_image=conv(qi), queue_text=conv(qt), backend=backend)
    assert rel_err(summed, 2 * got) <= 1e-6


@pytest.mark.parametrize("backend", backend_params("momentum_contrastive", kernel_device(), BACKENDS))
@pytest.mark.parametrize("alpha,qlen", [(0.4, 0), (0.4, 37), (0.0, 37), (1.0, 5)])
def test_momentum_contrastive_equals_albef(backend, alpha, qlen):
    g = torch.Generator().manual_seed(7)
    n, d = 10, 24
    img, txt, img_m, txt_m = (_rand(g, n, d) for _ in range(4))
    iq, tq = F.normalize(_rand(g, qlen, d), dim=1), F.normalize(_rand(g, qlen, d), dim=1)
    temp0 = 0.07
    ref_leaves = [img.clone().requires_grad_(), txt.clone().requires_grad_(), torch.tensor(temp0, dtype=torch.float64)
                  .requires_grad_()]
    want = albef_ita(ref_leaves[0], ref_leaves[1], img_m, txt_m, iq.T, tq.T, ref_leaves[2], alpha)
    want.backward()
    dev, dt, tol = _dev_dtype(backend)
    c = (lambda t: t.to(dev, dt))
    leaves = [c(img).requires_grad_(), c(txt).requires_grad_(), torch.tensor(temp0, dtype=dt, device=dev)
              .requires_grad_()]
    queue = (lambda q: c(q) if qlen else None)
    got = 0.5 * (fc.momentum_contrastive_loss(leaves[0], c(txt_m), c(img_m), queue(tq), 1 / leaves[2], alpha,
                                              backend=backend)
                 + fc.momentum_contrastive_loss(leaves[1], c(img_m), c(txt_m), queue(iq), 1 / leaves[2], alpha,
                                                backend=backend))
    got.backward()
    assert rel_err(got, want) <= tol
    for a, b in zip(leaves, ref_leaves):  # student features and the learnable temperature
        assert rel_err(a.grad, b.grad) <= max(tol, 1e-8 if dt == torch.float64 else 1e-4)


def test_feature_queue_ring_recent_and_state():
    q = fc.FeatureQueue(5, 2, gather=False)
    assert q.contents().shape == (0, 2)
    q.enqueue(torch.tensor([[1.0, 1], [2, 2], [3, 3]]))
    assert q.contents()[:, 0].tolist() == [1, 2, 3]
    q.enqueue(torch.tensor([[4.0, 4], [5, 5], [6, 6]]))  # wraps: 6 overwrites 1
    assert sorted(q.contents()[:, 0].tolist()) == [2, 3, 4, 5, 6]
    assert q.recent(2)[:, 0].tolist() == [5, 6] and q.recent(9).shape == (5, 2)
    q2 = fc.FeatureQueue(5, 2, gather=False)
    q2.load_state_dict(q.state_dict())
    assert torch.equal(q2.contents(), q.contents()) and q2.recent(1)[0, 0] == 6
    with pytest.raises(ValueError, match=r"x must have shape \(B, 2\)"):
        q.enqueue(torch.randn(3, 4))
    with pytest.raises(TypeError, match="queue holds torch.float32"):
        q.enqueue(torch.randn(3, 2, dtype=torch.float64))


def test_codis_loss_runs_learns_and_enqueues():
    torch.manual_seed(0)
    d, k = 16, 4
    loss_mod = fc.CodisLoss(d, k, queue_length=64, sinkhorn_queue_length=32, backend="reference")
    si, st = torch.nn.Linear(8, d), torch.nn.Linear(8, d)
    ti, tt = fc.EMATeacher(si, 0.9), fc.EMATeacher(st, 0.9)
    opt = torch.optim.Adam([*si.parameters(), *st.parameters(), *loss_mod.parameters()], lr=1e-2)
    centres = torch.randn(k, 8) * 3
    first = None
    for step in range(40):
        c = torch.randint(0, k, (16,))
        xi, xt = centres[c] + 0.3 * torch.randn(16, 8), centres[c] + 0.3 * torch.randn(16, 8)
        out = loss_mod(si(xi), st(xt), ti(xi), tt(xt))
        assert set(out) == {"codebook", "itc", "intra", "loss"} and torch.isfinite(out["loss"])
        first = first if first is not None else float(out["loss"])
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        ti.update(si)
        tt.update(st)
    assert loss_mod.queue_image.filled == 64 and loss_mod.temp.grad is not None
    assert float(out["loss"]) < first


def test_codis_bad_inputs():
    x = torch.randn(6, 8)
    with pytest.raises(ValueError, match=r"queue_image must have shape \(Q, 8\)"):
        fc.codebook_loss(x, x, x, x, torch.randn(3, 8), queue_image=torch.randn(4, 5))
    with pytest.raises(TypeError, match="queue_text is torch.float64 but the features are torch.float32"):
        fc.codebook_loss(x, x, x, x, torch.randn(3, 8), queue_text=torch.randn(4, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="teacher_query is required when alpha > 0"):
        fc.momentum_contrastive_loss(x, x, alpha=0.4)
    with pytest.raises(ValueError, match=r"alpha must lie in \[0, 1\]"):
        fc.momentum_contrastive_loss(x, x, x, alpha=1.5)
    with pytest.raises(ValueError, match="reduction must be 'mean'"):
        fc.codebook_loss(x, x, x, x, torch.randn(3, 8), reduction="max")
