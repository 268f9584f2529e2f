"""fastcontrast.integrations.transformers against the real transformers CLIPModel / SiglipModel (tiny configs,
nothing downloaded): loss and every parameter's gradient equal the unpatched model's; the HF Trainer example too."""
import os
import sys

import pytest
import torch

from _thirdparty import missing, torchvision_shim

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))

pytestmark = pytest.mark.skipif(missing("transformers") is not None,
                                reason="transformers is not installed (scripts/dev_env.sh --test installs it)")


@pytest.fixture
def fch():
    torchvision_shim()
    from fastcontrast.integrations import transformers as fch

    yield fch
    fch.revert()


def _model(kind):
    from hf_trainer_clip import tiny_model

    return tiny_model(kind, seed=0)


def _step(model, **kw):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 99, (9, 10), generator=g)
    px = torch.randn(9, 3, 30, 30, generator=g)
    model.zero_grad()
    out = model(input_ids=ids, pixel_values=px, return_loss=True, **kw)
    loss = out[0] if isinstance(out, tuple) else out.loss
    loss.backward()
    return out, loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same_grads(got, want):
    assert got.keys() == want.keys()
    total = torch.cat([g.flatten() for g in want.values()]).norm()
    for n in want:  # norm-relative to the whole gradient: attention q/k grads of a random init are ~1e-8
        assert float((got[n] - want[n]).norm()) <= 1e-5 * float(total), n


@pytest.mark.parametrize("kind", ["clip", "siglip"])
@pytest.mark.parametrize("materialize_logits", [True, False])
def test_patched_model_equals_unpatched(fch, kind, materialize_logits):
    model = _model(kind)
    ref_out, ref_loss, ref_grads = _step(model)
    apply = fch.apply_fastcontrast_to_clip if kind == "clip" else fch.apply_fastcontrast_to_siglip
    apply(model, materialize_logits=materialize_logits)
    out, loss, grads = _step(model)
    assert model.forward.__func__._fastcontrast  # the patch is in place, so the comparison means something
    assert torch.allclose(loss, ref_loss, rtol=1e-6)
    _assert_same_grads(grads, ref_grads)
    assert torch.allclose(out.image_embeds, ref_out.image_embeds, atol=1e-6)
    if materialize_logits:
        assert torch.allclose(out.logits_per_image, ref_out.logits_per_image, atol=1e-5)
    else:
        assert out.logits_per_image is None and out.logits_per_text is None


def test_class_patch_tuple_output_and_revert(fch):
    from transformers import CLIPModel

    model = _model("clip")
    _, ref_loss, _ = _step(model)
    original = CLIPModel.forward
    fch.apply_fastcontrast_to_clip(materialize_logits=False)  # the class: every CLIPModel
    assert CLIPModel.forward is not original
    out, loss, _ = _step(model, return_dict=False)
    assert isinstance(out, tuple) and torch.allclose(loss, ref_loss, rtol=1e-6)
    fch.revert()
    assert CLIPModel.forward is original
    with pytest.raises(TypeError, match="model must be a transformers SiglipModel"):
        fch.apply_fastcontrast_to_siglip(model)


def test_inference_path_untouched(fch):
    model = _model("siglip")
    fch.apply_fastcontrast_to_siglip(model, materialize_logits=False)
    with torch.no_grad():
        out = model(input_ids=torch.randint(3, 99, (4, 10)), pixel_values=torch.randn(4, 3, 30, 30))
    assert out.loss is None and out.logits_per_image.shape == (4, 4)


@pytest.mark.skipif(missing("accelerate") is not None, reason="the HF Trainer needs accelerate")
@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_hf_trainer_example_same_losses(kind):
    import hf_trainer_clip as ex

    flags = ["--steps", "5", "--batch", "8"] + (["--siglip"] if kind == "siglip" else [])
    theirs = ex.main(flags)["losses"]
    ours = ex.main(flags + ["--fastcontrast", "--no-logits"])["losses"]
    assert len(ours) == len(theirs) == 5
    assert all(abs(a - b) <= 1e-5 * abs(b) for a, b in zip(ours, theirs)), (ours, theirs)
