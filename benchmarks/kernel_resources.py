"""What the driver reports for every Triton kernel the package launched on this GPU, next to the static table.

    python benchmarks/kernel_resources.py [--static benchmarks/results/triton_aot.md]

Runs every validation case forward and backward on CUDA in fp32, bf16 and fp16 (so every kernel of the active
launch-table variant is compiled and launched), and after each case reads the kernels it compiled: registers,
spills and shared memory as loaded on the device (``CompiledKernel.n_regs``, ``.n_spills``, ``metadata.shared``),
printed and flushed at once beside the static report's row for the same kernel, dtype, spec, architecture and
variant (``python -m fastcontrast aot``). Without a GPU it prints one row saying so.
"""
from __future__ import annotations

import argparse
import importlib
import sys

import torch


def static_rows(path):
    """(kernel, dtype, spec, arch) -> [regs, stack, smem] of the static report's rows for the active variant."""
    from fastcontrast.ops._configs import DEFAULT_VARIANT, ENV_VARIANT
    import os

    rows = {}
    try:
        text = open(path).read()
    except OSError:
        return rows
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 15 and cells[0].startswith("_"):
            arch = cells[3]
            want = os.environ.get(ENV_VARIANT) or DEFAULT_VARIANT.get(arch)
            if want in cells[5].split("/"):
                rows[(cells[0], cells[1], cells[2], arch)] = cells[6:9]
    return rows


def _kernels():
    """(name, JITFunction, compiled kernel) of every Triton kernel compiled so far in this process."""
    for modname in ("infonce", "adaptive", "siglip", "codebook"):
        mod = importlib.import_module(f"fastcontrast.ops.{modname}.triton_kernels")
        for name in dir(mod):
            fn = getattr(mod, name)
            cache = getattr(fn, "device_caches", None)
            if not name.startswith("_") or cache is None:
                continue
            for kernel_cache in cache.values():
                kernels = kernel_cache[0] if isinstance(kernel_cache, tuple) else kernel_cache
                for key, k in kernels.items():
                    yield name, fn, key, k


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--static", default="benchmarks/results/triton_aot.md")
    p.add_argument("--size", default="300,300,768,2", help="n,m,d,k of the validation cases run")
    args = p.parse_args(argv)
    print("| kernel | dtype | spec | regs | spills | smem B | static regs | static stack B | static smem B | case |")
    print("|---|---|---|---|---|---|---|---|---|---|", flush=True)
    if not torch.cuda.is_available():
        # a row, not silence: the dry run of benchmarks/gpu_session.sh lands here
        print("| - | - | - | - | - | - | - | - | - | not run: no CUDA device (the driver reports resources only "
              "for kernels loaded on a GPU) |", flush=True)
        return 0
    from fastcontrast.ops._configs import arch_of
    from fastcontrast.validate import default_cases

    dev = torch.device("cuda")
    arch = arch_of(dev)
    static = static_rows(args.static)
    struct = ("FLAT", "GROUP")
    n, m, d, k = (int(v) for v in args.size.split(","))
    seen = set()
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        for case in default_cases(n=n, m=m, d=d, k=k):
            kw = case.make(torch.Generator().manual_seed(0), dev, dt)
            kw = {k: (v.requires_grad_() if isinstance(v, torch.Tensor) and v.is_floating_point() and v.dim() >= 1
                      and case.differentiable else v) for k, v in kw.items()}
            try:
                case.run("triton", **kw).backward()
                torch.cuda.synchronize()
            except Exception as e:  # noqa: BLE001 - a row that says why
                if "no 'triton'" not in str(e):
                    print(f"| - | {str(dt)[6:]} | - | - | - | - | - | - | - | {case.name}: "
                          f"{type(e).__name__}: {str(e)[:80]} |", flush=True)
                continue
            for name, fn, key, kern in _kernels():  # the kernels this case compiled, printed at once
                if (name, key) in seen:
                    continue
                seen.add((name, key))
                kern._init_handles()
                names = fn.arg_names
                consts = {names[i[0]]: v for i, v in kern.src.constants.items() if len(i) == 1}
                first_ptr = next(t for t in kern.src.signature.values() if t.startswith("*"))
                dtype = first_ptr[1:]
                # the static report's spec: the launch's constexprs but tiles, switches and specialised ints
                spec = ",".join(f"{c}={v}" for c, v in sorted(consts.items())
                                if not c.startswith("BLOCK") and c not in ("UPCAST",) + struct
                                and (isinstance(v, bool) or not isinstance(v, int)))
                srow = static.get((name, dtype, spec, arch), ["-", "-", "-"])
                print(f"| {name} | {dtype} | {spec} | {kern.n_regs} | {kern.n_spills} | {kern.metadata.shared} | "
                      + " | ".join(srow) + f" | {case.name} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
