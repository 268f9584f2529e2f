"""``python -m fastcontrast.bench``."""
from __future__ import annotations

import torch

from .. import oplist
from .ab import ab_table
from .impls import _configs
from .sweep import run
from .timing import _device_name


def main(argv=None) -> int:
    """``python -m fastcontrast.bench``: the bench with streaming rows and the launch-table A/B (the options
    ``python -m fastcontrast bench`` has, plus --variants, --rounds, --stream-csv, --compile-max, --explain-missing,
    --budget). Exits 1 when a row failed (anything but "unavailable here" or out of memory)."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m fastcontrast.bench", description="Speed and memory of every loss against what its users would run instead, measured in one run.")
    p.add_argument("--ops", default=None, help="op-list names (fastcontrast.oplist), comma-separated; default: "
                   + ", ".join(oplist.bench_ops()))
    p.add_argument("--sizes", default=None)
    p.add_argument("--dim", type=int, default=None)
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default=None)
    p.add_argument("--reps", type=int, default=5, help="timed calls per phase of a row (per variant and round in "
                   "the A/B)")
    p.add_argument("--budget", type=float, default=2.0, help="seconds per phase of a row after which it stops at 3 "
                   "repetitions")
    p.add_argument("--impls", default=None, help="comma-separated substrings of implementation names to keep")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--compile-max", type=int, default=None, help="torch.compile'd baselines only up to this N")
    p.add_argument("--variants", default=None, help="A/B: the Triton backend once per launch-table variant "
                   "(comma-separated, or 'all'), interleaved in rounds, nothing else; ends with the per-arch table")
    p.add_argument("--rounds", type=int, default=5, help="A/B rounds (each times every variant once, then the "
                   "first again)")
    p.add_argument("--explain-missing", action="store_true", help="baselines that cannot run stay as rows saying why")
    p.add_argument("--stream-csv", default=None, help="append each row to this CSV the moment it is measured")
    p.add_argument("--out", default="benchmarks/out", help="write bench.csv/bench.md/bench.png here at the end "
                   "(default: benchmarks/out, relative to the current directory; the bench prints where)")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    dev = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = dev.type == "cuda"
    sizes = [int(v) for v in (a.sizes or ("4096,16384,65536" if gpu else "512,1024,2048")).split(",")]
    dtype = getattr(torch, a.dtype or ("bfloat16" if gpu else "float32"))
    variants = None
    if a.variants:
        VARIANTS = _configs().VARIANTS
        variants = list(VARIANTS) if a.variants == "all" else a.variants.split(",")
        bad = [v for v in variants if v not in VARIANTS]
        if bad:
            p.error(f"--variants: unknown {bad}; expected some of {sorted(VARIANTS)}")
    rows = run(sizes, a.dim or (768 if gpu else 256), dtype, dev, out_dir=a.out, with_compile=not a.no_compile,
               reps=a.reps, ops=oplist.parse(a.ops) if a.ops else oplist.bench_ops(), impls=a.impls.split(",") if a.impls else None,
               progress=not a.no_progress, variants=variants, explain_missing=a.explain_missing,
               stream_csv=a.stream_csv, compile_max=a.compile_max, stream=True, budget_s=a.budget, rounds=a.rounds)
    if variants:
        arch = _configs().arch_of(dev) if gpu else "interpreter"
        print("\n## Launch-table A/B (" + _device_name(dev) + ")\n\n" + ab_table(rows, arch), flush=True)
    failed = [r for r in rows if r.get("failed")]
    if failed:
        print(f"\n{len(failed)} rows FAILED: " + "; ".join(f"{r['op']} {r['n']} {r['impl']}" for r in failed),
              flush=True)
    return 1 if failed else 0
