"""What the driver reports for every Triton kernel the package launched on this GPU, next to the static table.

    python benchmarks/kernel_resources.py [--static benchmarks/results/triton_aot.md]

Runs every validation case forward and backward on CUDA in fp32, bf16 and fp16 (so every kernel variant is
compiled and launched), then reads each compiled kernel's registers, spills and shared memory as loaded on the
device (``CompiledKernel.n_regs``, ``.n_spills``, ``metadata.shared``) and prints them beside the static
report's row for the same kernel, dtype, variant and architecture (``python -m fastcontrast aot``).
"""
from __future__ import annotations

import argparse
import importlib
import sys

import torch


def static_rows(path):
    rows = {}
    try:
        text = open(path).read()
    except OSError:
        return rows
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 11 and cells[0].startswith("_"):
            rows[(cells[0], cells[1], cells[2], cells[3])] = cells[5:8]
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--static", default="benchmarks/results/triton_aot.md")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("kernel_resources: needs a CUDA device")
        return 1
    from fastcontrast.ops._configs import arch_of
    from fastcontrast.validate import default_cases

    dev = torch.device("cuda")
    arch = arch_of(dev)
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        for case in default_cases(n=300, m=300, d=768, k=2):
            kw = case.make(torch.Generator().manual_seed(0), dev, dt)
            kw = {k: (v.requires_grad_() if isinstance(v, torch.Tensor) and v.is_floating_point() and v.dim() >= 1
                      and case.differentiable else v) for k, v in kw.items()}
            try:
                case.run("triton", **kw).backward()
            except Exception as e:  # noqa: BLE001
                if "no 'triton'" not in str(e):
                    raise
    torch.cuda.synchronize()
    static = static_rows(args.static)
    print(f"# {torch.cuda.get_device_name(dev)} ({arch}): driver-reported resources of every launched kernel "
          f"| static (aot) regs / stack / smem\n")
    print("| kernel | dtype | variant | regs | spills | smem B | static regs | static stack B | static smem B |")
    print("|---|---|---|---|---|---|---|---|---|")
    for modname in ("infonce", "adaptive", "siglip", "codebook"):
        mod = importlib.import_module(f"fastcontrast.ops.{modname}.triton_kernels")
        for name in dir(mod):
            fn = getattr(mod, name)
            cache = getattr(fn, "device_caches", None)
            if not name.startswith("_") or cache is None:
                continue
            for kernel_cache in cache.values():
                kernels = kernel_cache[0] if isinstance(kernel_cache, tuple) else kernel_cache
                for k in kernels.values():
                    k._init_handles()
                    names = fn.arg_names
                    consts = {names[i[0]]: v for i, v in k.src.constants.items() if len(i) == 1}
                    first_ptr = next(t for t in k.src.signature.values() if t.startswith("*"))
                    dtype = first_ptr[1:]
                    variant = ",".join(f"{c}={v}" for c, v in sorted(consts.items())
                                       if not c.startswith("BLOCK") and c != "UPCAST")
                    srow = static.get((name, dtype, variant, arch), ["-", "-", "-"])
                    print(f"| {name} | {dtype} | {variant} | {k.n_regs} | {k.n_spills} | {k.metadata.shared} | "
                          + " | ".join(srow) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
