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


def _spec(launch: dict, fn) -> Tuple[dict, dict, dict]:
    """(signature, constexprs, attributes) as a real launch specialises them at N = 4096, d = 768: every pointer
    16-byte aligned, every integer (sizes, strides, offsets) divisible by 16, and K = 1 (one token) a constant,
    as Triton makes any integer argument equal to 1."""
    sig = dict(launch["signature"])
    const = dict(launch["constexprs"])
    if "K" in sig and sig["K"] == "i32" and not const.get("MULTI", True):
        sig["K"], const["K"] = "constexpr", 1
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
             if sig.get(n, "").startswith("*") or sig.get(n) == "i32"}
    return sig, const, attrs


def compile_one(launch: dict, arch: str, cfg: dict):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from .ops._configs import CC, LAUNCHER_KEYS

    mod = __import__(launch["module"], fromlist=[launch["kernel"]])
    fn = getattr(mod, launch["kernel"])
    cfg = {k: v for k, v in cfg.items() if k not in LAUNCHER_KEYS}
    warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
    options = {"num_warps": warps, "num_stages": stages}
    maxnreg = cfg.pop("maxnreg", None)
    if maxnreg is not None:
        options["maxnreg"] = maxnreg
    sig, const, attrs = _spec(launch, fn)
    const.update(cfg)
    for k in cfg:  # structural switches of a variant that the capture's launch did not pass (kernel defaults)
        sig[k] = "constexpr"
    src = ASTSource(fn, sig, const, attrs)
    k = triton.compile(src, target=GPUTarget("cuda", CC[arch], 32), options=options)
    return k, warps, stages


# ------------------------------------------------------------------------------------------- reading a build
_SASS_OP = re.compile(r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.x]+)", re.M)


def sass_ops(cubin: bytes) -> Dict[str, int]:
    """Opcode -> count in the SASS of ``cubin`` (cuobjdump -sass)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([_tool("cuobjdump"), "-sass", f.name], capture_output=True, text=True).stdout
    ops: Dict[str, int] = {}
    for m in _SASS_OP.finditer(out):
        ops[m.group(1)] = ops.get(m.group(1), 0) + 1
    return ops


def mma_summary(ops: Dict[str, int]) -> Tuple[str, Optional[int]]:
    """("HGMMA 64x128x16 ×4", n) / ("HMMA 16816 ×32", None) / ("tcgen05 UTCHMMA ×8", None) / ("FFMA", None) /
    ("-", None): the matrix instructions of a build and, for HGMMA, the smallest n."""
    hg = {op: c for op, c in ops.items() if op.startswith(("HGMMA", "QGMMA"))}
    if hg:
        shapes = sorted({op.split(".")[1] for op in hg})
        n = min(int(sh.split("x")[1]) for sh in shapes)
        return "HGMMA " + ",".join(shapes) + f" ×{sum(hg.values())}", n
    tc = {op: c for op, c in ops.items() if op.startswith("UTC") and "MMA" in op}
    if tc:
        return "tcgen05 " + ",".join(sorted({op.split(".")[0] for op in tc})) + f" ×{sum(tc.values())}", None
    hm = {op: c for op, c in ops.items() if op.startswith("HMMA")}
    if hm:
        return "HMMA " + ",".join(sorted({op.split(".")[1] for op in hm})) + f" ×{sum(hm.values())}", None
    if any(op.startswith("FFMA") for op in ops):
        return "FFMA", None
    return "-", None


# registers per SM and the most CTAs one SM holds; shared memory per SM and the 1 KB the driver reserves per CTA
_REGS_SM, _MAX_CTAS, _MAX_WARPS = 65536, 32, 64
_SMEM_SM = {"sm80": 167_936, "sm90": 233_472, "sm100": 233_472}


def ctas_per_sm(arch: str, regs: int, warps: int, smem: int) -> Tuple[int, str]:
    """(CTAs per SM, what limits it): registers are allocated per warp in 256-register units."""
    per_warp = -(-regs * 32 // 256) * 256
    by_regs = (_REGS_SM // per_warp) // warps if per_warp else _MAX_CTAS
    by_smem = _SMEM_SM[arch] // (smem + 1024)
    by_warps = _MAX_WARPS // warps
    n = min(by_regs, by_smem, by_warps, _MAX_CTAS)
    return n, ("regs" if n == by_regs else "smem" if n == by_smem else "warps")


def loop_drains(ttgir: str) -> Tuple[int, int]:
    """(full copy drains, full MMA waits) inside loop bodies of the ttgir: ``ttg.async_wait {num = 0}`` and
    ``warp_group_dot_wait {pendings = 0}`` nested in an ``scf.for``. A nested column × K loop drains both at
    every column tile; the flattened loop waits only for the accumulator it reads (one MMA wait, no copy
    drain: the next tile's copies stay in flight)."""
    stack: List[bool] = []
    copies = mmas = 0
    for line in ttgir.splitlines():
        t = line.strip()
        if t.startswith("}"):
            if stack:
                stack.pop()
            t = t[1:].strip()
        if any(stack):
            if "ttg.async_wait" in t and "num = 0 :" in t:
                copies += 1
            if "warp_group_dot_wait" in t and "pendings = 0 :" in t:
                mmas += 1
        if t.endswith("{"):
            stack.append("scf.for" in t)
    return copies, mmas


def _stage_bytes_of(cfg: dict, dtype: str) -> Optional[int]:
    return _stage_bytes("", cfg, 4 if dtype == "fp32" else 2)


# Every kernel whose tile is an S tile (pairs of rows × columns, a GEMM over d): HGMMA n >= 128 is required of
# these in the default sm_90 variant, unless a reason is given here (it then shows in the table).
S_TILE_KERNELS = ("_lse_fwd_kernel", "_grad_tile_kernel", "_hinge_fwd_kernel", "_hinge_grad_tile_kernel",
                  "_hinge_pair_fwd_kernel", "_hinge_pair_grad_tile_kernel", "_softplus_rows_kernel",
                  "_sigmoid_grad_tile_kernel")
NARROW_OK: Dict[str, str] = {}  # kernel -> why its default sm_90 tile stays below n = 128


def _build_jobs(launches: List[dict], archs, variants) -> List[dict]:
    """One job per distinct (kernel, dtype, constexpr variant, arch, config); the variants sharing it listed."""
    import torch

    from .ops._configs import _STRUCT, VARIANTS, dtype_class

    jobs: Dict[tuple, dict] = {}
    # the capture ran one variant; its structural switches come from each variant's config instead
    struct = {k for keys in _STRUCT.values() for k in keys}
    launches = [dict(lc, constexprs={k: v for k, v in lc["constexprs"].items() if k not in struct})
                for lc in launches]
    uniq = {json.dumps([lc["kernel"], lc["dtype"], lc["constexprs"]], sort_keys=True): lc for lc in launches}
    launches = list(uniq.values())
    for lc in sorted(launches, key=lambda d: (d["kernel"], d["dtype"], json.dumps(d["constexprs"], sort_keys=True))):
        dclass = dtype_class({"fp16": torch.float16, "bf16": torch.bfloat16}.get(lc["dtype"], torch.float32))
        spec = ",".join(f"{k}={v}" for k, v in sorted(lc["constexprs"].items())
                        if not k.startswith("BLOCK") and k not in ("UPCAST",))
        for arch in archs:
            for name in variants:
                table = VARIANTS[name]
                if lc["kernel"] not in table:
                    key = (lc["kernel"], lc["dtype"], spec, "-", "missing")
                    jobs.setdefault(key, dict(kernel=lc["kernel"], dtype=lc["dtype"], spec=spec, arch="-",
                                              cfg=None, variants=[], launch=lc))
                    continue
                cfg = table[lc["kernel"]][(arch, dclass)]
                key = (lc["kernel"], lc["dtype"], spec, arch, json.dumps(cfg, sort_keys=True))
                job = jobs.setdefault(key, dict(kernel=lc["kernel"], dtype=lc["dtype"], spec=spec, arch=arch,
                                                cfg=dict(cfg), variants=[], launch=lc))
                if name not in job["variants"]:
                    job["variants"].append(name)
    return list(jobs.values())


def _cfg_str(cfg: dict) -> str:
    s = "×".join(str(cfg[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_R", "BLOCK_C") if k in cfg)
    s += f" w{cfg['num_warps']} s{cfg['num_stages']}"
    if cfg.get("maxnreg"):
        s += f" r{cfg['maxnreg']}"
    flags = [k for k in ("FLAT", "COL_SPLIT") if cfg.get(k)] + ([f"G{cfg['GROUP']}"] if cfg.get("GROUP", 1) > 1 else [])
    return s + (" " + "+".join(flags) if flags else "")


def build_row(job: dict) -> dict:
    """Compile one job and read it: the report's row (``error`` set when a check fails)."""
    from .ops._configs import DEFAULT_VARIANT, SMEM_LIMIT

    row = dict(kernel=job["kernel"], dtype=job["dtype"], variant=job["spec"], arch=job["arch"],
               variants="/".join(job["variants"]))
    if job["cfg"] is None:
        row.update(config="-", error="launched but missing from ops/_configs.VARIANTS")
        return row
    cfg, arch = job["cfg"], job["arch"]
    row["config"] = _cfg_str(cfg)
    try:
        # UPCAST is the interpreter's bf16 work-around; a GPU launch passes False
        lc = dict(job["launch"], constexprs={k: (False if k == "UPCAST" else v)
                                             for k, v in job["launch"]["constexprs"].items()})
        k, warps, stages = compile_one(lc, arch, cfg)
        res = resources(k.asm["cubin"])
        smem = int(k.metadata.shared)
        per_stage = _stage_bytes_of(cfg, job["dtype"])
        mma, n = mma_summary(sass_ops(k.asm["cubin"]))
        ctas, limit = ctas_per_sm(arch, res["regs"], warps, smem + res["static_smem"])
        copies, waits = loop_drains(k.asm["ttgir"])
        is_dot = "tt.dot" in k.asm["ttir"]
        row.update(regs=res["regs"], stack=res["stack"], smem=smem, stages=stages,
                   smem_stages=(smem // per_stage) if per_stage else None, mma=mma, mma_n=n,
                   ctas=f"{ctas} ({limit})", drains=f"{copies}/{waits}" if is_dot else "-")
        problems = []
        if smem > SMEM_LIMIT[arch]:
            problems.append(f"smem {smem} > {SMEM_LIMIT[arch]}")
        if res["stack"] > SPILL_LIMIT:
            problems.append(f"stack {res['stack']} > {SPILL_LIMIT}")
        half = job["dtype"] in ("bf16", "fp16")
        if is_dot and half and arch == "sm90" and not mma.startswith("HGMMA"):
            problems.append(f"no HGMMA on sm_90 ({mma})")
        if is_dot and half and arch == "sm100" and not mma.startswith("tcgen05"):
            problems.append(f"no tcgen05 MMA on sm_100 ({mma})")
        if (half and arch == "sm90" and DEFAULT_VARIANT["sm90"] in job["variants"] and job["kernel"] in S_TILE_KERNELS
                and n is not None and n < 128):
            if job["kernel"] in NARROW_OK:
                row["note"] = f"HGMMA n = {n}: {NARROW_OK[job['kernel']]}"
            else:
                problems.append(f"default sm_90 S tile has HGMMA n = {n} < 128")
        if problems:
            row["error"] = "; ".join(problems)
    except Exception as e:  # noqa: BLE001 - a compile error is a row, and a failure of the check
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
    return row


def report(archs=("sm80", "sm90", "sm100"), launches: Optional[List[dict]] = None, log=print, variants=None,
           jobs_n: Optional[int] = None) -> Tuple[List[dict], bool]:
    """Build every (launch, arch, distinct config over ``variants``) and return (rows, all checks passed);
    each row is logged (and flushed) as soon as it is built. ``jobs_n`` parallel compiles (default: CPUs)."""
    from .ops._configs import VARIANTS

    launches = launches if launches is not None else capture()
    jobs = _build_jobs(launches, archs, list(variants or VARIANTS))
    rows: List[dict] = []
    workers = jobs_n or min(8, os.cpu_count() or 1)
    if workers > 1:
        import concurrent.futures as cf
        import multiprocessing as mp

        with cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as ex:
            for row in ex.map(build_row, jobs):
                rows.append(row)
                log(_line(row))
                sys.stdout.flush()
    else:
        for job in jobs:
            row = build_row(job)
            rows.append(row)
            log(_line(row))
            sys.stdout.flush()
    return rows, not any("error" in r for r in rows)


HEADER = ("| kernel | dtype | spec | arch | config | variants | regs | stack B | smem B | stages | smem stages | "
          "MMA (SASS) | CTAs/SM (limit) | loop drains copy/MMA | result |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def _line(r: dict) -> str:
    def g(k):
        v = r.get(k)
        return "-" if v is None else str(v)

    result = r.get("error", r.get("note", "ok"))
    return (f"| {r['kernel']} | {r['dtype']} | {r.get('variant', '')} | {r['arch']} | {r['config']} | "
            f"{r.get('variants', '')} | {g('regs')} | {g('stack')} | {g('smem')} | {g('stages')} | "
            f"{g('smem_stages')} | {g('mma')} | {g('ctas')} | {g('drains')} | {result} |")


def per_variant(rows: List[dict]) -> str:
    """One line per (variant, arch): builds, most registers, fewest CTAs/SM, smallest HGMMA n of the 16-bit
    S-tile kernels, forward loop drains, flagged rows."""
    from .ops._configs import DEFAULT_VARIANT, VARIANTS

    out = ["| variant | arch | builds | max regs | max stack B | min CTAs/SM | S-tile HGMMA n (16-bit) | "
           "_lse_fwd_kernel drains copy/MMA (16-bit) | flagged |", "|---|---|---|---|---|---|---|---|---|"]
    archs = sorted({r["arch"] for r in rows if r["arch"] != "-"})
    for name in VARIANTS:
        for arch in archs:
            sub = [r for r in rows if r["arch"] == arch and name in r.get("variants", "").split("/")]
            if not sub:
                continue
            regs = [r["regs"] for r in sub if r.get("regs") is not None]
            stack = [r["stack"] for r in sub if r.get("stack") is not None]
            ctas = [int(r["ctas"].split()[0]) for r in sub if r.get("ctas")]
            ns = sorted({r["mma_n"] for r in sub if r.get("mma_n") and r["kernel"] in S_TILE_KERNELS
                         and r["dtype"] != "fp32"})
            dr = sorted({r["drains"] for r in sub if r["kernel"] == "_lse_fwd_kernel" and r["dtype"] != "fp32"
                         and "MULTI=False" in r["variant"] and r.get("drains")})
            tag = " (default)" if DEFAULT_VARIANT.get(arch) == name else ""
            out.append(f"| {name}{tag} | {arch} | {len(sub)} | {max(regs, default='-')} | {max(stack, default='-')} | "
                       f"{min(ctas, default='-')} | {','.join(map(str, ns)) or '-'} | {','.join(dr) or '-'} | "
                       f"{sum(1 for r in sub if 'error' in r)} |")
    return "\n".join(out)


def summary(rows: List[dict]) -> str:
    err = lambda r, *w: any(x in r.get("error", "") for x in w)  # noqa: E731
    return (f"{len(rows)} builds, "
            f"{sum(1 for r in rows if r.get('error', '').startswith(('Compil', 'Runtime', 'Assert', 'Value')))} "
            f"compile errors, {sum(1 for r in rows if err(r, 'smem') and '>' in r.get('error', ''))} over their "
            f"arch's shared memory, {sum(1 for r in rows if (r.get('stack') or 0) > SPILL_LIMIT)} with more than "
            f"{SPILL_LIMIT} B of stack, {sum(1 for r in rows if err(r, 'no HGMMA', 'no tcgen05'))} 16-bit dot "
            f"builds without the arch's MMA, {sum(1 for r in rows if err(r, '< 128'))} default sm_90 S tiles with "
            f"HGMMA n < 128; {sum(1 for r in rows if 'error' in r)} rows flagged")


LEGEND = (
    "Columns: spec = the launch's constexprs; config = tile (M×N×K), warps, stages, register cap (r), and the "
    "structural switches (FLAT: one tile×K loop; COL_SPLIT: column-split forward grid; G8: grouped program "
    "order); variants = the launch-table variants that use this build; regs per thread; stack frame (spills); "
    "shared memory per block; how many K-chunks of A and B the shared memory holds (>= 2: the GEMM loop is "
    "pipelined); MMA = the matrix instructions in the SASS (HGMMA m×n×k on sm_90, tcgen05 UTCHMMA on sm_100, "
    "HMMA on sm_80, FFMA: no tensor cores); CTAs/SM from registers (256-register units per warp, 65,536 per SM) "
    "and shared memory (+1 KB per CTA); loop drains = full copy drains (async_wait num = 0) / full MMA waits "
    "(warp_group_dot_wait pendings = 0) inside loops of the ttgir. Builds are specialised as a real launch at "
    "N = 4096, d = 768 is: 16-byte aligned pointers, integers divisible by 16, K = 1 a constant. Checks: smem "
    "<= 166,912 B (sm_80), 232,448 B (sm_90, sm_100); stack <= 512 B; every bf16/fp16 dot kernel HGMMA on "
    "sm_90 and tcgen05 on sm_100; every S-tile kernel of the default sm_90 variant HGMMA n >= 128.")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="fastcontrast aot", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="80,90,100", help="compute capabilities (default 80,90,100)")
    p.add_argument("--variants", default=None, help="launch-table variants, comma-separated (default: all)")
    p.add_argument("--out", default=None, help="write the tables (markdown) here too")
    p.add_argument("--launches", default=None, help="read the captured launches from this JSON file (written "
                   "by --save-launches) instead of capturing them again")
    p.add_argument("--save-launches", default=None, help="write the captured launches here")
    p.add_argument("--jobs", type=int, default=None, help="parallel compiles (default: CPUs, at most 8)")
    p.add_argument("--check", action="store_true", help="exit 1 on compile errors, smem over the arch's limit, "
                   f"more than {SPILL_LIMIT} B of stack, a 16-bit dot kernel without HGMMA (sm_90) / tcgen05 "
                   "(sm_100), or an S-tile kernel of the default sm_90 variant with HGMMA n < 128")
    args = p.parse_args(argv)
    archs = tuple(f"sm{a.strip()}" for a in args.arch.split(","))
    variants = [v.strip() for v in args.variants.split(",")] if args.variants else None
    import triton

    print(f"# Triton {triton.__version__}: every kernel the package launches, compiled for {', '.join(archs)} "
          "(no GPU needed)\n", flush=True)
    if args.launches:
        with open(args.launches) as f:
            launches = json.load(f)
    else:
        launches = capture()
    if args.save_launches:
        with open(args.save_launches, "w") as f:
            json.dump(launches, f)
    print(HEADER, flush=True)
    rows, ok = report(archs, launches, variants=variants, jobs_n=args.jobs)
    table_v = per_variant(rows)
    summ = summary(rows)
    print("\n" + table_v + "\n\n" + summ, flush=True)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(f"# Static Triton kernel report (Triton {triton.__version__})\n\n"
                    f"Regenerate: `TRITON_DEFAULT_FP_FUSION=1 python -m fastcontrast aot --arch {args.arch} --out "
                    f"{args.out}`.\n\n" + LEGEND + "\n\n## Per variant\n\n" + table_v + "\n\n" + summ
                    + "\n\n## Every build\n\n" + HEADER + "\n" + "\n".join(_line(r) for r in rows) + "\n")
        print(f"wrote {os.path.abspath(args.out)}")
    return 0 if ok or not args.check else 1
