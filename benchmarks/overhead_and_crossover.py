"""Per-call overhead and the size at which "auto" should switch from the materialised to the fused path.

    python benchmarks/overhead_and_crossover.py                  # CPU (or --device cuda)
    python benchmarks/overhead_and_crossover.py --sizes 16,256,1024,2048,4096,8192 --dim 512

1. Overhead: ``fc.clip_loss`` forward+backward at N = 16, d = 64, against a plain PyTorch CLIP loss
   (``s·x@y.T`` and two cross-entropies) on the same inputs: at this size both are almost all per-op overhead,
   so the difference is what fastcontrast's Python (validation, dispatch, autograd plumbing) costs per step.
2. Crossover: forward+backward of the materialised path (backend "dense") and the fused one ("cpu" on the
   CPU, "triton" on CUDA) over N; "auto" should take "dense" up to the last N where it wins
   (``fastcontrast.dispatch.set_crossover`` / ``FASTCONTRAST_CROSSOVER_*``).
Every figure is min / median / max of the repetitions, measured in one run.
"""
from __future__ import annotations

import argparse
import statistics
import sys

import torch
import torch.nn.functional as F

import fastcontrast as fc
from fastcontrast.bench import _device_name, time_ms
from fastcontrast.dispatch import crossover, unavailable_reason


def plain_clip(x, y, s):
    logits = s * x @ y.T
    t = torch.arange(x.shape[0], device=x.device)
    return (F.cross_entropy(logits, t) + F.cross_entropy(logits.T, t)) / 2


def measure(fn, n, d, dev, dtype, reps):
    g = torch.Generator().manual_seed(n)
    x = F.normalize(torch.randn(n, d, generator=g), dim=1).to(dev, dtype).requires_grad_()
    y = F.normalize(torch.randn(n, d, generator=g), dim=1).to(dev, dtype).requires_grad_()
    s = torch.tensor(14.3, device=dev, requires_grad=True)

    def step():
        for t in (x, y, s):
            t.grad = None
        fn(x, y, s).backward()

    return time_ms(step, dev, warmup=max(3, reps // 10), reps=reps)


def fmt(ts):
    return f"{min(ts):.4f} / {statistics.median(ts):.4f} / {max(ts):.4f}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sizes", default=None, help="batch sizes for the crossover (default 64..8192 on CPU, "
                   "1024..32768 on CUDA)")
    p.add_argument("--dim", type=int, default=None, help="feature dim for the crossover (512 CPU, 768 CUDA)")
    p.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (CUDA default)")
    p.add_argument("--reps", type=int, default=None)
    args = p.parse_args(argv)
    dev = torch.device(args.device)
    gpu = dev.type == "cuda"
    dtype = getattr(torch, args.dtype or ("bfloat16" if gpu else "float32"))
    if not gpu:
        torch.set_num_threads(torch.get_num_threads())
    print(f"# {_device_name(dev)}; torch {torch.__version__}; fastcontrast {fc.__version__}")

    reps = args.reps or 400
    print(f"\n## Per-call overhead: clip_loss forward+backward, N = 16, d = 64, float32, {reps} repetitions (ms, "
          "min / median / max)\n")
    print("| implementation | time | minus plain |")
    print("|---|---|---|")
    base = measure(plain_clip, 16, 64, dev, torch.float32, reps)
    print(f"| plain PyTorch (s·x@yᵀ, two cross-entropies) | {fmt(base)} | — |")
    for name, b in (("fastcontrast auto", "auto"), ("fastcontrast dense", "dense"), ("fastcontrast reference", "reference")):
        ts = measure(lambda x, y, s, b=b: fc.clip_loss(x, y, s, backend=b), 16, 64, dev, torch.float32, reps)
        print(f"| {name} | {fmt(ts)} | {1e3 * (statistics.median(ts) - statistics.median(base)):+.1f} µs |")

    fused = "triton" if gpu else "cpu"
    if unavailable_reason("infonce", fused, dev) is not None:
        print(f"\n(no crossover: backend {fused!r} unavailable: {unavailable_reason('infonce', fused, dev)})")
        return 0
    d = args.dim or (768 if gpu else 512)
    sizes = [int(v) for v in (args.sizes or ("1024,2048,4096,8192,16384,32768" if gpu
                                              else "64,256,1024,2048,4096,8192")).split(",")]
    creps = args.reps or (20 if gpu else 5)
    print(f"\n## Crossover: clip_loss forward+backward, d = {d}, {str(dtype).replace('torch.', '')}, {creps} "
          f"repetitions (ms, min / median / max); current crossover N·M = {crossover(dev.type)}\n")
    print(f"| N | dense | {fused} | plain PyTorch | dense / {fused} | faster |")
    print("|---|---|---|---|---|---|")
    last_dense = None
    for n in sizes:
        try:
            td = measure(lambda x, y, s: fc.clip_loss(x, y, s, backend="dense"), n, d, dev, dtype, creps)
        except torch.cuda.OutOfMemoryError:
            td = [float("nan")]
        tf = measure(lambda x, y, s: fc.clip_loss(x, y, s, backend=fused), n, d, dev, dtype, creps)
        tp = measure(plain_clip, n, d, dev, dtype, creps) if n <= 8192 else [float("nan")]
        r = statistics.median(td) / statistics.median(tf)
        win = "dense" if r < 1 else fused
        if win == "dense":
            last_dense = n
        print(f"| {n} | {fmt(td)} | {fmt(tf)} | {fmt(tp)} | {r:.2f} | {win} |")
    if last_dense:
        print(f"\nlast N where dense wins: {last_dense} → crossover N·M = {last_dense * last_dense}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
