"""Command line: ``python -m fastcontrast validate`` (the main job) and ``python -m fastcontrast backends``."""
from __future__ import annotations

import argparse
import sys

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="fastcontrast", description=__doc__)
    sub = p.add_subparsers(dest="cmd")
    v = sub.add_parser("validate", help="check every available backend against the float64 reference")
    v.add_argument("--device", action="append", help="cpu / cuda (repeatable; default: cuda if present, and cpu)")
    v.add_argument("--dtype", action="append", choices=["float32", "bfloat16", "float16"],
                   help="working dtype (repeatable; default float32 and bfloat16)")
    v.add_argument("--seeds", type=int, default=3, help="number of random seeds per case (default 3)")
    sub.add_parser("backends", help="list backends and why any is unavailable")
    args = p.parse_args(argv)
    cmd = args.cmd or "validate"
    if cmd == "backends":
        from .dispatch import BACKENDS, unavailable_reason
        from . import ops  # noqa: F401
        for dev in (["cuda"] if torch.cuda.is_available() else []) + ["cpu"]:
            for b in BACKENDS:
                r = unavailable_reason("infonce", b, torch.device(dev))
                print(f"{dev:5s} {b:10s} {'available' if r is None else 'unavailable: ' + r}")
        return 0
    from .validate import run_validation
    dtypes = [getattr(torch, d) for d in (getattr(args, "dtype", None) or ["float32", "bfloat16"])]
    ok, _ = run_validation(devices=getattr(args, "device", None), dtypes=dtypes,
                           seeds=tuple(range(getattr(args, "seeds", 3))))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
