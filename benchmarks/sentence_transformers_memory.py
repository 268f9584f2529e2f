"""Peak memory and time of sentence-transformers 6.2.0's losses, the package's own code against
``fastcontrast.integrations.sentence_transformers.patch()`` (CPU or CUDA).

    python benchmarks/sentence_transformers_memory.py                       # N = 8192, 1 hard negative, d = 256
    python benchmarks/sentence_transformers_memory.py --n 2048 --cases mnrl,cached-mnrl --reps 3

Cases (each one training step's loss part, forward and backward; the same step patched and unpatched):

* ``mnrl``: ``MultipleNegativesRankingLoss`` (cosine, scale 20) on (anchor, positive, 1 hard negative)
  embeddings: ``compute_loss_from_embeddings`` and its backward (M = 2N columns).
* ``mnrl-every-option``: the same with the four directions (joint) and ``hardness_mode="all_negatives"``.
* ``cached-mnrl``: ``CachedMultipleNegativesRankingLoss(mini_batch_size=--mbs)``'s loss stage
  (``calculate_loss(..., with_backward=True)`` on the cached embeddings: the part the patch changes; the model's
  two passes are the package's either way).
* ``matryoshka``: ``MatryoshkaLoss(MultipleNegativesRankingLoss, dims d, d/2, d/4, d/8, d/16)``, a whole step of
  a real ``SentenceTransformer`` built here (a ``StaticEmbedding`` of width d over a WordLevel vocabulary: its
  forward is an embedding bag, so the step is the loss's), forward and backward into the embedding table.
* ``matryoshka-cached``: the same dims around ``CachedMultipleNegativesRankingLoss``: its loss stage.

Peak: the peak live bytes of the tensors the step creates (``fastcontrast.tools.memtrack.PeakMemory``, op by op,
the fused ops' insides included; inputs and parameters not counted), one run (deterministic on the CPU). Time:
wall time of the step, min / median / max of ``--reps`` in the same run. Before measuring, the patched step's
loss and gradients are compared with the package's (relative error of the loss and of the gradients' norm,
printed; the run stops above 1e-4).
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, os.pardir, "tests"))

CASES = ("mnrl", "mnrl-every-option", "cached-mnrl", "matryoshka", "matryoshka-cached")


def _leaves(n, d, columns, dev, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, d, generator=g).to(dev).requires_grad_() for _ in range(columns)]


def _static_model(d, dev):
    """A real SentenceTransformer: StaticEmbedding (width d) over the tests' WordLevel vocabulary."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import StaticEmbedding
    from test_sentence_transformers import WORDS
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]"] + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    torch.manual_seed(0)
    return SentenceTransformer(modules=[StaticEmbedding(tok, embedding_dim=d)], device=str(dev))


def _cached_reps(leaves, mbs):
    """The cached embeddings as the cached loss holds them: per column, mini-batches of leaves."""
    return [[t.requires_grad_() for t in x.detach().split(mbs)] for x in leaves]


def build(case, n, d, mbs, dev, bert_path):
    """(step, tensors whose gradients the step computes): step() runs the loss forward and backward."""
    from sentence_transformers.sentence_transformer import losses
    from test_sentence_transformers import load_model, sentences

    dims = [d >> i for i in range(5)]
    if case in ("mnrl", "mnrl-every-option"):
        kw = {} if case == "mnrl" else dict(
            directions=("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"),
            hardness_mode="all_negatives", hardness_strength=5.0)
        loss = losses.MultipleNegativesRankingLoss(None, **kw)
        emb = _leaves(n, d, 3, dev)

        def step():
            for e in emb:
                e.grad = None
            out = loss.compute_loss_from_embeddings(emb, None)
            out.backward()
            return out.detach()
        return step, emb
    if case == "matryoshka":
        model = _static_model(d, dev)
        feats = [model.preprocess(sentences(n, c)) for c in range(3)]
        feats = [{k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in f.items()} for f in feats]
        loss = losses.MatryoshkaLoss(model, losses.MultipleNegativesRankingLoss(model), dims)
        params = list(model.parameters())

        def step():
            model.zero_grad(set_to_none=True)
            out = loss([dict(f) for f in feats], None)
            out.backward()
            return out.detach()
        return step, params
    bert = load_model(bert_path).to(dev)  # the cached losses refuse a StaticEmbedding; only its config is used
    cached = losses.CachedMultipleNegativesRankingLoss(bert, mini_batch_size=mbs)
    if case == "matryoshka-cached":
        losses.MatryoshkaLoss(bert, cached, dims)  # wraps cached.calculate_loss in its CachedLossDecorator
    calc = lambda *a, **k: cached.calculate_loss(*a, **k)  # noqa: E731  (looked up per call: patched or not)
    emb = _leaves(n, d, 3, dev)
    got = [None] * 3

    def step():
        reps = _cached_reps(emb, mbs)
        out = calc(reps, None, with_backward=True)
        for i, r in enumerate(reps):
            got[i] = torch.cat([t.grad for t in r])
        return out
    return step, got


def _flat(tensors):
    out = []
    for t in tensors:
        g = t.grad if getattr(t, "grad", None) is not None else t
        out.append(g.detach().flatten().clone())
    return torch.cat(out)


def measure(fn, dev, reps):
    from fastcontrast.bench import time_ms
    from fastcontrast.tools.memtrack import PeakMemory

    with PeakMemory() as pm:
        fn()
    return pm.peak, pm.largest, time_ms(fn, dev, warmup=1, reps=reps, budget_s=600.0)


def run_case(case, args, dev, bert_path, fcst):
    step, tensors = build(case, args.n, args.d, args.mbs, dev, bert_path)
    fcst.unpatch()
    random.seed(0)
    ref_loss = step()
    ref = _flat(tensors)
    fcst.patch(backend=args.backend)
    random.seed(0)
    got_loss = step()
    got = _flat(tensors)
    err_loss = float((got_loss - ref_loss).abs() / ref_loss.abs().clamp_min(1e-30))
    err_grad = float((got - ref).norm() / ref.norm().clamp_min(1e-30))
    if not (err_loss <= 1e-4 and err_grad <= 1e-4):
        raise SystemExit(f"{case}: patched differs from the package (loss rel {err_loss:.1e}, grad rel {err_grad:.1e})")
    fcst.unpatch()
    base = measure(step, dev, args.reps)
    fcst.patch(backend=args.backend)
    fused = measure(step, dev, args.reps)
    fcst.unpatch()
    return base, fused, err_loss, err_grad


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--n", type=int, default=8192, help="queries per batch (M = 2N document columns)")
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--mbs", type=int, default=32, help="the cached losses' mini_batch_size (the package's default)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--backend", default="auto", help="patch(backend=...)")
    p.add_argument("--cases", default=",".join(CASES))
    args = p.parse_args(argv)
    from _thirdparty import torchvision_shim

    torchvision_shim()
    from fastcontrast.bench import _device_name
    from fastcontrast.integrations import sentence_transformers as fcst
    from test_sentence_transformers import save_tiny_bert

    dev = torch.device(args.device)
    bert_path = save_tiny_bert(os.path.join(tempfile.mkdtemp(), "bert"), hidden=args.d)
    import sentence_transformers

    print(f"device: {_device_name(dev)}; torch {torch.__version__}; sentence-transformers "
          f"{sentence_transformers.__version__}; N = {args.n}, 1 hard negative (M = {2 * args.n}), d = {args.d}, "
          f"mini_batch_size {args.mbs}, patch(backend={args.backend!r}); time: min / median / max of {args.reps}")
    head = ("| case | peak MiB, package | peak MiB, patched | patched / package | largest tensor MiB, package / "
            "patched | time ms, package | time ms, patched | median ratio | rel. err loss / grad |")
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    mib = 2.0 ** 20
    for case in args.cases.split(","):
        (bp, bl, bt), (fp, fl, ft), el, eg = run_case(case, args, dev, bert_path, fcst)
        print(f"| {case} | {bp / mib:.1f} | {fp / mib:.1f} | {fp / bp:.3f} | {bl / mib:.1f} / {fl / mib:.1f} | "
              f"{min(bt):.0f} / {statistics.median(bt):.0f} / {max(bt):.0f} | "
              f"{min(ft):.0f} / {statistics.median(ft):.0f} / {max(ft):.0f} | "
              f"{statistics.median(ft) / statistics.median(bt):.2f}× | {el:.1e} / {eg:.1e} |", flush=True)


if __name__ == "__main__":
    main()
