"""One call to make sentence-transformers' contrastive losses compute through fastcontrast's fused ops.

    import fastcontrast.integrations.sentence_transformers as fcst
    fcst.patch()           # before or after the losses are built: the methods are patched on the classes

Written for, and tested against, sentence-transformers 6.2.0. ``patch`` replaces, on the package's own classes,
the method that computes each loss from the embeddings; everything else (the model's forwards, column merging,
the cached losses' GradCache machinery, the guide model's forwards, the loss's constructor and attributes) is the
package's code, untouched:

* ``MultipleNegativesRankingLoss.compute_loss_from_embeddings`` (``MultipleNegativesSymmetricRankingLoss`` is a
  subclass with fixed arguments), every option: ``scale``, ``similarity_fct`` (cosine or dot), hard-negative
  columns, ``gather_across_devices``, ``directions`` (query_to_query and doc_to_doc with their self-exclusion:
  one's own query, one's own documents), ``partition_mode`` (joint: one log-sum-exp over every direction's
  columns; per_direction: the mean of the directions' log-sum-exps) and ``hardness_mode``/``hardness_strength``
  (alpha·stop_grad(S) added to the selected negatives' logits). The loss is −mean_i(s·S_ii − log_z_i): the
  positive's score is a row dot, each direction's log-sum-exp one :func:`fastcontrast.functional.lse_rows` call,
  which on the fused backends never holds the N×M scores (``patch(backend="auto")``, the default, decides per
  call by its size: materialised below the crossover, where that is faster, fused above; docs/backends.md).
* ``CachedMultipleNegativesRankingLoss.calculate_loss`` (and its symmetric subclass): the same loss on the cached
  embeddings. ``mini_batch_size``/``mini_batch_num_tokens`` bound what they bound in the package: the embedding
  mini-batches of the two model passes (the package's code), and, ``mini_batch_size``, the rows of the loss stage
  scored at a time: the package holds a (mini_batch_size, M) block of scores per chunk (and back-propagates each
  chunk as it goes); here each chunk of rows is one fused call per direction, which holds at most half its rows'
  scores at a time (the fused kernels' row blocks). Both also hold O(M·d) per chunk (the normalised documents and
  their gradient; the fused call about one M×d more), so where the score blocks dominate the patched stage needs
  less memory, and at a small mini_batch_size about the package's (benchmarks/RESULTS.md).
* ``GISTEmbedLoss.forward`` (its embedding part as in the package) and ``CachedGISTEmbedLoss.calculate_loss``:
  ``temperature``, ``margin_strategy``/``margin`` (the false-negative threshold per anchor, from the guide's
  anchor-positive cosine), ``contrast_anchors``, ``contrast_positives``, negatives, ``gather_across_devices``;
  the guide's similarity of every cell is computed inside the same fused sweep and the masked cells dropped
  (the positive is never dropped).
* ``MatryoshkaLoss.forward`` and its cached path (``CachedLossDecorator.__call__``): around a
  ``(Cached)MultipleNegativesRankingLoss`` with the one query_to_doc direction and no hardness weighting, the
  weighted sum over the sampled dimensions (``matryoshka_dims``, ``matryoshka_weights``, ``n_dims_per_step``,
  drawn from ``random`` exactly as the package draws them) is one :func:`fastcontrast.functional.
  matryoshka_ce_rows` call (per chunk of ``mini_batch_size`` rows around the cached loss). Around any other
  configuration or loss, the package's own loop over the dimensions runs and each dimension's loss goes through
  the patched loss above (fused per dimension).

Falls back to the package's own code, with a one-time :class:`FallbackWarning` per loss class and reason, where
the computation is not one fastcontrast fuses: a similarity function other than cosine or dot
(``util.cos_sim``/``util.dot_score``, or ``model.similarity`` resolving to them), embeddings that are not dense 2-D
float tensors, a GIST similarity other than ``nn.CosineSimilarity(dim=-1)`` or an overridden ``sim_matrix``,
and a configuration key this integration does not know (a newer sentence-transformers' option: never ignored).
``unpatch()`` puts every original method back; an instance still holding a patched bound method (Matryoshka's
cached decorator binds ``calculate_loss`` when it is built) then runs the original.

sentence-transformers imports transformers, which imports torchvision: :func:`patch` first calls
:func:`fastcontrast.integrations.ensure_torchvision_importable` (see the open_clip integration).
"""
from __future__ import annotations

import sys
import warnings
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from ._torchvision import ensure_torchvision_importable

TESTED_VERSION = "6.2.0"
_M = "sentence_transformers.sentence_transformer.losses."
_MNRL, _CMNRL, _GIST, _CGIST, _MATRYOSHKA = ("MultipleNegativesRankingLoss", "CachedMultipleNegativesRankingLoss",
                                             "GISTEmbedLoss", "CachedGISTEmbedLoss", "MatryoshkaLoss")
FAMILIES = (_MNRL, _CMNRL, _GIST, _CGIST, _MATRYOSHKA)
# the symmetric losses are subclasses that fix directions/partition_mode: they share their parent's patched method
ALIASES = {"MultipleNegativesSymmetricRankingLoss": _MNRL, "CachedMultipleNegativesSymmetricRankingLoss": _CMNRL}
_MODULES = {_MNRL: "multiple_negatives_ranking", _CMNRL: "cached_multiple_negatives_ranking",
            _GIST: "gist_embed", _CGIST: "cached_gist_embed", _MATRYOSHKA: "matryoshka"}
# every option of 6.2.0 (get_config_dict's keys); an unknown key falls back instead of being ignored
_MNRL_KEYS = {"scale", "similarity_fct", "gather_across_devices", "directions", "partition_mode", "hardness_mode",
              "hardness_strength"}
_GIST_KEYS = {"guide", "temperature", "margin_strategy", "margin", "contrast_anchors", "contrast_positives",
              "gather_across_devices"}
_CACHE_KEYS = {"mini_batch_size", "mini_batch_num_tokens"}
_KNOWN_KEYS = {_MNRL: _MNRL_KEYS, _CMNRL: _MNRL_KEYS | _CACHE_KEYS, _GIST: _GIST_KEYS, _CGIST: _GIST_KEYS | _CACHE_KEYS,
               _MATRYOSHKA: {"loss", "matryoshka_dims", "matryoshka_weights", "n_dims_per_step"}}
# hardness_mode -> the cells of the query_to_doc block that get alpha·stop_grad(S) ("same": the row's own
# positive and hard negatives; the own positive is never penalised)
_HARDNESS_CELLS = {"hard_negatives": ("same_hard",), "in_batch_negatives": ("other_inbatch", "other_hard"),
                   "all_negatives": ("same_hard", "other_inbatch", "other_hard")}


class FallbackWarning(UserWarning):
    """A patched loss computed by sentence-transformers' own code; said once per loss class and reason."""


class _State:
    backend = "auto"
    active: Dict[str, bool] = {}                              # family -> patched now
    originals: Dict[Tuple[str, str], Callable] = {}           # (family, attribute) -> the package's function
    installed: List[Tuple[type, str, Callable]] = []          # (class, attribute, original) for unpatch
    noticed: set = set()


def _functional():
    from .. import functional  # looked up at call time: the fused ops (and a test's spy on them)
    return functional


def _module(family: str):
    return sys.modules[_M + _MODULES[family]]


def _original(family: str, attr: str) -> Callable:
    return _State.originals[(family, attr)]


def _notice(loss, reason: str) -> None:
    key = (type(loss).__name__, reason)
    if key not in _State.noticed:
        _State.noticed.add(key)
        warnings.warn(f"fastcontrast: {type(loss).__name__} is computed by sentence-transformers' own code "
                      f"(not fused): {reason}. Said once.", FallbackWarning, stacklevel=3)


# ------------------------------------------------------------------------------------------- what can be fused
def _similarity_kind(fct) -> Optional[str]:
    """'cos' / 'dot' for sentence-transformers' cos_sim / dot_score (or ``model.similarity`` set to them)."""
    from sentence_transformers.util import similarity as sim

    if fct is sim.cos_sim:
        return "cos"
    if fct is sim.dot_score:
        return "dot"
    from sentence_transformers import SentenceTransformer

    owner = getattr(fct, "__self__", None)
    if owner is not None and getattr(fct, "__func__", None) is SentenceTransformer.similarity:
        owner.similarity_fn_name  # noqa: B018  (sets owner._similarity, as model.similarity does)
        return _similarity_kind(owner._similarity)
    return None


def _name(fct) -> str:
    return getattr(fct, "__qualname__", None) or type(fct).__name__


def _unknown_option(loss, family: str) -> Optional[str]:
    try:
        keys = set(loss.get_config_dict())
    except Exception:  # noqa: BLE001  (a config that cannot be read: nothing to check it against)
        return None
    unknown = sorted(keys - _KNOWN_KEYS[family])
    if unknown:
        return (f"option(s) {unknown} unknown to fastcontrast's integration (written for sentence-transformers "
                f"{TESTED_VERSION})")
    return None


def _mnrl_reason(loss, family: str, embeddings) -> Optional[str]:
    """Why this MNRL-family call cannot be fused (None: it can)."""
    if _similarity_kind(loss.similarity_fct) is None:
        return (f"similarity_fct {_name(loss.similarity_fct)} is neither cosine (util.cos_sim) nor dot "
                "(util.dot_score)")
    if embeddings is not None and not all(isinstance(e, torch.Tensor) and e.dim() == 2 and e.layout == torch.strided
                                          and e.is_floating_point() for e in embeddings):
        return "the embeddings are not dense 2-D float tensors"
    return _unknown_option(loss, family)


def _gist_reason(loss, family: str) -> Optional[str]:
    sim, cls = loss.similarity_fct, type(loss)
    if not (isinstance(sim, torch.nn.CosineSimilarity) and sim.dim in (-1, 2)):
        return f"similarity_fct {_name(sim)} is not nn.CosineSimilarity(dim=-1)"
    if cls.sim_matrix is not getattr(_module(family), family).sim_matrix:
        return f"{cls.__name__} overrides sim_matrix"
    return _unknown_option(loss, family)


def _hardness_on(cfg) -> bool:
    return cfg.hardness_mode in _HARDNESS_CELLS and cfg.hardness_strength > 0.0


# ------------------------------------------------------------------------------------------------ fused losses
def _gather(t: torch.Tensor) -> torch.Tensor:
    """sentence-transformers' all_gather_with_grad: every rank's rows (backward: the ranks' gradients of this
    rank's rows summed), fastcontrast's gather; without a process group the package's own (it warns once and
    returns the tensor)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        from ..distributed import all_gather_with_grad

        return all_gather_with_grad(t)
    from sentence_transformers.util import all_gather_with_grad

    return all_gather_with_grad(t)


def _rank() -> int:
    from sentence_transformers.util import get_rank

    return get_rank()


def _lse(queries, keys, scale, normalize: bool, **kw) -> torch.Tensor:
    return _functional().lse_rows(queries, keys, scale, normalize=normalize, backend=_State.backend, **kw)


def _row_dot(a, b, normalize: bool) -> torch.Tensor:
    if normalize:  # sentence-transformers' normalize_embeddings
        a, b = F.normalize(a, p=2, dim=-1), F.normalize(b, p=2, dim=-1)
    return (a * b).sum(-1)


def _no_columns(rows: torch.Tensor) -> torch.Tensor:
    """The log-sum-exp of a block whose every cell is excluded (one query in the world batch): −inf per row."""
    return rows.new_full((rows.shape[0],), float("-inf"))


def _gathered(cfg, embeddings):
    """(queries, docs, offset, local batch): the package's gather of every column and this rank's row offset."""
    queries, docs = embeddings[0], list(embeddings[1:])
    b, offset = queries.size(0), 0
    if cfg.gather_across_devices:
        queries = _gather(queries)
        docs = [_gather(d) for d in docs]
        offset = _rank() * b
    return queries, docs, offset, b


def _chunked(rows_loss, b: int, chunk: Optional[int], with_backward: bool) -> torch.Tensor:
    """Σ_chunks mean(loss of the chunk's rows)·len/b over chunks of ``chunk`` local rows (None: one chunk), each
    back-propagated as it is computed when ``with_backward``: the cached losses' loss stage, whose
    ``mini_batch_size`` bounds the rows one fused call scores at a time as it bounds the package's score blocks."""
    step = b if chunk is None else max(1, int(chunk))
    losses = []
    for begin in range(0, b, step):
        end = min(begin + step, b)
        losses.append(_finish(rows_loss(begin, end) * ((end - begin) / b), with_backward))
    return sum(losses) if len(losses) > 1 else losses[0]


def _mnrl_loss(cfg, embeddings, kind: str, chunk: Optional[int] = None, with_backward: bool = False):
    """MultipleNegativesRankingLoss.compute_loss_from_embeddings of 6.2.0 (and the cached loss's calculate_loss
    with ``chunk`` = mini_batch_size), every direction a fused lse."""
    if len(embeddings) < 2:
        raise ValueError(f"Expected at least 2 embeddings, got {len(embeddings)}")
    queries, docs, offset, b = _gathered(cfg, embeddings)
    w, k, dev = queries.size(0), len(docs), queries.device
    docs_all = torch.cat(docs, dim=0) if k > 1 else docs[0]
    groups = torch.arange(w, device=dev)  # column j of a (w·k)-wide block belongs to query j mod w
    doc_groups = groups.repeat(k)
    hard_cols = torch.arange(w * k, device=dev) >= w
    norm, s = kind == "cos", cfg.scale

    def rows_loss(begin: int, end: int) -> torch.Tensor:
        local = torch.arange(offset + begin, offset + end, device=dev)
        q, d = queries[offset + begin:offset + end], docs[0][offset + begin:offset + end]
        hard = {}
        if _hardness_on(cfg):
            hard = dict(row_ids=local, col_ids=doc_groups, hard_cols=hard_cols,
                        hardness_strength=float(cfg.hardness_strength),
                        hardness_cells=_HARDNESS_CELLS[cfg.hardness_mode])
        lses = [_lse(q, docs_all, s, norm, **hard)]  # query_to_doc: always (it holds the positive)
        if "query_to_query" in cfg.directions:  # without q_i -> q_i
            lses.append(_lse(q, queries, s, norm, row_ids=local, col_ids=groups, exclude_same=True)
                        if w > 1 else _no_columns(q))
        if "doc_to_query" in cfg.directions:
            lses.append(_lse(d, queries, s, norm))
        if "doc_to_doc" in cfg.directions:  # without the documents of one's own query
            lses.append(_lse(d, docs_all, s, norm, row_ids=local, col_ids=doc_groups, exclude_same=True)
                        if w > 1 else _no_columns(d))
        if cfg.partition_mode == "joint":
            log_z = torch.logsumexp(torch.stack(lses), dim=0) if len(lses) > 1 else lses[0]
        else:  # per_direction
            log_z = sum(lses) / len(lses)
        return (log_z - s * _row_dot(q, d, norm)).mean()  # the positive is never penalised

    return _chunked(rows_loss, b, chunk, with_backward)


def _gist_loss(cfg, anchor, anchor_guide, cands, cands_guide, chunk: Optional[int] = None,
               with_backward: bool = False) -> torch.Tensor:
    """GISTEmbedLoss / CachedGISTEmbedLoss of 6.2.0: CE over [a·P | a·A | p·P | a·N...]/T with the guide's
    false-negative mask, the guide's cell similarities computed in the fused sweep."""
    b, offset = anchor.size(0), 0
    if cfg.gather_across_devices:  # the candidates, not the anchors
        cands = [_gather(c) for c in cands]
        cands_guide = [_gather(c) for c in cands_guide]
        offset = _rank() * b
    if cfg.margin_strategy not in ("absolute", "relative"):
        raise ValueError(f"margin_strategy must be 'absolute' or 'relative', got {cfg.margin_strategy!r}")
    pos, pos_guide = cands[0], cands_guide[0]
    s = 1.0 / cfg.temperature
    keys, guide_keys = [pos], [pos_guide]
    if cfg.contrast_anchors:
        keys.append(anchor)
        guide_keys.append(anchor_guide)
    keys, guide_keys = torch.cat(keys + cands[1:]), torch.cat(guide_keys + cands_guide[1:])

    def rows_loss(begin: int, end: int) -> torch.Tensor:
        mine = slice(offset + begin, offset + end)
        a, ag = anchor[begin:end], anchor_guide[begin:end]
        guided = F.cosine_similarity(ag, pos_guide[mine], dim=-1)  # the guide's anchor-positive cosine
        margin = cfg.margin if cfg.margin_strategy == "absolute" else guided.abs() * cfg.margin
        threshold = guided - margin
        lses = [_lse(a, keys, s, True, keep=torch.arange(mine.start, mine.stop, device=a.device),
                     guide_queries=ag, guide_keys=guide_keys, guide_threshold=threshold)]
        if cfg.contrast_positives:
            lses.append(_lse(pos[mine], pos, s, True, guide_queries=pos_guide[mine], guide_keys=pos_guide,
                             guide_threshold=threshold))
        log_z = torch.logsumexp(torch.stack(lses), dim=0) if len(lses) > 1 else lses[0]
        return (log_z - s * F.cosine_similarity(a, pos[mine], dim=-1)).mean()

    return _chunked(rows_loss, b, chunk, with_backward)


def _matryoshka_mnrl(cfg, embeddings, dims, weights, chunk: Optional[int] = None,
                     with_backward: bool = False) -> torch.Tensor:
    """Σ_p w_p · MNRL(normalize(e[:, :d_p])) (query_to_doc, no hardness): one fused call over the prefixes (per
    chunk of rows for the cached loss). The package's shrink normalises each prefix, so cosine and dot both score
    cosines of prefixes."""
    if len(embeddings) < 2:
        raise ValueError(f"Expected at least 2 embeddings, got {len(embeddings)}")
    full = embeddings[0].shape[-1]
    for d in dims:
        if d > full:
            raise ValueError(f"Dimension {d} in matryoshka_dims cannot be greater than the model's embedding "
                             f"dimension: {full}")
    summed: Dict[int, float] = {}  # the fused call takes strictly decreasing dims: a repeated dim's weights add
    for d, w in zip(dims, weights):
        summed[int(d)] = summed.get(int(d), 0) + w
    dims = sorted(summed, reverse=True)
    queries, docs, offset, b = _gathered(cfg, embeddings)
    docs_all = torch.cat(docs, dim=0) if len(docs) > 1 else docs[0]

    def rows_loss(begin: int, end: int) -> torch.Tensor:
        labels = torch.arange(offset + begin, offset + end, device=queries.device)
        return _functional().matryoshka_ce_rows(
            queries[offset + begin:offset + end], docs_all, cfg.scale, labels=labels, dims=tuple(dims),
            weights=tuple(summed[d] for d in dims), normalize=True, backend=_State.backend)

    return _chunked(rows_loss, b, chunk, with_backward)


def _finish(loss: torch.Tensor, with_backward: bool) -> torch.Tensor:
    """The cached losses' contract: with_backward back-propagates to the cached embeddings, returns detached."""
    if with_backward:
        loss.backward()
        loss = loss.detach()
    return loss


# ------------------------------------------------------------------------------------------- patched methods
def compute_loss_from_embeddings(self, embeddings, labels):
    """MultipleNegativesRankingLoss.compute_loss_from_embeddings through fastcontrast (see the module doc)."""
    if not _State.active.get(_MNRL):
        return _original(_MNRL, "compute_loss_from_embeddings")(self, embeddings, labels)
    reason = _mnrl_reason(self, _MNRL, embeddings)
    if reason is not None:
        _notice(self, reason)
        return _original(_MNRL, "compute_loss_from_embeddings")(self, embeddings, labels)
    return _mnrl_loss(self, list(embeddings), _similarity_kind(self.similarity_fct))


def cached_mnrl_calculate_loss(self, reps, labels=None, *, with_backward: bool = False):
    """CachedMultipleNegativesRankingLoss.calculate_loss through fastcontrast: the fused loss on the cached
    embeddings, per chunk of mini_batch_size rows as the package (the GradCache passes around it are the
    package's)."""
    original = _original(_CMNRL, "calculate_loss")
    if not _State.active.get(_CMNRL):
        return original(self, reps, labels, with_backward=with_backward)
    embeddings = [torch.cat(r) for r in reps]
    reason = _mnrl_reason(self, _CMNRL, embeddings)
    if reason is not None:
        _notice(self, reason)
        return original(self, reps, labels, with_backward=with_backward)
    return _mnrl_loss(self, embeddings, _similarity_kind(self.similarity_fct), self.mini_batch_size, with_backward)


def _gist_embed(self, sentence_features):
    """GISTEmbedLoss.forward's embedding part, as in sentence-transformers 6.2.0 (the model's columns, then the
    guide's under no_grad, retokenised when the vocabularies differ)."""
    mod = _module(_GIST)
    guide_features = [dict(sentence_feature) for sentence_feature in sentence_features]
    embeddings = mod.embed_columns(self.model, sentence_features)
    with torch.no_grad():
        if self.must_retokenize:
            guide_features = []
            for sentence_feature in sentence_features:
                input_ids = sentence_feature["input_ids"]
                if "cu_seq_lens_q" in sentence_feature:
                    flat_input_ids = input_ids[0].tolist()
                    cu_seq_lens = sentence_feature["cu_seq_lens_q"].tolist()
                    input_ids = [flat_input_ids[start:end] for start, end in zip(cu_seq_lens[:-1], cu_seq_lens[1:])]
                decoded = self.tokenizer.batch_decode(input_ids, skip_special_tokens=True)
                guide_features.append(mod.batch_to_device(self.guide.preprocess(decoded), self.guide.device))
        guide_embeddings = mod.embed_columns(self.guide, guide_features)
    return embeddings, guide_embeddings


def gist_forward(self, sentence_features, labels):
    """GISTEmbedLoss.forward through fastcontrast: the package's embedding, the fused masked loss."""
    original = _original(_GIST, "forward")
    if not _State.active.get(_GIST):
        return original(self, sentence_features, labels)
    reason = _gist_reason(self, _GIST)
    if reason is not None:
        _notice(self, reason)
        return original(self, sentence_features, labels)
    embeddings, guide_embeddings = _gist_embed(self, list(sentence_features))
    if len(embeddings) not in (2, 3):
        raise ValueError(f"Expected 2 or 3 embeddings, got {len(embeddings)}")
    return _gist_loss(self, embeddings[0], guide_embeddings[0], list(embeddings[1:]), list(guide_embeddings[1:]))


def cached_gist_calculate_loss(self, reps, reps_guided, with_backward: bool = False):
    """CachedGISTEmbedLoss.calculate_loss through fastcontrast: the fused loss on the cached embeddings, per
    chunk of mini_batch_size rows as the package."""
    original = _original(_CGIST, "calculate_loss")
    if not _State.active.get(_CGIST):
        return original(self, reps, reps_guided, with_backward=with_backward)
    reason = _gist_reason(self, _CGIST)
    if reason is not None:
        _notice(self, reason)
        return original(self, reps, reps_guided, with_backward=with_backward)
    if len(reps) != len(reps_guided):
        raise ValueError("reps and reps_guided must have the same length")
    cands = [torch.cat(r) for r in reps[1:]]
    cands_guide = [torch.cat(r) for r in reps_guided[1:]]
    return _gist_loss(self, torch.cat(reps[0]), torch.cat(reps_guided[0]), cands, cands_guide,
                      self.mini_batch_size, with_backward)


def _dims_drawn(obj, sort: bool):
    """The dimensions (and weights) of this step, drawn from ``random`` exactly as the package draws them."""
    idx = range(len(obj.matryoshka_dims))
    if 0 < obj.n_dims_per_step < len(idx):
        idx = _module(_MATRYOSHKA).random.sample(idx, obj.n_dims_per_step)
        if sort:
            idx.sort()
    return [obj.matryoshka_dims[i] for i in idx], [obj.matryoshka_weights[i] for i in idx]


def _matryoshka_kind(inner, family: str) -> Optional[str]:
    """The similarity kind when the wrapped loss's Matryoshka sum fuses into one call (MNRL family, patched and not
    overridden, query_to_doc only, no hardness); None: the package's loop over the dimensions."""
    if not _State.active.get(family) or _mnrl_reason(inner, family, None) is not None:
        return None
    if any(d in inner.directions for d in ("query_to_query", "doc_to_query", "doc_to_doc")) or _hardness_on(inner):
        return None
    return _similarity_kind(inner.similarity_fct)


def matryoshka_forward(self, sentence_features, labels):
    """MatryoshkaLoss.forward: around a fusable MNRL, one fused call over the drawn dimensions; else the
    package's loop (each dimension's loss through the patched inner loss)."""
    original = _original(_MATRYOSHKA, "forward")
    if not _State.active.get(_MATRYOSHKA) or self.uses_gradient_cache:
        return original(self, sentence_features, labels)
    reason = _unknown_option(self, _MATRYOSHKA)
    if reason is not None:
        _notice(self, reason)
        return original(self, sentence_features, labels)
    inner, mnrl = self.loss, getattr(_module(_MNRL), _MNRL)
    if not (isinstance(inner, mnrl) and inner.model is self.model and type(inner).forward is mnrl.forward
            and type(inner).compute_loss_from_embeddings is compute_loss_from_embeddings
            and _matryoshka_kind(inner, _MNRL)):
        return original(self, sentence_features, labels)
    embeddings = _module(_MNRL).embed_columns(self.model, list(sentence_features))
    dims, weights = _dims_drawn(self, sort=True)
    return _matryoshka_mnrl(inner, embeddings, dims, weights)


def _rebound(fn):
    """A cached loss's calculate_loss bound before patch(): the patched one of the same instance (else None)."""
    obj, func = getattr(fn, "__self__", None), getattr(fn, "__func__", None)
    for family, patched in ((_CMNRL, cached_mnrl_calculate_loss), (_CGIST, cached_gist_calculate_loss)):
        if _State.active.get(family) and func is _State.originals.get((family, "calculate_loss")):
            return patched.__get__(obj)
    return None


def matryoshka_cached_call(self, reps, *args, **kwargs):
    """CachedLossDecorator.__call__ (MatryoshkaLoss around a cached loss): around a fusable cached MNRL, one fused
    call over the drawn dimensions, back-propagated to the cached embeddings; else the package's loop."""
    original = _original(_MATRYOSHKA, "__call__")
    if not _State.active.get(_MATRYOSHKA):
        return original(self, reps, *args, **kwargs)
    obj, func = getattr(self.fn, "__self__", None), getattr(self.fn, "__func__", None)
    if isinstance(obj, getattr(_module(_CMNRL), _CMNRL)) and _matryoshka_kind(obj, _CMNRL) \
            and func in (cached_mnrl_calculate_loss, _State.originals.get((_CMNRL, "calculate_loss"))):
        dims, weights = _dims_drawn(self, sort=False)
        return _matryoshka_mnrl(obj, [torch.cat(r) for r in reps], dims, weights, obj.mini_batch_size,
                                kwargs.get("with_backward", False))
    rebound = _rebound(self.fn)
    if rebound is None:
        return original(self, reps, *args, **kwargs)
    held, self.fn = self.fn, rebound
    try:
        return original(self, reps, *args, **kwargs)
    finally:
        self.fn = held


_PATCHES = {_MNRL: ((_MNRL, "compute_loss_from_embeddings", compute_loss_from_embeddings),),
            _CMNRL: ((_CMNRL, "calculate_loss", cached_mnrl_calculate_loss),),
            _GIST: ((_GIST, "forward", gist_forward),),
            _CGIST: ((_CGIST, "calculate_loss", cached_gist_calculate_loss),),
            _MATRYOSHKA: ((_MATRYOSHKA, "forward", matryoshka_forward),
                          ("CachedLossDecorator", "__call__", matryoshka_cached_call))}


# ----------------------------------------------------------------------------------------------- patch/unpatch
def _families(losses) -> List[str]:
    if isinstance(losses, str):
        losses = (losses,)
    out = []
    for name in losses:
        family = ALIASES.get(name, name)
        if family not in FAMILIES:
            raise ValueError(f"losses: cannot patch {name!r}; expected some of {sorted(FAMILIES + tuple(ALIASES))}")
        if family not in out:
            out.append(family)
    return out


def patch(backend: str = "auto", losses=FAMILIES + tuple(ALIASES)) -> List[str]:
    """Patch the named sentence-transformers losses (default: all of them) to compute through fastcontrast;
    returns the patched families. ``backend`` is every fused call's (``"auto"``: size-aware, see docs/backends.md).
    Naming a symmetric loss patches its parent (the same method). Calling it again re-patches; :func:`unpatch`
    undoes it."""
    from .. import BACKENDS

    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {', '.join(BACKENDS)}; got {backend!r}")
    families = _families(losses)
    ensure_torchvision_importable()
    import sentence_transformers  # noqa: F401  (ImportError when it is not installed)

    for family in FAMILIES:
        __import__(_M + _MODULES[family])
    unpatch()
    _State.backend = backend
    for family in families:
        mod = _module(family)
        for cls_name, attr, fn in _PATCHES[family]:
            cls = getattr(mod, cls_name)
            original = cls.__dict__[attr]
            _State.originals.setdefault((family, attr), original)
            _State.installed.append((cls, attr, original))
            setattr(cls, attr, fn)
        _State.active[family] = True
    return families


def unpatch() -> None:
    """Restore every method :func:`patch` replaced."""
    while _State.installed:
        cls, attr, original = _State.installed.pop()
        setattr(cls, attr, original)
    _State.active.clear()


def is_patched(loss: Optional[str] = None) -> bool:
    """Whether any loss (or the named one) is patched now."""
    if loss is None:
        return bool(_State.installed)
    return bool(_State.active.get(ALIASES.get(loss, loss)))
