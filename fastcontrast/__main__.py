"""Command line: ``python -m fastcontrast validate`` (the main job), ``backends``, ``bench`` (= ``python -m
fastcontrast.bench``) and ``aot``."""
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
    sub.add_parser("bench", help="time and memory of every loss against its baselines, in one run "
                   "(python -m fastcontrast bench --help)", add_help=False)
    sub.add_parser("aot", help="compile every Triton kernel for sm_80/sm_90 without a GPU; registers, spills, "
                   "shared memory (python -m fastcontrast aot --help)", add_help=False)
    from_command_line = argv is None
    if argv is None:
        argv = sys.argv[1:]
    if argv and argv[0] == "aot":
        from .aot import main as aot_main
        return aot_main(argv[1:])
    if argv and argv[0] == "bench":  # one bench CLI: fastcontrast.bench's
        from .bench.cli import main as bench_main
        return bench_main(argv[1:])
    args = p.parse_args(argv)
    cmd = args.cmd or "validate"
    if cmd == "backends":
        from . import losses  # noqa: F401  (registers every implementation)
        from .dispatch import BACKENDS, crossover, registered, unavailable_reason
        for dev in (["cuda"] if torch.cuda.is_available() else []) + ["cpu"]:
            print(f"## {dev} (auto: the materialised path up to N·M = {crossover(dev)}, fused above)")
            for op in registered():
                for b in BACKENDS:
                    r = unavailable_reason(op, b, torch.device(dev))
                    print(f"{op:22s} {b:10s} {'available' if r is None else 'unavailable: ' + r}")
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
