"""Compiling one captured launch for a GPU without one, and reading the build: registers, stack, shared memory,
matrix instructions, occupancy, loop drains; the checks of ``--check``."""
from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
from typing import Dict, List, Optional, Tuple


SPILL_LIMIT = 512  # every build, aligned or not: unaligned launches get the narrower tiles of configs.UNALIGNED


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
    """(signature, constexprs, attributes) as the captured launch specialises them on a GPU: the arguments in
    its ``align`` (integers divisible by 16, pointers aligned to 16 bytes) get ``tt.divisibility = 16`` and the
    integers equal to 1 are already constants. A launch captured without ``align`` (an older launches file) is
    specialised as at N = 4096, d = 768: every pointer and integer divisible by 16, K = 1 a constant."""
    sig = dict(launch["signature"])
    const = dict(launch["constexprs"])
    if "align" in launch:
        align = set(launch["align"])
        attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names) if n in align}
        return sig, const, attrs
    if "K" in sig and sig["K"] == "i32" and not const.get("MULTI", True):
        sig["K"], const["K"] = "constexpr", 1
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
             if sig.get(n, "").startswith("*") or sig.get(n) == "i32"}
    return sig, const, attrs


def compile_one(launch: dict, arch: str, cfg: dict):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from ..primitives.configs import CC, LAUNCHER_KEYS

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
_PTX_MMA = re.compile(r"^\s*(?:@!?%p\d+\s+)?(wgmma\.mma_async\S*|tcgen05\.mma\S*|mma\.sync\S*)", re.M)
_TCGEN05_SASS = {"f16": "UTCHMMA", "tf32": "UTCHMMA", "f8f6f4": "UTCQMMA", "i8": "UTCIMMA"}


def mma_summary(ptx: str) -> Tuple[str, Optional[int]]:
    """("HGMMA 64x128x16 ×4", n) / ("HMMA 16816 ×32", None) / ("tcgen05 UTCHMMA ×8", None) / ("FFMA", None) /
    ("-", None): the matrix instructions of a build, named as the SASS names them (each PTX ``wgmma``,
    ``mma.sync`` and ``tcgen05.mma`` assembles to one HGMMA, HMMA, UTC*MMA), and for HGMMA the smallest n. Read
    from the PTX: one ``cuobjdump -sass`` less per build (0.4 s of 1.7)."""
    hg, tc, hm = {}, {}, {}
    for m in _PTX_MMA.finditer(ptx):
        op = m.group(1)
        shape = re.search(r"\.m(\d+)n(\d+)k(\d+)", op)
        if op.startswith("wgmma"):
            key = f"{shape.group(1)}x{shape.group(2)}x{shape.group(3)}"
            hg[key] = hg.get(key, 0) + 1
        elif op.startswith("tcgen05"):
            kind = re.search(r"kind::(\w+)", op)
            key = _TCGEN05_SASS.get(kind.group(1) if kind else "", "UTCMMA")
            tc[key] = tc.get(key, 0) + 1
        elif shape:
            key = f"{shape.group(1)}{shape.group(2)}{shape.group(3)}"
            hm[key] = hm.get(key, 0) + 1
    if hg:
        n = min(int(sh.split("x")[1]) for sh in hg)
        return "HGMMA " + ",".join(sorted(hg)) + f" ×{sum(hg.values())}", n
    if tc:
        return "tcgen05 " + ",".join(sorted(tc)) + f" ×{sum(tc.values())}", None
    if hm:
        return "HMMA " + ",".join(sorted(hm)) + f" ×{sum(hm.values())}", None
    if re.search(r"\bfma\.rn(\.ftz)?\.f32\b", ptx):
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
                  "_sigmoid_grad_tile_kernel", "_lse_masked_fwd_kernel", "_masked_grad_tile_kernel",
                  "_matryoshka_fwd_kernel", "_matryoshka_grad_kernel")
NARROW_OK: Dict[str, str] = {  # kernel -> why its default sm_90 tile stays below n = 128
    "_matryoshka_grad_kernel": "each prefix's accumulator stays live across its checkpoint: 128x64 spilled "
                               "352-1,376 B (aot, Triton 3.9), so 64x64",
    "_matryoshka_fwd_kernel": "the first Matryoshka kernels keep the lse kernel's 128x64 baseline tile; no GPU has "
                              "A/B'd a wider one yet",
}


# The workloads built for every requested arch and every launch-table variant (the table); the others are built
# for DEVICE_ARCH alone (the GPU sessions' H100/H200), with the variants that launch them: every variant for the
# bench (the session's A/B runs each), the variant in effect at capture for the rest.
TABLE_WORKLOADS = ("report",)
DEVICE_ARCH = "sm90"
HIDDEN = ("BLOCK", "UPCAST")  # constexprs left out of the spec: tiles (the config column) and the interpreter's


def spec_string(constexprs: dict) -> str:
    """The report's spec: a launch's constexprs (integers specialised to 1 included) but its tiles and
    structural switches, which the config column shows."""
    from ..primitives.configs import _STRUCT

    struct = {k for keys in _STRUCT.values() for k in keys}
    return ",".join(f"{k}={v}" for k, v in sorted(constexprs.items())
                    if not k.startswith(HIDDEN) and k not in struct) or "-"


def unaligned_string(launch: dict) -> str:
    """The integer and pointer arguments of a launch that are not 16-divisible (no ``tt.divisibility``); "?" for
    a launch captured without alignment."""
    if "align" not in launch:
        return "?"
    align = set(launch["align"])
    return ",".join(n for n, t in launch["signature"].items()
                    if t != "constexpr" and t != "u1" and (t.startswith("*") or t[0] in "iu") and n not in align) or "-"


def _merge(launches: List[dict]) -> List[dict]:
    """One record per distinct build input (kernel, dtype, constexprs but the structural switches, alignment),
    with the union of the workloads that made it and of the variants it ran under."""
    from ..primitives.configs import _STRUCT

    struct = {k for keys in _STRUCT.values() for k in keys}
    merged: Dict[str, dict] = {}
    for lc in launches:
        consts = {k: v for k, v in lc["constexprs"].items() if k not in struct}
        key = json.dumps([lc["module"], lc["kernel"], lc["dtype"], lc["signature"], consts, lc.get("align")],
                         sort_keys=True)
        m = merged.setdefault(key, dict(lc, constexprs=consts, workloads=[], ran=[]))
        for w in lc.get("workloads") or ["report"]:
            if w not in m["workloads"]:
                m["workloads"].append(w)
        if lc.get("variant") and lc["variant"] not in m["ran"]:
            m["ran"].append(lc["variant"])
    return list(merged.values())


def _targets(lc: dict, archs, variants) -> Tuple[list, list]:
    """(archs, variants) a merged launch record is built for (see TABLE_WORKLOADS)."""
    wl = lc["workloads"]
    if "align" not in lc or any(w.split("/")[0] in TABLE_WORKLOADS for w in wl):
        return list(archs), list(variants)
    arch = [a for a in archs if a == DEVICE_ARCH]
    if any(w.split("/")[0] == "bench" for w in wl):
        return arch, list(variants)
    return arch, [v for v in variants if v in lc["ran"]] or list(variants)


def _build_jobs(launches: List[dict], archs, variants) -> List[dict]:
    """One job per distinct (kernel, dtype, spec, unaligned arguments, arch, config), the variants sharing it
    and the workloads that launch it listed."""
    import torch

    from ..primitives.configs import ALIGN_ARGS, VARIANTS, dtype_class, table_config

    jobs: Dict[tuple, dict] = {}
    order = lambda d: (d["kernel"], d["dtype"], spec_string(d["constexprs"]), unaligned_string(d))  # noqa: E731
    for lc in sorted(_merge(launches), key=order):
        dclass = dtype_class({"fp16": torch.float16, "bf16": torch.bfloat16}.get(lc["dtype"], torch.float32))
        spec, unal = spec_string(lc["constexprs"]), unaligned_string(lc)
        archs_l, variants_l = _targets(lc, archs, variants)
        for arch in archs_l:
            for name in variants_l:
                table = VARIANTS[name]
                if lc["kernel"] not in table:
                    key = (lc["kernel"], lc["dtype"], spec, unal, "-", "missing")
                    job = jobs.setdefault(key, dict(kernel=lc["kernel"], dtype=lc["dtype"], spec=spec, unaligned=unal,
                                                    arch="-", cfg=None, variants=[], workloads=[], launch=lc))
                else:
                    # the launcher's rule (configs.is_aligned): the row width and strides decide the tile
                    aligned = "align" not in lc or all(a in lc["align"] for a in ALIGN_ARGS.get(lc["kernel"], ())
                                                       if a in lc["signature"] and lc["signature"][a] != "constexpr")
                    cfg = table_config(name, lc["kernel"], arch, dclass, aligned)
                    key = (lc["kernel"], lc["dtype"], spec, unal, arch, json.dumps(cfg, sort_keys=True))
                    job = jobs.setdefault(key, dict(kernel=lc["kernel"], dtype=lc["dtype"], spec=spec, unaligned=unal,
                                                    arch=arch, cfg=dict(cfg), variants=[], workloads=[], launch=lc,
                                                    aligned=aligned))
                if name not in job["variants"]:
                    job["variants"].append(name)
                for w in lc["workloads"]:
                    w = w.split("/")[0]
                    if w not in job["workloads"]:
                        job["workloads"].append(w)
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
    from ..primitives.configs import DEFAULT_VARIANT, SMEM_LIMIT

    row = dict(kernel=job["kernel"], dtype=job["dtype"], variant=job["spec"], unaligned=job.get("unaligned", "?"),
               arch=job["arch"], variants="/".join(job["variants"]), workloads=",".join(sorted(job.get("workloads", []))))
    if job["cfg"] is None:
        row.update(config="-", error="launched but missing from primitives/configs.VARIANTS")
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
        mma, n = mma_summary(k.asm["ptx"])
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
            elif not job.get("aligned", True):
                row["note"] = f"HGMMA n = {n}: an unaligned launch's tile (configs.UNALIGNED: the wide tile spills)"
            else:
                problems.append(f"default sm_90 S tile has HGMMA n = {n} < 128")
        if problems:
            row["error"] = "; ".join(problems)
    except Exception as e:  # noqa: BLE001 - a compile error is a row, and a failure of the check
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
    return row
