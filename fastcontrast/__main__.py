"""Command line: ``python -m fastcontrast validate`` (the main job) and ``python -m fastcontrast backends``."""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys

import torch

INTERPRETER_NOTE = ("validate: no CUDA device, so the Triton rows run on the CPU through the Triton interpreter "
                    "(TRITON_INTERPRET=1; set TRITON_INTERPRET=0 to skip them)")


def _rerun_with_triton_interpreter(argv) -> None:
    """``validate`` on a machine without CUDA: run the Triton rows through the interpreter by default.

    TRITON_INTERPRET must be set before triton.jit decorates the kernels, i.e. before ``fastcontrast`` is
    imported, which ``python -m fastcontrast`` has already done; so the command runs itself again once with it set
    (one line says so). A TRITON_INTERPRET the user set, either way, is kept; so is a machine without triton.
    """
    if torch.cuda.is_available() or "TRITON_INTERPRET" in os.environ or importlib.util.find_spec("triton") is None:
        return
    print(INTERPRETER_NOTE, flush=True)
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "fastcontrast", *argv], {**os.environ, "TRITON_INTERPRET": "1"})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="fastcontrast", description=__doc__)
    sub = p.add_subparsers(dest="cmd")
    v = sub.add_parser("validate", help="check every available backend against the float64 reference")
    v.add_argument("--device", action="append", help="cpu / cuda (repeatable; default: cuda if present, and cpu)")
    v.add_argument("--dtype", action="append", choices=["float32", "bfloat16", "float16"],
                   help="working dtype (repeatable; default float32 and bfloat16)")
    v.add_argument("--seeds", type=int, default=3, help="number of random seeds per case (default 3)")
    sub.add_parser("backends", help="list backends and why any is unavailable")
    b = sub.add_parser("bench", help="time and memory of the fused loss against its baselines, in one run")
    b.add_argument("--ops", default="clip,siglip,oblique,mmts,mmts_margin,codebook,momentum,clip_multipos,distill",
                   help="comma-separated ops (default: all of clip, siglip, oblique, mmts, mmts_margin, codebook, "
                   "momentum, clip_multipos, distill)")
    b.add_argument("--sizes", default=None, help="comma-separated batch sizes (default: 512,1024,2048 on CPU; "
                   "4096,16384,65536 on CUDA)")
    b.add_argument("--dim", type=int, default=None, help="feature dim (default 256 on CPU, 768 on CUDA)")
    b.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="default float32 on CPU, bfloat16 on CUDA")
    b.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    b.add_argument("--no-compile", action="store_true", help="skip the torch.compile'd reference baseline")
    b.add_argument("--reps", type=int, default=7)
    b.add_argument("--impls", default=None, help="comma-separated substrings: keep only matching implementations "
                   "(e.g. 'cpu,eager,compiled')")
    b.add_argument("--out", default="benchmarks/out",
                   help="folder for bench.csv, bench.md, bench.png (default: benchmarks/out, relative to the "
                   "current directory; the bench prints the absolute path it wrote)")
    b.add_argument("--no-progress", action="store_true", help="no progress line on stderr")
    sub.add_parser("aot", help="compile every Triton kernel for sm_80/sm_90 without a GPU; registers, spills, "
                   "shared memory (python -m fastcontrast aot --help)", add_help=False)
    from_command_line = argv is None
    if argv is None:
        argv = sys.argv[1:]
    if argv and argv[0] == "aot":
        from .aot import main as aot_main
        return aot_main(argv[1:])
    args = p.parse_args(argv)
    cmd = args.cmd or "validate"
    if cmd == "backends":
        from .dispatch import BACKENDS, _registry, crossover, unavailable_reason
        from . import losses  # noqa: F401
        for dev in (["cuda"] if torch.cuda.is_available() else []) + ["cpu"]:
            print(f"## {dev} (auto: the materialised path up to N·M = {crossover(dev)}, fused above)")
            for op in sorted({o for o, _ in _registry}):
                for b in BACKENDS:
                    r = unavailable_reason(op, b, torch.device(dev))
                    print(f"{op:22s} {b:10s} {'available' if r is None else 'unavailable: ' + r}")
        return 0
    if cmd == "bench":
        from .bench import run
        dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        gpu = dev.type == "cuda"
        sizes = [int(v) for v in (args.sizes or ("4096,16384,65536" if gpu else "512,1024,2048")).split(",")]
        dtype = getattr(torch, args.dtype or ("bfloat16" if gpu else "float32"))
        run(sizes, args.dim or (768 if gpu else 256), dtype, dev, out_dir=args.out, with_compile=not args.no_compile,
            reps=args.reps, ops=tuple(args.ops.split(",")), impls=args.impls.split(",") if args.impls else None,
            progress=not args.no_progress)
        return 0
    if from_command_line:  # python -m fastcontrast / the console script (a caller's process is never replaced)
        _rerun_with_triton_interpreter(argv)
    elif not torch.cuda.is_available() and "TRITON_INTERPRET" not in os.environ:
        print("validate: no CUDA device and TRITON_INTERPRET is not set: the Triton rows skip (set "
              "TRITON_INTERPRET=1 before importing fastcontrast, or run python -m fastcontrast validate)")
    from .validate import run_validation
    dtypes = [getattr(torch, d) for d in (getattr(args, "dtype", None) or ["float32", "bfloat16"])]
    ok, _ = run_validation(devices=getattr(args, "device", None), dtypes=dtypes,
                           seeds=tuple(range(getattr(args, "seeds", 3))))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
