"""fastcontrast.integrations.sentence_transformers against the real sentence-transformers 6.2.0 (a one-layer BERT
with a WordLevel vocabulary built here, nothing downloaded): every patched loss equals the package's own, loss
and every parameter's gradient (float32 1e-5, float64 1e-10), with and without hard negatives, over every option
6.2.0 has; the fused ops really run; unpatch() restores the package's methods; a similarity fastcontrast does not
fuse falls back to the package with one notice."""
import copy
import random
import warnings

import pytest
import torch

from _thirdparty import missing, torchvision_shim

pytestmark = pytest.mark.skipif(missing("sentence_transformers") is not None,
                                reason="sentence-transformers is not installed (scripts/dev_env.sh --test installs it)")

WORDS = ("the a cat dog sat ran on under mat rug sun rain car road house tree red blue big small fast slow "
         "green old new hot cold up down left right near far").split()
DIM = 32
TOL = {torch.float32: 1e-5, torch.float64: 1e-10}


def save_tiny_bert(path, seed=0, hidden=DIM, vocab_order=1):
    """A one-layer BERT and its WordLevel tokenizer (transformers' PreTrainedTokenizerFast), saved to ``path``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {w: i for i, w in enumerate(specials + WORDS[::vocab_order])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", model_max_length=32)
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=2 * hidden, max_position_embeddings=64, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    BertModel(cfg).save_pretrained(str(path))
    fast.save_pretrained(str(path))
    return str(path)


def load_model(path, dtype=torch.float32):
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling

    t = Transformer(path)
    model = SentenceTransformer(modules=[t, Pooling(t.get_embedding_dimension(), "mean")], device="cpu")
    return model.to(dtype)


def sentences(n, seed, length=(2, 7)):
    r = random.Random(seed)
    return [" ".join(r.choice(WORDS) for _ in range(r.randint(*length))) for _ in range(n)]


def features(model, columns):
    return [model.preprocess(texts) for texts in columns]


def batch(model, n=7, negatives=0, seed=0):
    return features(model, [sentences(n, seed + 100 * c) for c in range(2 + negatives)])


def loss_and_grads(loss_fn, model, feats):
    model.zero_grad(set_to_none=True)
    loss = loss_fn([dict(f) for f in feats], None)  # fresh dicts: the modules write their outputs into them
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def assert_same(ref, got, dtype):
    """Loss and every parameter's gradient, to TOL relative to each tensor's largest magnitude (at least 1)."""
    (l0, g0), (l1, g1) = ref, got
    assert torch.isfinite(l0), l0
    tol = TOL[dtype]
    torch.testing.assert_close(l1, l0, rtol=tol, atol=tol * max(1.0, abs(float(l0))))
    assert g0 and set(g0) == set(g1)
    for name in g0:
        scale = max(1.0, float(g0[name].abs().max()))
        torch.testing.assert_close(g1[name], g0[name], rtol=tol, atol=tol * scale, msg=lambda m: f"{name}: {m}")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: one intra-op thread is ~50x faster than two contending ones on the shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def bert_path(tmp_path_factory):
    torchvision_shim()
    return save_tiny_bert(tmp_path_factory.mktemp("bert") / "m")


@pytest.fixture(scope="session")
def guide_path(tmp_path_factory):
    return save_tiny_bert(tmp_path_factory.mktemp("guide") / "g", seed=1, hidden=24)


@pytest.fixture(scope="session")
def models(bert_path, guide_path):
    return {dtype: (load_model(bert_path, dtype), load_model(guide_path, dtype))
            for dtype in (torch.float32, torch.float64)}


@pytest.fixture
def fcst():
    torchvision_shim()
    from fastcontrast.integrations import sentence_transformers as fcst

    fcst.unpatch()
    yield fcst
    fcst.unpatch()


@pytest.fixture
def calls(monkeypatch):
    """Counts the calls of fastcontrast's fused functions the integration makes."""
    import fastcontrast.functional as fcf

    counts = {"lse_rows": 0, "matryoshka_ce_rows": 0}
    for name in counts:
        real = getattr(fcf, name)

        def spy(*a, _real=real, _name=name, **k):
            counts[_name] += 1
            return _real(*a, **k)

        monkeypatch.setattr(fcf, name, spy)
    return counts


def compare(fcst, calls, make_loss, models, dtype=torch.float32, negatives=0, n=7, seed=0, fused="lse_rows"):
    """The package's loss, then the patched one, on the same model and batch: equal loss and gradients."""
    model, guide = (copy.deepcopy(m) for m in models[dtype])
    loss_fn = make_loss(model, guide)
    feats = batch(model, n=n, negatives=negatives, seed=seed)
    random.seed(seed)
    ref = loss_and_grads(loss_fn, model, feats)
    assert calls[fused] == 0
    fcst.patch()
    random.seed(seed)
    got = loss_and_grads(loss_fn, model, feats)
    fcst.unpatch()
    assert calls[fused] > 0, f"the patched loss did not call fastcontrast.functional.{fused}"
    assert_same(ref, got, dtype)
    return ref, got


def st_losses():
    from sentence_transformers.sentence_transformer import losses

    return losses


# --------------------------------------------------------------------------------------------------------- MNRL
DIRECTIONS = [(("query_to_doc",), "joint"), (("query_to_doc", "doc_to_query"), "per_direction"),
              (("query_to_doc", "doc_to_query"), "joint"), (("query_to_doc", "query_to_query"), "joint"),
              (("query_to_doc", "doc_to_doc"), "joint"),
              (("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"), "joint")]
HARDNESS = [(None, 0.0), ("hard_negatives", 5.0), ("in_batch_negatives", 9.0), ("all_negatives", 3.0)]


def _sim(name):
    from sentence_transformers import util

    return {"cos": util.cos_sim, "dot": util.dot_score}[name]


@pytest.mark.parametrize("negatives", [0, 1, 2])
@pytest.mark.parametrize("hardness", HARDNESS, ids=lambda h: str(h[0]))
@pytest.mark.parametrize("directions", DIRECTIONS, ids=lambda d: "+".join(x[:5] for x in d[0]) + "-" + d[1][:5])
def test_mnrl_every_option(fcst, calls, models, directions, hardness, negatives):
    dirs, mode = directions
    compare(fcst, calls, lambda m, g: st_losses().MultipleNegativesRankingLoss(
        m, scale=20.0, directions=dirs, partition_mode=mode, hardness_mode=hardness[0],
        hardness_strength=hardness[1]), models, negatives=negatives)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("sim", ["cos", "dot"])
@pytest.mark.parametrize("negatives", [0, 1])
def test_mnrl_similarity_and_dtype(fcst, calls, models, sim, dtype, negatives):
    compare(fcst, calls, lambda m, g: st_losses().MultipleNegativesRankingLoss(
        m, scale=20.0 if sim == "cos" else 0.5, similarity_fct=_sim(sim),
        directions=("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"),
        hardness_mode="all_negatives", hardness_strength=2.0), models, dtype=dtype, negatives=negatives)


@pytest.mark.parametrize("cached", [False, True])
def test_mnrl_batch_of_one(fcst, calls, models, cached):
    """One query in the batch: query_to_query and doc_to_doc have no column left (their lse is -inf)."""
    kw = dict(directions=("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"),
              hardness_mode="all_negatives", hardness_strength=2.0)
    compare(fcst, calls, lambda m, g: (st_losses().CachedMultipleNegativesRankingLoss(m, mini_batch_size=2, **kw)
                                       if cached else st_losses().MultipleNegativesRankingLoss(m, **kw)),
            models, n=1, negatives=1)


def test_symmetric_mnrl(fcst, calls, models):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        compare(fcst, calls, lambda m, g: st_losses().MultipleNegativesSymmetricRankingLoss(m, scale=10.0), models)


def test_model_similarity_is_resolved(fcst, calls, models):
    """``similarity_fct=model.similarity`` (the model's similarity_fn_name) fuses when it resolves to cosine/dot."""
    def make(m, g):
        m.similarity_fn_name = "dot"
        return st_losses().MultipleNegativesRankingLoss(m, scale=0.5, similarity_fct=m.similarity)

    compare(fcst, calls, make, models, negatives=1)


# ------------------------------------------------------------------------------------------------- cached MNRL
@pytest.mark.parametrize("negatives", [0, 2])
@pytest.mark.parametrize("hardness", HARDNESS, ids=lambda h: str(h[0]))
@pytest.mark.parametrize("directions", [DIRECTIONS[0], DIRECTIONS[1], DIRECTIONS[5]],
                         ids=lambda d: "+".join(x[:5] for x in d[0]) + "-" + d[1][:5])
def test_cached_mnrl_every_option(fcst, calls, models, directions, hardness, negatives):
    dirs, mode = directions
    compare(fcst, calls, lambda m, g: st_losses().CachedMultipleNegativesRankingLoss(
        m, scale=20.0, mini_batch_size=3, directions=dirs, partition_mode=mode, hardness_mode=hardness[0],
        hardness_strength=hardness[1]), models, negatives=negatives)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("mini", [dict(mini_batch_size=2), dict(mini_batch_size=64),
                                  dict(mini_batch_size=4, mini_batch_num_tokens=12)], ids=str)
def test_cached_mnrl_mini_batches(fcst, calls, models, mini, dtype):
    compare(fcst, calls, lambda m, g: st_losses().CachedMultipleNegativesRankingLoss(
        m, similarity_fct=_sim("dot"), scale=0.5, **mini), models, dtype=dtype, negatives=1)


def test_cached_symmetric_mnrl(fcst, calls, models):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        compare(fcst, calls, lambda m, g: st_losses().CachedMultipleNegativesSymmetricRankingLoss(
            m, mini_batch_size=3), models)


# -------------------------------------------------------------------------------------------------------- GIST
@pytest.mark.parametrize("negatives", [0, 1])
@pytest.mark.parametrize("contrast", [(True, True), (True, False), (False, True), (False, False)], ids=str)
@pytest.mark.parametrize("margin", [("absolute", 0.0), ("absolute", 0.1), ("relative", 0.05)], ids=str)
def test_gist_every_option(fcst, calls, models, margin, contrast, negatives):
    compare(fcst, calls, lambda m, g: st_losses().GISTEmbedLoss(
        m, g, temperature=0.05, margin_strategy=margin[0], margin=margin[1], contrast_anchors=contrast[0],
        contrast_positives=contrast[1]), models, negatives=negatives)


@pytest.mark.parametrize("negatives", [0, 1, 2])
@pytest.mark.parametrize("contrast", [(True, True), (False, False)], ids=str)
@pytest.mark.parametrize("margin", [("absolute", 0.0), ("relative", 0.1)], ids=str)
def test_cached_gist_every_option(fcst, calls, models, margin, contrast, negatives):
    compare(fcst, calls, lambda m, g: st_losses().CachedGISTEmbedLoss(
        m, g, temperature=0.05, mini_batch_size=3, margin_strategy=margin[0], margin=margin[1],
        contrast_anchors=contrast[0], contrast_positives=contrast[1]), models, negatives=negatives)


@pytest.mark.parametrize("cached", [False, True])
def test_gist_margin_that_drops_every_negative(fcst, calls, models, cached):
    """margin 2: every cell but the positive is dropped (rows of the anchor-anchor and positive-positive blocks
    with no column left): the package's loss and gradients are 0; the patched ones 0 to rounding (its positive
    score and the log-sum-exp that holds only it are two computations of one number), never NaN."""
    def make(m, g):
        cls = st_losses().CachedGISTEmbedLoss if cached else st_losses().GISTEmbedLoss
        return cls(m, g, temperature=0.05, margin=2.0, **({"mini_batch_size": 3} if cached else {}))

    (loss, grads), (loss1, grads1) = compare(fcst, calls, make, models, negatives=1)
    assert float(loss) == 0.0 and all(float(g.abs().max()) == 0.0 for g in grads.values())
    assert abs(float(loss1)) < 1e-5 and all(float(g.abs().max()) < 1e-5 for g in grads1.values())


@pytest.mark.parametrize("cached", [False, True])
def test_gist_float64_and_retokenised_guide(fcst, calls, models, tmp_path, cached):
    """A guide with another vocabulary (the texts are decoded and retokenised for it), in float64."""
    other = load_model(save_tiny_bert(tmp_path / "rev", seed=2, hidden=16, vocab_order=-1), torch.float64)

    def make(m, g):
        cls = st_losses().CachedGISTEmbedLoss if cached else st_losses().GISTEmbedLoss
        loss = cls(m, other, temperature=0.05, **({"mini_batch_size": 3} if cached else {}))
        assert loss.must_retokenize
        return loss

    compare(fcst, calls, make, models, dtype=torch.float64, negatives=1)


# -------------------------------------------------------------------------------------------------- Matryoshka
MATRYOSHKA = [dict(matryoshka_dims=[32, 16, 8]), dict(matryoshka_dims=[8, 32, 16], matryoshka_weights=[0.25, 1, 0.5]),
              dict(matryoshka_dims=[32, 24, 16, 8, 4], matryoshka_weights=[1, 2, 3, 4, 5], n_dims_per_step=2)]


@pytest.mark.parametrize("negatives", [0, 1])
@pytest.mark.parametrize("sim", ["cos", "dot"])
@pytest.mark.parametrize("cached", [False, True])
@pytest.mark.parametrize("mat", MATRYOSHKA, ids=lambda m: "-".join(map(str, m["matryoshka_dims"])))
def test_matryoshka_fused_over_dims(fcst, calls, models, mat, cached, sim, negatives):
    """Around MNRL / cached MNRL (query_to_doc, no hardness): one fused call over the drawn dimensions."""
    def make(m, g):
        inner = (st_losses().CachedMultipleNegativesRankingLoss(m, similarity_fct=_sim(sim), mini_batch_size=3)
                 if cached else st_losses().MultipleNegativesRankingLoss(m, similarity_fct=_sim(sim)))
        return st_losses().MatryoshkaLoss(m, inner, **mat)

    compare(fcst, calls, make, models, negatives=negatives, fused="matryoshka_ce_rows")
    assert calls["lse_rows"] == 0


@pytest.mark.parametrize("cached", [False, True])
def test_matryoshka_per_dim_around_other_configs(fcst, calls, models, cached):
    """Around MNRL with more directions and hardness weighting: the package's loop, each dimension fused."""
    def make(m, g):
        kw = dict(directions=("query_to_doc", "doc_to_query", "doc_to_doc"), hardness_mode="in_batch_negatives",
                  hardness_strength=4.0)
        inner = (st_losses().CachedMultipleNegativesRankingLoss(m, mini_batch_size=3, **kw) if cached
                 else st_losses().MultipleNegativesRankingLoss(m, **kw))
        return st_losses().MatryoshkaLoss(m, inner, [32, 16, 8], n_dims_per_step=2)

    compare(fcst, calls, make, models, negatives=1)
    assert calls["matryoshka_ce_rows"] == 0


@pytest.mark.parametrize("cached", [False, True])
def test_matryoshka_around_gist(fcst, calls, models, cached):
    def make(m, g):
        inner = (st_losses().CachedGISTEmbedLoss(m, g, mini_batch_size=3) if cached
                 else st_losses().GISTEmbedLoss(m, g))
        return st_losses().MatryoshkaLoss(m, inner, [32, 16], matryoshka_weights=[1.0, 0.5])

    compare(fcst, calls, make, models, negatives=1)


def test_matryoshka_float64(fcst, calls, models):
    compare(fcst, calls, lambda m, g: st_losses().MatryoshkaLoss(
        m, st_losses().MultipleNegativesRankingLoss(m), [32, 16, 8], matryoshka_weights=[1, 0.5, 0.25]),
        models, dtype=torch.float64, negatives=1, fused="matryoshka_ce_rows")


def test_matryoshka_built_before_or_during_patch(fcst, calls, models):
    """MatryoshkaLoss binds the cached loss's calculate_loss when built: built before patch() it still fuses; built
    while patched, it computes the package's way again after unpatch()."""
    model = copy.deepcopy(models[torch.float32][0])
    feats = batch(model, negatives=1)
    make = lambda: st_losses().MatryoshkaLoss(  # noqa: E731
        model, st_losses().CachedMultipleNegativesRankingLoss(model, mini_batch_size=3), [32, 16])
    before = make()
    ref = loss_and_grads(before, model, feats)
    fcst.patch()
    assert_same(ref, loss_and_grads(before, model, feats), torch.float32)
    assert calls["matryoshka_ce_rows"] == 3  # one per chunk of mini_batch_size rows: 7 = 3 + 3 + 1
    during = make()
    fcst.unpatch()
    assert_same(ref, loss_and_grads(during, model, feats), torch.float32)
    assert calls["matryoshka_ce_rows"] == 3 and calls["lse_rows"] == 0


# ------------------------------------------------------------------------------------ fallback, unpatch, errors
def test_other_similarity_falls_back_with_one_notice(fcst, calls, models):
    from sentence_transformers import util

    from fastcontrast.integrations.sentence_transformers import FallbackWarning

    model = copy.deepcopy(models[torch.float32][0])
    feats = batch(model, negatives=1)
    loss = st_losses().MultipleNegativesRankingLoss(model, scale=1.0, similarity_fct=util.euclidean_sim)
    ref = loss_and_grads(loss, model, feats)
    fcst.patch()
    fcst._State.noticed.clear()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        got = [loss_and_grads(loss, model, feats) for _ in range(2)]
    notes = [w for w in seen if issubclass(w.category, FallbackWarning)]
    assert len(notes) == 1 and "euclidean_sim" in str(notes[0].message), [str(w.message) for w in seen]
    assert calls["lse_rows"] == 0
    for g in got:
        assert_same(ref, g, torch.float32)


def test_unknown_option_falls_back(fcst, calls, models):
    """A configuration key the integration does not know (a newer release's option) is never ignored."""
    model = copy.deepcopy(models[torch.float32][0])
    loss = st_losses().MultipleNegativesRankingLoss(model)
    config = loss.get_config_dict()
    loss.get_config_dict = lambda: {**config, "new_option": 1}
    feats = batch(model)
    ref = loss_and_grads(loss, model, feats)
    fcst.patch()
    with pytest.warns(UserWarning, match="new_option"):
        got = loss_and_grads(loss, model, feats)
    assert calls["lse_rows"] == 0
    assert_same(ref, got, torch.float32)


def test_unpatch_restores_the_package_methods(fcst):
    from sentence_transformers.sentence_transformer.losses import matryoshka

    losses = st_losses()
    places = [(losses.MultipleNegativesRankingLoss, "compute_loss_from_embeddings"),
              (losses.CachedMultipleNegativesRankingLoss, "calculate_loss"), (losses.GISTEmbedLoss, "forward"),
              (losses.CachedGISTEmbedLoss, "calculate_loss"), (losses.MatryoshkaLoss, "forward"),
              (matryoshka.CachedLossDecorator, "__call__")]
    before = [cls.__dict__[attr] for cls, attr in places]
    assert fcst.patch() == list(fcst.FAMILIES)
    assert all(cls.__dict__[attr] is not b for (cls, attr), b in zip(places, before))
    assert "compute_loss_from_embeddings" not in losses.MultipleNegativesSymmetricRankingLoss.__dict__
    assert fcst.is_patched() and fcst.is_patched("MultipleNegativesSymmetricRankingLoss")
    fcst.patch(losses=["GISTEmbedLoss"])  # re-patching starts from the package's methods
    assert fcst.is_patched("GISTEmbedLoss") and not fcst.is_patched("MatryoshkaLoss")
    fcst.unpatch()
    assert all(cls.__dict__[attr] is b for (cls, attr), b in zip(places, before))
    assert not fcst.is_patched()


def test_patch_arguments_are_checked(fcst):
    with pytest.raises(ValueError, match="backend"):
        fcst.patch(backend="gpu")
    with pytest.raises(ValueError, match="losses: cannot patch 'TripletLoss'"):
        fcst.patch(losses=["TripletLoss"])
    assert not fcst.is_patched()


# ------------------------------------------------------------------------- the fused ops run, no N×M is held
class _FastcontrastOps(__import__("torch.utils._python_dispatch", fromlist=["TorchDispatchMode"]).TorchDispatchMode):
    """The ``torch.ops.fastcontrast.*`` custom ops a region runs."""

    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name.startswith("fastcontrast::"):
            self.names.add(func._schema.name)
        return func(*args, **(kwargs or {}))


def _leaves(n, d, columns, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, d, generator=g, dtype=dtype).requires_grad_() for _ in range(columns)]


def _probe(run, embeddings):
    """(loss, gradients, PeakMemory, fastcontrast ops) of run(embeddings) and its backward."""
    from fastcontrast.tools.memtrack import PeakMemory

    for e in embeddings:
        e.grad = None
    with PeakMemory() as mem, _FastcontrastOps() as ops:  # ops innermost: it sees the custom op before the probe
        loss = run(embeddings)
        loss.backward()
    return loss.detach(), {str(i): e.grad for i, e in enumerate(embeddings)}, mem, ops.names


MNRL_CONFIGS = {"default": {}, "every-option": dict(
    directions=("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"), hardness_mode="all_negatives",
    hardness_strength=5.0)}


@pytest.fixture
def small_blocks(monkeypatch):
    """The fused kernels' row-block byte budget (fastcontrast.primitives.tiles.BLOCK_BYTES, 256 MiB) lowered to
    2 MiB, so that at test sizes too a block is far below N×M: what is left is what the kernels hold per block."""
    from fastcontrast.primitives import tiles

    monkeypatch.setattr(tiles, "BLOCK_BYTES", 2 * 2**20)
    return tiles.BLOCK_BYTES


@pytest.mark.parametrize("backend", ["cpu", "auto"])
@pytest.mark.parametrize("config", list(MNRL_CONFIGS))
def test_mnrl_runs_fused_ops_without_n_by_m(fcst, models, monkeypatch, small_blocks, backend, config):
    """N = 2048 queries, 1 hard negative (M = 4096): the package holds N×M scores per direction; the patched loss
    runs torch.ops.fastcontrast.* and holds one block of rows at a time (the byte budget), its peak <= 20 % of the
    package's (``auto`` above the CPU crossover, here lowered below the N×N blocks of the query_to_query and
    doc_to_query directions: each direction's call picks its backend by its own size)."""
    from fastcontrast import dispatch

    n = 2048
    nm_bytes = n * 2 * n * 4
    monkeypatch.setitem(dispatch._CROSSOVER, "cpu", n * n // 2)
    loss = st_losses().MultipleNegativesRankingLoss(models[torch.float32][0], **MNRL_CONFIGS[config])
    emb = _leaves(n, 32, 3, seed=0)
    run = lambda e: loss.compute_loss_from_embeddings(e, None)  # noqa: E731
    ref = _probe(run, emb)
    fcst.patch(backend=backend)
    got = _probe(run, emb)
    assert ref[2].largest >= nm_bytes and not ref[3]  # the probe sees the package's N×M; no fastcontrast op there
    assert got[3] & {"fastcontrast::lse_masked", "fastcontrast::lse_pair"}, got[3]
    assert got[2].largest <= small_blocks, (got[2].largest, small_blocks)
    assert got[2].peak <= 0.2 * ref[2].peak, (got[2].peak, ref[2].peak)
    assert_same(ref[:2], got[:2], torch.float32)


def test_gist_runs_fused_ops_without_n_by_m(fcst, models, small_blocks):
    """GIST's loss stage with a negative at N = 512 (M = 1536 columns for the anchors): the package's similarities
    and masks are N×M (its cosine even N×M×D); the patched loss computes the guide's similarities inside the fused
    sweep, one block of rows at a time. (Its equality to the package is the tests above; this one probes the
    memory of the same function.)"""
    from fastcontrast.integrations.sentence_transformers import _gist_loss

    n, nm_bytes = 512, 512 * 1536 * 4
    gist = st_losses().GISTEmbedLoss(*models[torch.float32], temperature=0.05)
    guides = [t.detach() for t in _leaves(n, 24, 3, seed=1)]
    fcst.patch(backend="cpu")
    loss, grads, mem, ops = _probe(lambda e: _gist_loss(gist, e[0], guides[0], e[1:], guides[1:]),
                                   _leaves(n, 32, 3, seed=0))
    assert "fastcontrast::lse_masked" in ops, ops
    assert mem.largest <= nm_bytes / 2, (mem.largest, nm_bytes)
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads.values())


@pytest.mark.parametrize("config", list(MNRL_CONFIGS))
def test_cached_mnrl_loss_stage_memory_below_the_package(fcst, models, config):
    """The cached loss's loss stage at N = 1024, M = 2048, mini_batch_size 64: the package holds (64, M) score
    blocks; the patched stage scores the same chunks through the fused ops (row blocks of at most half a chunk),
    its peak below the package's, its loss and cached gradients the package's."""
    loss = st_losses().CachedMultipleNegativesRankingLoss(models[torch.float32][0], mini_batch_size=64,
                                                           **MNRL_CONFIGS[config])
    emb = _leaves(1024, 32, 3, seed=0)

    def run(e):
        reps = [list(t.detach().split(100)) for t in e]  # the cached embeddings, as mini-batches of another size
        for r in reps:
            for t in r:
                t.requires_grad_()
        out = loss.calculate_loss(reps, None, with_backward=True)
        for t, r in zip(e, reps):  # hand the cached gradients on, so that _probe reads them
            t.grad = torch.cat([x.grad for x in r])
        return out.requires_grad_()

    ref = _probe(run, emb)
    fcst.patch(backend="cpu")
    got = _probe(run, emb)
    assert got[3] & {"fastcontrast::lse_masked", "fastcontrast::lse_pair"}, got[3]
    assert got[2].peak < ref[2].peak, (got[2].peak, ref[2].peak)
    assert_same(ref[:2], got[:2], torch.float32)
