"""OpInfo-style sweep (issue 20, point 4): every public loss × every available backend × dtype × shape class ×
layout × kind of scale/bias argument, forward and every gradient against the float64 reference evaluated on the
same (rounded) inputs.

Sampling, to stay fast on 2 cores: the full product op × backend × dtype on the base shape (contiguous, default
argument kinds); then, for each op × backend, each shape class, each layout and each argument kind varied one at a
time from that base. Combinations an op cannot take (a batch mismatch for a paired loss, a tensor where only a
number is accepted, ``None`` for a required scale) must raise a clear error whose message names the argument; the
sweep asserts the message. Backends an op has no implementation for must refuse, naming the backend and the op.

Layouts are views of a leaf tensor (the gradient is compared on the leaf): ``transposed`` is ``.t()`` of a d×N
tensor, ``sliced`` every other row and column of a buffer whose unused elements are NaN (a kernel that reads
outside the view answers NaN, which never passes), ``expanded`` stride-0 rows, ``offset`` a view one element
into a flat buffer (storage offset not 16-byte aligned; the element before is NaN).
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Callable, Dict, Optional, Tuple

import pytest
import torch

import fastcontrast as fc
from fastcontrast import oplist
from fastcontrast.dispatch import BACKENDS, BackendUnavailableError, unavailable_reason

CPU = torch.device("cpu")
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
DT_ID = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}
# Against the float64 reference on the same rounded inputs: what is left is the kernels' own arithmetic.
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}
LAYOUTS = ("contiguous", "transposed", "sliced", "expanded", "offset")

# Values exact in every dtype (bf16 included), so the kind of an argument never changes its value.
SCALE, BIAS, TAU_I, TAU_T, MARGIN = 2.5, -1.5, 0.5, 0.25, 0.25


# ------------------------------------------------------------------------------------------------ the ops
@dataclasses.dataclass
class Scalar:
    """A scale-like argument: its base value, its default kind, and how each kind it refuses is refused."""
    value: float
    base: str = "grad"
    refuse: Dict[str, Tuple[type, str]] = dataclasses.field(default_factory=dict)
    kinds: Tuple[str, ...] = ("float", "tensor", "grad", "dtype", "shape1", "none")


REQUIRED = lambda name: {"none": (TypeError, rf"{name} must be a float or a one-element tensor")}  # noqa: E731
NUMBER_ONLY = lambda name: {k: (TypeError, rf"{name} must be a float") for k in  # noqa: E731
                            ("tensor", "grad", "dtype", "shape1", "vector", "none")}


@dataclasses.dataclass
class Op:
    name: str
    dispatch: str  # the dispatcher's op: decides which backends apply
    fn: Callable
    make: Callable  # (shape, n, m, d, k, g) -> (features {name: float64 tensor}, other kwargs)
    scalars: Dict[str, Scalar]
    shapes: Tuple[str, ...] = ("n1", "ragged", "d1", "d13")
    refuse_shape: Dict[str, Tuple[type, str]] = dataclasses.field(default_factory=dict)
    fixed: Dict = dataclasses.field(default_factory=dict)  # constant keyword arguments
    tokens: bool = False  # features are (N, K, d)
    base: str = "base"  # the shape class of the product and of the layout / argument-kind variations


def _rn(g, *shape):
    v = torch.randn(*shape, generator=g, dtype=torch.float64)
    if shape[-1] == 1:  # d = 1: away from 0, where normalising (x/|x|, a Jacobian of size 1/|x|) is ill-posed
        v = v.sign() * (0.5 + v.abs())
    return v


def _labels(g, n, m):
    return torch.randint(0, m, (n,), generator=g)


# Shape classes: (N, M, d, K). The base is square with the diagonal as positives; "ragged" has N != M and labels.
# "ids": group ids instead of labels (several positives per row, UniCL / SigLIP+), N != M.
SHAPES = {"base": (6, 6, 16, 2), "n1": (1, 1, 16, 2), "ragged": (5, 9, 16, 2), "d1": (6, 6, 1, 3),
          "d13": (6, 6, 13, 3), "tokens": (5, 7, 3, 4), "ids": (6, 8, 16, 2)}


def _positives(g, n, m, shape):
    if shape == "ids":  # 3 groups: every row has several positives, some column may have none
        return {"image_ids": torch.randint(0, 3, (n,), generator=g), "text_ids": torch.randint(0, 4, (m,), generator=g)}
    return {"labels": _labels(g, n, m)} if n != m else {}


def _pair(shape, g):
    n, m, d, _ = SHAPES[shape]
    feats = {"image_features": _rn(g, n, d), "text_features": _rn(g, m, d)}
    return feats, _positives(g, n, m, shape)


def _tokens(shape, g):
    n, m, d, k = SHAPES[shape]
    feats = {"image_tokens": _rn(g, n, k, d), "text_tokens": _rn(g, m, k, d)}
    return feats, _positives(g, n, m, shape)


def _negatives(shape, g):  # negative_only: no positives at all, so no labels even when N != M
    return _pair(shape, g)[0], {}


def _ce_rows(shape, g):
    n, m, d, _ = SHAPES[shape]
    return {"a": _rn(g, n, d), "b": _rn(g, m, d)}, {"labels": _labels(g, n, m)}


def _margin(shape, g):
    feats, other = _pair(shape, g)
    return feats, other


def _codebook(shape, g):
    n, m, d, _ = SHAPES[shape]
    feats = {"image_features": _rn(g, n, d), "text_features": _rn(g, n, d), "teacher_image_features": _rn(g, n, d),
             "teacher_text_features": _rn(g, n, d), "codebook": _rn(g, 7, d)}
    if n != m:  # ragged: queues of earlier teacher rows take part in the Sinkhorn (Q != N)
        feats["queue_image"], feats["queue_text"] = _rn(g, m, d), _rn(g, m, d)
    return feats, {}


def _momentum(shape, g):
    n, m, d, _ = SHAPES[shape]
    feats = {"query": _rn(g, n, d), "keys": _rn(g, n, d), "teacher_query": _rn(g, n, d)}
    if n != m:
        feats["queue"] = _rn(g, m, d)
    return feats, {}


def _distill(shape, g):
    n, m, d, _ = SHAPES[shape]
    dt = d + 3  # the teacher's width differs from the student's
    return {"image_features": _rn(g, n, d), "text_features": _rn(g, m, d), "teacher_image_features": _rn(g, n, dt),
            "teacher_text_features": _rn(g, m, dt)}, {}


def _matryoshka(shape, g, names=("image_features", "text_features")):
    """Prefix ends inside the features (d = 16: 16, 8, 3; d = 13: 13, 6, 2; d = 1: 1), weights one per dim."""
    n, m, d, _ = SHAPES[shape]
    dims = tuple(sorted({d, max(1, d // 2), max(1, d // 5)}, reverse=True))
    other = {"dims": dims, "weights": tuple(0.5 + i for i in range(len(dims)))}
    feats = {names[0]: _rn(g, n, d), names[1]: _rn(g, m, d)}
    return feats, dict(other, **_positives(g, n, m, shape))


def _matryoshka_ce_rows(shape, g):
    return _matryoshka(shape, g, ("queries", "keys"))


def _guides(g, rows, dg=5, clusters=3, cid=None):
    """Guide rows near orthonormal directions (cosines ≈ 1 or ≈ 0, far from the thresholds), float32."""
    cid = torch.randint(0, clusters, (rows,), generator=g) if cid is None else cid
    return (torch.eye(clusters, dg)[cid] + 0.01 * torch.randn(rows, dg, generator=g)).float()


def _lse_rows(shape, g):  # every mask of lse_rows; the weights give each row its upstream gradient
    n, m, d, _ = SHAPES[shape]
    other = {"row_weights": (0.5 + torch.rand(n, generator=g)).float(), "keep": torch.randint(0, m, (n,), generator=g),
             "row_ids": torch.randint(0, 3, (n,), generator=g), "col_ids": torch.randint(0, 3, (m,), generator=g),
             "hard_cols": torch.rand(m, generator=g) < 0.4, "guide_queries": _guides(g, n),
             "guide_keys": _guides(g, m), "guide_threshold": torch.full((n,), 0.5)}
    return {"queries": _rn(g, n, d), "keys": _rn(g, m, d)}, other


def _clip_masked(shape, g):  # NegCLIP's negatives (a feature: their gradient is compared), ids, a guide
    n, m, d, _ = SHAPES[shape]
    feats, other = _pair(shape, g)
    feats["text_negatives"] = _rn(g, 3, d)
    cx, cy = torch.randint(0, 3, (n,), generator=g), torch.randint(0, 3, (m,), generator=g)
    cy[other.get("labels", torch.arange(n))] = cx  # the guide sees each pair alike (as GISTEmbed's guide does)
    other.update(false_negative_ids=(torch.randint(0, 3, (n,), generator=g), torch.randint(0, 3, (m,), generator=g)),
                 guide_image_features=_guides(g, n, cid=cx), guide_text_features=_guides(g, m, cid=cy),
                 guide_text_negatives=_guides(g, 3))
    return feats, other


def _scale(**refuse):
    return Scalar(SCALE, refuse={**REQUIRED("logit_scale"), **refuse})


def _bias():
    return Scalar(BIAS, base="float")


def _tau(name, value, none_ok=False):
    return Scalar(value, refuse={} if none_ok else REQUIRED(name), kinds=Scalar(0).kinds + ("vector",))


MARGIN_KINDS = ("float", "tensor", "grad", "dtype", "shape1", "vector", "none")

IDS = ("n1", "ragged", "d1", "d13", "ids")
def _src(name):
    """(dispatcher op, public function) of the op list's entry ``name``: the sweep iterates the one op list."""
    o = oplist.get(name)
    return o.dispatch, o.fn


OPS = [
    Op("clip_loss", *_src("clip_loss"), _pair, {"logit_scale": _scale(), "logit_bias": _bias()}, shapes=IDS),
    Op("clip_loss(normalize)", *_src("clip_loss"), _pair, {"logit_scale": _scale(), "logit_bias": _bias()},
       fixed={"normalize": True}),
    Op("siglip_loss", *_src("siglip_loss"), _pair, {"logit_scale": _scale(), "logit_bias": _bias()}, shapes=IDS),
    Op("siglip_loss(inverse_count)", *_src("siglip_loss(ids,inverse_count)"), _pair,
       {"logit_scale": _scale(), "logit_bias": _bias()}, base="ids", shapes=("base",),
       fixed={"weighting": "inverse_count"},
       refuse_shape={"base": (ValueError, r"weighting='inverse_count' needs image_ids and text_ids")}),
    Op("siglip_loss(negative_only)", *_src("siglip_loss"), _negatives,
       {"logit_scale": _scale(), "logit_bias": _bias()}, fixed={"negative_only": True}),
    Op("oblique_clip_loss", *_src("oblique_clip_loss"), _tokens,
       {"logit_scale": _scale(), "logit_bias": _bias()}, shapes=("n1", "ragged", "d1", "d13", "tokens", "ids"),
       tokens=True),
    Op("adaptive_temperature_clip_loss", *_src("adaptive_temperature_clip_loss"), _pair,
       {"tau_image": _tau("tau_image", TAU_I), "tau_text": _tau("tau_text", TAU_T, none_ok=True),
        "logit_bias": _bias()}, shapes=IDS, fixed={"normalize": True}),
    Op("max_margin_loss", *_src("max_margin_loss"), _margin,
       {"margin": Scalar(MARGIN, base="float", kinds=MARGIN_KINDS, refuse={"none": (TypeError, "margin must be")})},
       refuse_shape={"n1": (ValueError, r"reduction='mean' averages the hinge over the negatives.*M = 1")}),
    Op("max_margin_loss(hardest)", *_src("max_margin_loss"), _margin,
       {"margin": Scalar(MARGIN, base="float", kinds=MARGIN_KINDS, refuse={"none": (TypeError, "margin must be")})},
       fixed={"hardest": True}),
    Op("max_margin_loss(sum)", *_src("max_margin_loss"), _margin,
       {"margin": Scalar(MARGIN, base="float", kinds=MARGIN_KINDS, refuse={"none": (TypeError, "margin must be")})},
       fixed={"reduction": "sum"}),
    Op("ce_rows", *_src("ce_rows"), _ce_rows, {"logit_scale": _scale(), "logit_bias": _bias()}),
    Op("lse_rows(masks)", *_src("lse_rows(masks)"), _lse_rows, {"logit_scale": _scale()},
       fixed={"normalize": True, "exclude_same": True, "hardness_strength": 2.0,
              "hardness_cells": ("same_hard", "other_inbatch")}),
    Op("clip_loss(false_negative_ids,guide)", *_src("clip_loss(false_negative_ids,guide)"), _clip_masked,
       {"logit_scale": _scale(), "logit_bias": _bias()}, fixed={"normalize": True, "guide_margin": 0.1}),
    Op("codebook_loss", *_src("codebook_loss"), _codebook,
       {"tau": Scalar(TAU_T, base="float", refuse=NUMBER_ONLY("tau"))}, fixed={"epsilon": 0.25, "n_iters": 4}),
    Op("momentum_contrastive_loss", *_src("momentum_contrastive_loss"), _momentum,
       {"logit_scale": _scale()}, fixed={"alpha": 0.4}),
    Op("matryoshka_ce_rows", *_src("matryoshka_ce_rows"), _matryoshka_ce_rows, {"logit_scale": _scale()}),
    Op("matryoshka_clip_loss", *_src("matryoshka_clip_loss"), _matryoshka, {"logit_scale": _scale()}),
    Op("matryoshka_clip_loss(dot)", *_src("matryoshka_clip_loss"), _matryoshka, {"logit_scale": _scale()},
       shapes=("ragged",), fixed={"normalize": False}),
    Op("distill_clip_loss", *_src("distill_clip_loss"), _distill,
       {"logit_scale": _scale(), "teacher_logit_scale": Scalar(2.0, refuse=REQUIRED("teacher_logit_scale"))},
       refuse_shape={"ragged": (ValueError, "distill_clip_loss pairs image i with text i: batches must match")}),
]
OP = {o.name: o for o in OPS}


def test_the_sweep_covers_every_public_loss_of_the_op_list():
    """A new op in fastcontrast.oplist without a sweep entry fails here, naming it."""
    swept = {o.fn for o in OPS}
    missing = sorted({o.name for o in oplist.OPS if o.fn not in swept})
    assert not missing, f"ops of the op list the sweep does not cover: {missing}"


def backends(op: Op):
    return [b for b in BACKENDS if unavailable_reason(op.dispatch, b, CPU) is None] + ["auto"]


# ------------------------------------------------------------------------------------------------ layouts
def _layout(v: torch.Tensor, layout: str, dtype) -> Tuple[torch.Tensor, Callable]:
    """(leaf, view): the leaf (requires grad) and the function that turns it (or its float64 copy) into the
    argument; ``view(leaf)`` holds ``v``'s values (for "expanded", v's first row repeated)."""
    v = v.to(dtype)
    if layout == "contiguous":
        return v.clone(), lambda t: t
    if layout == "transposed":  # .t() of a d×N tensor (all dims reversed for tokens)
        perm = tuple(reversed(range(v.dim())))
        return v.permute(perm).contiguous(), lambda t: t.permute(perm)
    if layout == "sliced":  # every other row and every other feature of a NaN-padded buffer
        buf = torch.full(tuple(2 * s for s in v.shape), float("nan"), dtype=dtype)
        idx = (slice(None, None, 2),) * v.dim()
        buf[idx] = v
        return buf, lambda t: t[idx]
    if layout == "expanded":  # stride-0 rows (first feature argument only: identical rows on both sides would
        # make every gradient vanish, a comparison of rounding noise)
        shape = v.shape
        return v[:1].clone(), lambda t: t.expand(shape)
    if layout == "offset":  # one element into a flat buffer: storage offset 2, 4 or 8 bytes, never 16-aligned
        buf = torch.cat([torch.full((1,), float("nan"), dtype=dtype), v.reshape(-1)])
        shape = v.shape
        return buf, lambda t: t[1:].view(shape)
    raise AssertionError(layout)


def _scalar_arg(kind: str, value: float, dtype, n: int, g):
    """(test argument, reference argument) of one kind; tensors that take a gradient are the leaves."""
    f32 = torch.float64 if dtype == torch.float64 else torch.float32
    if kind == "float":
        return value, value
    if kind == "none":
        return None, None
    if kind == "vector":  # per sample, around the value, with a gradient
        v = (value * (0.75 + 0.5 * torch.rand(n, generator=g, dtype=torch.float64))).to(f32).requires_grad_()
    elif kind == "tensor":
        v = torch.tensor(value, dtype=f32)
    elif kind == "grad":
        v = torch.tensor(value, dtype=f32, requires_grad=True)
    elif kind == "dtype":  # a learnable scale of a model cast to the features' dtype (model.half())
        v = torch.tensor(value, dtype=dtype, requires_grad=True)
    elif kind == "shape1":
        v = torch.tensor([value], dtype=f32, requires_grad=True)
    else:
        raise AssertionError(kind)
    return v, v.detach().double().requires_grad_(v.requires_grad)


def rel_err(a: torch.Tensor, b: torch.Tensor, typical: float = 0.0) -> float:
    """‖a − b‖ / max(‖b‖, typical) in float64; NaN/inf in ``a`` gives inf (NaN never passes).

    ``typical``: the norm the same quantity has on the base shape. Where the exact value is 0 or nearly (the
    loss and gradients of N = M = 1, the bias gradient of a softmax, features normalised in d = 1) a dtype's
    rounding is relative to the size of the terms that cancel, not to the 0 they cancel to."""
    a, b = a.detach().double(), b.detach().double()
    if not bool(torch.isfinite(a).all()):
        return math.inf
    den = max(float(b.norm()), typical)
    return float((a - b).norm() / den) if den > 0 else float((a - b).norm())


def _expect_out_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------- the check
@dataclasses.dataclass(frozen=True)
class Case:
    op: str
    backend: str
    dtype: torch.dtype
    shape: str = "base"
    layout: str = "contiguous"
    kinds: Tuple[Tuple[str, str], ...] = ()  # (argument, kind) overrides of the op's base kinds

    @property
    def id(self):
        kinds = ",".join(f"{a}={k}" for a, k in self.kinds)
        return "-".join(x for x in (self.op, self.backend, DT_ID[self.dtype], self.shape, self.layout, kinds) if x)


def _build(case: Case, seed: int = 0):
    op = OP[case.op]
    g = torch.Generator().manual_seed(seed)
    feats, other = op.make(case.shape, g)
    kw, rkw, leaves, rleaves, names = dict(op.fixed), dict(op.fixed), [], [], []
    for i, (name, v) in enumerate(feats.items()):
        leaf, view = _layout(v, case.layout if case.layout != "expanded" or i == 0 else "contiguous", case.dtype)
        leaf.requires_grad_()
        rleaf = leaf.detach().double().requires_grad_()
        kw[name], rkw[name] = view(leaf), view(rleaf).contiguous()
        leaves.append(leaf)
        rleaves.append(rleaf)
        names.append(name)
    n = next(iter(feats.values())).shape[0]
    kinds = dict(case.kinds)
    for name, sc in op.scalars.items():
        kind = kinds.get(name, sc.base)
        size = n if name != "tau_text" else feats["text_features"].shape[0]
        a, ra = _scalar_arg(kind, sc.value, case.dtype, size, g)
        kw[name], rkw[name] = a, ra
        if isinstance(a, torch.Tensor) and a.requires_grad:
            leaves.append(a)
            rleaves.append(ra)
            names.append(name)
    kw.update(other)
    rkw.update(other)
    return kw, rkw, leaves, rleaves, names


def _expected_error(case: Case) -> Optional[Tuple[type, str]]:
    op = OP[case.op]
    if case.shape in op.refuse_shape:
        return op.refuse_shape[case.shape]
    for name, kind in case.kinds:
        if kind in op.scalars[name].refuse:
            return op.scalars[name].refuse[kind]
    return None


def _loss(out):
    return out[0] + out[1] if isinstance(out, tuple) else out


def _run(case: Case, seed: int = 0):
    """(outputs, reference outputs, [(name, grad, reference grad, leaf)])."""
    kw, rkw, leaves, rleaves, names = _build(case, seed)
    out = OP[case.op].fn(**kw, backend=case.backend)
    ref = OP[case.op].fn(**rkw, backend="reference")
    gs = torch.autograd.grad(_loss(out), leaves, allow_unused=True)
    rgs = torch.autograd.grad(_loss(ref), rleaves, allow_unused=True)
    outs, refs = (out, ref) if isinstance(out, tuple) else ((out,), (ref,))
    return outs, refs, list(zip(names, gs, rgs, leaves))


_TYPICAL: Dict[str, Dict[str, float]] = {}


def _typical(op: str) -> Dict[str, float]:
    """Norms of the float64 reference's outputs and gradients on the base shape: the scale of each quantity."""
    if op not in _TYPICAL:
        outs, _, grads = _run(Case(op, "reference", torch.float64, OP[op].base))
        t = {f"forward[{i}]": float(o.detach().abs()) for i, o in enumerate(outs)}
        t.update({f"d/d{name}": float(g.norm()) for name, g, _, _ in grads if g is not None})
        for name, sc in OP[op].scalars.items():  # ∂L/∂s is of the size L/s (the bias of a softmax: 0 exactly)
            w = f"d/d{name}"
            t[w] = max(t.get(w, 0.0), t["forward[0]"] / abs(sc.value))
        _TYPICAL[op] = t
    return _TYPICAL[op]


def errors(case: Case, seed: int = 0):
    """[(what, rel err, detail)] of the forward outputs and of every gradient against the float64 reference."""
    outs, refs, grads = _run(case, seed)
    typ = _typical(case.op)
    res = []
    for i, (o, r) in enumerate(zip(outs, refs)):
        assert o.shape == () and o.dtype == _expect_out_dtype(case.dtype), (case.id, i, o.shape, o.dtype)
        what = f"forward[{i}]"
        res.append((what, rel_err(o, r, typ.get(what, 0.0)), f"{float(o):.10g} vs reference {float(r):.10g}"))
    for name, a, b, leaf in grads:
        if b is None:  # not differentiated by the reference (a teacher, a detached schedule): nor here
            assert a is None or not bool(a.abs().sum() > 0), f"{case.id}: {name} has a gradient the reference has not"
            continue
        assert a is not None or not bool(b.abs().sum() > 0), f"{case.id}: no gradient for {name}"
        if a is None:
            continue
        assert a.shape == leaf.shape and a.dtype == leaf.dtype, (case.id, name, a.shape, a.dtype)
        what = f"d/d{name}"
        res.append((what, rel_err(a, b, typ.get(what, 0.0)), f"|ref| {float(b.norm()):.3g}"))
    return res


def check(case: Case, seed: int = 0):
    want_err = _expected_error(case)
    if want_err is not None:
        kw = _build(case, seed)[0]
        with pytest.raises(want_err[0], match=want_err[1]):
            OP[case.op].fn(**kw, backend=case.backend)
        return
    tol = TOL[case.dtype]
    bad = [f"{what}: rel err {e:.2e} > {tol:.0e} ({detail})" for what, e, detail in errors(case, seed) if not e <= tol]
    assert not bad, f"{case.id}: " + "; ".join(bad)


# ------------------------------------------------------------------------------------------- the cases
def _product_cases():
    return [Case(op.name, b, dt, op.base) for op in OPS for b in backends(op) for dt in DTYPES]


def _one_at_a_time():
    cases = []
    for op in OPS:
        for b in backends(op)[:-1]:  # "auto" is in the product; at these sizes it is dense or the reference
            # bf16 where kernels have low-precision paths; the reference only upcasts (bf16 is in the product)
            for dt in (torch.float32, torch.bfloat16) if b != "reference" else (torch.float32,):
                cases += [Case(op.name, b, dt, shape=s) for s in op.shapes]
                cases += [Case(op.name, b, dt, op.base, layout=lay) for lay in LAYOUTS[1:]]
            for name, sc in op.scalars.items():
                cases += [Case(op.name, b, torch.float32, op.base, kinds=((name, k),))
                          for k in sc.kinds if k != sc.base]
                if "dtype" in sc.kinds and "dtype" not in sc.refuse:  # a half-precision learnable scale
                    cases += [Case(op.name, b, dt, op.base, kinds=((name, "dtype"),))
                              for dt in (torch.bfloat16, torch.float16)]
    return cases


@pytest.mark.parametrize("case", _product_cases(), ids=lambda c: c.id)
def test_product(case):
    check(case)


@pytest.mark.parametrize("case", _one_at_a_time(), ids=lambda c: c.id)
def test_one_at_a_time(case):
    check(case)


# ------------------------------------------------------------------------ refusals and invalid indices
@pytest.mark.parametrize("op,backend", [(op.name, b) for op in OPS for b in BACKENDS
                                        if unavailable_reason(op.dispatch, b, CPU) is not None],
                         ids=lambda v: str(v))
def test_unavailable_backend_says_why(op, backend):
    """A backend an op has no implementation for (or that cannot run here) refuses, naming itself and the op."""
    o = OP[op]
    kw = _build(Case(op, "reference", torch.float32, o.base))[0]
    with pytest.raises(BackendUnavailableError, match=rf"backend '{backend}' is unavailable for '{o.dispatch}': "):
        o.fn(**kw, backend=backend)


@pytest.mark.parametrize("op", [o.name for o in OPS if o.name in ("clip_loss", "siglip_loss", "ce_rows")])
def test_unknown_backend_is_a_value_error(op):
    o = OP[op]
    kw = _build(Case(op, "reference", torch.float32, o.base))[0]
    with pytest.raises(ValueError, match=r"backend: unknown backend 'gpu'; expected one of"):
        o.fn(**kw, backend="gpu")


LABELLED = [o for o in OPS if o.make in (_pair, _tokens, _ce_rows) and o.base == "base"]


@pytest.mark.parametrize("bad", [-1, 9], ids=["negative", "too_large"])
@pytest.mark.parametrize("case", [Case(o.name, b, torch.float32, "ragged") for o in LABELLED for b in backends(o)],
                         ids=lambda c: c.id)
def test_labels_out_of_range_are_nan_or_raise(case, bad):
    """Issue 20 point 1 through every labelled op and backend: a label outside [0, M) makes the loss and every
    gradient NaN (no host sync), or, in debug mode, raises a ValueError giving the range."""
    kw, _, leaves, _, names = _build(case)
    kw["labels"] = kw["labels"].clone()
    kw["labels"][1] = bad
    out = OP[case.op].fn(**kw, backend=case.backend)
    assert torch.isnan(out), f"{case.id}: label {bad} gave {float(out)}"
    for name, gr in zip(names, torch.autograd.grad(out, leaves, allow_unused=True)):
        assert gr is not None and bool(torch.isnan(gr).all()), f"{case.id}: d/d{name} is not NaN"
    with fc.debug(), pytest.raises(ValueError, match=rf"labels must lie in \[0, 9\), got values in"):
        OP[case.op].fn(**kw, backend=case.backend)


def test_negative_only_refuses_positives():
    x, y = torch.randn(3, 4), torch.randn(5, 4)
    with pytest.raises(ValueError, match="negative_only makes every pair a negative: it cannot be combined with labels"):
        fc.siglip_loss(x, y, 1.0, labels=torch.zeros(3, dtype=torch.long), negative_only=True)


@pytest.mark.parametrize("value", [math.nan, math.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("case", [Case(o.name, b, torch.float32, o.base) for o in OPS for b in backends(o)],
                         ids=lambda c: c.id)
def test_non_finite_feature_is_never_a_finite_loss(case, value):
    """One NaN or inf in the first feature argument: never a finite loss (a finite number would hide it), and in
    debug mode a ValueError naming the argument."""
    kw = _build(case)[0]
    name = next(k for k in OP[case.op].make("base", torch.Generator())[0])
    bad = kw[name].detach().clone()
    bad.view(-1)[0] = value
    kw[name] = bad
    out = OP[case.op].fn(**kw, backend=case.backend)
    for o in (out if isinstance(out, tuple) else (out,)):
        assert not bool(torch.isfinite(o)), f"{case.id}: {value} in {name} gave the finite loss {float(o)}"
    with fc.debug(), pytest.raises(ValueError, match=rf"{name} contains non-finite values \(NaN or inf\)"):
        OP[case.op].fn(**kw, backend=case.backend)


@pytest.mark.parametrize("case", [Case(o.name, b, torch.float32, o.base, layout=lay) for o in OPS
                                  for b in backends(o)[:-1] for lay in ("sliced", "offset")], ids=lambda c: c.id)
def test_debug_mode_reads_only_the_view(case):
    """Debug mode's value checks look at the argument, not its storage: the NaN padding around a sliced or
    offset view is no reason to refuse it, and the answer is the reference's."""
    with fc.debug():
        check(case)
