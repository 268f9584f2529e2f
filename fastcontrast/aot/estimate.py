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
    "validate": (("validate/",), "ran"),
    "ab": (("bench/clip/bf16/grad", "bench/siglip/bf16/grad"), "all"),
    "bench": (("bench/clip/bf16/grad", "bench/siglip/bf16/grad"), "ran"),
    "resources": (("validate/",), "ran"),
    "tests": (("tests/",), "ran"),
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
    """Compare the per-step estimates written in ``script`` (lines "# estimate STEP: N Triton compiles x a-b s +
    W s [+ G Inductor graphs x c-d s] = LO-HI s (limit L s)" and the variables T_STEP=L) with the compile counts
    of the launches: the counts must match, the sums add up, each limit must exceed its estimate's upper end by
    20 %, and the default steps' upper ends must add up to at most 240 s."""
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
        n, a, b, w = int(e.group(2)), float(e.group(3)), float(e.group(4)), int(e.group(5))
        g, c, d = int(e.group(6) or 0), float(e.group(7) or 0), float(e.group(8) or 0)
        lo, hi, limit = int(e.group(9)), int(e.group(10)), int(e.group(11))
        var = re.search(rf"\bT_{step}=(\d+)", text)
        problems = []
        if n != counts[step]:
            problems.append(f"the launches give {counts[step]} compiles, the script says {n}")
        if (lo, hi) != (round(n * a + w + g * c), round(n * b + w + g * d)):
            problems.append(f"{n} x {a:g}-{b:g} + {w} + {g} x {c:g}-{d:g} is {n * a + w + g * c:.0f}-"
                            f"{n * b + w + g * d:.0f} s, not {lo}-{hi}")
        if limit < 1.2 * hi:
            problems.append(f"limit {limit} s has less than 20 % over {hi} s")
        if var is None or int(var.group(1)) != limit:
            problems.append(f"T_{step} is not {limit}")
        if step in default:
            total += hi
        print(f"{step}: {counts[step]} Triton compiles on {DEVICE_ARCH} (script: {n}), {lo}-{hi} s, limit {limit} s"
              + ("" if not problems else ": " + "; ".join(problems)))
        ok &= not problems
    pre = re.search(r"^# estimate start: (\d+) s", text, re.M)
    total += int(pre.group(1)) if pre else 0
    print(f"default steps ({' '.join(default)}) with the start: at most {total} s (target 240 s)")
    return 0 if ok and total <= 240 else 1
