"""fastcontrast.integrations.sentence_transformers in the package's own training loop and across ranks:
SentenceTransformerTrainer gives the same per-step losses and final weights with and without the patch, and two
gloo ranks with ``gather_across_devices=True`` compute the same loss and gradients as the package on each rank."""
import copy
import os
import random

import pytest
import torch

from _gloo import run_ranks
from _thirdparty import missing, torchvision_shim
from test_sentence_transformers import (assert_same, batch, load_model, loss_and_grads, one_thread,  # noqa: F401
                                        save_tiny_bert, sentences, st_losses)  # one_thread: the autouse fixture

pytestmark = pytest.mark.skipif(missing("sentence_transformers", "datasets") is not None,
                                reason="sentence-transformers is not installed (scripts/dev_env.sh --test installs it)")


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    torchvision_shim()
    root = tmp_path_factory.mktemp("st")
    return save_tiny_bert(root / "m"), save_tiny_bert(root / "g", seed=1, hidden=24)


# ------------------------------------------------------------------------------------------------------ trainer
def _train(paths, make_loss, patched, tmp_path, steps=4):
    from datasets import Dataset
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments

    from fastcontrast.integrations import sentence_transformers as fcst

    model, guide = load_model(paths[0]), load_model(paths[1])
    n = 8 * steps
    data = Dataset.from_dict({"anchor": sentences(n, 1), "positive": sentences(n, 2), "negative": sentences(n, 3)})
    loss = make_loss(model, guide)
    seen = []
    loss.register_forward_hook(lambda module, args, out: seen.append(float(out.detach())))
    args = SentenceTransformerTrainingArguments(
        output_dir=str(tmp_path / ("patched" if patched else "package")), max_steps=steps, learning_rate=1e-3,
        per_device_train_batch_size=8, logging_steps=1, report_to="none", save_strategy="no", use_cpu=True, seed=0,
        data_seed=0, disable_tqdm=True, dataloader_num_workers=0)
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=data, loss=loss)
    if patched:
        fcst.patch()
    try:
        random.seed(0)
        trainer.train()
    finally:
        fcst.unpatch()
    return seen, {k: v.detach().clone() for k, v in model.state_dict().items()}


TRAINED = {
    "mnrl-hard-negatives": lambda m, g: st_losses().MultipleNegativesRankingLoss(
        m, directions=("query_to_doc", "doc_to_query"), hardness_mode="all_negatives", hardness_strength=5.0),
    "matryoshka-cached-mnrl": lambda m, g: st_losses().MatryoshkaLoss(
        m, st_losses().CachedMultipleNegativesRankingLoss(m, mini_batch_size=3), [32, 16, 8], n_dims_per_step=2),
    "cached-gist": lambda m, g: st_losses().CachedGISTEmbedLoss(m, g, temperature=0.05, mini_batch_size=4,
                                                                margin_strategy="relative", margin=0.05),
}


@pytest.mark.parametrize("name", list(TRAINED))
def test_trainer_steps_match(paths, tmp_path, name):
    ref, w_ref = _train(paths, TRAINED[name], False, tmp_path)
    got, w_got = _train(paths, TRAINED[name], True, tmp_path)
    assert len(ref) == len(got) == 4, (ref, got)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(ref), rtol=1e-5, atol=1e-5)
    assert len({round(x, 6) for x in ref}) > 1, "the steps changed nothing"
    for k in w_ref:
        torch.testing.assert_close(w_got[k], w_ref[k], rtol=1e-5, atol=1e-5, msg=lambda m: f"{k}: {m}")


# ---------------------------------------------------------------------------------------------- 2 gloo ranks
GATHERED = {
    "mnrl": lambda m, g: st_losses().MultipleNegativesRankingLoss(
        m, gather_across_devices=True, directions=("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"),
        hardness_mode="in_batch_negatives", hardness_strength=3.0),
    "mnrl-per-direction": lambda m, g: st_losses().MultipleNegativesRankingLoss(
        m, gather_across_devices=True, directions=("query_to_doc", "doc_to_query"), partition_mode="per_direction",
        hardness_mode="hard_negatives", hardness_strength=4.0),
    "cached-mnrl": lambda m, g: st_losses().CachedMultipleNegativesRankingLoss(
        m, gather_across_devices=True, mini_batch_size=3, directions=("query_to_doc", "doc_to_doc"),
        hardness_mode="all_negatives", hardness_strength=2.0),
    "gist": lambda m, g: st_losses().GISTEmbedLoss(m, g, temperature=0.05, gather_across_devices=True),
    "cached-gist": lambda m, g: st_losses().CachedGISTEmbedLoss(
        m, g, temperature=0.05, mini_batch_size=3, gather_across_devices=True, margin_strategy="relative",
        margin=0.1),
    "matryoshka": lambda m, g: st_losses().MatryoshkaLoss(
        m, st_losses().MultipleNegativesRankingLoss(m, gather_across_devices=True), [32, 16, 8],
        matryoshka_weights=[1, 0.5, 0.25]),
    "matryoshka-cached": lambda m, g: st_losses().MatryoshkaLoss(
        m, st_losses().CachedMultipleNegativesRankingLoss(m, gather_across_devices=True, mini_batch_size=4),
        [32, 16]),
}


def _gathered_cases(rank, world):
    torchvision_shim()
    import fastcontrast.functional as fcf
    from fastcontrast.integrations import sentence_transformers as fcst

    counts = {"lse_rows": 0, "matryoshka_ce_rows": 0}
    for name in counts:
        real = getattr(fcf, name)
        setattr(fcf, name, lambda *a, _r=real, _n=name, **k: (counts.__setitem__(_n, counts[_n] + 1), _r(*a, **k))[1])
    model_path, guide_path = os.environ["FC_ST_PATHS"].split(os.pathsep)
    base, guide = load_model(model_path), load_model(guide_path)
    out = {}
    for name, make in GATHERED.items():
        model = copy.deepcopy(base)
        loss = make(model, guide)
        feats = batch(model, n=5, negatives=1, seed=10 * rank)  # each rank its own rows
        ref = loss_and_grads(loss, model, feats)
        before = dict(counts)
        fcst.patch()
        got = loss_and_grads(loss, model, feats)
        fcst.unpatch()
        out[name] = (ref, got, sum(counts.values()) > sum(before.values()))
    return out


def test_two_gloo_ranks_gather_across_devices(paths, monkeypatch):
    monkeypatch.setenv("FC_ST_PATHS", os.pathsep.join(paths))
    results = run_ranks(_gathered_cases, 2)
    for rank, out in enumerate(results):
        assert set(out) == set(GATHERED)
        for name, (ref, got, fused) in out.items():
            assert fused, f"rank {rank} {name}: no fused call"
            assert_same(ref, got, torch.float32)
    # the ranks' losses differ (each its own rows) but are of one global batch
    assert not torch.equal(results[0]["mnrl"][0][0], results[1]["mnrl"][0][0])
