"""Per-rank peak memory and time of ``fastcontrast.SigLipLoss`` across ranks, by ``dist_impl`` and world size.

    python benchmarks/siglip_ring_memory.py                                  # N=1024, D=256, worlds 2 4, gloo CPU
    python benchmarks/siglip_ring_memory.py --worlds 2 4 8 --n 2048 --impls bidir gather --reps 3

Each world size is one ``torch.multiprocessing.spawn`` of gloo ranks (CPU; a file store, no port). Every rank
holds the same local batch (N image and N text features of width D, fp32) and runs one forward + backward of
``SigLipLoss(rank, world_size, dist_impl)`` into its features, logit scale and bias.

* peak: the peak live bytes of the tensors the step creates (the loss's buffers, received blocks, gradients),
  seen op by op by ``fastcontrast.tools.memtrack.PeakMemory`` (a TorchDispatchMode, so it works on the CPU); the
  inputs, which exist before the step, are not counted. The max over ranks is reported.
* time: wall time of the step (the tracker off), median of ``--reps`` after one warm-up, max over ranks.

The last lines give each ``dist_impl``'s peak at the largest world size over the smallest: ``bidir``/``shift``/
``reduce`` hold one text block at a time (target: within 1.2×), ``gather`` holds all of them.
Each rank uses one intra-op thread (``--threads``): W processes share the machine's cores.
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

HERE = os.path.dirname(os.path.abspath(__file__))


def _worker(rank, world, init_file, out_dir, args):
    if args.backend != "triton":  # the PyTorch path; the Triton interpreter only when asked for
        os.environ.pop("TRITON_INTERPRET", None)
    torch.set_num_threads(args.threads)
    import fastcontrast as fc
    from fastcontrast.tools.memtrack import PeakMemory

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=600))
    try:
        g = torch.Generator().manual_seed(1000 + rank)
        x = torch.nn.functional.normalize(torch.randn(args.n, args.d, generator=g), dim=1).requires_grad_()
        y = torch.nn.functional.normalize(torch.randn(args.n, args.d, generator=g), dim=1).requires_grad_()
        t = torch.tensor(2.3, requires_grad=True)
        b = torch.tensor(-10.0, requires_grad=True)
        rows = {}
        for impl in args.impls:
            loss_fn = fc.SigLipLoss(rank=rank, world_size=world, dist_impl=impl, backend=args.backend)

            def step():
                loss_fn(x, y, t.exp(), b).backward()
                x.grad = y.grad = t.grad = b.grad = None

            step()  # warm-up
            with PeakMemory() as pm:
                step()
            times = []
            for _ in range(args.reps):
                dist.barrier()
                t0 = time.perf_counter()
                step()
                times.append(time.perf_counter() - t0)
            rows[impl] = dict(peak=pm.peak, ms=1e3 * statistics.median(times))
        torch.save(rows, os.path.join(out_dir, f"r{rank}.pt"))
    finally:
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skip interpreter-exit destructors racing gloo's threads


def measure(world: int, args) -> dict:
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_worker, args=(world, os.path.join(d, "init"), d, args), nprocs=world, join=True)
        per_rank = [torch.load(os.path.join(d, f"r{r}.pt")) for r in range(world)]
    return {impl: dict(peak=max(r[impl]["peak"] for r in per_rank), ms=max(r[impl]["ms"] for r in per_rank))
            for impl in args.impls}


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True,
                              check=True).stdout.strip()
    except Exception:  # noqa: BLE001  (not a checkout)
        return "unknown"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    p.add_argument("--n", type=int, default=1024, help="local batch per rank")
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--impls", nargs="+", default=["bidir", "shift", "reduce", "gather"],
                   choices=["bidir", "shift", "reduce", "gather"])
    p.add_argument("--backend", default="auto")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    print(f"# siglip_ring_memory: N={args.n} per rank, D={args.d}, fp32, gloo on the CPU, backend={args.backend}, "
          f"torch {torch.__version__}, {os.cpu_count()} CPUs, commit {_commit()}, "
          f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    results = {w: measure(w, args) for w in args.worlds}
    print(f"{'dist_impl':<10}{'world':>6}{'peak MiB/rank':>15}{'step ms':>10}")
    for impl in args.impls:
        for w in args.worlds:
            r = results[w][impl]
            print(f"{impl:<10}{w:>6}{r['peak'] / 2**20:>15.2f}{r['ms']:>10.1f}")
    lo, hi = min(args.worlds), max(args.worlds)
    for impl in args.impls:
        ratio = results[hi][impl]["peak"] / results[lo][impl]["peak"]
        print(f"ratio {impl}: peak at world {hi} / world {lo} = {ratio:.3f}")
    return results


if __name__ == "__main__":
    main()
