"""Every public function rejects bad input at the boundary with an error naming the argument."""
import pytest
import torch

from _ops import dispatch_of, uncovered
import fastcontrast as fc
from fastcontrast import BackendUnavailableError

X = torch.randn(4, 8)
Y = torch.randn(4, 8)


@pytest.fixture(autouse=True)
def _debug_checks():
    """Value checks (NaN, a scale tensor <= 0, labels out of range) are opt-in host syncs: on for this file.
    Type, shape and device checks run either way (test_checks_without_debug)."""
    with fc.debug():
        yield


def test_checks_without_debug():
    with fc.debug(False):
        with pytest.raises(ValueError, match="image_features must be 2-D"):
            fc.clip_loss(torch.randn(4, 2, 8), Y, 10.0)
        with pytest.raises(ValueError, match="logit_scale must be > 0"):
            fc.clip_loss(X, Y, -1.0)  # a Python number costs no sync: always checked
        with pytest.raises(TypeError, match="labels must be an integer"):
            fc.clip_loss(X, Y, 10.0, labels=torch.zeros(4))


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(image_features=torch.randn(4, 2, 8)), ValueError, "image_features must be 2-D"),
    (dict(text_features=torch.randn(4, 7)), ValueError, "per-sample shape"),
    (dict(image_features=torch.randint(0, 3, (4, 8))), TypeError, "image_features must be a floating"),
    (dict(text_features=Y.double()), TypeError, "one dtype"),
    (dict(image_features=torch.randn(0, 8)), ValueError, "empty batch"),
    (dict(image_features=torch.randn(4, 0)), ValueError, "empty feature"),
    (dict(logit_scale=float("nan")), ValueError, "logit_scale must be finite"),
    (dict(logit_scale=torch.tensor(float("inf"))), ValueError, "logit_scale must be finite"),
    (dict(logit_scale=-1.0), ValueError, "logit_scale must be > 0"),
    (dict(logit_scale=torch.ones(2)), ValueError, "logit_scale must have exactly one element"),
    (dict(logit_scale="10"), TypeError, "logit_scale must be a float"),
    (dict(logit_bias=float("inf")), ValueError, "logit_bias must be finite"),
    (dict(image_features=torch.full((4, 8), float("nan"))), ValueError, "image_features contains non-finite"),
    (dict(text_features=torch.randn(5, 8)), ValueError, "labels are required"),
    (dict(labels=torch.tensor([0, 1, 2, 4])), ValueError, r"labels must lie in \[0, 4\)"),
    (dict(labels=torch.tensor([0.0, 1, 2, 3])), TypeError, "labels must be an integer"),
    (dict(labels=torch.tensor([0, 1, 2])), ValueError, r"labels must have shape \(4,\)"),
    (dict(backend="tpu"), ValueError, "unknown backend"),
    (dict(image_features=[[1.0]]), TypeError, "image_features must be a torch.Tensor"),
])
def test_clip_loss_bad_inputs(kwargs, exc, match):
    args = dict(image_features=X, text_features=Y, logit_scale=10.0)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        fc.clip_loss(**args)


def test_unavailable_backend_says_why():
    with pytest.raises(BackendUnavailableError, match="cuda.*needs CUDA tensors"):
        fc.clip_loss(X, Y, 10.0, backend="cuda")
    if not torch.cuda.is_available():
        import os
        if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
            with pytest.raises(BackendUnavailableError, match="triton"):
                fc.clip_loss(X, Y, 10.0, backend="triton")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="device mismatch needs a CUDA device")
def test_device_mismatch():
    with pytest.raises(ValueError, match="one device"):
        fc.clip_loss(X, Y.cuda(), 10.0)


def test_device_mismatch_meta():
    # a meta tensor stands in for "another device" on CPU-only machines
    with pytest.raises(ValueError, match="one device"):
        fc.clip_loss(X, torch.empty(4, 8, device="meta"), 10.0)


def test_oblique_bad_inputs():
    with pytest.raises(ValueError, match="image_tokens must be 3-D"):
        fc.oblique_clip_loss(X, Y)
    with pytest.raises(ValueError, match="per-sample shape"):
        fc.oblique_clip_loss(torch.randn(4, 2, 4), torch.randn(4, 3, 4))


def test_adaptive_bad_inputs():
    with pytest.raises(ValueError, match="tau_image must be > 0"):
        fc.adaptive_temperature_clip_loss(X, Y, torch.tensor([0.1, 0.1, 0.0, 0.1]), torch.full((4,), 0.1))
    with pytest.raises(ValueError, match="tau_text is required"):
        fc.adaptive_temperature_clip_loss(X, torch.randn(5, 8), torch.full((4,), 0.1))
    with pytest.raises(ValueError, match=r"tau_text must be a scalar or have shape \(4,\)"):
        fc.adaptive_temperature_clip_loss(X, Y, 0.1, torch.full((3,), 0.1))
    with pytest.raises(ValueError, match="tau_image contains non-finite"):
        fc.adaptive_temperature_clip_loss(X, Y, torch.tensor([0.1, float("nan"), 0.1, 0.1]), 0.1)


def test_margin_density_sinkhorn_codebook_bad_inputs():
    with pytest.raises(ValueError, match="margin must be >= 0"):
        fc.max_margin_loss(X, Y, margin=-0.1)
    with pytest.raises(ValueError, match="k must be at most"):
        fc.density_temperature(X, 0.05, 0.01, 0.1, k=4)
    with pytest.raises(ValueError, match="tau_min <= tau <= tau_max"):
        fc.density_temperature(X, 0.5, 0.01, 0.1, k=2)
    with pytest.raises(ValueError, match="epsilon must be > 0"):
        fc.sinkhorn(torch.randn(4, 3), epsilon=0.0)
    with pytest.raises(TypeError, match="n_iters must be an int"):
        fc.sinkhorn(torch.randn(4, 3), n_iters=2.5)
    with pytest.raises(ValueError, match=r"codebook must have shape \(K, 8\)"):
        fc.codebook_loss(X, Y, X, Y, torch.randn(5, 7))
    with pytest.raises(ValueError, match="batch 4 but teacher_text_features has batch 3"):
        fc.codebook_loss(X, Y, X, Y[:3], torch.randn(5, 8))
    with pytest.raises(ValueError, match="codebook contains non-finite"):
        fc.codebook_loss(X, Y, X, Y, torch.full((5, 8), float("inf")))


def test_cliploss_module_mismatched_batch():
    with pytest.raises(ValueError, match="batches must match"):
        fc.ClipLoss()(X, torch.randn(5, 8), 10.0)
    with pytest.raises(RuntimeError, match="torch.distributed is not initialised"):
        fc.ClipLoss(world_size=2, rank=0)(X, Y, 10.0)
    with pytest.raises(ValueError, match="mode must be"):
        fc.ClipLoss(mode="tree")


# ------------------------------------------------------------------ invalid labels without a host sync (issue 20)
def _label_calls():
    """(name, backend, call(x, y, s, labels)) for every public loss that takes labels, on every backend here."""
    from fastcontrast.dispatch import available_backends

    return [pytest.param(name, b, fn, id=f"{name}-{b}") for name, fn in LABEL_CALLS.items()
            for b in available_backends(dispatch_of(name), "cpu") + ("auto",)]


# every public loss that takes labels (names of the op list; the dispatcher op is the op list's)
LABEL_CALLS = {
    "clip_loss": lambda x, y, s, lab, b: fc.clip_loss(x, y, s, labels=lab, backend=b),
    "clip_loss(bias)": lambda x, y, s, lab, b: fc.clip_loss(x, y, s, -1.0, labels=lab, backend=b),
    "siglip_loss": lambda x, y, s, lab, b: fc.siglip_loss(x, y, s, -1.0, labels=lab, backend=b),
    "ce_rows": lambda x, y, s, lab, b: fc.functional.ce_rows(x, y, s, labels=lab, backend=b),
    "oblique_clip_loss": lambda x, y, s, lab, b: fc.oblique_clip_loss(
        x.reshape(x.shape[0], 2, -1), y.reshape(y.shape[0], 2, -1), s, labels=lab, backend=b),
    "adaptive_temperature_clip_loss": lambda x, y, s, lab, b: fc.adaptive_temperature_clip_loss(
        x, y, 1 / s, torch.full((y.shape[0],), 0.3), labels=lab, backend=b),
    "max_margin_loss": lambda x, y, s, lab, b: fc.max_margin_loss(x, y, 0.2 * s, labels=lab, backend=b),
    "matryoshka_ce_rows": lambda x, y, s, lab, b: fc.matryoshka_ce_rows(x, y, s, labels=lab, dims=(8, 3), backend=b),
    "matryoshka_clip_loss": lambda x, y, s, lab, b: fc.matryoshka_clip_loss(x, y, s, dims=(8, 3), labels=lab,
                                                                            backend=b),
}
NO_LABELS = ("codebook_loss", "momentum_contrastive_loss", "distill_clip_loss")  # positives are fixed (i ↔ i)
# lse_rows: keep (row i's kept column) is its index argument; its range cases are tested in test_lse_rows
NO_LABELS += ("lse_rows",)


def test_every_labelled_loss_of_the_op_list_is_covered():
    assert not uncovered(LABEL_CALLS, NO_LABELS), uncovered(LABEL_CALLS, NO_LABELS)


BAD_LABELS = {"negative": [0, 1, 2, 3, 4, -1], "all_minus_one": [-1] * 6, "too_large": [0, 1, 2, 3, 4, 5],
              "huge": [0, 1, 2, 3, 4, 2 ** 40]}


@pytest.mark.parametrize("name,backend,fn", _label_calls())
def test_invalid_labels_are_nan_without_debug(name, backend, fn):
    """Debug off: a label outside [0, M) (M = 5 texts for 6 images) makes the loss and every gradient NaN, on every
    backend (Python-style wrap of -1 to the last column used to give a finite loss); valid labels are untouched."""
    x, y = torch.randn(6, 8, requires_grad=True), torch.randn(5, 8, requires_grad=True)
    s = torch.tensor(3.0, requires_grad=True)
    with fc.debug(False):
        for kind, lab in BAD_LABELS.items():
            loss = fn(x, y, s, torch.tensor(lab), backend)
            gx, gy, gs = torch.autograd.grad(loss, [x, y, s], allow_unused=True)
            assert torch.isnan(loss), f"{name}/{backend}: labels {kind} gave a finite loss {float(loss)}"
            assert torch.isnan(gx).all() and torch.isnan(gy).all(), f"{name}/{backend}: {kind} left finite grads"
            assert gs is None or torch.isnan(gs), f"{name}/{backend}: {kind} left a finite scale grad"
        good = torch.tensor([4, 0, 2, 2, 1, 3])
        loss = fn(x, y, s, good, backend)
        ref = fn(x.detach().double(), y.detach().double(), s.detach().double(), good, "reference")
        assert torch.isfinite(loss) and torch.allclose(loss.double(), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name,backend,fn", _label_calls())
def test_invalid_labels_raise_in_debug(name, backend, fn):
    x, y = torch.randn(6, 8), torch.randn(5, 8)
    for lab, shown in (([0, 1, 2, 3, 4, -1], r"\[-1, 4\]"), ([0, 1, 2, 3, 4, 5], r"\[0, 5\]")):
        with pytest.raises(ValueError, match=r"labels must lie in \[0, 5\), got values in " + shown):
            fn(x, y, torch.tensor(3.0), torch.tensor(lab), backend)


def test_label_guard_has_no_host_sync_and_compiles():
    """The guard is device-side: no .item() (a CUDA graph could capture it), and torch.compile traces it
    with no graph break, the flag folded into the compiled loss."""
    from fastcontrast import _validation as V

    x, y = torch.randn(6, 8), torch.randn(5, 8)
    with fc.debug(False):
        lab, bad = V.labels_guard(torch.tensor([0, 1, -1]), 5)
        assert lab.tolist() == [0, 1, 0] and bad.dim() == 0 and bool(bad)
        out = torch.tensor(2.0)
        assert V.poison(out, torch.tensor(False)) is not out and float(V.poison(out, torch.tensor(False))) == 2.0

        def f(x, y, lab):
            return fc.clip_loss(x, y, 3.0, labels=lab, backend="dense")

        torch.compiler.reset()
        compiled = torch.compile(f, backend="eager", fullgraph=True)  # fullgraph: a host read would break it
        assert torch.isnan(compiled(x, y, torch.tensor([0, 1, 2, 3, 4, -1])))
        good = torch.tensor([0, 1, 2, 3, 4, 0])
        assert torch.equal(compiled(x, y, good), f(x, y, good))
