"""Building every job (in parallel) and writing the report's tables."""
from __future__ import annotations

import os
import sys
from typing import Dict, List, Optional, Tuple

from .build import S_TILE_KERNELS, SPILL_LIMIT, _build_jobs, build_row
from .launches import capture



def report(archs=("sm80", "sm90", "sm100"), launches: Optional[List[dict]] = None, log=print, variants=None,
           jobs_n: Optional[int] = None) -> Tuple[List[dict], bool]:
    """Build every (launch, arch, distinct config over ``variants``) and return (rows, all checks passed);
    each row is logged (and flushed) as soon as it is built. ``jobs_n`` parallel compiles (default: CPUs)."""
    from ..primitives.configs import VARIANTS

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


HEADER = ("| kernel | dtype | spec | unaligned | arch | config | variants | regs | stack B | smem B | stages | "
          "smem stages | MMA | CTAs/SM (limit) | loop drains copy/MMA | launched by | result |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def _line(r: dict) -> str:
    def g(k):
        v = r.get(k)
        return "-" if v is None else str(v)

    result = r.get("error", r.get("note", "ok"))
    return (f"| {r['kernel']} | {r['dtype']} | {r.get('variant', '')} | {r.get('unaligned', '?')} | {r['arch']} | "
            f"{r['config']} | {r.get('variants', '')} | {g('regs')} | {g('stack')} | {g('smem')} | {g('stages')} | "
            f"{g('smem_stages')} | {g('mma')} | {g('ctas')} | {g('drains')} | {r.get('workloads') or '-'} | {result} |")


def parse_table(path: str) -> List[dict]:
    """The rows of a report written by ``--out`` (the columns of HEADER; numbers left as text)."""
    cols = ["kernel", "dtype", "spec", "unaligned", "arch", "config", "variants", "regs", "stack", "smem", "stages",
            "smem_stages", "mma", "ctas", "drains", "workloads", "result"]
    rows = []
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError:
        return rows
    for line in lines:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == len(cols) and cells[0].startswith("_"):
            rows.append(dict(zip(cols, cells)))
    return rows


def per_variant(rows: List[dict]) -> str:
    """One line per (variant, arch): builds, most registers, fewest CTAs/SM, smallest HGMMA n of the 16-bit
    S-tile kernels, forward loop drains, flagged rows."""
    from ..primitives.configs import DEFAULT_VARIANT, VARIANTS

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


def classes(rows: List[dict]) -> str:
    """Builds per workload (a build launched by several counts in each) and per arch."""
    per: Dict[str, int] = {}
    for r in rows:
        for w in (r.get("workloads") or "-").split(","):
            per[w] = per.get(w, 0) + 1
    arch: Dict[str, int] = {}
    for r in rows:
        arch[r["arch"]] = arch.get(r["arch"], 0) + 1
    return ("Builds per workload: " + ", ".join(f"{k} {v}" for k, v in sorted(per.items())) + "; per arch: "
            + ", ".join(f"{k} {v}" for k, v in sorted(arch.items())) + ".")


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
    "Columns: spec = the launch's constexprs (integer arguments equal to 1 included: Triton makes them "
    "constants); unaligned = its integer and pointer arguments that are not 16-divisible (no tt.divisibility; "
    "'-': every one is, as at N = 4096, d = 768); config = tile (M×N×K), warps, stages, register cap (r), and "
    "the structural switches (FLAT: one tile×K loop; COL_SPLIT: column-split forward grid; G8: grouped program "
    "order); variants = the launch-table variants that use this build; regs per thread; stack frame (spills); "
    "shared memory per block; how many K-chunks of A and B the shared memory holds (>= 2: the GEMM loop is "
    "pipelined); MMA = the matrix instructions, read from the PTX and named as the SASS names them (HGMMA m×n×k "
    "on sm_90, tcgen05 UTCHMMA on sm_100, HMMA on sm_80, FFMA: no tensor cores); CTAs/SM from registers "
    "(256-register units per warp, 65,536 per SM) and shared memory (+1 KB per CTA); loop drains = full copy "
    "drains (async_wait num = 0) / full MMA waits (warp_group_dot_wait pendings = 0) inside loops of the ttgir; "
    "launched by = the workloads whose launches this build serves. Builds are specialised as the captured launch "
    "is on a GPU. The table's launches (report) are built for every arch and variant; the others for sm_90 with "
    "the variants that launch them. Checks: smem <= 166,912 B (sm_80), 232,448 B (sm_90, sm_100); stack <= "
    "512 B, aligned or not (an unaligned launch gets the narrower tile of primitives.configs.UNALIGNED, as the "
    "launcher does); every bf16/fp16 dot kernel HGMMA "
    "on sm_90 and tcgen05 on sm_100; every S-tile kernel of the default sm_90 variant HGMMA n >= 128 (an "
    "unaligned launch's narrower tile is noted).")
