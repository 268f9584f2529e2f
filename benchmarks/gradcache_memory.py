"""Peak memory and time of a GradCache step against the plain step at the same global batch (CPU or CUDA).

    python benchmarks/gradcache_memory.py                         # batch 256, chunks 16 and 64, small towers
    python benchmarks/gradcache_memory.py --batch 256 --chunks 16 --model open_clip --reps 7

One training step = forward of both towers, ``fastcontrast.ClipLoss(normalize=True)`` on the whole batch,
backward into every parameter. Plain: one forward and one backward through the batch. GradCache
(``fastcontrast.GradCache``): chunked no-grad forward, the loss, then a replay with autograd per chunk.

* peak: the peak live bytes of the tensors the step creates (activations, features, gradients, the loss's
  buffers), seen op by op by ``fastcontrast.tools.memtrack.PeakMemory`` (a TorchDispatchMode, so it works on the CPU);
  the parameters and inputs, which exist before the step, are not counted. On CUDA the allocator's
  ``max_memory_allocated`` is reported beside it.
* time: wall time of the step (the tracker off), min / median / max of ``--reps`` repetitions, in the same run.

Before timing, the two steps' gradients are compared (they must agree to fp32 rounding, or the run stops).
Models: ``torch`` (default): two 2-layer transformer towers of width 64 on 16 image patches / 16 tokens, with
dropout 0.1 (replayed); ``open_clip``: the tiny open_clip CLIP of examples/open_clip_train_tiny.py (needs
open_clip).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch
import torch.nn as nn

import fastcontrast as fc
from fastcontrast.tools.memtrack import PeakMemory
from fastcontrast.bench import _device_name, time_ms

HERE = os.path.dirname(os.path.abspath(__file__))


class SmallTowers(nn.Module):
    """Image: 8×8 patches of a 32×32 RGB image -> 2 transformer layers -> mean -> 64. Text: 16 tokens, the same."""

    def __init__(self, width=64, layers=2, dim=64, vocab=1000, dropout=0.1):
        super().__init__()

        def encoder():
            layer = nn.TransformerEncoderLayer(width, 4, 4 * width, dropout=dropout, batch_first=True)
            return nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)

        self.patch = nn.Linear(3 * 8 * 8, width)
        self.pos_i = nn.Parameter(torch.randn(16, width) * 0.02)
        self.vis, self.proj_i = encoder(), nn.Linear(width, dim)
        self.tok = nn.Embedding(vocab, width)
        self.pos_t = nn.Parameter(torch.randn(16, width) * 0.02)
        self.txt, self.proj_t = encoder(), nn.Linear(width, dim)
        self.logit_scale = nn.Parameter(torch.tensor(2.659))

    def encode_image(self, x):
        n = x.shape[0]
        p = x.unfold(2, 8, 8).unfold(3, 8, 8).permute(0, 2, 3, 1, 4, 5).reshape(n, 16, 3 * 64)
        return self.proj_i(self.vis(self.patch(p) + self.pos_i).mean(1))

    def encode_text(self, ids):
        return self.proj_t(self.txt(self.tok(ids) + self.pos_t).mean(1))


def build(kind, dev):
    torch.manual_seed(0)
    if kind == "torch":
        model = SmallTowers()
        img_in, txt_in = (3, 32, 32), (16, 1000)
    else:
        sys.path.insert(0, os.path.join(HERE, os.pardir, "tests"))
        from _thirdparty import import_open_clip

        open_clip = import_open_clip()
        sys.path.insert(0, os.path.join(HERE, os.pardir, "examples"))
        from open_clip_train_tiny import TINY

        model = open_clip.CLIP(**TINY)
        img_in, txt_in = (3, 32, 32), (16, 49408)
    return model.to(dev).train(), img_in, txt_in


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", choices=["torch", "open_clip"], default="torch")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--chunks", default="16,64", help="GradCache chunk sizes, comma-separated")
    p.add_argument("--reps", type=int, default=7)
    args = p.parse_args(argv)
    dev = torch.device(args.device)
    model, img_in, txt_in = build(args.model, dev)
    n = args.batch
    g = torch.Generator().manual_seed(1)
    images = torch.randn(n, *img_in, generator=g).to(dev)
    texts = torch.randint(1, txt_in[1], (n, txt_in[0]), generator=g).to(dev)
    loss_fn = fc.ClipLoss(normalize=True)
    if args.model == "torch":
        enc = [model.encode_image, model.encode_text]
    else:
        enc = [lambda x: model.encode_image(x), lambda t: model.encode_text(t)]

    def plain():
        model.zero_grad(set_to_none=True)
        loss = loss_fn(enc[0](images), enc[1](texts), model.logit_scale.exp())
        loss.backward()
        return loss

    def cached(chunk):
        gc = fc.GradCache(enc, loss_fn, chunk)

        def step():
            model.zero_grad(set_to_none=True)
            return gc(images, texts, model.logit_scale.exp())
        return step

    def grads():
        return torch.cat([q.grad.flatten() for q in model.parameters() if q.grad is not None])

    chunks = [int(c) for c in args.chunks.split(",")]
    # equal gradients first (dropout on: GradCache replays the masks of its own first pass, so compare
    # against the chunked plain forward drawn from the same seed: here, the eval-mode model, no dropout)
    model.eval()
    plain()
    ref = grads()
    for c in chunks:
        cached(c)()
        err = float((grads() - ref).norm() / ref.norm())
        if not err <= 1e-5:
            raise SystemExit(f"GradCache chunk {c}: gradients differ from the plain step (rel err {err:.2e})")
    model.train()

    rows = []
    for name, fn in [("plain step", plain)] + [(f"GradCache chunk {c}", cached(c)) for c in chunks]:
        peaks, cuda_peaks = [], []
        for _ in range(3):
            model.zero_grad(set_to_none=True)
            if dev.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats(dev)
                base = torch.cuda.memory_allocated(dev)
            with PeakMemory() as pm:
                fn()
            peaks.append(pm.peak)
            if dev.type == "cuda":
                cuda_peaks.append(torch.cuda.max_memory_allocated(dev) - base)
        ts = time_ms(fn, dev, warmup=2, reps=args.reps, budget_s=120.0)
        rows.append((name, peaks, cuda_peaks, ts))

    mib = 2.0 ** 20
    base_peak, base_t = statistics.median(rows[0][1]), statistics.median(rows[0][3])
    print(f"device: {_device_name(dev)}; torch {torch.__version__}; model {args.model} "
          f"({sum(q.numel() for q in model.parameters()) / 1e6:.2f} M parameters); batch {n}; "
          f"reps {len(rows[0][3])}")
    head = "| step | peak extra memory (MiB), min / median / max | vs plain | time (ms), min / median / max | vs plain |"
    if dev.type == "cuda":
        head += " CUDA max_memory_allocated (MiB) |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for name, peaks, cuda_peaks, ts in rows:
        line = (f"| {name} | {min(peaks) / mib:.1f} / {statistics.median(peaks) / mib:.1f} / "
                f"{max(peaks) / mib:.1f} | {statistics.median(peaks) / base_peak:.3f}× | "
                f"{min(ts):.1f} / {statistics.median(ts):.1f} / {max(ts):.1f} | "
                f"{statistics.median(ts) / base_t:.2f}× |")
        if dev.type == "cuda":
            line += f" {statistics.median(cuda_peaks) / mib:.1f} |"
        print(line)
    return rows


if __name__ == "__main__":
    main()
