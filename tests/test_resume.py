"""Issue 20 point 5: resuming loses nothing.

Every stateful module (FeatureQueue, EMATeacher, CodisLoss, CodebookLoss, MMTSClipLoss, MMTSMaxMarginLoss,
ClusterIndex) trains 3 steps, is saved through ``state_dict``/``torch.save``, and resumes in a fresh process that
built everything from other random weights; steps 3..5 and the final state must equal 6 uninterrupted steps bit
for bit. The schedules are set so that their state changes inside the 6 steps (ALBEF's α warm-up over epoch 0,
the Sinkhorn queue starting at step 2 and joining once full, SwAV's prototype freeze, the queues' write positions).
"""
import os
import subprocess
import sys

import pytest
import torch

import fastcontrast as fc
import fastcontrast.clusters  # noqa: F401

WORKER = os.path.join(os.path.dirname(__file__), "_resume_worker.py")


def _run(*args):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(os.path.dirname(WORKER)),
                                                       os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, WORKER, *args], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.parametrize("scenario", ["codis", "codebook", "mmts"])
def test_resume_is_bit_identical(tmp_path, scenario):
    full, part, resumed = tmp_path / "full.pt", tmp_path / "part.pt", tmp_path / "resumed.pt"
    _run(scenario, "full", str(full))
    _run(scenario, "first", str(part), str(tmp_path))
    _run(scenario, "resume", str(resumed), str(tmp_path))
    a, p, b = (torch.load(f, weights_only=True) for f in (full, part, resumed))
    assert len(a["losses"]) == 6 and len(p["losses"]) == 3 and len(b["losses"]) == 3
    for i, (x, y) in enumerate(zip(a["losses"], p["losses"] + b["losses"])):
        assert torch.isfinite(x), f"step {i}: loss {x}"
        assert torch.equal(x, y), f"step {i}: uninterrupted {x.item()!r} vs resumed {y.item()!r}"
    assert a["final"].keys() == b["final"].keys() and len(a["final"]) > 0
    for k in a["final"]:
        assert torch.equal(a["final"][k], b["final"][k]), f"{k} differs after resuming"
    assert a["extra"] == b["extra"]
    # the run must have moved: a resumed run that silently restarted from step 0 cannot pass by coincidence
    assert not all(torch.equal(a["final"][k], p["final"][k]) for k in a["final"])


def test_state_dicts_hold_the_schedule_state(tmp_path):
    """What each module carries, saved and loaded with weights_only=True (no pickled code)."""
    q = fc.FeatureQueue(5, 3)
    q.enqueue(torch.randn(3, 3))
    q.enqueue(torch.randn(4, 3))  # wraps: write position 2
    codis = fc.CodisLoss(4, num_codes=3, queue_length=6, sinkhorn_queue_length=4, steps_per_epoch=2)
    codis.steps, codis._sk_rows = 5, 3
    codis.codebook_loss.steps = 5
    torch.save({"q": q.state_dict(), "codis": codis.state_dict()}, tmp_path / "s.pt")
    s = torch.load(tmp_path / "s.pt", weights_only=True)
    q2, codis2 = fc.FeatureQueue(5, 3), fc.CodisLoss(4, num_codes=3, queue_length=6, sinkhorn_queue_length=4,
                                                      steps_per_epoch=2)
    q2.load_state_dict(s["q"])
    codis2.load_state_dict(s["codis"])
    assert (q2.ptr, q2.filled, q2.real) == (q.ptr, q.filled, q.real) == (2, 5, 5)
    assert torch.equal(q2.contents(), q.contents()) and torch.equal(q2.recent(3), q.recent(3))
    assert (codis2.steps, codis2._sk_rows, codis2.codebook_loss.steps) == (5, 3, 5)
    assert codis2.alpha_at(codis2.steps) == codis.alpha_at(5)


def test_mmts_state_dict_carries_its_schedule():
    """The schedule's configuration travels with the state_dict, and a module built otherwise refuses it."""
    a = fc.MMTSClipLoss(100, 2, 50)
    sd = a.state_dict()
    b = fc.MMTSClipLoss(100, 2, 50)
    b.load_state_dict(sd)
    tau_a = a.temperatures(torch.tensor([2, 10, 50]), step=17)
    assert torch.equal(tau_a, b.temperatures(torch.tensor([2, 10, 50]), step=17))
    c = fc.MMTSClipLoss(100, 3, 50)
    with pytest.raises(ValueError, match="c_min=3"):
        c.load_state_dict(sd)
    d = fc.MMTSMaxMarginLoss()  # built without the data-derived schedule: takes the checkpoint's
    d.load_state_dict(sd)
    assert (d.total_steps, d.c_min, d.c_max) == (100, 2, 50)
    assert torch.equal(tau_a, d.temperatures(torch.tensor([2, 10, 50]), step=17))


def test_cluster_index_round_trip(tmp_path):
    idx = fc.clusters.from_labels(torch.tensor([0, 2, 2, 5, 5, 5]))
    idx.save(tmp_path / "c.pt")
    back = fc.clusters.ClusterIndex.load(tmp_path / "c.pt")
    assert torch.equal(back.ids, idx.ids) and torch.equal(back.sizes, idx.sizes)
    assert (back.c_min, back.c_max) == (idx.c_min, idx.c_max) == (1, 3)
    torch.save({"x": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="ClusterIndex.save"):
        fc.clusters.ClusterIndex.load(tmp_path / "other.pt")
