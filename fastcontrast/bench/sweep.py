"""The sweep: every implementation of every op at every size, one row each, streamed; the final table."""
from __future__ import annotations

import csv
import os
import sys
from typing import Dict, List, Optional

import torch

from .. import oplist
from .impls import IMPL_BY_NAME, OPS, Unavailable, bytes_floor, candidates, describe, flops, make_inputs
from .timing import (SPREAD_FLAG, _NAN_ROW, _Sink, _device_name, _flags, _free, _is_oom, _leaves, _progress,
                     _stream_line, copy_gbps, matmul_tflops, measure)



def run(sizes: List[int], dim: int, dtype: torch.dtype, dev: torch.device, out_dir: Optional[str] = None,
        with_compile: bool = True, reps: int = 7, ops=OPS, impls: Optional[List[str]] = None, log=print,
        progress: bool = True, variants: Optional[List[str]] = None, explain_missing: bool = False,
        stream_csv: Optional[str] = None, compile_max: Optional[int] = None, stream: bool = False,
        budget_s: float = 2.0, rounds: int = 5):
    """The sweep. ``stream``: print each row as a markdown line the moment it is measured; ``stream_csv``: append
    it to this CSV (header first), flushed, so a run stopped at any point keeps every row measured so far.
    ``compile_max``: the torch.compile'd baselines only up to this N (default: every size). ``budget_s``: seconds
    per phase of a row after which it stops at 3 repetitions. ``variants``: the launch-table A/B instead
    (:func:`ab_run`, ``rounds`` rounds). Rows carry ``failed`` when an implementation raised anything but
    "unavailable here" or out-of-memory."""
    benchable = oplist.benchable_ops()
    unknown = [op for op in ops if op not in benchable]
    if unknown:
        raise ValueError(f"ops: unknown or without bench inputs {unknown}; the benched ops of fastcontrast.oplist "
                         f"are {', '.join(benchable)}")
    if variants:
        from .ab import ab_run

        return ab_run(sizes, dim, dtype, dev, variants, ops=ops, reps=reps, rounds=rounds, log=log,
                      stream_csv=stream_csv, progress=progress)
    sink = _Sink(stream_csv)
    peak = matmul_tflops(dev, dtype)
    bw = copy_gbps(dev)
    log(f"# device: {_device_name(dev)}; dtype {str(dtype).replace('torch.', '')}; d = {dim}; "
        f"measured matmul {peak:.1f} TFLOP/s, copy {bw:.0f} GB/s (read + write); {reps} repetitions per row "
        f"(at least 3 past {budget_s:g} s per phase)")
    if stream:
        log("| op | N | impl | fwd ms (min/med/max) | fwd+bwd ms (min/med/max) | peak extra MiB | floor ms | note |\n"
            "|---|---|---|---|---|---|---|---|")
    rows = []
    cand_kw = dict(with_compile=with_compile, explain_missing=explain_missing, dtype=dtype)
    work = [(op, n, name) for op in ops for n in sizes for name in candidates(op, dev, **cand_kw)  # lazy
            if (not impls or any(k in name for k in impls))
            and not (compile_max is not None and n > compile_max and "compiled" in name)]
    cands, inputs, key, oom_at = {}, {}, None, {}
    for i, (op, n, name) in enumerate(work):
        if progress:
            _progress(i, len(work), f"{op} N={n} {name}")
        if op not in cands:
            cands = {op: candidates(op, dev, **cand_kw)}
        if key != (op, n):
            inputs = {}
            _free(dev)
            key, inputs = (op, n), make_inputs(op, n, dim, dev, dtype)
        row = _row(op, n, dim, name, cands[op][name], inputs, dev, reps, budget_s, oom_at)
        elt = torch.finfo(dtype).bits // 8
        t_flop, t_byte = flops(op, n, dim) / (peak * 1e12), bytes_floor(op, n, dim, elt) / (bw * 1e9)
        row["floor_ms"], row["bound"] = max(t_flop, t_byte) * 1e3, "compute" if t_flop > t_byte else "memory"
        rows.append(row)
        if stream:
            log(_stream_line(row))
            sys.stdout.flush()
        sink.write(row)
    sink.close()
    if progress:
        _progress(len(work), len(work), "done")
    _ratios(rows)
    _write_tables(rows, out_dir, log)
    return rows


def _row(op, n, dim, name, fn, inputs, dev, reps, budget_s, oom_at) -> dict:
    """One implementation at one size: its measured row, or a row whose note says why not (OOM, unavailable,
    FAILED; ``oom_at`` remembers where each implementation ran out of memory, and larger sizes are not tried)."""
    impl = IMPL_BY_NAME.get(name)
    row = {"op": op, "n": n, "d": dim, "impl": name}
    try:
        if (op, name) in oom_at and oom_at[(op, name)] < n:
            raise torch.cuda.OutOfMemoryError(f"out of memory at N = {oom_at[(op, name)]}: not tried")
        m = measure(fn, inputs, dev, reps, budget_s, grads_in_forward=bool(impl and impl.grads_in_forward))
        notes = m.pop("_notes")
        row.update(m)
        notes += _flags(row)
        if dev.type == "cpu" and "compiled" in name:
            # the CPU tracker is a dispatch mode, under which the compiled graph is not what runs
            row["peak_mib"] = float("nan")
            notes.append("CPU peak not measurable for compiled graphs")
        if notes:
            row["note"] = "; ".join(notes)
    except Exception as e:  # noqa: BLE001 - every outcome is a row
        row.update(_NAN_ROW)
        if _is_oom(e):
            oom_at.setdefault((op, name), n)
            row["note"] = "OOM" + ("" if oom_at[(op, name)] == n else f" (at N = {oom_at[(op, name)]}, not tried)")
        elif isinstance(e, Unavailable):
            row["note"] = str(e)
        else:
            row["note"], row["failed"] = f"FAILED {type(e).__name__}: {str(e)[:100]}", True
        for t in _leaves(inputs):
            t.grad = None
        _free(dev)
    return row


def _write_tables(rows, out_dir, log) -> None:
    """The final table and legend to ``log``; with ``out_dir``, bench.csv, bench.md and bench.png there too."""
    table = to_markdown(rows)
    log(table)
    log(legend(rows))
    if not out_dir:
        return
    out_dir = os.path.abspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "bench.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=sorted({k for r in rows for k in r}))
        w.writeheader()
        w.writerows(rows)
    with open(os.path.join(out_dir, "bench.md"), "w") as f:
        f.write(table + "\n\n" + legend(rows) + "\n")
    png = plot(rows, os.path.join(out_dir, "bench.png"))
    log(f"\nwrote {out_dir}/bench.csv, bench.md" + (", bench.png" if png else "")
        + ("" if png else "\nno bench.png: matplotlib is not installed (pip install matplotlib, or "
                          "pip install 'fastcontrast[bench]')"))


def legend(rows) -> str:
    names = list(dict.fromkeys(r["impl"] for r in rows))
    lines = ["Implementations:"] + [f"- {n}: {describe(n)}" for n in names]
    lines.append("Timing: fwd = the training forward (autograd recording, as in a training step; output dropped); "
                 "fwd+bwd = forward and .backward(), the last gradients dropped first; CUDA events around each call "
                 "after warm-up calls that compile (torch.compile graphs and Triton kernels are built there, not "
                 "timed). Times: min / median / max of the repetitions (ms). Peak extra MiB: memory allocated "
                 "beyond the inputs during forward+backward, gradients included.")
    lines.append(f"Flagged: spread max/min > {SPREAD_FLAG}, or forward slower than forward+backward (a busy machine: "
                 "rerun before quoting). OOM: out of GPU memory (larger sizes of that implementation not tried).")
    lines.append("× base: the op's eager baseline's fwd+bwd time over the row's (open_clip's loss when installed, "
                 "else the float32 reference); × compiled: the same against its torch.compile'd baseline.")
    lines.append("floor: max(FLOPs / measured matmul rate, bytes / measured copy rate) of forward+backward.")
    return "\n".join(lines)


def _base_of(impls: Dict[str, dict], compiled: bool) -> Optional[dict]:
    """The op's baseline row at one N: open_clip's loss (eager or compiled) when it ran, else the reference."""
    for r in impls.values():
        name = r["impl"]
        if name.startswith("open_clip") and name.endswith("(compiled)") == compiled and r["fwd_bwd_ms"] == r["fwd_bwd_ms"]:
            return r
    ref = impls.get("reference fp32 (compiled)" if compiled else "reference fp32 (eager)")
    return ref if ref and ref["fwd_bwd_ms"] == ref["fwd_bwd_ms"] else None


def _ratios(rows):
    by_n: Dict[tuple, Dict[str, dict]] = {}
    for r in rows:
        by_n.setdefault((r["op"], r["n"]), {})[r["impl"]] = r
    for impls in by_n.values():
        for key, compiled in (("speedup_vs_base", False), ("speedup_vs_compiled", True)):
            base = _base_of(impls, compiled)
            for r in impls.values():
                if base is not None and r["fwd_bwd_ms"] == r["fwd_bwd_ms"]:
                    r[key] = base["fwd_bwd_ms"] / r["fwd_bwd_ms"]
                    if not compiled:
                        r["base"] = base["impl"]
                        r["mem_vs_base"] = (r["peak_mib"] / base["peak_mib"] if base["peak_mib"]
                                            and base["peak_mib"] == base["peak_mib"] else float("nan"))


TABLE_HEADER = ("| op | N | impl | fwd ms (min/med/max) | fwd+bwd ms (min/med/max) | × base | × compiled | "
                "peak extra MiB | mem / base | floor ms | floor / time | note |")


def to_markdown(rows) -> str:
    lines = [TABLE_HEADER, "|" + "---|" * 12]
    for r in rows:
        pct = 100 * r["floor_ms"] / r["fwd_bwd_ms"] if r["fwd_bwd_ms"] == r["fwd_bwd_ms"] else float("nan")
        lines.append(
            f"| {r['op']} | {r['n']} | {r['impl']} | {r['fwd_min_ms']:.3f} / {r['fwd_ms']:.3f} / {r['fwd_max_ms']:.3f} | "
            f"{r['fwd_bwd_min_ms']:.3f} / {r['fwd_bwd_ms']:.3f} / {r['fwd_bwd_max_ms']:.3f} | "
            f"{r.get('speedup_vs_base', float('nan')):.2f} | {r.get('speedup_vs_compiled', float('nan')):.2f} | "
            f"{r['peak_mib']:.1f} | {r.get('mem_vs_base', float('nan')):.3f} | {r['floor_ms']:.3f} | {pct:.0f}% | "
            f"{r.get('note', '')} |")
    bases = {(r["op"], r["base"]) for r in rows if r.get("base")}
    if bases:
        lines.append("\nbase: " + "; ".join(f"{op}: {b}" for op, b in sorted(bases)))
    return "\n".join(lines)


def plot(rows, path) -> bool:
    """Time and memory against N per op; False (nothing written) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:  # noqa: BLE001
        return False
    ops = list(dict.fromkeys(r["op"] for r in rows))
    fig, axes = plt.subplots(len(ops), 2, figsize=(11, 3.6 * len(ops)), squeeze=False)
    for (a1, a2), op in zip(axes, ops):
        sub = [r for r in rows if r["op"] == op]
        for impl in dict.fromkeys(r["impl"] for r in sub):
            pts = [(r["n"], r["fwd_bwd_ms"], r["fwd_bwd_min_ms"], r["fwd_bwd_max_ms"], r["peak_mib"]) for r in sub
                   if r["impl"] == impl and r["fwd_bwd_ms"] == r["fwd_bwd_ms"]]
            if pts:
                xs = [p[0] for p in pts]
                a1.errorbar(xs, [p[1] for p in pts], yerr=[[p[1] - p[2] for p in pts], [p[3] - p[1] for p in pts]],
                            fmt="o-", capsize=3, label=impl)
                a2.plot(xs, [max(p[4], 1e-3) if p[4] == p[4] else float("nan") for p in pts], "o-", label=impl)
        for ax in (a1, a2):
            ax.set_xscale("log")
            ax.set_yscale("log")
        a1.set(xlabel="batch N", ylabel="fwd+bwd ms (median, min–max)", title=f"{op}: time")
        a2.set(xlabel="batch N", ylabel="peak extra memory (MiB)", title=f"{op}: memory")
        a1.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
