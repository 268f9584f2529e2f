"""Static report of every Triton kernel the package launches, compiled for GPUs without one.

``python -m fastcontrast aot [--arch 80,90,100] [--out benchmarks/results/triton_aot.md] [--check]``

1. Capture (:mod:`.launches`): subprocesses run the workloads (:data:`WORKLOADS`: the table's 16-divisible
   validation cases, ``validate`` at its odd default size, the bench's ops; forward and backward and the no-grad
   forward, fp32/bf16/fp16) on the Triton interpreter and record each kernel launch as a GPU launch specialises
   it: argument types, constexprs (integers equal to 1 included), which integers and pointers are 16-divisible,
   the launch-table variant in effect. ``--add-launches`` adds launches recorded elsewhere (the GPU session's
   test files, recorded during CI's test run by benchmarks/launch_capture.py).
2. Compile (:mod:`.build`): each distinct launch, for each configuration of the launch table
   (:mod:`fastcontrast.primitives.configs`) that runs it, ``triton.compile`` with a ``GPUTarget("cuda", cc, 32)``
   and the launch's own specialisation: the table's launches for every arch and variant, the others for sm_90
   (the GPU sessions' H100/H200) with the variants that launch them.
3. Read: registers, stack frame and spill bytes from the ``cuobjdump`` inside Triton's package
   (``-res-usage``), shared memory and stages from the compiled kernel's metadata, the matrix instructions from
   its PTX; "smem stages" estimates how many K-chunks of A and B the shared memory holds (≥ 2: pipelined).

``--check`` exits non-zero on a compile error, on a build that needs more shared memory than its
architecture gives one block, or on one that spills more than 512 B of stack (unaligned launches get the
narrower tiles of ``primitives.configs.UNALIGNED``, as the launcher picks them). ``--estimate benchmarks/gpu_session.sh`` counts the kernels each step of the GPU session
compiles (:mod:`.estimate`) and checks the script's written estimates against them.
"""
from __future__ import annotations

import argparse
import json
import os
from typing import List

from .launches import _capture_main  # noqa: F401  (the capture subprocesses' entry)

from .build import (DEVICE_ARCH, SPILL_LIMIT, TABLE_WORKLOADS, build_row, compile_one,  # noqa: F401
                    mma_summary, resources, spec_string, unaligned_string)
from .estimate import SESSION_STEPS, check_estimates, step_compiles  # noqa: F401
from .launches import (SESSION_TESTS, WORKLOADS, capture, install_launch_hook, launch_record,  # noqa: F401
                       record_key)
from .tables import HEADER, LEGEND, _line, classes, parse_table, per_variant, report, summary  # noqa: F401



def load_launches(paths) -> List[dict]:
    out: List[dict] = []
    for path in paths:
        with open(path) as f:
            out.extend(json.load(f))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="fastcontrast aot", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="80,90,100", help="compute capabilities (default 80,90,100)")
    p.add_argument("--variants", default=None, help="launch-table variants, comma-separated (default: all)")
    p.add_argument("--out", default=None, help="write the tables (markdown) here too")
    p.add_argument("--workloads", default="report,validate,bench", help="what to capture (comma-separated, of "
                   f"{', '.join(WORKLOADS)}; default report,validate,bench: the tests workload runs "
                   f"{len(SESSION_TESTS)} test files on the interpreter, or comes from --add-launches)")
    p.add_argument("--launches", default=None, help="read the captured launches from this JSON file (written "
                   "by --save-launches) instead of capturing them again")
    p.add_argument("--add-launches", action="append", default=[], help="also build the launches recorded in "
                   "this JSON file (repeatable; e.g. the tests' launches recorded by benchmarks/launch_capture.py "
                   "during a pytest run); a missing file is an error")
    p.add_argument("--save-launches", default=None, help="write the captured launches here")
    p.add_argument("--jobs", type=int, default=None, help="parallel compiles (default: CPUs, at most 8)")
    p.add_argument("--check", action="store_true", help="exit 1 on compile errors, smem over the arch's limit, "
                   f"more than {SPILL_LIMIT} B of stack (aligned or not), a 16-bit dot kernel "
                   "without HGMMA (sm_90) / tcgen05 (sm_100), or an S-tile kernel of the default sm_90 variant with "
                   "HGMMA n < 128")
    p.add_argument("--estimate", default=None, metavar="SCRIPT", help="no builds: count the Triton kernels each "
                   "step of the GPU session SCRIPT (benchmarks/gpu_session.sh) compiles on sm_90, from the launches, "
                   "and check the estimate lines written in SCRIPT against them (exit 1 when they differ)")
    args = p.parse_args(argv)
    archs = tuple(f"sm{a.strip()}" for a in args.arch.split(","))
    variants = [v.strip() for v in args.variants.split(",")] if args.variants else None
    import triton

    if args.launches:
        launches = load_launches([args.launches])
    else:
        launches = capture(args.workloads.split(","), root=os.getcwd())
    if args.save_launches:
        with open(args.save_launches, "w") as f:
            json.dump(launches, f)
    launches = launches + load_launches(args.add_launches)
    if args.estimate:
        return check_estimates(launches, args.estimate)
    print(f"# Triton {triton.__version__}: every kernel the package launches, compiled for {', '.join(archs)} "
          "(no GPU needed)\n", flush=True)
    print(HEADER, flush=True)
    rows, ok = report(archs, launches, variants=variants, jobs_n=args.jobs)
    table_v = per_variant(rows)
    summ = summary(rows) + "\n\n" + classes(rows)
    print("\n" + table_v + "\n\n" + summ, flush=True)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        wl = "\n".join(f"- {k}: {v}" for k, v in WORKLOADS.items())
        with open(args.out, "w") as f:
            f.write(f"# Static Triton kernel report (Triton {triton.__version__})\n\n"
                    f"Regenerate: `TRITON_DEFAULT_FP_FUSION=1 python -m fastcontrast aot --arch {args.arch} "
                    f"--workloads report,validate,bench,tests --out {args.out}`.\n\n" + LEGEND
                    + "\n\nWorkloads (the launches captured on the interpreter):\n" + wl
                    + "\n\n## Per variant\n\n" + table_v + "\n\n" + summ
                    + "\n\n## Every build\n\n" + HEADER + "\n" + "\n".join(_line(r) for r in rows) + "\n")
        print(f"wrote {os.path.abspath(args.out)}")
    return 0 if ok or not args.check else 1
