"""Property-based fuzz of the public losses (issue 20, point 4): shapes, values (huge and tiny features and scales,
±inf / NaN features, invalid labels), debug mode on and off, every backend.

The invariant, whatever the input: the call raises a clear error (ValueError / TypeError / RuntimeError whose
message names the offending argument, the backend or fastcontrast), or the answer is NaN (or ±inf: no plausible
number either), or it is the float64 reference's answer on the same (rounded) inputs: a finite loss or gradient
that the reference does not give is a silent wrong answer and fails. Beyond that, what must raise does: a Python scale that is not a finite positive
number always, non-finite features and out-of-range labels in debug mode.

Bounded for CI: few examples, no deadline, derandomised (the same examples on every run), no example database.
"""
from __future__ import annotations

import inspect
import math
import re

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis", reason="hypothesis is in tests/requirements-test.txt")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import fastcontrast as fc  # noqa: E402
from fastcontrast import functional as Fn  # noqa: E402
from _ops import dispatch_of, uncovered  # noqa: E402
from fastcontrast.dispatch import BACKENDS, unavailable_reason  # noqa: E402

CPU = torch.device("cpu")
FUZZ = settings(max_examples=200, deadline=None, derandomize=True, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
# |out − ref| <= TOL·(|ref| + T), T the size of the terms the loss adds up (see _term_size)
TOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 2e-2}

# op -> (dispatcher op, feature rank, what the scale-like argument is called, accepts a bias, normalises)
_FUZZED = {
    "clip_loss": (2, "logit_scale", True, None),
    "siglip_loss": (2, "logit_scale", True, False),
    "ce_rows": (2, "logit_scale", True, False),
    "oblique_clip_loss": (3, "logit_scale", True, True),
    "adaptive_temperature_clip_loss": (2, "tau_image", True, None),
    "max_margin_loss": (2, "margin", False, None),
    "momentum_contrastive_loss": (2, "logit_scale", False, None),
    "distill_clip_loss": (2, "logit_scale", False, False),
    "matryoshka_ce_rows": (2, "logit_scale", False, None),
    "matryoshka_clip_loss": (2, "logit_scale", False, None),
}
OPS = {name: (dispatch_of(name),) + spec for name, spec in _FUZZED.items()}  # dispatcher ops: the op list's
# codebook_loss: its Sinkhorn targets are a non-smooth function of the teacher (argmax-like at small ε), so a
# drawn magnitude tells little; its inputs are swept and validated (test_opinfo_sweep, test_codebook)
# lse_rows: a building block, not a loss (an (N,) log-sum-exp, keep instead of labels, any finite scale); its
# arguments are swept (test_opinfo_sweep) and its bad inputs, NaN and range cases tested (test_lse_rows)
NOT_FUZZED = ("codebook_loss", "lse_rows")


def test_every_public_loss_of_the_op_list_is_fuzzed():
    assert not uncovered(OPS, NOT_FUZZED), uncovered(OPS, NOT_FUZZED)
NO_LABELS = ("momentum_contrastive_loss", "distill_clip_loss")
FEATURE_NAMES = {2: ("image_features", "text_features"), 3: ("image_tokens", "text_tokens")}
# Ordinary values first: hypothesis draws (and shrinks) towards the front of a list.
MAGNITUDES = (1.0, 1e-4, 1e4, 1e-30, 1e30)
# mostly valid values (huge and tiny included), some that must be refused (or, as tensors, computed with)
SCALES = (3.0, 0.5, 100.0, 1e-6, 1e6, 1e-30, 1e30) * 3 + (0.0, -2.0, math.inf, -math.inf, math.nan)
BIASES = (None, -5.0, 0.0, 5.0, -1e30, 1e30) * 3 + (math.nan,)
SPECIALS = (None,) * 6 + (math.nan, math.inf, -math.inf)


def _backends(op):
    return [b for b in BACKENDS if unavailable_reason(OPS[op][0], b, CPU) is None] + ["auto"]


@st.composite
def cases(draw):
    op = draw(st.sampled_from(sorted(OPS)))
    _, rank, _, has_bias, norm = OPS[op]
    c = {
        "op": op, "backend": draw(st.sampled_from(_backends(op))),
        "dtype": draw(st.sampled_from((torch.float32, torch.bfloat16, torch.float16, torch.float64))),
        "n": draw(st.integers(1, 5)), "d": draw(st.integers(1, 9)), "k": draw(st.integers(1, 3)) if rank == 3 else 1,
        "mag": (draw(st.sampled_from(MAGNITUDES)), draw(st.sampled_from(MAGNITUDES))),
        "special": draw(st.sampled_from(SPECIALS)), "special_at": draw(st.integers(0, 10 ** 6)),
        "scale": draw(st.sampled_from(SCALES)), "scale_tensor": draw(st.booleans()),
        "bias": draw(st.sampled_from(BIASES)) if has_bias else None, "debug": draw(st.booleans()),
        "normalize": draw(st.booleans()) if norm is None else norm, "seed": draw(st.integers(0, 2 ** 16)),
        "hardest": draw(st.booleans()) if op == "max_margin_loss" else False,
    }
    c["m"] = c["n"] if draw(st.booleans()) else draw(st.integers(1, 6))
    # labels: none (the diagonal, when square), valid, or with one index outside [0, M)
    kind = draw(st.sampled_from(("none", "valid", "valid", "valid", "bad"))) if op != "ce_rows" else \
        draw(st.sampled_from(("valid", "valid", "valid", "bad")))
    if kind == "none" and c["m"] != c["n"] and draw(st.integers(0, 3)):  # mostly labelled where required
        kind = "valid"
    if op in NO_LABELS:  # paired batches (N != M must be refused), no labels argument
        kind = "none"
    c["labels"] = kind  # "none" with N != M: the call must say labels are required
    c["bad_label"] = draw(st.sampled_from((-1, c["m"], c["m"] + 3)))
    return c


def _inputs(c):
    """(kwargs of the call, kwargs of the float64 reference call, feature leaves, their float64 copies)."""
    g = torch.Generator().manual_seed(c["seed"])
    op = c["op"]
    rank = OPS[op][1]
    shapes = [(c["n"], c["k"], c["d"]), (c["m"], c["k"], c["d"])] if rank == 3 else [(c["n"], c["d"]), (c["m"], c["d"])]
    feats = [torch.randn(*s, generator=g, dtype=torch.float64) * mag for s, mag in zip(shapes, c["mag"])]
    if c["special"] is not None:
        t = feats[c["special_at"] % 2]
        t.view(-1)[c["special_at"] % t.numel()] = c["special"]
    leaves = [f.to(c["dtype"]).requires_grad_() for f in feats]
    refs = [f.detach().double().requires_grad_() for f in leaves]
    kw, rkw = {}, {}
    for name, a, r in zip(FEATURE_NAMES[rank], leaves, refs):
        kw[name], rkw[name] = a, r
    rename = {"ce_rows": ("a", "b"), "momentum_contrastive_loss": ("query", "keys"),
              "matryoshka_ce_rows": ("queries", "keys")}.get(op)
    if rename:
        kw[rename[0]], kw[rename[1]] = kw.pop("image_features"), kw.pop("text_features")
        rkw[rename[0]], rkw[rename[1]] = rkw.pop("image_features"), rkw.pop("text_features")
    if op == "momentum_contrastive_loss":  # the teacher: ordinary values, no gradient; a queue of m rows
        tq = torch.randn(c["n"], c["d"], generator=g, dtype=torch.float64)
        kw["teacher_query"], rkw["teacher_query"] = tq.to(c["dtype"]), tq.to(c["dtype"]).double()
        queue = torch.randn(c["m"], c["d"], generator=g, dtype=torch.float64)
        kw["queue"], rkw["queue"] = queue.to(c["dtype"]), queue.to(c["dtype"]).double()
        kw["normalize"] = rkw["normalize"] = c["normalize"]
    if op == "distill_clip_loss":  # teacher features of another width, ordinary values
        for name, rows in (("teacher_image_features", c["n"]), ("teacher_text_features", c["m"])):
            t = torch.randn(rows, c["d"] + 2, generator=g, dtype=torch.float64).to(c["dtype"])
            kw[name], rkw[name] = t, t.double()
        kw["teacher_logit_scale"] = rkw["teacher_logit_scale"] = 2.0
    sname = OPS[op][2]
    s = c["scale"]
    if c["scale_tensor"]:
        kw[sname] = torch.tensor(s, dtype=torch.float64 if c["dtype"] == torch.float64 else torch.float32)
        rkw[sname] = kw[sname].double()
    else:
        kw[sname] = rkw[sname] = s
    if OPS[op][3]:
        kw["logit_bias"] = rkw["logit_bias"] = c["bias"]
    if c["labels"] != "none":
        labels = torch.randint(0, c["m"], (c["n"],), generator=g)
        if c["labels"] == "bad":
            labels[c["special_at"] % c["n"]] = c["bad_label"]
        kw["labels"] = rkw["labels"] = labels
    if op in ("clip_loss", "adaptive_temperature_clip_loss", "max_margin_loss", "matryoshka_ce_rows",
              "matryoshka_clip_loss"):
        kw["normalize"] = rkw["normalize"] = c["normalize"]
    if op.startswith("matryoshka"):  # prefixes d, d/2, 1 (fewer where they coincide), weights 1
        kw["dims"] = rkw["dims"] = tuple(sorted({c["d"], max(1, c["d"] // 2), 1}, reverse=True))
    if op == "max_margin_loss":
        kw["hardest"] = rkw["hardest"] = c["hardest"]
    return kw, rkw, leaves, refs


FN = {"clip_loss": fc.clip_loss, "siglip_loss": fc.siglip_loss, "ce_rows": Fn.ce_rows,
      "oblique_clip_loss": fc.oblique_clip_loss, "adaptive_temperature_clip_loss": fc.adaptive_temperature_clip_loss,
      "max_margin_loss": fc.max_margin_loss, "momentum_contrastive_loss": fc.momentum_contrastive_loss,
      "distill_clip_loss": fc.distill_clip_loss, "matryoshka_ce_rows": fc.matryoshka_ce_rows,
      "matryoshka_clip_loss": fc.matryoshka_clip_loss}


def _normed(t, tokens):
    return torch.nn.functional.normalize(t, dim=-1) if tokens else t


def _term_size(c, rkw) -> float:
    """The size of the terms the loss adds up: |scale|·max|S_ij| + |bias| + 1 (for the hinge: max|S_ij| +
    |margin| + 1), from the float64 inputs. Rounding is relative to it, not to a loss that cancels to ~0."""
    x, y = [t.detach() for k, t in rkw.items() if k in ("image_features", "text_features", "image_tokens",
                                                          "text_tokens", "a", "b", "query", "keys", "queries")]
    if "queue" in rkw:
        y = torch.cat([y, rkw["queue"]])
    if c["normalize"]:
        x, y = _normed(x, True), _normed(y, True)
    s = (x.reshape(x.shape[0], -1) @ y.reshape(y.shape[0], -1).T).abs().max().item()
    v = abs(float(c["scale"]))
    if c["op"] == "adaptive_temperature_clip_loss":
        v = 1.0 / v if v else math.inf
    if c["op"] == "max_margin_loss":
        return s + v + 1.0
    return v * s + abs(c["bias"] or 0.0) + 1.0


def _must_raise(c) -> bool:
    """Inputs that must be refused: a Python number for the scale that is not finite (or, except the margin, not
    > 0), a negative Python margin; in debug mode also non-finite features (after rounding to the dtype), a
    tensor scale that is not finite and > 0 (the margin: finite), and labels outside [0, M)."""
    s = c["scale"]
    finite = math.isfinite(s)
    if not c["scale_tensor"] and (not finite or s < 0 or (s == 0 and c["op"] != "max_margin_loss")):
        return True
    if c["bias"] is not None and not math.isfinite(c["bias"]):
        return True
    if not c["debug"]:
        return False
    if c["scale_tensor"] and (not finite or (s <= 0 and c["op"] != "max_margin_loss")):
        return True
    return c["labels"] == "bad"


def _names_an_argument(msg: str, fn) -> bool:
    """The message starts with an argument's name ("labels must ...") or names one, the backend or fastcontrast."""
    names = list(inspect.signature(fn).parameters) + ["fastcontrast"]
    return any(msg.startswith(f"{k} ") for k in names) or any(
        re.search(rf"\b{re.escape(k)}\b", msg) for k in names if len(k) > 1)


def check(c):
    kw, rkw, leaves, refs = _inputs(c)
    fn = FN[c["op"]]
    non_finite_features = not all(bool(torch.isfinite(t).all()) for t in leaves)
    try:
        with fc.debug(c["debug"]):
            outs = fn(**kw, backend=c["backend"])
            outs = outs if isinstance(outs, tuple) else (outs,)  # distill: (contrastive, distill)
            out = sum(outs)
            grads = torch.autograd.grad(out, leaves, allow_unused=True) if out.requires_grad else (None, None)
    except (ValueError, TypeError, RuntimeError) as e:
        msg = str(e)
        assert _names_an_argument(msg, fn), f"{c}: an error that names nothing: {type(e).__name__}: {msg}"
        return "error"
    assert not _must_raise(c), f"{c}: should have raised, returned {out}"
    assert not (c["debug"] and non_finite_features), f"{c}: debug mode let non-finite features through: {out}"
    if any(bool(torch.isnan(o)) for o in outs):
        return "nan"
    if any(bool(torch.isinf(o)) for o in outs):  # no plausible number either: an overflow (the fused kernels form
        return "inf"  # ⟨x, y⟩ before the norms, so fp32 features above ~1e19 overflow where the reference does not)
    routs = fn(**rkw, backend="reference")  # debug off: the reference's answer, NaN included
    routs = routs if isinstance(routs, tuple) else (routs,)
    rout = sum(routs)
    dt = c["dtype"]
    tol = TOL[dt]
    t = _term_size(c, rkw)
    for o, r in zip(outs, routs):
        assert torch.isfinite(r), f"{c}: finite {float(o)} where the reference gives {float(r)}"
        err = abs(float(o) - float(r))
        assert err <= tol * (abs(float(r)) + t), f"{c}: loss {float(o)} vs reference {float(r)} (terms {t:.3g})"
    if not rout.requires_grad:
        return "ok"
    rgrads = torch.autograd.grad(rout, refs, allow_unused=True)
    for name, a, b, leaf in zip(("x", "y"), grads, rgrads, leaves):
        if a is None or b is None:
            assert a is None or not bool(a.abs().sum() > 0) or b is not None, f"{c}: d{name} without a reference"
            continue
        if not bool(torch.isfinite(a).all()):  # NaN, or inf from an overflowing product: no plausible number
            continue
        assert bool(torch.isfinite(b).all()), f"{c}: finite d{name} where the reference's is not"
        # the gradient's terms: the term size times the other side's feature size, over the smallest feature
        # norm where normalising (the Jacobian of x/|x|)
        other = refs[1] if name == "x" else refs[0]
        scale = max(abs(float(c["scale"])) if c["op"] != "adaptive_temperature_clip_loss"
                    else 1.0 / max(abs(float(c["scale"])), 1e-300), 1.0)
        g_terms = scale * float(other.detach().abs().max()) * max(c["n"], c["m"])
        if c["normalize"]:
            own = leaf.detach().double().reshape(leaf.shape[0], -1)
            g_terms = scale * max(c["n"], c["m"]) / max(float(own.norm(dim=-1).min()), 1e-300)
        # a logit of size T holds |scale·S| only to eps·T: a huge bias leaves the softmax with nothing to resolve
        eps = torch.finfo(torch.float64 if dt == torch.float64 else torch.float32).eps
        gerr = float((a.double() - b).norm())
        assert gerr <= tol * float(b.norm()) + 4 * g_terms * max(tol, 4 * eps * t), \
            f"{c}: d{name} off by {gerr:.3g} (|ref| {float(b.norm()):.3g}, terms {g_terms:.3g})"
    return "ok"


def test_fuzz_clear_error_nan_or_reference():
    """The invariant on every draw; and the draws are not vacuous: they reach errors, NaN and compared answers."""
    seen = []

    @FUZZ
    @given(cases())
    def fuzz(c):
        seen.append(check(c))

    fuzz()
    assert {"error", "nan", "ok"} <= set(seen), seen
