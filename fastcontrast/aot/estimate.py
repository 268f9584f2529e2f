"""How many Triton kernels each step of benchmarks/gpu_session.sh compiles on the device, and the check of the
estimates written in the script."""
from __future__ import annotations

import json
import re
from typing import Dict, List

from .build import DEVICE_ARCH, HIDDEN, _merge



# ------------------------------------------------------------------------------------------- session estimate
# The Triton kernels each step of benchmarks/gpu_session.sh launches on the device (sm_90): the capture's tags
# ("workload/detail" prefixes) and which launch-table variants run them ("all": the A/B; "ran": the one in effect).
SESSION_STEPS = {
    "validate": (("validate/fp32", "validate/bf16"), "ran"),  # the session validates fp32 and bf16
    "ab": (("bench/clip_loss/bf16/grad", "bench/siglip_loss/bf16/grad"), "all"),  # the session's --ops
    "bench": (("bench/clip_loss/bf16/grad", "bench/siglip_loss/bf16/grad"), "ran"),
    "resources": (("validate/fp32", "validate/bf16"), "ran"),
    "tests": (("tests/",), "ran"),
    "embed": (("bench/ce_rows/bf16/grad", "bench/matryoshka_ce_rows/bf16/grad"), "ran"),  # sentence-transformers
}
_ESTIMATE = re.compile(r"^# estimate (\w+): (\d+) Triton compiles x ([\d.]+)-([\d.]+) s \+ (\d+) s"
                       r"(?: \+ (\d+) Inductor graphs x ([\d.]+)-([\d.]+) s)? = (\d+)-(\d+) s \(limit (\d+) s\)", re.M)


def step_compiles(launches: List[dict], steps, arch: str = DEVICE_ARCH) -> Dict[str, int]:
    """Triton kernels each of ``steps`` compiles on ``arch``, in order, with one Triton cache for the whole call:
    a kernel an earlier step compiled (same source, signature, constants, alignment, tiles, warps, stages) is a
    cache hit."""
    import torch

    from ..primitives.configs import LAUNCHER_KEYS, VARIANTS, dtype_class, variant

    done, out = set(), {}
    for step in steps:
        tags, which = SESSION_STEPS[step]
        builds = set()
        for lc in _merge([r for r in launches if any(t.startswith(tags) for t in r.get("workloads", []))]):
            dclass = dtype_class({"fp16": torch.float16, "bf16": torch.bfloat16}.get(lc["dtype"], torch.float32))
            names = list(VARIANTS) if which == "all" else (lc["ran"] or [variant(arch)])
            for v in names:
                cfg = VARIANTS[v].get(lc["kernel"], {}).get((arch, dclass))
                if cfg is None:
                    continue
                cfg = {k: x for k, x in cfg.items() if k not in LAUNCHER_KEYS}
                consts = {k: x for k, x in lc["constexprs"].items() if not k.startswith(HIDDEN)}  # the GPU's tiles
                builds.add(json.dumps([lc["module"], lc["kernel"], lc["signature"], consts, lc.get("align"), cfg],
                                      sort_keys=True))
        out[step] = len(builds - done)
        done |= builds
    return out


def check_estimates(launches: List[dict], script: str) -> int:
    """Check the per-step estimates written in ``script`` (lines "# estimate STEP: N Triton compiles x a-b s +
    W s [+ G Inductor graphs x c-d s] = LO-HI s (limit L s)" and the variables T_STEP=L) against the compile
    counts of the launches. Fails (1) when a line's sums do not add up, a limit is not the T_STEP the script
    uses, or, with the counts recomputed, a limit has less than 20 % over its estimate's upper end or the default
    steps' upper ends (with the start) exceed 240 s; a count that changed but still fits is printed as stale
    (update the line), not a failure, so a new test or case does not stop CI while the budget holds."""
    text = open(script).read()
    m = re.search(r'STEPS=\$\{STEPS:-"([^"]+)"\}', text)
    default = m.group(1).split() if m else []
    lines = {e.group(1): e for e in _ESTIMATE.finditer(text)}
    steps = [s for s in default if s in SESSION_STEPS] + [s for s in lines if s not in default and s in SESSION_STEPS]
    counts = step_compiles(launches, [s for s in steps if s in default])  # one call: a shared cache
    counts.update({s: step_compiles(launches, [s])[s] for s in steps if s not in default})  # a call of its own
    ok, total = True, 0
    for step in steps:
        e = lines.get(step)
        if e is None:
            print(f"{step}: {counts[step]} Triton compiles; no estimate line in {script}")
            ok = False
            continue
        problems, hi_now = _check_line(e, counts[step], text)
        total += hi_now if step in default else 0
        ok &= not [p for p in problems if not p.startswith("stale")]
        print(f"{step}: {counts[step]} Triton compiles on {DEVICE_ARCH} (script: {e.group(2)}), estimate "
              f"{e.group(9)}-{e.group(10)} s, limit {e.group(11)} s" + ("" if not problems else ": " + "; ".join(problems)))
    pre = re.search(r"^# estimate start: (\d+) s", text, re.M)
    total += int(pre.group(1)) if pre else 0
    print(f"default steps ({' '.join(default)}) with the start, counts as now: at most {total} s (target 240 s)")
    return 0 if ok and total <= 240 else 1


def _check_line(e, count: int, text: str):
    """(problems, the upper end with ``count`` compiles) of one estimate line."""
    step = e.group(1)
    n, a, b, w = int(e.group(2)), float(e.group(3)), float(e.group(4)), int(e.group(5))
    g, c, d = int(e.group(6) or 0), float(e.group(7) or 0), float(e.group(8) or 0)
    lo, hi, limit = int(e.group(9)), int(e.group(10)), int(e.group(11))
    var = re.search(rf"\bT_{step}=(\d+)", text)
    problems = []
    if (lo, hi) != (round(n * a + w + g * c), round(n * b + w + g * d)):
        problems.append(f"{n} x {a:g}-{b:g} + {w} + {g} x {c:g}-{d:g} is {n * a + w + g * c:.0f}-"
                        f"{n * b + w + g * d:.0f} s, not {lo}-{hi}")
    if var is None or int(var.group(1)) != limit:
        problems.append(f"T_{step} is not {limit}")
    hi_now = round(count * b + w + g * d)
    if limit < 1.2 * hi_now:
        problems.append(f"limit {limit} s has less than 20 % over the upper end {hi_now} s")
    if count != n:
        problems.append(f"stale: the launches give {count} compiles ({round(count * a + w + g * c)}-{hi_now} s), "
                        f"the line says {n}")
    return problems, hi_now
