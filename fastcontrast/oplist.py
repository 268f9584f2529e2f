"""The one list of ops: every public loss (and its variants), what it dispatches to, how to make its inputs, and
its FLOP and byte floor. ``python -m fastcontrast validate``, ``bench`` and ``aot`` and the test-suite iterate
:data:`OPS`; adding an op is one entry here plus its files (docs/adding_an_op.md).

An :class:`OpInfo`:

* ``name``: the public function's name, a variant in parentheses (``max_margin_loss(hardest)``);
* ``fn`` + ``call``: the public function and the fixed keyword arguments of the variant;
* ``dispatch``: the dispatcher's op (``fastcontrast.dispatch``); its implementations are
  ``dispatch.registered(dispatch)``, its reference ``backend="reference"``;
* ``make(g, device, dtype, n, m, d, k)``: fresh random inputs at any size (validate: ragged 37×53×40, K = 3);
* ``bench``: whether ``bench`` times it by default; ``bench_make(g, device, dtype, n, d)``: its trainer-like
  inputs (normalised features, leaves with gradients) at batch n;
* ``flops(n, d)`` / ``bytes(n, d, elt)``: the floor of one forward+backward at the bench inputs: the pairwise
  products once plus one GEMM per feature gradient, and each input read and gradient written once.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict, Optional, Tuple

import torch

from . import functional as Fn


@dataclasses.dataclass(frozen=True)
class OpInfo:
    name: str
    fn: Callable
    dispatch: str
    make: Callable
    call: Dict = dataclasses.field(default_factory=dict)
    bench: bool = False
    bench_make: Optional[Callable] = None
    bench_call: Dict = dataclasses.field(default_factory=dict)  # bench's fixed arguments (call is validate's)
    flops: Callable = lambda n, d: 6 * n * n * d
    bytes: Callable = lambda n, d, elt: 4 * n * d * elt
    differentiable: bool = True

    def __call__(self, backend: str = "auto", bench: bool = False, **inputs):
        """The loss on ``inputs`` with the variant's fixed arguments (``bench``: bench's); a tuple's parts summed
        (distill's contrastive + distill terms)."""
        out = self.fn(**inputs, **(self.bench_call if bench else self.call), backend=backend)
        return sum(out) if isinstance(out, tuple) else out

    @property
    def public(self) -> str:
        """The public function's name (without the variant)."""
        return self.name.split("(")[0]


# ------------------------------------------------------------------------------------------ validation inputs
def _randn(g, shape, device, dtype, scale=1.0):
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(device=device, dtype=dtype)


def _f32(dt):
    return torch.float32 if dt != torch.float64 else dt


def _pair(g, dev, dt, n, m, d, k):
    return {"image_features": _randn(g, (n, d), dev, dt), "text_features": _randn(g, (m, d), dev, dt),
            "logit_scale": torch.tensor(7.5, dtype=_f32(dt), device=dev),
            "labels": torch.randint(0, m, (n,), generator=g).to(dev) if n != m else None}


def _square(g, dev, dt, n, m, d, k):
    return {"image_features": _randn(g, (n, d), dev, dt), "text_features": _randn(g, (n, d), dev, dt),
            "logit_scale": torch.tensor(7.5, dtype=_f32(dt), device=dev)}


def _ids(g, dev, dt, n, m, d, k):
    inp = _pair(g, dev, dt, n, m, d, k)
    inp.pop("labels")  # a few groups: several positives per row, some row or column may have none
    inp["image_ids"] = torch.randint(0, 5, (n,), generator=g).to(dev)
    inp["text_ids"] = torch.randint(0, 6, (m,), generator=g).to(dev)
    return inp


def _tokens(g, dev, dt, n, m, d, k):
    dtok = max(d // k, 2)
    return {"image_tokens": _randn(g, (n, k, dtok), dev, dt), "text_tokens": _randn(g, (n, k, dtok), dev, dt),
            "logit_scale": torch.tensor(4.0, dtype=_f32(dt), device=dev)}


def _adaptive(g, dev, dt, n, m, d, k):
    inp = _pair(g, dev, dt, n, m, d, k)
    inp.pop("logit_scale")
    inp["tau_image"] = (0.05 + 0.1 * torch.rand(n, generator=g, dtype=torch.float64)).to(dev, _f32(dt))
    inp["tau_text"] = (0.05 + 0.1 * torch.rand(m, generator=g, dtype=torch.float64)).to(dev, _f32(dt))
    return inp


def _margin(g, dev, dt, n, m, d, k):
    inp = _pair(g, dev, dt, n, m, d, k)
    inp.pop("logit_scale")
    return inp


def _mmts_margin(g, dev, dt, n, m, d, k):  # margin m_i = τ_i(t), MM-TS's per-pair margin
    inp = _margin(g, dev, dt, n, m, d, k)
    inp["margin"] = Fn.mmts_temperature(torch.randint(1, 50, (n,), generator=g).to(dev), 7, 100, 1, 49)
    return inp


def _diagonal_margin(g, dev, dt, n, m, d, k):
    inp = _square(g, dev, dt, n, m, d, k)
    inp.pop("logit_scale")
    inp["margin"] = Fn.mmts_temperature(torch.randint(1, 50, (n,), generator=g).to(dev), 7, 100, 1, 49)
    return inp


def _ce_rows(g, dev, dt, n, m, d, k):
    return {"a": _randn(g, (n, d), dev, dt), "b": _randn(g, (m, d), dev, dt),
            "logit_scale": torch.tensor(7.5, dtype=_f32(dt), device=dev),
            "labels": torch.randint(0, m, (n,), generator=g).to(dev)}


def _codebook(g, dev, dt, n, m, d, k):
    return {"image_features": _randn(g, (n, d), dev, dt), "text_features": _randn(g, (n, d), dev, dt),
            "teacher_image_features": _randn(g, (n, d), dev, dt), "teacher_text_features": _randn(g, (n, d), dev, dt),
            "codebook": _randn(g, (11, d), dev, dt)}


def _codebook_queue(g, dev, dt, n, m, d, k):
    inp = _codebook(g, dev, dt, n, m, d, k)
    inp["queue_image"], inp["queue_text"] = _randn(g, (m, d), dev, dt), _randn(g, (m, d), dev, dt)
    return inp


def _momentum(g, dev, dt, n, m, d, k):  # ALBEF/CODIS instance term: student queries vs teacher keys + a queue
    return {"query": _randn(g, (n, d), dev, dt), "keys": _randn(g, (n, d), dev, dt),
            "teacher_query": _randn(g, (n, d), dev, dt), "queue": _randn(g, (m, d), dev, dt),
            "logit_scale": torch.tensor(1 / 0.07, dtype=_f32(dt), device=dev)}


def _distill(g, dev, dt, n, m, d, k):
    return {"image_features": _randn(g, (n, d), dev, dt), "text_features": _randn(g, (n, d), dev, dt),
            "logit_scale": torch.tensor(7.5, dtype=_f32(dt), device=dev),
            "teacher_image_features": _randn(g, (n, d + 3), dev, dt),
            "teacher_text_features": _randn(g, (n, d + 3), dev, dt),
            "teacher_logit_scale": torch.tensor(4.0, dtype=_f32(dt), device=dev)}


def _matryoshka_dims(d):  # the halvings down to d/8, largest first (d = 40: 40, 20, 10, 5: ends inside a K-chunk)
    return tuple(sorted({v for v in (d, d // 2, d // 4, d // 8) if v >= 1}, reverse=True))


def _matryoshka_ce_rows(g, dev, dt, n, m, d, k):  # MNRL: N queries against M keys (positives + hard negatives)
    dims = _matryoshka_dims(d)
    return {"queries": _randn(g, (n, d), dev, dt), "keys": _randn(g, (m, d), dev, dt),
            "logit_scale": torch.tensor(7.5, dtype=_f32(dt), device=dev),
            "labels": torch.randint(0, m, (n,), generator=g).to(dev), "dims": dims,
            "weights": tuple(1.0 / (1 + i) for i in range(len(dims)))}


def _matryoshka_clip(g, dev, dt, n, m, d, k):
    dims = _matryoshka_dims(d)
    return dict(_pair(g, dev, dt, n, m, d, k), dims=dims, weights=tuple(1.0 + 0.5 * i for i in range(len(dims))))


def _guide_clusters(g, dev, dt, rows, dg=16, clusters=4, cid=None):  # dg 16-divisible, as a guide's 768
    """Guide features near one of a few orthonormal directions (cosine ≈ 1 within a cluster, ≈ 0 across): every
    guide score lies far from the thresholds below, so every backend drops the same entries. ``cid``: the rows'
    clusters (default: drawn)."""
    cid = torch.randint(0, clusters, (rows,), generator=g) if cid is None else cid
    return (torch.eye(clusters, dg, dtype=torch.float64)[cid]
            + 0.01 * torch.randn(rows, dg, generator=g, dtype=torch.float64)).to(dev, dt)


def _lse_rows(g, dev, dt, n, m, d, k):  # one direction of MNRL: queries against documents, each its positive
    return {"queries": _randn(g, (n, d), dev, dt), "keys": _randn(g, (m, d), dev, dt),
            "logit_scale": torch.tensor(7.5, dtype=_f32(dt), device=dev),
            "row_weights": (0.5 + torch.rand(n, generator=g, dtype=torch.float64)).to(dev, _f32(dt)),
            "keep": torch.randint(0, m, (n,), generator=g).to(dev)}


def _lse_rows_masks(g, dev, dt, n, m, d, k):  # every rule: same-group exclusion, a guide, the hardness cells
    inp = _lse_rows(g, dev, dt, n, m, d, k)
    inp.update(row_ids=torch.randint(0, 5, (n,), generator=g).to(dev),
               col_ids=torch.randint(0, 5, (m,), generator=g).to(dev), hard_cols=(torch.rand(m, generator=g) < 0.3
                                                                                  ).to(dev),
               guide_queries=_guide_clusters(g, dev, dt, n), guide_keys=_guide_clusters(g, dev, dt, m),
               guide_threshold=torch.full((n,), 0.5, dtype=_f32(dt), device=dev))
    return inp


def lse_rows_loss(queries, keys, logit_scale, row_weights, backend="auto", **kw):
    """Σ_i w_i·lse_rows_i: :func:`fastcontrast.lse_rows` as the scalar the op list's users differentiate
    (validate, the sweep, aot); the weights (N,) give every row its own upstream gradient (and get lse as theirs)."""
    return (Fn.lse_rows(queries, keys, logit_scale, backend=backend, **kw) * row_weights).sum()


def _negatives(g, dev, dt, n, m, d, k):  # NegCLIP: hard-negative captions beside the batch's texts
    return dict(_pair(g, dev, dt, n, m, d, k), text_negatives=_randn(g, (max(1, m // 3), d), dev, dt))


def _masked_clip(g, dev, dt, n, m, d, k):  # and false negatives by id, and a guide (clusters: no near-ties)
    inp = _negatives(g, dev, dt, n, m, d, k)
    cx, cy = torch.randint(0, 4, (n,), generator=g), torch.randint(0, 4, (m,), generator=g)
    labels = inp["labels"]
    cy[torch.arange(n) if labels is None else labels.cpu()] = cx  # the guide sees each pair alike (as GIST's)
    inp.update(false_negative_ids=(torch.randint(0, 5, (n,), generator=g).to(dev),
                                   torch.randint(0, 5, (m,), generator=g).to(dev)),
               guide_image_features=_guide_clusters(g, dev, dt, n, cid=cx),
               guide_text_features=_guide_clusters(g, dev, dt, m, cid=cy),
               guide_text_negatives=_guide_clusters(g, dev, dt, inp["text_negatives"].shape[0]))
    return inp


# ------------------------------------------------------------------------------------------ bench inputs
def _codes(n: int) -> int:
    return max(16, min(4096, n // 4))


def _feat(g, dev, dt, *shape):
    return torch.nn.functional.normalize(torch.randn(*shape, generator=g), dim=-1).to(dev, dt).requires_grad_()


def _scalar(dev, v):
    return torch.tensor(v, device=dev, requires_grad=True)


def _mmts_tau(g, dev, n):  # MM-TS: τ_i(t) from dataset-wide cluster sizes (one τ per pair)
    return Fn.mmts_temperature(torch.randint(1, 1000, (n,), generator=g), 100, 10_000, 1, 999).to(dev)


def _b_clip(g, dev, dt, n, d):
    return {"image_features": _feat(g, dev, dt, n, d), "text_features": _feat(g, dev, dt, n, d),
            "logit_scale": _scalar(dev, 14.3)}


def _b_ids(g, dev, dt, n, d):  # about 5 captions per image id (COCO-like), shared by both sides
    ids = torch.randint(0, max(1, n // 5), (n,), generator=g).to(dev)
    return dict(_b_clip(g, dev, dt, n, d), image_ids=ids, text_ids=ids)


def _b_siglip(g, dev, dt, n, d):
    return dict(_b_clip(g, dev, dt, n, d), logit_scale=_scalar(dev, 10.0), logit_bias=_scalar(dev, -10.0))


def _b_oblique(g, dev, dt, n, d):  # Sun: K = 16 tokens, scale 1
    return {"image_tokens": _feat(g, dev, dt, n, 16, d // 16), "text_tokens": _feat(g, dev, dt, n, 16, d // 16)}


def _b_mmts(g, dev, dt, n, d):
    return {"image_features": _feat(g, dev, dt, n, d), "text_features": _feat(g, dev, dt, n, d),
            "tau_image": _mmts_tau(g, dev, n)}


def _b_mmts_margin(g, dev, dt, n, d):
    return {"image_features": _feat(g, dev, dt, n, d), "text_features": _feat(g, dev, dt, n, d),
            "margin": _mmts_tau(g, dev, n)}


def _b_codebook(g, dev, dt, n, d):
    out = {k: _feat(g, dev, dt, n, d) for k in ("image_features", "text_features")}
    out.update({k: _feat(g, dev, dt, n, d).detach() for k in ("teacher_image_features", "teacher_text_features")})
    out["codebook"] = _feat(g, dev, dt, _codes(n), d)
    return out


def _b_momentum(g, dev, dt, n, d):  # N queries against N teacher keys + a queue of 4N
    return {"query": _feat(g, dev, dt, n, d), "keys": _feat(g, dev, dt, n, d).detach(),
            "teacher_query": _feat(g, dev, dt, n, d).detach(), "queue": _feat(g, dev, dt, 4 * n, d).detach(),
            "logit_scale": _scalar(dev, 1 / 0.07)}


def _b_distill(g, dev, dt, n, d):  # open_clip's --distill: student features and scale, a teacher's
    return dict(_b_clip(g, dev, dt, n, d), teacher_image_features=_feat(g, dev, dt, n, d).detach(),
                teacher_text_features=_feat(g, dev, dt, n, d).detach(),
                teacher_logit_scale=torch.tensor(100.0, device=dev))


def _b_mnrl(g, dev, dt, n, d):  # sentence-transformers' MNRL: N queries against N positives + 1 hard negative each
    return {"a": _feat(g, dev, dt, n, d), "b": _feat(g, dev, dt, 2 * n, d), "logit_scale": _scalar(dev, 20.0),
            "labels": torch.arange(n, device=dev)}


def _b_matryoshka(g, dev, dt, n, d):  # MatryoshkaLoss(MNRL): the same, at d, d/2, ..., d/16
    return {"queries": _feat(g, dev, dt, n, d), "keys": _feat(g, dev, dt, 2 * n, d), "logit_scale": _scalar(dev, 20.0),
            "labels": torch.arange(n, device=dev), "dims": tuple(d >> i for i in range(5) if d >> i >= 1)}


def _mnrl_flops(n, d):  # the N×2N products once and a GEMM per feature gradient: 3 units of 2·N·2N·d
    return 12 * n * n * d


def _mnrl_bytes(n, d, elt):  # N + 2N rows read, their gradients written
    return 6 * n * d * elt


# ------------------------------------------------------------------------------------------ FLOP / byte floors
def _codebook_flops(n, d):  # two sides × (scores + 2 grad GEMMs) + two teacher score matrices
    return 2 * 6 * n * _codes(n) * d + 2 * 2 * n * _codes(n) * d


def _codebook_bytes(n, d, elt):
    return (4 * n * d + 2 * _codes(n) * d + 2 * n * d) * elt


def _momentum_flops(n, d):  # student scores + the query gradient, plus the teacher's soft-target pass (2 GEMMs)
    return 4 * n * 5 * n * d + 4 * n * 5 * n * d


_DISTILL_FLOPS = dict(flops=lambda n, d: 8 * n * n * d, bytes=lambda n, d, elt: 6 * n * d * elt)


OPS: Tuple[OpInfo, ...] = (
    OpInfo("clip_loss", Fn.clip_loss, "infonce", _pair, {"logit_bias": -1.5}, bench=True, bench_make=_b_clip),
    OpInfo("clip_loss(normalize)", Fn.clip_loss, "infonce", _pair, {"normalize": True}),
    OpInfo("clip_loss(ids)", Fn.clip_loss, "infonce_ids", _ids, {"normalize": True}, bench=True,
           bench_make=_b_ids),
    OpInfo("oblique_clip_loss", Fn.oblique_clip_loss, "infonce", _tokens, bench=True, bench_make=_b_oblique),
    OpInfo("adaptive_temperature_clip_loss", Fn.adaptive_temperature_clip_loss, "infonce", _adaptive,
           {"normalize": True}, bench=True, bench_make=_b_mmts),
    OpInfo("siglip_loss", Fn.siglip_loss, "siglip", _pair, {"logit_bias": -2.0}, bench=True, bench_make=_b_siglip),
    OpInfo("siglip_loss(negative_only)", Fn.siglip_loss, "siglip", _square, {"logit_bias": -2.0,
                                                                             "negative_only": True}),
    OpInfo("siglip_loss(ids,inverse_count)", Fn.siglip_loss, "siglip_ids", _ids,
           {"logit_bias": -2.0, "weighting": "inverse_count"}),
    OpInfo("max_margin_loss", Fn.max_margin_loss, "max_margin", _margin, {"margin": 0.3}),
    OpInfo("max_margin_loss(mmts_margin)", Fn.max_margin_loss, "max_margin", _mmts_margin, bench=True,
           bench_make=_b_mmts_margin),
    OpInfo("max_margin_loss(diagonal)", Fn.max_margin_loss, "max_margin", _diagonal_margin),  # one-sweep kernels
    OpInfo("max_margin_loss(hardest)", Fn.max_margin_loss, "max_margin", _margin, {"margin": 0.3,
                                                                                  "hardest": True}),
    OpInfo("max_margin_loss(sum)", Fn.max_margin_loss, "max_margin", _margin, {"margin": 0.3, "reduction": "sum"}),
    # bench_make: sentence-transformers' MNRL (one direction, 1 hard negative per query); timed by the GPU
    # session's "embed" step, not by default
    OpInfo("ce_rows", Fn.ce_rows, "ce_rows", _ce_rows, {"logit_bias": 0.5}, bench_make=_b_mnrl, flops=_mnrl_flops,
           bytes=_mnrl_bytes),
    OpInfo("clip_loss(text_negatives)", Fn.clip_loss, "infonce_masked", _negatives, {"normalize": True}),
    OpInfo("clip_loss(false_negative_ids,guide)", Fn.clip_loss, "infonce_masked", _masked_clip,
           {"normalize": True, "guide_margin": 0.1}),
    OpInfo("lse_rows", lse_rows_loss, "lse_rows", _lse_rows, {"normalize": True}),
    OpInfo("lse_rows(masks)", lse_rows_loss, "lse_rows", _lse_rows_masks,
           {"normalize": True, "exclude_same": True, "hardness_strength": 2.0,
            "hardness_cells": ("same_hard", "other_inbatch", "other_hard")}),
    OpInfo("codebook_loss", Fn.codebook_loss, "swapped_prediction", _codebook,
           {"tau": 0.2, "epsilon": 0.1, "n_iters": 5}, bench=True, bench_make=_b_codebook,
           bench_call={"tau": 0.1, "epsilon": 0.05, "n_iters": 3}, flops=_codebook_flops, bytes=_codebook_bytes),
    OpInfo("codebook_loss(queue)", Fn.codebook_loss, "swapped_prediction", _codebook_queue,
           {"tau": 0.2, "epsilon": 0.1, "n_iters": 5}),
    OpInfo("momentum_contrastive_loss", Fn.momentum_contrastive_loss, "momentum_contrastive", _momentum,
           {"alpha": 0.4}, bench=True, bench_make=_b_momentum, bench_call={"alpha": 0.4}, flops=_momentum_flops,
           bytes=lambda n, d, elt: 8 * n * d * elt),
    OpInfo("distill_clip_loss", Fn.distill_clip_loss, "distill", _distill, bench=True, bench_make=_b_distill,
           **_DISTILL_FLOPS),
    OpInfo("matryoshka_ce_rows", Fn.matryoshka_ce_rows, "matryoshka_ce_rows", _matryoshka_ce_rows,
           bench_make=_b_matryoshka, flops=_mnrl_flops, bytes=_mnrl_bytes),  # the floor of one full-size loss
    OpInfo("matryoshka_clip_loss", Fn.matryoshka_clip_loss, "matryoshka_clip", _matryoshka_clip),
)
OP: Dict[str, OpInfo] = {o.name: o for o in OPS}


def get(name: str) -> OpInfo:
    """The op named ``name`` (a clear error listing the names otherwise)."""
    if name not in OP:
        raise ValueError(f"unknown op {name!r}; the ops are: {', '.join(OP)}")
    return OP[name]


def bench_ops() -> Tuple[str, ...]:
    """The ops ``bench`` times by default."""
    return tuple(o.name for o in OPS if o.bench)


def benchable_ops() -> Tuple[str, ...]:
    """Every op ``bench`` can time: those with bench inputs (the default ones and, e.g., the GPU session's embed
    step's)."""
    return tuple(o.name for o in OPS if o.bench_make is not None)


def parse(names: str) -> Tuple[str, ...]:
    """A comma-separated list of op names (commas inside a variant's parentheses belong to the name); each
    checked against the op list."""
    out, depth, cur = [], 0, ""
    for ch in names:
        depth += (ch == "(") - (ch == ")")
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    out.append(cur.strip())
    return tuple(get(n).name for n in out if n)
