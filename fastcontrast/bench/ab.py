"""The launch-table A/B: variants interleaved in rounds, the baseline repeated, identical launches measured once,
and the line for the launch table only when the winner's margin exceeds the measured spread."""
from __future__ import annotations

import math
import statistics
import sys
from typing import Callable, Dict, List, Optional, Tuple

import torch

from .impls import _configs, loss_fn, make_inputs
from .timing import _NAN_ROW, _Sink, _device_name, _free, _progress, _stats, _stream_line, phases, time_ms



# ------------------------------------------------------------------------------------------------ A/B of variants
def launched_kernels(call: Callable[[], object]) -> List[str]:
    """Names of the Triton kernels ``call()`` launches (recorded through :func:`fastcontrast.aot.install_launch_hook`,
    removed again before returning, so timed calls pay nothing)."""
    from ..aot import install_launch_hook

    names: List[str] = []
    remove = install_launch_hook(lambda rec: names.append(rec["kernel"]) if rec["kernel"] not in names else None)
    try:
        call()
    finally:
        remove()
    return names


def variant_groups(variants: List[str], kernels: List[str], arch: str, dtype: torch.dtype) -> List[List[str]]:
    """``variants`` grouped by identical launches: the same resolved launch configuration (tiles, warps, stages,
    register cap, structural and launcher switches) for every kernel in ``kernels`` on ``arch``; such variants
    compile to the same kernels and launch them alike, so one measurement serves the group. Order kept."""
    C = _configs()
    dclass = C.dtype_class(dtype)
    groups: Dict[str, List[str]] = {}
    for v in variants:
        table = C.VARIANTS[v]
        key = repr([(k, sorted(table[k][(arch, dclass)].items())) for k in kernels if k in table])
        groups.setdefault(key, []).append(v)
    return list(groups.values())


REPEAT = "#2"  # suffix of the baseline's second measurement in every round (the A/B's own noise)


def ab_run(sizes: List[int], dim: int, dtype: torch.dtype, dev: torch.device, variants: List[str], ops=("clip_loss",),
           reps: int = 3, rounds: int = 5, log=print, stream_csv: Optional[str] = None, progress: bool = True):
    """The launch-table A/B: for each (op, N), the variants grouped by identical launches (:func:`variant_groups`:
    one measurement per group), then ``rounds`` rounds, each timing every group once in turn and the first
    variant again (its repeat, "<name>#2"): A B C D A A B C D A ... Each turn takes the median of ``reps``
    forward and of ``reps`` forward+backward calls; a row holds min / median / max over the rounds. Rows are
    streamed (CSV, markdown) at the end of each (op, N)."""
    C = _configs()
    arch = C.arch_of(dev) if dev.type == "cuda" else "sm90"  # the interpreter runs the sm_90 variant's switches
    sink = _Sink(stream_csv)
    log(f"# A/B of launch-table variants {', '.join(variants)} on {_device_name(dev)} ({arch}); dtype "
        f"{str(dtype).replace('torch.', '')}; d = {dim}; {rounds} rounds of {reps} calls per variant and phase")
    log("| op | N | impl | fwd ms (min/med/max) | fwd+bwd ms (min/med/max) | peak extra MiB | floor ms | note |\n"
        "|---|---|---|---|---|---|---|---|")
    rows: List[dict] = []
    work = [(op, n) for op in ops for n in sizes]
    for i, (op, n) in enumerate(work):
        if progress:
            _progress(i, len(work), f"A/B {op} N={n}")
        _free(dev)
        inputs = make_inputs(op, n, dim, dev, dtype)
        fwd, fwd_bwd = phases(loss_fn(op, "triton"), inputs)

        base_row = {"op": op, "n": n, "d": dim, "floor_ms": float("nan"), "bound": ""}
        try:
            C.set_variant(variants[0])
            kernels = launched_kernels(fwd_bwd)  # also the first variant's warm-up
            groups = variant_groups(variants, kernels, arch, dtype)
            order = [g[0] for g in groups] + [variants[0] + REPEAT]
            samples = {v: {"fwd": [], "fwd_bwd": []} for v in order}
            for v in order[1:-1]:  # warm-up (compile) of the other groups
                C.set_variant(v)
                fwd_bwd()
            for _ in range(rounds):
                for v in order:
                    C.set_variant(v.replace(REPEAT, ""))
                    samples[v]["fwd"].append(statistics.median(time_ms(fwd, dev, warmup=1, reps=reps)))
                    samples[v]["fwd_bwd"].append(statistics.median(time_ms(fwd_bwd, dev, warmup=0, reps=reps)))
            out = []
            for g in groups + [[variants[0] + REPEAT]]:
                r = dict(base_row, impl=f"fastcontrast[triton:{g[0]}]", peak_mib=float("nan"),
                         **_stats("fwd", samples[g[0]]["fwd"]), **_stats("fwd_bwd", samples[g[0]]["fwd_bwd"]))
                notes = [f"same launches as {g[0]} (measured once)" for _ in g[1:]][:1]
                if g[0].endswith(REPEAT):
                    notes = [f"{variants[0]} again, last in each round (the A/B's noise)"]
                for v in g:
                    rv = dict(r, impl=f"fastcontrast[triton:{v}]",
                              note="; ".join([f"same launches as {g[0]} (measured once)"] if v != g[0] else
                                             notes[:1] if g[0].endswith(REPEAT) else
                                             ([f"measured once for {'/'.join(g)}"] if len(g) > 1 else [])))
                    out.append(rv)
        except Exception as e:  # noqa: BLE001 - a failed (op, N) is a row per variant
            msg = f"FAILED {type(e).__name__}: {str(e)[:100]}"
            out = [dict(base_row, impl=f"fastcontrast[triton:{v}]", note=msg, failed=True, **_NAN_ROW)
                   for v in variants]
        finally:
            C.set_variant(None)
        for r in out:
            rows.append(r)
            log(_stream_line(r))
            sink.write(r)
        sys.stdout.flush()
    sink.close()
    if progress:
        _progress(len(work), len(work), "done")
    return rows


def _variant_of(impl: str) -> str:
    return impl[len("fastcontrast[triton:"):-1]


def ab_verdict(rows) -> Tuple[Optional[str], str]:
    """(winner or None, the verdict line). Each variant's score is the geometric mean over the (op, N) rows of
    its median fwd+bwd; the runner-up is the best variant whose launches differ from the winner's somewhere.
    The noise of a row is the largest of: the winner's and the runner-up's (max − min) / median over the rounds,
    and |first variant − its repeat| / first variant; the spread is the median of the rows' noise. The winner is
    named only when its margin over the runner-up exceeds that spread."""
    by: Dict[tuple, Dict[str, dict]] = {}
    for r in rows:
        if r["impl"].startswith("fastcontrast[triton:"):
            by.setdefault((r["op"], r["n"]), {})[_variant_of(r["impl"])] = r
    names = [v for v in dict.fromkeys(_variant_of(r["impl"]) for r in rows if r["impl"].startswith("fastcontrast[triton:"))
             if not v.endswith(REPEAT)]
    ok = {v: [per[v]["fwd_bwd_ms"] for per in by.values() if v in per] for v in names}
    score = {v: math.exp(sum(math.log(t) for t in ts) / len(ts)) for v, ts in ok.items()
             if ts and len(ts) == len(by) and all(t == t and t > 0 for t in ts)}
    if not score:
        return None, "no variant ran every row: nothing to paste"
    ranked = sorted(score, key=score.get)
    win = ranked[0]
    same = lambda a, b: all(per.get(a, {}).get("fwd_bwd_ms") == per.get(b, {}).get("fwd_bwd_ms")  # noqa: E731
                            for per in by.values())
    rivals = [v for v in ranked[1:] if not same(v, win)]
    means = ", ".join(f"{v} {score[v]:.3f} ms" for v in ranked)
    if not rivals:
        return None, f"Geometric mean fwd+bwd: {means}. Every variant launched the same kernels: nothing to choose"
    run_up = rivals[0]
    margin = score[run_up] / score[win] - 1
    noise = []
    for per in by.values():
        rel = [(per[v]["fwd_bwd_max_ms"] - per[v]["fwd_bwd_min_ms"]) / per[v]["fwd_bwd_ms"] for v in (win, run_up)]
        first = names[0]
        if first in per and first + REPEAT in per:
            a, b = per[first]["fwd_bwd_ms"], per[first + REPEAT]["fwd_bwd_ms"]
            rel.append(abs(a - b) / a)
        noise.append(max(rel))
    spread = statistics.median(noise)
    head = (f"Geometric mean fwd+bwd over the rows: {means}. Winner {win}, {100 * margin:.1f}% ahead of {run_up}; "
            f"measured spread {100 * spread:.1f}% (median over the rows of the larger of the two variants' "
            f"(max - min) / median over the rounds and the repeat's difference)")
    if margin > spread:
        return win, head
    return None, head + ": the margin does not exceed the spread, nothing to paste"


def ab_table(rows, arch: str) -> str:
    """The launch-table A/B: fwd+bwd median (min-max over the rounds) per variant for every (op, N), the ratio
    to the first variant, the best; variants that launch the same kernels are labelled so (one measurement);
    then :func:`ab_verdict` and, only when the margin exceeds the spread, the line to paste into the launch
    table's DEFAULT_VARIANT."""
    ab = [r for r in rows if r["impl"].startswith("fastcontrast[triton:")]
    if not ab:
        return "no A/B rows"
    names = list(dict.fromkeys(_variant_of(r["impl"]) for r in ab))
    by: Dict[tuple, Dict[str, dict]] = {}
    for r in ab:
        by.setdefault((r["op"], r["n"]), {})[_variant_of(r["impl"])] = r
    lines = ["| arch | op | N | " + " | ".join(f"{v} fwd+bwd ms [min-max] (fwd)" for v in names) + " | best |",
             "|" + "---|" * (len(names) + 4)]
    for (op, n), per in by.items():
        base = per.get(names[0], {}).get("fwd_bwd_ms", float("nan"))
        cells, best = [], None
        for v in names:
            r = per.get(v)
            t = r["fwd_bwd_ms"] if r else float("nan")
            note = (r or {}).get("note", "")
            if r and t == t:
                if not v.endswith(REPEAT) and (best is None or t < per[best]["fwd_bwd_ms"]):
                    best = v
                ratio = f" ×{base / t:.2f}" if base == base and v != names[0] else ""
                same = f" = {note.split('same launches as ')[1].split(' ')[0]} (same build)" \
                    if "same launches as" in note else ""
                cells.append(f"{t:.3f} [{r['fwd_bwd_min_ms']:.3f}-{r['fwd_bwd_max_ms']:.3f}]{ratio} "
                             f"({r['fwd_ms']:.3f}){same}")
            else:
                cells.append(f"- ({note or 'not run'})")
        lines.append(f"| {arch} | {op} | {n} | " + " | ".join(cells) + f" | {best or '-'} |")
    win, verdict = ab_verdict(rows)
    lines.append("\n" + verdict)
    if win is not None:
        C = _configs()
        path = C.__name__.replace(".", "/") + ".py"
        lines.append(f"Paste into {path}: DEFAULT_VARIANT[{arch!r}] = {win!r}")
    return "\n".join(lines)
