"""What the driver reports for every Triton kernel the package launched on this GPU, next to the static table.

    python benchmarks/kernel_resources.py [--static benchmarks/results/triton_aot.md] [--size 37,53,40,3]

Runs every validation case forward and backward on CUDA in fp32, bf16 and fp16 as ``validate`` does (its
``compare``, seed 0: every kernel of the active launch-table variant is compiled and launched), and after each
case reads the kernels it compiled: registers, spills and shared memory as loaded on the device (``CompiledKernel.n_regs``, ``.n_spills``, ``metadata.shared``),
printed and flushed at once beside the static report's row for the same kernel, dtype, spec, unaligned
arguments, architecture and variant (``python -m fastcontrast aot``).

The static table compared against is the one built with the Triton this runs under (the first line of each
``benchmarks/results/triton_aot*.md`` names its Triton): the device's Triton 3.6.0 reads
``triton_aot_triton360.md``, not the project's newer one. The default size is ``validate``'s, so in
``benchmarks/gpu_session.sh`` (one Triton cache for the whole call) every kernel here was already compiled by the
validate step. Without a GPU it prints one row saying so. Exits 1 when a case fails.
"""
from __future__ import annotations

import argparse
import glob
import os
import re
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def table_for(version: str, folder: str = os.path.join(HERE, "results")):
    """The static report built with Triton ``version`` (its first line says which), or None."""
    for path in sorted(glob.glob(os.path.join(folder, "triton_aot*.md"))):
        with open(path) as f:
            m = re.search(r"\(Triton ([^)]+)\)", f.readline())
        if m and m.group(1) == version:
            return path
    return None


def static_rows(path):
    """(kernel, dtype, spec, unaligned, arch) -> [regs, stack, smem] of the static report's rows for the active
    variant."""
    from fastcontrast.aot import parse_table
    from fastcontrast.primitives.configs import DEFAULT_VARIANT, ENV_VARIANT

    rows = {}
    for r in parse_table(path):
        want = os.environ.get(ENV_VARIANT) or DEFAULT_VARIANT.get(r["arch"])
        if want in r["variants"].split("/"):
            rows[(r["kernel"], r["dtype"], r["spec"], r["unaligned"], r["arch"])] = [r["regs"], r["stack"], r["smem"]]
    return rows


def _kernels():
    """(name, JITFunction, key, compiled kernel) of every Triton kernel of the package compiled so far in this
    process (found in every loaded fastcontrast module, wherever the package keeps its kernels)."""
    seen = set()
    for modname, mod in list(sys.modules.items()):
        if not modname.startswith("fastcontrast") or mod is None:
            continue
        for name, fn in list(vars(mod).items()):
            cache = getattr(fn, "device_caches", None)
            if not name.startswith("_") or cache is None or id(fn) in seen:
                continue
            seen.add(id(fn))
            for kernel_cache in cache.values():
                kernels = kernel_cache[0] if isinstance(kernel_cache, tuple) else kernel_cache
                for key, k in kernels.items():
                    yield name, fn, key, k


def _describe(fn, kern):
    """(dtype, spec, unaligned) of a compiled kernel, as the static report writes them."""
    from fastcontrast.aot import spec_string

    names = fn.arg_names
    sig = dict(kern.src.signature)
    consts = {names[i[0]]: v for i, v in kern.src.constants.items() if len(i) == 1}
    div = {names[i[0]] for i, a in (getattr(kern.src, "attrs", None) or {}).items()
           if len(i) == 1 and any(x and x[0] == "tt.divisibility" for x in a)}
    first_ptr = next(t for t in sig.values() if t.startswith("*"))
    unaligned = [n for n, t in sig.items() if t != "constexpr" and n not in consts  # argument order, as the table
                 and (t.startswith("*") or t[0] in "iu") and t != "u1" and n not in div]
    return first_ptr[1:], spec_string(consts), ",".join(unaligned) or "-"


def main(argv=None):
    import triton

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--static", default=None, help="the static report to compare with (default: the one built "
                   "with this Triton, benchmarks/results/triton_aot*.md)")
    p.add_argument("--size", default="37,53,40,3", help="n,m,d,k of the validation cases run (default: validate's)")
    args = p.parse_args(argv)
    static_path = args.static or table_for(triton.__version__)
    print(f"# Triton {triton.__version__}; static table: "
          f"{os.path.relpath(static_path) if static_path else f'none built with Triton {triton.__version__}'}\n")
    print("| kernel | dtype | spec | unaligned | regs | spills | smem B | static regs | static stack B | "
          "static smem B | case |")
    print("|---|---|---|---|---|---|---|---|---|---|---|", flush=True)
    if not torch.cuda.is_available():
        # a row, not silence: the dry run of benchmarks/gpu_session.sh lands here
        print("| - | - | - | - | - | - | - | - | - | - | not run: no CUDA device (the driver reports resources only "
              "for kernels loaded on a GPU) |", flush=True)
        return 0
    from fastcontrast.primitives.configs import arch_of
    from fastcontrast.validate import compare, default_cases

    dev = torch.device("cuda")
    arch = arch_of(dev)
    static = static_rows(static_path) if static_path else {}
    n, m, d, k = (int(v) for v in args.size.split(","))
    seen, failed, missing = set(), 0, 0
    for dt in (torch.float32, torch.bfloat16):  # the session's validate dtypes: every kernel a cache hit
        for case in default_cases(n=n, m=m, d=d, k=k):
            try:
                compare(case, "triton", dt, dev, 0)  # validate's own call (seed 0): the same launches, cached
                torch.cuda.synchronize()
            except Exception as e:  # noqa: BLE001 - a row that says why
                if "no 'triton'" not in str(e):
                    failed += 1
                    print(f"| - | {str(dt)[6:]} | - | - | - | - | - | - | - | - | {case.name}: FAILED "
                          f"{type(e).__name__}: {str(e)[:80]} |", flush=True)
                continue
            for name, fn, key, kern in _kernels():  # the kernels this case compiled, printed at once
                if (name, key) in seen:
                    continue
                seen.add((name, key))
                kern._init_handles()
                try:
                    dtype, spec, unaligned = _describe(fn, kern)
                except Exception as e:  # noqa: BLE001 - the driver's numbers still print
                    dtype, spec, unaligned = "?", f"({type(e).__name__})", "?"
                srow = static.get((name, dtype, spec, unaligned, arch))
                missing += srow is None
                print(f"| {name} | {dtype} | {spec} | {unaligned} | {kern.n_regs} | {kern.n_spills} | "
                      f"{kern.metadata.shared} | " + " | ".join(srow or ["not in the table"] * 3) + f" | {case.name} |",
                      flush=True)
    print(f"\n{len(seen)} kernels; {missing} without a static row; {failed} cases failed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
