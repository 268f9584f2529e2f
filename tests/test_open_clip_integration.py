"""fastcontrast.integrations.open_clip against the real open_clip package and its own trainer (no fakes).

``open_clip.create_loss`` is driven with the trainer's own argument names, and examples/open_clip_train_tiny.py
runs ``open_clip_train.main`` for a few steps with and without the patch: the per-step losses must agree.
"""
import json
import os
import subprocess
import sys
import types

import pytest
import torch

import fastcontrast as fc
from _thirdparty import import_open_clip, missing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.skipif(missing("open_clip", "torchvision") is not None,
                                reason=f"{missing('open_clip', 'torchvision')} is not installed "
                                       "(scripts/dev_env.sh --test installs open_clip and its dependencies)")


@pytest.fixture
def oc():
    open_clip = import_open_clip()
    import fastcontrast.integrations.open_clip as fco

    yield open_clip
    fco.unpatch()


def _args(**kw):
    base = dict(distill=False, model="ViT-B-32", siglip=False, local_loss=False, gather_with_grad=False, rank=0,
                world_size=1, horovod=False, coca_caption_loss_weight=2.0, coca_contrastive_loss_weight=1.0,
                loss_dist_impl=None)
    base.update(kw)
    return types.SimpleNamespace(**base)


def test_create_loss_builds_fastcontrast_classes_after_patch(oc):
    import fastcontrast.integrations.open_clip as fco

    assert not isinstance(oc.create_loss(_args()), fc.ClipLoss)  # open_clip's own class before patch()
    fco.patch()
    assert isinstance(oc.create_loss(_args()), fc.ClipLoss)
    assert isinstance(oc.create_loss(_args(siglip=True)), fc.SigLipLoss)
    coca = oc.create_loss(_args(model="coca_ViT-B-32"))
    assert isinstance(coca, fco.FastCoCaLoss) and coca.caption_loss_weight == 2.0
    assert isinstance(oc.create_loss(_args(distill=True)), fco.FastDistillClipLoss)


def test_unpatch_restores_every_binding(oc):
    import open_clip.factory
    import open_clip.loss
    import fastcontrast.integrations.open_clip as fco

    before = {(m.__name__, n): getattr(m, n) for m in (oc, open_clip.loss, open_clip.factory)
              for n in ("ClipLoss", "SigLipLoss", "CoCaLoss", "DistillClipLoss") if hasattr(m, n)}
    fco.patch()
    assert all(getattr(sys.modules[m], n) is not cls for (m, n), cls in before.items())
    fco.patch(backend="reference")  # twice, another backend: still one layer deep
    assert oc.create_loss(_args()).backend == "reference"
    fco.unpatch()
    assert all(getattr(sys.modules[m], n) is cls for (m, n), cls in before.items())
    assert not fco.is_patched()


def test_patch_reaches_modules_that_imported_the_class(oc, monkeypatch):
    import fastcontrast.integrations.open_clip as fco

    user = types.ModuleType("user_trainer")
    user.MyLoss = oc.ClipLoss  # e.g. `from open_clip import ClipLoss as MyLoss` in a user's trainer
    monkeypatch.setitem(sys.modules, "user_trainer", user)
    fco.patch()
    assert issubclass(user.MyLoss, fc.ClipLoss)
    fco.unpatch()
    assert user.MyLoss is oc.ClipLoss


def test_fast_coca_loss_equals_open_clip(oc):
    import fastcontrast.integrations.open_clip as fco

    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(6, 16, generator=g, dtype=torch.float64), dim=1)
    txt = torch.nn.functional.normalize(torch.randn(6, 16, generator=g, dtype=torch.float64), dim=1)
    logits = torch.randn(6, 5, 11, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 11, (6, 5), generator=g)
    labels[:, -1] = 0  # pad tokens are ignored

    def run(loss_obj):
        leaves = [t.clone().requires_grad_() for t in (img, txt, logits)]
        out = loss_obj(*leaves[:2], leaves[2], labels, torch.tensor(14.0, dtype=torch.float64), output_dict=True)
        sum(out.values()).backward()
        return [v.detach() for v in out.values()] + [t.grad for t in leaves]

    want = run(oc.CoCaLoss(caption_loss_weight=2.0, clip_loss_weight=1.0))
    got = run(fco.FastCoCaLoss(caption_loss_weight=2.0, clip_loss_weight=1.0, backend="reference"))
    for a, b in zip(got, want):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", ["auto", "cpu", "reference"])
def test_distill_through_create_loss_equals_open_clip(oc, backend):
    """``--distill``: open_clip's create_loss builds the fused DistillClipLoss; both outputs and the student's
    gradients equal open_clip's, and the teacher (run under no_grad by the trainer) gets no gradient."""
    import fastcontrast.integrations.open_clip as fco

    if backend == "cpu" and fc.dispatch.unavailable_reason("distill", "cpu", torch.device("cpu")) is not None:
        pytest.skip(fc.dispatch.unavailable_reason("distill", "cpu", torch.device("cpu")))
    theirs_obj = oc.create_loss(_args(distill=True))
    fco.patch(backend=backend)
    ours_obj = oc.create_loss(_args(distill=True))
    assert type(theirs_obj).__module__ == "open_clip.loss" and isinstance(ours_obj, fco.FastDistillClipLoss)
    g = torch.Generator().manual_seed(1)
    img, txt = (torch.randn(9, 12, generator=g, dtype=torch.float64) for _ in range(2))
    t_img, t_txt = (torch.randn(9, 20, generator=g, dtype=torch.float64) for _ in range(2))

    def run(loss_obj, output_dict):
        x, y, s = img.clone().requires_grad_(), txt.clone().requires_grad_(), torch.tensor(2.5, dtype=torch.float64)
        s.requires_grad_()
        out = loss_obj(x, y, s, t_img, t_txt, torch.tensor(9.0, dtype=torch.float64), output_dict=output_dict)
        c, d = (out["contrastive_loss"], out["distill_loss"]) if output_dict else out
        (c + 0.5 * d).backward()
        return [c.detach(), d.detach(), x.grad, y.grad, s.grad]

    for output_dict in (True, False):
        for a, b in zip(run(ours_obj, output_dict), run(theirs_obj, output_dict)):
            assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


def _train(*flags):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "open_clip_train_tiny.py"), "--steps", "6",
                        *flags], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(missing("open_clip_train", "webdataset", "pandas", "braceexpand", "PIL") is not None,
                    reason="open_clip's training dependencies are not installed (scripts/dev_env.sh --test)")
@pytest.mark.parametrize("loss,precision,rtol", [
    ("clip", "fp32", 1e-5),
    ("clip", "amp", 5e-3),        # CPU amp is float16: open_clip rounds the logits to fp16, fastcontrast does not
    ("clip", "amp_bf16", 3e-2),   # bf16 logits carry ~0.4 % error each; a few steps of training compound it
    ("siglip", "fp32", 1e-5),
    ("siglip", "amp_bf16", 3e-2),
])
def test_open_clip_trainer_losses_equal_with_and_without_patch(loss, precision, rtol):
    flags = ["--precision", precision] + (["--siglip"] if loss == "siglip" else [])
    theirs = _train(*flags)
    ours = _train(*flags, "--fastcontrast")
    assert theirs["loss_class"].startswith("open_clip.loss.")
    assert ours["loss_class"].startswith("fastcontrast.integrations.open_clip.Fast")
    assert len(ours["losses"]) == len(theirs["losses"]) == 6
    for step, (a, b) in enumerate(zip(ours["losses"], theirs["losses"])):
        assert a == a and abs(a - b) <= rtol * abs(b), (step, ours["losses"], theirs["losses"])
