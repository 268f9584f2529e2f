"""Static report of every Triton kernel the package launches, compiled for GPUs without one.

``python -m fastcontrast aot [--arch 80,90,100] [--out benchmarks/results/triton_aot.md] [--check]``

1. Capture: a subprocess runs every op of the validation cases forward and backward on the Triton interpreter
   (CPU tensors, fp32/bf16/fp16) and records each kernel launch: its arguments' types and constexprs.
2. Compile: for each captured (kernel, dtype) and each configuration of the launch table
   (:mod:`fastcontrast.ops._configs`) for each architecture, ``triton.compile`` with a
   ``GPUTarget("cuda", cc, 32)``; pointers and integer arguments are specialised as 16-divisible, as they are
   at d = 768 on a real launch.
3. Read: registers, stack frame and spill bytes from the ``cuobjdump`` inside Triton's package
   (``-res-usage``), shared memory and stages from the compiled kernel's metadata; "smem stages" estimates how
   many K-chunks of A and B the shared memory holds (≥ 2 means the GEMM loop is pipelined).

``--check`` exits non-zero on a compile error, on a build that needs more shared memory than its
architecture gives one block, or on one that spills more than 512 B of stack.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from typing import Dict, List, Optional, Tuple

SPILL_LIMIT = 512

_CAPTURE = r"""
import json, os, sys
os.environ["TRITON_INTERPRET"] = "1"
import torch
import triton.runtime.interpreter as I
from fastcontrast.validate import default_cases
launches = {}
orig = I.InterpretedFunction.run

def tname(t):
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int32: "i32",
            torch.int64: "i64", torch.float64: "fp64", torch.bool: "i1", torch.uint8: "u8"}[t.dtype]

def run(self, *args, grid, warmup, **kwargs):
    import inspect
    fn = self.fn
    names = self.arg_names
    params = inspect.signature(fn).parameters
    bound = dict(zip(names, args))
    bound.update(kwargs)
    sig, const = {}, {}
    for n in names:
        v = bound[n]
        if "constexpr" in str(params[n].annotation):
            sig[n] = "constexpr"; const[n] = v
        elif isinstance(v, torch.Tensor):
            sig[n] = "*" + tname(v)
        elif isinstance(v, int):
            sig[n] = "i32"
        elif isinstance(v, float):
            sig[n] = "fp32"
        else:
            sig[n] = "constexpr"; const[n] = v
    feats = [bound[n] for n in names if isinstance(bound[n], torch.Tensor) and bound[n].dim() == 2]
    dtype = tname(feats[0]) if feats else "fp32"
    key = (fn.__module__, fn.__name__, dtype, json.dumps(sig, sort_keys=True), json.dumps(const, sort_keys=True))
    launches[key] = True
    return orig(self, *args, grid=grid, warmup=warmup, **kwargs)

I.InterpretedFunction.run = run
# fp32 twice: ieee dots by default, tf32 when the user allows it (torch.backends.cuda.matmul.allow_tf32)
for dt, tf32 in ((torch.float32, False), (torch.float32, True), (torch.bfloat16, False), (torch.float16, False)):
    torch.backends.cuda.matmul.allow_tf32 = tf32
    for case in default_cases(n=37, m=53, d=64, k=2):
        g = torch.Generator().manual_seed(0)
        kw = case.make(g, torch.device("cpu"), dt)
        kw = {k: (v.requires_grad_() if isinstance(v, torch.Tensor) and v.is_floating_point() and v.dim() >= 1
                  and case.differentiable else v) for k, v in kw.items()}
        try:
            case.run("triton", **kw).backward()
        except Exception as e:
            if "no 'triton'" not in str(e):
                raise
out = [dict(module=k[0], kernel=k[1], dtype=k[2], signature=json.loads(k[3]), constexprs=json.loads(k[4]))
       for k in launches]
json.dump(out, sys.stdout)
"""


def capture() -> List[dict]:
    """Every distinct (kernel, dtype, signature, constexprs) the package launches, from a subprocess that runs
    the validation cases on the Triton interpreter."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONWARNINGS="ignore")
    r = subprocess.run([sys.executable, "-c", _CAPTURE], capture_output=True, text=True, env=env, timeout=1200)
    if r.returncode != 0:
        raise RuntimeError(f"capturing the kernel launches failed:\n{r.stderr[-4000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def _tool(name: str) -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{name} is not in Triton's package ({path})")
    return path


def resources(cubin: bytes) -> Dict[str, int]:
    """Registers, stack frame, spill stores/loads of the one kernel in ``cubin`` (cuobjdump -res-usage)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([_tool("cuobjdump"), "-res-usage", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
    if not m:
        raise RuntimeError(f"cannot read the resource usage:\n{out}")
    return {"regs": int(m.group(1)), "stack": int(m.group(2)), "static_smem": int(m.group(3)),
            "local": int(m.group(4))}


def _stage_bytes(kernel: str, cfg: dict, elt: int) -> Optional[int]:
    """Bytes of one pipeline stage of the GEMM loop: an A tile and a B tile of one K-chunk."""
    if "BLOCK_K" not in cfg:
        return None
    return (cfg["BLOCK_M"] + cfg["BLOCK_N"]) * cfg["BLOCK_K"] * elt


def compile_one(launch: dict, arch: str, cfg: dict):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from .ops._configs import CC

    mod = __import__(launch["module"], fromlist=[launch["kernel"]])
    fn = getattr(mod, launch["kernel"])
    cfg = dict(cfg)
    warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
    const = dict(launch["constexprs"], **cfg)
    sig = dict(launch["signature"])
    # a real launch at d = 768 specialises 16-aligned pointers and 16-divisible sizes/strides
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
             if sig.get(n, "").startswith("*") or (sig.get(n) == "i32" and ("stride" in n or n in ("D", "DT")))}
    src = ASTSource(fn, sig, const, attrs)
    k = triton.compile(src, target=GPUTarget("cuda", CC[arch], 32), options={"num_warps": warps, "num_stages": stages})
    return k, warps, stages


def report(archs=("sm80", "sm90", "sm100"), launches: Optional[List[dict]] = None, log=print) -> Tuple[List[dict], bool]:
    from .ops._configs import SMEM_LIMIT, TABLE, dtype_class

    launches = launches if launches is not None else capture()
    rows, ok = [], True
    seen = set()
    for lc in sorted(launches, key=lambda d: (d["kernel"], d["dtype"], json.dumps(d["constexprs"], sort_keys=True))):
        if lc["kernel"] not in TABLE:
            rows.append(dict(kernel=lc["kernel"], dtype=lc["dtype"], arch="-", config="-",
                             error="launched but missing from ops/_configs.TABLE"))
            ok = False
            continue
        dclass = dtype_class({"fp32": None, "fp16": __import__("torch").float16,
                              "bf16": __import__("torch").bfloat16}.get(lc["dtype"]))
        variant = ",".join(f"{k}={v}" for k, v in sorted(lc["constexprs"].items())
                           if not k.startswith("BLOCK") and k not in ("UPCAST",))
        for arch in archs:
            cfg = TABLE[lc["kernel"]][(arch, dclass)]
            key = (lc["kernel"], lc["dtype"], variant, arch, json.dumps(cfg, sort_keys=True))
            if key in seen:
                continue
            seen.add(key)
            cfg_s = "×".join(str(cfg[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_R", "BLOCK_C") if k in cfg)
            cfg_s += f" w{cfg['num_warps']} s{cfg['num_stages']}"
            row = dict(kernel=lc["kernel"], dtype=lc["dtype"], variant=variant, arch=arch, config=cfg_s)
            try:
                # UPCAST is the interpreter's bf16 work-around; a GPU launch passes False
                lc_c = dict(lc, constexprs={k: (False if k == "UPCAST" else v) for k, v in lc["constexprs"].items()})
                k, warps, stages = compile_one(lc_c, arch, cfg)
                res = resources(k.asm["cubin"])
                smem = int(k.metadata.shared)
                elt = 4 if lc["dtype"] == "fp32" else 2
                per_stage = _stage_bytes(lc["kernel"], cfg, elt)
                row.update(regs=res["regs"], stack=res["stack"], smem=smem, stages=stages,
                           smem_stages=(smem // per_stage) if per_stage else None)
                problems = []
                if smem > SMEM_LIMIT[arch]:
                    problems.append(f"smem {smem} > {SMEM_LIMIT[arch]}")
                if res["stack"] > SPILL_LIMIT:
                    problems.append(f"stack {res['stack']} > {SPILL_LIMIT}")
                if problems:
                    row["error"] = "; ".join(problems)
                    ok = False
            except Exception as e:  # noqa: BLE001 - a compile error is a row, and a failure of the check
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
                ok = False
            rows.append(row)
            log(_line(row), flush=True) if log is print else log(_line(row))
    return rows, ok


HEADER = ("| kernel | dtype | variant | arch | config | regs | stack B | smem B | stages | smem stages | result |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|")


def _line(r: dict) -> str:
    def g(k):
        v = r.get(k)
        return "-" if v is None else str(v)

    return (f"| {r['kernel']} | {r['dtype']} | {r.get('variant', '')} | {r['arch']} | {r['config']} | {g('regs')} | "
            f"{g('stack')} | {g('smem')} | {g('stages')} | {g('smem_stages')} | {r.get('error', 'ok')} |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="fastcontrast aot", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="80,90,100", help="compute capabilities (default 80,90,100)")
    p.add_argument("--out", default=None, help="write the table (markdown) here too")
    p.add_argument("--check", action="store_true", help="exit 1 on compile errors, smem over the arch's limit, "
                   f"or more than {SPILL_LIMIT} B of stack")
    args = p.parse_args(argv)
    archs = tuple(f"sm{a.strip()}" for a in args.arch.split(","))
    import triton

    print(f"# Triton {triton.__version__}: every kernel the package launches, compiled for {', '.join(archs)} "
          "(no GPU needed)\n")
    print(HEADER)
    rows, ok = report(archs)
    n_err = sum(1 for r in rows if "error" in r)
    summary = (f"\n{len(rows)} builds, {sum(1 for r in rows if r.get('error', '').startswith(('Compil', 'Runtime', 'Assert')))} "
               f"compile errors, {sum(1 for r in rows if 'smem' in r.get('error', '') and '>' in r.get('error', ''))} "
               f"over their arch's shared memory, {sum(1 for r in rows if (r.get('stack') or 0) > SPILL_LIMIT)} with "
               f"more than {SPILL_LIMIT} B of stack; {n_err} rows flagged")
    print(summary)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(f"# Static Triton kernel report (Triton {triton.__version__})\n\n"
                    "Regenerate: `python -m fastcontrast aot --out benchmarks/results/triton_aot.md`. Columns: "
                    "registers per thread, stack frame (spills), shared memory per block, num_stages asked, and "
                    "how many K-chunks of A and B the shared memory holds (>= 2: the GEMM loop is pipelined). "
                    "Limits: smem 166,912 B (sm_80), 232,448 B (sm_90, sm_100); stack <= 512 B.\n\n"
                    + HEADER + "\n" + "\n".join(_line(r) for r in rows) + "\n" + summary + "\n")
        print(f"wrote {os.path.abspath(args.out)}")
    return 0 if ok or not args.check else 1
