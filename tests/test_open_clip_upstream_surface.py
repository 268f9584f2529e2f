"""The open_clip drop-ins follow open_clip's classes, released and upcoming: every constructor argument of
open_clip 3.3.0 (installed, read by ``inspect``) and of its main branch (``MAIN`` below, read from main's
``src/open_clip/loss.py`` at 89fb801, 2026-06-27: it adds ``SigLipLoss(chunk_size=)``, ``_chunked_loss`` and
drops ``use_horovod``), and the helper methods open_clip's code and tests call, with open_clip's values.

.ci/upstream_tests.sh runs open_clip's own test suite with the patch; open_clip main's
``tests/test_siglip_chunked_loss.py`` (not yet released) drives ``SigLipLoss(chunk_size=k)._loss`` as
``test_siglip_loss_matches_open_clip_chunked_semantics`` does here.
"""
import inspect

import pytest
import torch

import fastcontrast as fc
from _thirdparty import import_open_clip, missing
from conftest import backend_param

pytestmark = pytest.mark.skipif(missing("open_clip", "torchvision") is not None,
                                reason=f"{missing('open_clip', 'torchvision')} is not installed "
                                       "(scripts/dev_env.sh --test installs open_clip and its dependencies)")

NAMES = ("ClipLoss", "SigLipLoss", "CoCaLoss", "DistillClipLoss")
# open_clip main (89fb801): constructor parameters in order, and the methods each class defines
MAIN = {
    "ClipLoss": (["local_loss", "gather_with_grad", "cache_labels", "rank", "world_size"],
                 ["get_ground_truth", "get_logits", "forward"]),
    "SigLipLoss": (["cache_labels", "rank", "world_size", "dist_impl", "chunk_size"],
                   ["get_ground_truth", "get_logits", "_loss", "_chunked_loss", "forward"]),
    "CoCaLoss": (["caption_loss_weight", "clip_loss_weight", "pad_id", "local_loss", "gather_with_grad",
                  "cache_labels", "rank", "world_size"], ["forward"]),
    "DistillClipLoss": (["local_loss", "gather_with_grad", "cache_labels", "rank", "world_size"],
                        ["dist_loss", "forward"]),
}


@pytest.fixture
def oc():
    """open_clip's own loss classes (taken before any patch) and the drop-ins."""
    import_open_clip()
    import open_clip.loss as L
    import fastcontrast.integrations.open_clip as fco

    fco.unpatch()
    theirs = {n: getattr(L, n) for n in NAMES}
    assert not any(issubclass(c, (fc.ClipLoss, fc.SigLipLoss)) for c in theirs.values())
    yield theirs, {n: fco._REPLACEMENTS[n] for n in NAMES}
    fco.unpatch()


def _params(fn):
    return [p for p in inspect.signature(fn).parameters if p != "self"]


@pytest.mark.parametrize("name", NAMES)
def test_every_constructor_argument_of_open_clip_3_3_and_main(oc, name):
    theirs, ours = oc
    got = _params(ours[name].__init__)
    released = _params(theirs[name].__init__)
    assert got[: len(released)] == released, (name, got, released)  # same names, same positions
    main = MAIN[name][0]
    assert [p for p in got if p in main] == main, (name, got, main)  # main's, in main's order
    if name == "SigLipLoss":
        assert got[: len(main)] == main  # chunk_size right after dist_impl, as on main
    # this package's additions come after and have defaults
    extra = [p for p in got if p not in released and p not in main]
    assert all(inspect.signature(ours[name].__init__).parameters[p].default is not inspect.Parameter.empty
               for p in extra), extra


@pytest.mark.parametrize("name", NAMES)
def test_every_method_open_clip_defines(oc, name):
    theirs, ours = oc
    released = [k for k, v in vars(theirs[name]).items() if callable(v) and k != "__init__"]
    for method in set(released) | set(MAIN[name][1]):
        assert callable(getattr(ours[name], method, None)), f"{name}.{method}"
        if method in vars(theirs[name]):  # same parameters as open_clip's
            assert _params(getattr(ours[name], method))[: len(_params(getattr(theirs[name], method)))] \
                == _params(getattr(theirs[name], method)), f"{name}.{method}"
    for attr in ("prev_num_logits", "labels", "cache_labels", "rank", "world_size"):
        kw = {"caption_loss_weight": 1.0, "clip_loss_weight": 1.0} if name == "CoCaLoss" else {}
        assert hasattr(ours[name](**kw), attr), f"{name}.{attr}"


def _feats(n, m, d=24, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=1)
    y = torch.nn.functional.normalize(torch.randn(m, d, generator=g, dtype=dtype), dim=1)
    return x, y, torch.tensor(10.0, dtype=dtype), torch.tensor(-10.0, dtype=dtype)


def _value_and_grads(fn, *tensors):
    leaves = [t.clone().requires_grad_() for t in tensors]
    out = fn(*leaves)
    out.backward()
    return [out.detach()] + [t.grad for t in leaves]


def _close(got, want, tol=1e-10):
    for a, b in zip(got, want):
        assert a is not None and b is not None
        assert torch.allclose(a.to(b.dtype), b, rtol=tol, atol=tol), (a, b)


SIGLIP_BACKENDS = ["auto", "reference", backend_param("siglip", "triton")]


@pytest.mark.parametrize("backend", SIGLIP_BACKENDS)
@pytest.mark.parametrize("negative_only", [False, True])
@pytest.mark.parametrize("chunk_size", [0, 1, 8, 64])
def test_siglip_loss_equals_open_clip(oc, backend, negative_only, chunk_size):
    """``_loss`` (what open_clip's distributed loop and its tests call): value and every gradient, float64,
    whatever ``chunk_size`` (open_clip main's parity test uses 64, 32, 8, 1 and checks 1e-5)."""
    theirs, ours = oc
    x, y, s, b = _feats(64, 64)
    tol = 1e-10 if backend == "reference" else 1e-5
    want = _value_and_grads(lambda *t: theirs["SigLipLoss"]()._loss(*t, negative_only=negative_only), x, y, s, b)
    loss = ours["SigLipLoss"](chunk_size=chunk_size, backend=backend)
    got = _value_and_grads(lambda *t: loss._loss(*t, negative_only=negative_only), x, y, s, b)
    _close(got, want, tol)
    if chunk_size:
        _close(_value_and_grads(lambda *t: loss._chunked_loss(*t, negative_only=negative_only), x, y, s, b),
               want, tol)


@pytest.mark.parametrize("n,m", [(70, 70), (37, 53), (53, 37)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_siglip_loss_matches_open_clip_chunked_semantics(oc, n, m, with_bias):
    """open_clip main's chunked ``_loss``: uneven chunks (70 rows), rectangular blocks (positives at (k, k),
    k < min(N, M)), no bias; the value as open_clip's helpers (``get_logits``) compute it, float64."""
    theirs, ours = oc
    x, y, s, b = _feats(n, m)
    b = b if with_bias else None

    def want_fn(x, y, s, *b):
        logits = theirs["SigLipLoss"]().get_logits(x, y, s, *b)
        z = 2 * torch.eye(n, m, dtype=logits.dtype) - 1
        return -torch.nn.functional.logsigmoid(z * logits).sum() / n

    args = (x, y, s) + ((b,) if with_bias else ())
    want = _value_and_grads(want_fn, *args)
    for chunk_size in (0, 8):
        got = _value_and_grads(lambda *t: ours["SigLipLoss"](chunk_size=chunk_size)._loss(*t), *args)
        _close(got, want)
    if n == m:  # open_clip 3.3.0's own _loss handles square blocks only
        _close(_value_and_grads(lambda *t: theirs["SigLipLoss"]()._loss(*t), *args), want)


def test_siglip_forward_with_chunk_size_equals_open_clip_forward(oc):
    """A trainer passing open_clip main's ``chunk_size`` gets open_clip's loss (chunking bounds the logits
    block, which the fused loss never builds; the value does not depend on it)."""
    theirs, ours = oc
    x, y, s, b = _feats(33, 33)
    want = _value_and_grads(lambda *t: theirs["SigLipLoss"]()(*t), x, y, s, b)
    for chunk_size in (0, 4, 1000):
        _close(_value_and_grads(lambda *t: ours["SigLipLoss"](chunk_size=chunk_size)(*t), x, y, s, b), want)
    out = ours["SigLipLoss"](chunk_size=4)(x, y, s, b, output_dict=True)
    assert set(out) == {"contrastive_loss"}


def test_siglip_helpers_equal_open_clip(oc):
    theirs, ours = oc
    x, y, s, b = _feats(9, 9)
    t, o = theirs["SigLipLoss"](), ours["SigLipLoss"]()
    for neg in (False, True):
        assert torch.equal(o.get_ground_truth(x.device, x.dtype, 9, negative_only=neg),
                           t.get_ground_truth(x.device, x.dtype, 9, negative_only=neg))
    assert torch.allclose(o.get_logits(x, y, s, b), t.get_logits(x, y, s, b), rtol=0, atol=1e-14)
    assert torch.allclose(o.get_logits(x, y, s), t.get_logits(x, y, s), rtol=0, atol=1e-14)


@pytest.mark.parametrize("cache_labels", [False, True])
def test_clip_helpers_and_label_cache_equal_open_clip(oc, cache_labels):
    theirs, ours = oc
    x, y, s, b = _feats(7, 7)
    for name in ("ClipLoss", "DistillClipLoss"):
        t, o = theirs[name](cache_labels=cache_labels), ours[name](cache_labels=cache_labels)
        for n in (7, 7, 5):
            lt, lo = t.get_ground_truth(x.device, n), o.get_ground_truth(x.device, n)
            assert torch.equal(lo, lt) and lo.dtype == lt.dtype
            assert o.prev_num_logits == t.prev_num_logits and o.labels.keys() == t.labels.keys()
        if cache_labels:  # the cached tensor itself comes back, as open_clip's
            assert o.get_ground_truth(x.device, 5) is o.labels[x.device]
        for got, want in zip(o.get_logits(x, y, s, b), t.get_logits(x, y, s, b)):
            assert torch.allclose(got, want, rtol=0, atol=1e-14)


def test_distill_dist_loss_equals_open_clip(oc):
    theirs, ours = oc
    g = torch.Generator().manual_seed(3)
    teacher, student = torch.randn(6, 6, generator=g, dtype=torch.float64), torch.randn(6, 6, generator=g,
                                                                                       dtype=torch.float64)
    want = _value_and_grads(lambda s_: theirs["DistillClipLoss"]().dist_loss(teacher, s_), student)
    got = _value_and_grads(lambda s_: ours["DistillClipLoss"]().dist_loss(teacher, s_), student)
    _close(got, want)


def test_patched_classes_keep_open_clip_hierarchy(oc):
    """After patch(), ``isinstance(loss, open_clip.loss.ClipLoss)`` holds for CoCa and Distill, as in open_clip."""
    import open_clip.loss as L
    import fastcontrast.integrations.open_clip as fco

    fco.patch()
    coca = L.CoCaLoss(caption_loss_weight=2.0, clip_loss_weight=1.0)
    assert isinstance(coca, L.ClipLoss) and isinstance(L.DistillClipLoss(), L.ClipLoss)
    assert isinstance(L.DistillClipLoss(), fc.DistillClipLoss)
    loss = L.SigLipLoss(chunk_size=16)  # open_clip main's argument, passed the way its trainer would
    assert loss.chunk_size == 16 and isinstance(loss, fc.SigLipLoss)
    fco.patch(backend="reference")
    assert L.SigLipLoss(chunk_size=2).backend == "reference"
    assert _params(L.SigLipLoss.__init__)[:5] == MAIN["SigLipLoss"][0]  # the backend wrapper keeps the signature


def test_bad_arguments_name_themselves(oc):
    _, ours = oc
    import fastcontrast.integrations.open_clip as fco

    with pytest.raises(ValueError, match="chunk_size must be >= 0"):
        ours["SigLipLoss"](chunk_size=-1)
    for bad in (1.5, True, "8"):
        with pytest.raises(TypeError, match="chunk_size must be an int"):
            ours["SigLipLoss"](chunk_size=bad)
    with pytest.raises(ValueError, match="dist_impl must be one of"):
        ours["SigLipLoss"](dist_impl="ring")
    for name in ("ClipLoss", "DistillClipLoss"):
        with pytest.raises(ValueError, match="use_horovod"):
            ours[name](use_horovod=True)
    with pytest.raises(ValueError, match="use_horovod"):
        ours["CoCaLoss"](1.0, 1.0, use_horovod=True)
    with pytest.raises(TypeError, match="unexpected keyword argument 'chunk'"):
        ours["SigLipLoss"](chunk=8)
    with pytest.raises(ValueError, match="backend must be 'auto' or one of"):
        fco.patch(backend="fast")
    with pytest.raises(ValueError, match="losses: cannot patch"):
        fco.patch(losses=("GenLipLoss",))
    assert not fco.is_patched()
    x, y, s, b = _feats(4, 4)
    with pytest.raises(ValueError, match="image_features"):
        ours["SigLipLoss"]()._loss(x[0], y, s, b)
